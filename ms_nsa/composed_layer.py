"""NativeSparseAttention with every fused op replaced by its stock-op statement, for MindSpore autodiff.

`ComposedNativeSparseAttention` is the layer (same parameters, projections, rotary embedding, gates,
masks) whose branches are the ops' composed versions: gather + weighted sum for nsa_compress, dense
masked softmax attention + the importance map + ops.topk for nsa_compress_attention, gather +
softmax for nsa_select_attention, a dense band-masked [T, T] attention for nsa_window_attention.
MindSpore differentiates all of it, so comparing its gradients with the layer's checks every bprop
of the layer. Dense in T: a test oracle for small T only. The sequence lengths are fixed when it is
built (host-side geometry). Not part of the public API.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from .composed import composed_forward
from .compress.composed import composed_compress, window_rows
from .compress.reference import windows
from .compress_attention.composed import composed_attention, composed_probabilities, composed_topk, \
    importance_matrix, masks
from .compress_attention.reference import selection_blocks
from ._layer_common import sequence_positions
from .nsa_layer import NativeSparseAttention
from .window.composed import composed_window_attention


class ComposedNativeSparseAttention(NativeSparseAttention):
    """The layer for the cumulative lengths `cu_seq_len` (a tuple), in stock ops; same arguments otherwise."""

    def __init__(self, *args, cu_seq_len, **kwargs):
        super().__init__(*args, **kwargs)
        cu = tuple(int(v) for v in cu_seq_len)
        tokens = cu[-1]
        l, d, l_sel = self.compress_block_size, self.compress_stride, self.select_block_size
        if not self.use_compressed:
            return
        starts = windows(tokens, l, d, cu)
        cmp_cu = tuple(int(v) for v in np.cumsum([len(windows(e - b, l, d)) for b, e in zip((0,) + cu[:-1], cu)]))
        self.rows = window_rows(tokens, l, d, cu)
        longest, longest_cmp = max(np.diff((0,) + cu)), max(np.diff((0,) + cmp_cu))
        causal = np.arange(longest_cmp)[None, :] * d + l - 1 > np.arange(longest)[:, None]
        self.masked, self.foreign = masks(tokens, len(starts), causal, cu, cmp_cu)
        # Per sequence: its query rows, compressed keys, importance map and forced blocks.
        self.sequences = []
        for q0, q1, c0, c1 in zip((0,) + cu[:-1], cu, (0,) + cmp_cu[:-1], cmp_cu):
            blocks = selection_blocks(c1 - c0, d, l_sel)
            own = np.arange(q1 - q0)[:, None] // l_sel
            block = np.arange(blocks)[None, :]
            forced = (block == 0) | ((block <= own) & (block > own - self.select_local_blocks))
            self.sequences.append((q0, q1, c0, c1, importance_matrix(c1 - c0, l, d, l_sel),
                                   Tensor(np.broadcast_to(forced[None], (self.kv_head_num,) + forced.shape).copy())))

    def compressed(self, q, key, value, cu_seq_len, position):
        tokens = q.shape[0]
        cmp_key = composed_compress(key, self.w_compress_k, self.rows)
        cmp_value = composed_compress(value, self.w_compress_v, self.rows)
        out = composed_attention(q, cmp_key, cmp_value, self.scale, self.masked, self.foreign)
        probs = ops.stop_gradient(composed_probabilities(q, cmp_key, self.scale, self.masked, self.foreign))
        topk = ()
        for q0, q1, c0, c1, weights, forced in self.sequences:
            topk += (composed_topk(probs[:, :, q0:q1, c0:c1], weights, self.select_block_count, forced),)
        sees_one = (position >= self.compress_block_size - 1).astype(ms.float32).reshape(tokens, 1, 1)
        return out * sees_one, ops.concat(topk, 0)

    # Geometry from the lengths in-graph here (graph mode's parameter elimination fails on a method
    # argument that is never used, "The pointer[manager] is null").
    def selected(self, q, key, value, topk_indices, cu_seq_len):
        tokens = q.shape[0]
        position = sequence_positions(tokens, cu_seq_len)
        start = ops.arange(tokens, dtype=ms.int32) - position
        return composed_forward(q, key, value, topk_indices, self.scale, self.select_block_size,
                                start.reshape(tokens, 1, 1), position.reshape(tokens, 1, 1), sparse_mode=2)

    def window(self, q, key, value, cu_seq_len):
        tokens = q.shape[0]
        start = ops.arange(tokens, dtype=ms.int32) - sequence_positions(tokens, cu_seq_len)
        return composed_window_attention(q.astype(ms.float32), key.astype(ms.float32), value.astype(ms.float32),
                                         self.scale, self.window_size, start)
