"""ms_nsa: NSA selected attention for MindSpore (TND layout, varlen batches, grouped KV heads).

    attention_out, softmax_max, softmax_sum = ms_nsa.nsa_select_attention(query, key, value, topk_indices,
        scale_value, head_num, select_block_size, select_block_count, *, atten_mask=None,
        actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0)
    dq, dk, dv = ms_nsa.nsa_select_attention_grad(grad, query, key, value, attention_out, softmax_max,
        softmax_sum, topk_indices, ...)
    cell = ms_nsa.nn.NsaSelectAttention(head_num, select_block_size, select_block_count)
    ms_nsa.check_inputs(query, key, value, topk_indices, ...)   # the op's checks, without running it
    ms_nsa.reference.forward(...), ms_nsa.reference.backward(...)   # float64 NumPy

See docs/usage.md.
"""
from . import nn, reference
from ._cpu_kernels import get_num_threads, set_num_threads
from .functional import check_inputs, nsa_select_attention, nsa_select_attention_grad

__all__ = ["nsa_select_attention", "nsa_select_attention_grad", "check_inputs", "nn", "reference",
           "set_num_threads", "get_num_threads"]
__version__ = "0.1.0"
