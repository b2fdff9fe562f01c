"""A small float64 NumPy reference of NSA selected attention, written for clarity, not speed.

`forward` and `backward` take the same arguments as `ms_nsa.nsa_select_attention` and
`ms_nsa.nsa_select_attention_grad` (NumPy arrays or MindSpore Tensors) and compute in float64, one
query row at a time, straight from the definition in docs/semantics.md.
"""
from __future__ import annotations

import numpy as np

SOFTMAX_STAT_WIDTH = 8


def _as_float64(x):
    if hasattr(x, "asnumpy"):  # a MindSpore Tensor; bfloat16 has no NumPy dtype, so go through float32
        import mindspore as ms
        x = x.astype(ms.float32).asnumpy() if x.dtype == ms.bfloat16 else x.asnumpy()
    return np.asarray(x, dtype=np.float64)


def _as_int(x):
    return np.asarray(x.asnumpy() if hasattr(x, "asnumpy") else x, dtype=np.int64)


def _batches(q_tokens, kv_tokens, actual_seq_qlen, actual_seq_kvlen):
    """[(q_begin, q_end, kv_begin, kv_end)] per batch."""
    cu_q = [q_tokens] if actual_seq_qlen is None else list(_as_int(actual_seq_qlen).reshape(-1))
    cu_kv = [kv_tokens] if actual_seq_kvlen is None else list(_as_int(actual_seq_kvlen).reshape(-1))
    starts_q, starts_kv = [0] + cu_q[:-1], [0] + cu_kv[:-1]
    return list(zip(starts_q, cu_q, starts_kv, cu_kv))


def _selection(topk_row, select_block_size, position, causal):
    """Batch-local key positions of one query row's selection, and which of them are visible."""
    positions = (np.asarray(topk_row, np.int64)[:, None] * select_block_size
                 + np.arange(select_block_size)[None, :]).reshape(-1)
    visible = positions <= position if causal else np.ones_like(positions, dtype=bool)
    return positions, visible


def _rows(query, key, topk_indices, head_num, select_block_size, actual_seq_qlen, actual_seq_kvlen,
          sparse_mode):
    """Yields (t, n, heads, key rows, visible) for every query row t and KV head n."""
    q_tokens, n1, _ = query.shape
    kv_tokens, n2, _ = key.shape
    assert n1 == head_num and n1 % n2 == 0
    group = n1 // n2
    topk = _as_int(topk_indices)
    for q_begin, q_end, kv_begin, _ in _batches(q_tokens, kv_tokens, actual_seq_qlen, actual_seq_kvlen):
        for t in range(q_begin, q_end):
            for n in range(n2):
                positions, visible = _selection(topk[t, n], select_block_size, t - q_begin, sparse_mode == 2)
                yield t, n, slice(n * group, (n + 1) * group), kv_begin + positions, visible


def forward(query, key, value, topk_indices, scale_value, head_num, select_block_size, select_block_count,
            *, atten_mask=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0):
    """Returns (attention_out, softmax_max, softmax_sum) in float64."""
    del atten_mask, select_block_count  # reserved / implied by topk_indices' shape
    q, k, v = _as_float64(query), _as_float64(key), _as_float64(value)
    out = np.zeros(q.shape[:2] + (v.shape[2],))
    row_max = np.full(q.shape[:2], -np.inf)
    row_sum = np.zeros(q.shape[:2])
    for t, n, heads, rows, visible in _rows(q, k, topk_indices, head_num, select_block_size,
                                            actual_seq_qlen, actual_seq_kvlen, sparse_mode):
        if not visible.any():
            continue  # no key to attend to: O = 0, max = -inf, sum = 0
        scores = scale_value * q[t, heads] @ k[rows[visible], n].T            # [G, visible]
        m = scores.max(axis=1, keepdims=True)
        e = np.exp(scores - m)
        row_max[t, heads], row_sum[t, heads] = m[:, 0], e.sum(axis=1)
        out[t, heads] = (e / e.sum(axis=1, keepdims=True)) @ v[rows[visible], n]
    widen = lambda x: np.repeat(x[..., None], SOFTMAX_STAT_WIDTH, axis=-1)  # noqa: E731
    return out, widen(row_max), widen(row_sum)


def backward(grad, query, key, value, attention_out, softmax_max, softmax_sum, topk_indices, scale_value,
             head_num, select_block_size, select_block_count, *, atten_mask=None, actual_seq_qlen=None,
             actual_seq_kvlen=None, sparse_mode=0):
    """Returns (dq, dk, dv) in float64, from the given forward outputs (as the CANN op does)."""
    del atten_mask, select_block_count
    q, k, v = _as_float64(query), _as_float64(key), _as_float64(value)
    d_out, out = _as_float64(grad), _as_float64(attention_out)
    m_all, l_all = _as_float64(softmax_max)[..., 0], _as_float64(softmax_sum)[..., 0]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for t, n, heads, rows, visible in _rows(q, k, topk_indices, head_num, select_block_size,
                                            actual_seq_qlen, actual_seq_kvlen, sparse_mode):
        if not visible.any():
            continue
        sel = rows[visible]
        scores = scale_value * q[t, heads] @ k[sel, n].T                      # [G, visible]
        p = np.exp(scores - m_all[t, heads][:, None]) / l_all[t, heads][:, None]
        dp = d_out[t, heads] @ v[sel, n].T
        delta = (d_out[t, heads] * out[t, heads]).sum(axis=1, keepdims=True)
        ds = p * (dp - delta)
        dq[t, heads] = scale_value * ds @ k[sel, n]
        np.add.at(dk[:, n], sel, scale_value * ds.T @ q[t, heads])   # duplicates add up
        np.add.at(dv[:, n], sel, p.T @ d_out[t, heads])
    return dq, dk, dv
