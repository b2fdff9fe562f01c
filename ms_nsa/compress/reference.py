"""float64 NumPy reference of nsa_compress and its gradient, for clarity, not speed.

Written from CANN's aclnnNsaCompress / aclnnNsaCompressGrad docs and Huawei's CPU goldens (op-plugin
test/test_custom_ops/test_npu_nsa_compress.py and test_npu_nsa_compress_grad.py); each rule cites it.
"""
from __future__ import annotations

import numpy as np

from ..reference import _as_float64, _batches


def windows(tokens, compress_block_size, compress_stride, actual_seq_len=None):
    """Global first token of every window, segments in order."""
    starts = []
    for begin, end, _, _ in _batches(tokens, tokens, actual_seq_len, actual_seq_len):
        length = end - begin
        if length < compress_block_size:      # golden: "skip short samples" (no window at all)
            continue
        # golden: `for start in range(0, seq_len, stride)`, break once start + l > seq_len
        starts.extend(begin + s for s in range(0, length - compress_block_size + 1, compress_stride))
    return starts


def forward(input, weight, compress_block_size, compress_stride, *, actual_seq_len=None):  # noqa: A002
    """output [T_cmp, N, D]: out[i, n] = sum_j weight[j, n] * input[start_i + j, n] (aclnnNsaCompress doc)."""
    x, w = _as_float64(input), _as_float64(weight)
    starts = windows(x.shape[0], compress_block_size, compress_stride, actual_seq_len)
    out = np.zeros((len(starts),) + x.shape[1:])
    for i, start in enumerate(starts):
        out[i] = np.einsum("jn,jnd->nd", w, x[start:start + compress_block_size])
    return out


def backward(grad, input, weight, compress_block_size, compress_stride, *, actual_seq_len=None):  # noqa: A002
    """(input_grad, weight_grad): golden compress_sample_bwd, d input scattered back through the same
    windows (index_add_, so overlaps add), d weight[j, n] = sum_i <grad[i, n], input[start_i + j, n]>."""
    g, x, w = _as_float64(grad), _as_float64(input), _as_float64(weight)
    starts = windows(x.shape[0], compress_block_size, compress_stride, actual_seq_len)
    input_grad, weight_grad = np.zeros_like(x), np.zeros_like(w)
    for i, start in enumerate(starts):
        rows = slice(start, start + compress_block_size)
        input_grad[rows] += w[:, :, None] * g[i][None]
        weight_grad += np.einsum("nd,jnd->jn", g[i], x[rows])
    return input_grad, weight_grad
