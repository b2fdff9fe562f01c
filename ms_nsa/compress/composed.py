"""nsa_compress from stock MindSpore ops (gather + weighted sum, float32): the test oracle for
MindSpore autodiff of the gradient, and the benchmark baseline. Not part of the public API."""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from .reference import windows


def window_rows(tokens, compress_block_size, compress_stride, actual_seq_len=None):
    """int32 [T_cmp, l]: the input rows of every window (host-side; depends only on the lengths)."""
    starts = np.asarray(windows(tokens, compress_block_size, compress_stride, actual_seq_len), np.int32)
    return Tensor(starts[:, None] + np.arange(compress_block_size, dtype=np.int32)[None, :])


def composed_compress(input, weight, rows):  # noqa: A002
    """output [T_cmp, N, D] in float32 from input [T, N, D], weight [l, N], rows = window_rows(...)."""
    gathered = ops.gather(input.astype(ms.float32), rows.reshape(-1), 0)          # [T_cmp * l, N, D]
    gathered = gathered.reshape(rows.shape[0], rows.shape[1], input.shape[1], input.shape[2])
    return (gathered * weight.astype(ms.float32).expand_dims(-1).expand_dims(0)).sum(axis=1)
