"""nsa_window_attention from stock MindSpore ops: a dense [T, T] band-masked attention, differentiated
by MindSpore's own autodiff. A test oracle for small T only (its memory grows with T^2)."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops


def sequence_starts(tokens, actual_seq_len=None):
    """[T] int32: the first token of each token's sequence (NumPy, from constant lengths)."""
    cu = [tokens] if actual_seq_len is None else [int(v) for v in actual_seq_len]
    starts = np.zeros(tokens, np.int32)
    for begin, end in zip([0] + cu[:-1], cu):
        starts[begin:end] = begin
    return Tensor(starts)


def composed_window_attention(query, key, value, scale_value, window_size, starts):
    """attention_out [T, N1, Dv]; `starts` from sequence_starts()."""
    tokens, q_heads, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    rows = ops.arange(tokens, dtype=ms.int32).reshape(tokens, 1)
    cols = ops.arange(tokens, dtype=ms.int32).reshape(1, tokens)
    visible = ops.logical_and(ops.logical_and(cols <= rows, cols > rows - window_size),
                              cols >= starts.reshape(tokens, 1))                       # [T, T]
    q = query.reshape(tokens, kv_heads, group, dim).transpose(1, 2, 0, 3)              # [N2, G, T, D]
    k = key.transpose(1, 0, 2).reshape(kv_heads, 1, tokens, dim)
    v = value.transpose(1, 0, 2).reshape(kv_heads, 1, tokens, value.shape[2])
    scores = ops.matmul(q, k.swapaxes(-1, -2)) * scale_value                            # [N2, G, T, T]
    scores = ops.masked_fill(scores, ops.logical_not(visible), Tensor(-1e30, scores.dtype))
    out = ops.matmul(ops.softmax(scores, axis=-1), v)                                   # [N2, G, T, Dv]
    return out.transpose(2, 0, 1, 3).reshape(tokens, q_heads, value.shape[2])
