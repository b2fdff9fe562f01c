"""Cells that put the functional API inside a compiled graph (in GRAPH_MODE they are compiled;
in PyNative they run eagerly), so one test body covers both modes."""
import ms_nsa
from mindspore import nn


class Forward(nn.Cell):
    def __init__(self, scale_value, head_num, select_block_size, select_block_count, sparse_mode=0):
        super().__init__()
        self.args = (scale_value, head_num, select_block_size, select_block_count)
        self.sparse_mode = sparse_mode

    def construct(self, query, key, value, topk_indices, actual_seq_qlen=None, actual_seq_kvlen=None,
                  atten_mask=None):
        return ms_nsa.nsa_select_attention(query, key, value, topk_indices, *self.args, atten_mask=atten_mask,
                                           actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
                                           sparse_mode=self.sparse_mode)


class Backward(nn.Cell):
    def __init__(self, scale_value, head_num, select_block_size, select_block_count, sparse_mode=0):
        super().__init__()
        self.args = (scale_value, head_num, select_block_size, select_block_count)
        self.sparse_mode = sparse_mode

    def construct(self, grad, query, key, value, attention_out, softmax_max, softmax_sum, topk_indices,
                  actual_seq_qlen=None, actual_seq_kvlen=None, atten_mask=None):
        return ms_nsa.nsa_select_attention_grad(grad, query, key, value, attention_out, softmax_max,
                                                softmax_sum, topk_indices, *self.args, atten_mask=atten_mask,
                                                actual_seq_qlen=actual_seq_qlen,
                                                actual_seq_kvlen=actual_seq_kvlen, sparse_mode=self.sparse_mode)
