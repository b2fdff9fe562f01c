"""float64 NumPy reference of nsa_window_attention and its gradient, written for clarity, not speed.

Straight from the definition (ops_yaml/nsa_window_attention.yaml, docs/semantics.md): query t at
position s of its sequence attends to the keys at positions max(0, s - w + 1) .. s of that sequence.
"""
from __future__ import annotations

import numpy as np

from ..reference import SOFTMAX_STAT_WIDTH, _as_float64, _batches


def _windows(tokens, kv_heads, group, window_size, actual_seq_len):
    """Yields (t, heads, n, keys): query row t, KV head n, its G query heads and the key rows t sees."""
    for begin, end, _, _ in _batches(tokens, tokens, actual_seq_len, actual_seq_len):
        for t in range(begin, end):
            keys = slice(max(begin, t - window_size + 1), t + 1)
            for n in range(kv_heads):
                yield t, slice(n * group, (n + 1) * group), n, keys


def forward(query, key, value, scale_value, head_num, window_size, *, actual_seq_len=None):
    """(attention_out, softmax_max, softmax_sum) in float64, as nsa_window_attention returns them."""
    q, k, v = _as_float64(query), _as_float64(key), _as_float64(value)
    tokens, q_heads, _ = q.shape
    assert q_heads == head_num and q_heads % k.shape[1] == 0
    out = np.zeros((tokens, q_heads, v.shape[2]))
    row_max, row_sum = np.zeros((tokens, q_heads)), np.zeros((tokens, q_heads))
    for t, heads, n, keys in _windows(tokens, k.shape[1], q_heads // k.shape[1], window_size, actual_seq_len):
        scores = scale_value * q[t, heads] @ k[keys, n].T                  # [G, visible keys]
        m = scores.max(axis=1, keepdims=True)
        e = np.exp(scores - m)
        row_max[t, heads], row_sum[t, heads] = m[:, 0], e.sum(axis=1)
        out[t, heads] = (e / e.sum(axis=1, keepdims=True)) @ v[keys, n]
    widen = lambda x: np.repeat(x[..., None], SOFTMAX_STAT_WIDTH, axis=-1)  # noqa: E731
    return out, widen(row_max), widen(row_sum)


def backward(grad, query, key, value, attention_out, softmax_max, softmax_sum, scale_value, head_num, window_size,
             *, actual_seq_len=None):
    """(dq, dk, dv) in float64, from the given forward outputs (as the gradient op takes them)."""
    q, k, v = _as_float64(query), _as_float64(key), _as_float64(value)
    d_out, out = _as_float64(grad), _as_float64(attention_out)
    m_all, l_all = _as_float64(softmax_max)[..., 0], _as_float64(softmax_sum)[..., 0]
    tokens, q_heads, _ = q.shape
    assert q_heads == head_num
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for t, heads, n, keys in _windows(tokens, k.shape[1], q_heads // k.shape[1], window_size, actual_seq_len):
        scores = scale_value * q[t, heads] @ k[keys, n].T
        p = np.exp(scores - m_all[t, heads][:, None]) / l_all[t, heads][:, None]
        dp = d_out[t, heads] @ v[keys, n].T
        ds = p * (dp - (d_out[t, heads] * out[t, heads]).sum(axis=1, keepdims=True))
        dq[t, heads] = scale_value * ds @ k[keys, n]
        dk[keys, n] += scale_value * ds.T @ q[t, heads]
        dv[keys, n] += p.T @ d_out[t, heads]
    return dq, dk, dv
