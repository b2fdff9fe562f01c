"""`nn.Cell` faces: `ms_nsa.nn.NsaSelectAttention` and `ms_nsa.nn.NsaWindowAttention` (the ops),
`ms_nsa.nn.NativeSparseAttention` (the NSA layer on the fused ops) and
`ms_nsa.nn.EqualBlocksNativeSparseAttention` (the earlier stock-op layer: baseline, and the layer that
runs on Ascend today)."""
from __future__ import annotations

from mindspore import nn

from . import _backend
from .functional import nsa_select_attention
from .op_def import FORWARD, load_op_def
from .window import NsaWindowAttention  # noqa: F401  (re-exported)


class NsaSelectAttention(nn.Cell):
    r"""NSA selected attention as a Cell: returns attention_out [T1, N1, Dv].

    Args:
        head_num (int): N1, the number of query heads.
        select_block_size (int): keys per selected block (16..128, a multiple of 16).
        select_block_count (int): selected blocks per query row (1..32).
        scale_value (float, optional): score scale; None means D ** -0.5 with D the query head dim.
        sparse_mode (int): 0 (no mask) or 2 (causal within each batch).

    Inputs:
        query [T1, N1, D], key [T2, N2, D], value [T2, N2, Dv], topk_indices [T1, N2, C] int32, and
        optionally actual_seq_qlen / actual_seq_kvlen (cumulative lengths, tuple or 1-D int Tensor)
        and atten_mask (reserved, as in the function: checked, never read).

    Gradients reach query, key and value through the op's registered bprop (the gradient kernel).

    Examples:
        >>> import numpy as np, mindspore as ms, ms_nsa
        >>> attn = ms_nsa.nn.NsaSelectAttention(head_num=4, select_block_size=16, select_block_count=2,
        ...                                     sparse_mode=2)
        >>> query = ms.Tensor(np.random.randn(48, 4, 32).astype(np.float32))
        >>> key = value = ms.Tensor(np.random.randn(96, 2, 32).astype(np.float32))
        >>> topk = ms.Tensor(np.tile(np.arange(2, dtype=np.int32), (48, 2, 1)))   # blocks 0 and 1
        >>> attn(query, key, value, topk, (16, 16 + 32), (32, 32 + 64)).shape   # 2 batches: 16 + 32 rows
        (48, 4, 32)
    """

    def __init__(self, head_num, select_block_size, select_block_count, scale_value=None, sparse_mode=0):
        super().__init__()
        attrs = dict(head_num=head_num, select_block_size=select_block_size,
                     select_block_count=select_block_count, sparse_mode=sparse_mode)
        if scale_value is not None:
            attrs["scale_value"] = scale_value
        load_op_def(FORWARD).check_attrs(attrs, _backend.name())
        self.head_num = head_num
        self.select_block_size = select_block_size
        self.select_block_count = select_block_count
        self.scale_value = None if scale_value is None else float(scale_value)
        self.sparse_mode = sparse_mode

    def construct(self, query, key, value, topk_indices, actual_seq_qlen=None, actual_seq_kvlen=None,
                  atten_mask=None):
        scale_value = self.scale_value
        if scale_value is None:
            scale_value = query.shape[-1] ** -0.5
        return nsa_select_attention(
            query, key, value, topk_indices, scale_value, self.head_num, self.select_block_size,
            self.select_block_count, atten_mask=atten_mask, actual_seq_qlen=actual_seq_qlen,
            actual_seq_kvlen=actual_seq_kvlen, sparse_mode=self.sparse_mode)[0]

    def extend_repr(self):
        return (f"head_num={self.head_num}, select_block_size={self.select_block_size}, "
                f"select_block_count={self.select_block_count}, scale_value={self.scale_value}, "
                f"sparse_mode={self.sparse_mode}")


# The NSA layers live in their own modules; the equal-blocks one builds on NsaSelectAttention above
# (imported last because it imports NsaSelectAttention from here).
from .nsa_layer import NativeSparseAttention  # noqa: E402  pylint: disable=wrong-import-position
from .nsa_layer_equal_blocks import EqualBlocksNativeSparseAttention  # noqa: E402  pylint: disable=wrong-import-position
