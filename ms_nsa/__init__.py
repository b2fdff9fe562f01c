"""ms_nsa: NSA selected attention for MindSpore (TND layout, varlen batches, grouped KV heads).

    attention_out, softmax_max, softmax_sum = ms_nsa.nsa_select_attention(query, key, value, topk_indices,
        scale_value, head_num, select_block_size, select_block_count, *, atten_mask=None,
        actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0)
    dq, dk, dv = ms_nsa.nsa_select_attention_grad(grad, query, key, value, attention_out, softmax_max,
        softmax_sum, topk_indices, ...)
    cell = ms_nsa.nn.NsaSelectAttention(head_num, select_block_size, select_block_count)
    ms_nsa.check_inputs(query, key, value, topk_indices, ...)   # the op's checks, without running it
    ms_nsa.reference.forward(...), ms_nsa.reference.backward(...)   # float64 NumPy

    compressed = ms_nsa.nsa_compress(input, weight, compress_block_size, compress_stride, *, actual_seq_len=None)
    attention_out, topk_indices, softmax_max, softmax_sum = ms_nsa.nsa_compress_attention(query, key, value,
        scale_value, head_num, compress_block_size, compress_stride, select_block_size, select_block_count, ...)
    attention_out, softmax_max, softmax_sum = ms_nsa.nsa_window_attention(query, key, value, scale_value,
        head_num, window_size, *, actual_seq_len=None)     # causal sliding window, packed sequences

See docs/usage.md.
"""
from . import nn, reference
from ._cpu_kernels import get_num_threads, set_num_threads
from .functional import check_inputs, nsa_select_attention, nsa_select_attention_grad
from .compress import nsa_compress, nsa_compress_grad
from .compress_attention import nsa_compress_attention, nsa_compress_attention_grad
from .window import nsa_window_attention, nsa_window_attention_grad

__all__ = ["nsa_select_attention", "nsa_select_attention_grad", "check_inputs", "nsa_compress", "nsa_compress_grad",
           "nsa_compress_attention", "nsa_compress_attention_grad", "nsa_window_attention",
           "nsa_window_attention_grad", "nn", "reference", "set_num_threads",
           "get_num_threads"]
__version__ = "0.1.0"
