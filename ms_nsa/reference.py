"""A small float64 NumPy reference of NSA selected attention, written for clarity, not speed.

`forward` and `backward` take the same arguments as `ms_nsa.nsa_select_attention` and
`ms_nsa.nsa_select_attention_grad` (NumPy arrays or MindSpore Tensors) and compute in float64, one
query row at a time, straight from the definition in docs/semantics.md.

`cann_forward` and `cann_backward` are the CANN flavour: what CANN's aclnnNsaSelectedAttention(Grad)
kernels compute according to their sources (ops-transformer, attention/nsa_selected_attention*), which
differs from ms_nsa's definition outside the rows listed in docs/semantics.md ("Where the backends
agree"). Each rule below names the function it reproduces. The Ascend twin is checked against these.
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


def _selection(topk_row, select_block_size, position, rule):
    """Batch-local key positions of one query row's selection, and which of them are visible."""
    topk_row = np.asarray(topk_row, np.int64)
    positions = (topk_row[:, None] * select_block_size + np.arange(select_block_size)[None, :]).reshape(-1)
    visible_rows = np.asarray(rule(topk_row, select_block_size, position))       # per slot
    visible = (np.arange(select_block_size)[None, :] < visible_rows[:, None]).reshape(-1)
    return positions, visible


def no_mask(topk_row, block, position):
    return np.full(len(topk_row), block)


def causal(topk_row, block, position):
    """ms_nsa's sparse_mode 2: key position p > query position s is masked (spec §2)."""
    return np.clip(position - topk_row * block + 1, 0, block)


def cann_forward_mask(topk_row, block, position):
    """nsa_selected_attention_kernel.h, HandleMask: by block index. The query's own block (s / β) is cut
    after s % β + 1 keys, every block after it is masked, earlier ones never; slot order plays no part.
    Position for position this is `causal`."""
    own = position // block
    return np.where(topk_row < own, block, np.where(topk_row == own, position % block + 1, 0))


def cann_backward_mask(topk_row, block, position):
    """nsa_vec_op.h, CalAttenMsk: by slot. The last slot holding the own block is cut at the diagonal;
    while s + 1 < β·C every later slot is masked and earlier slots never are; with the own block nowhere,
    the whole row is masked while s + 1 <= β·C. (Read for one 8-slot chunk, C <= 8, and β = 64; see
    docs/semantics.md for what the chunking and the 64-bit mask do otherwise.)"""
    span = block * len(topk_row)
    own_slots = np.flatnonzero(topk_row == position // block)
    if own_slots.size == 0:
        return np.full(len(topk_row), 0 if position + 1 <= span else block)
    own = own_slots[-1]
    later = 0 if position + 1 < span else block
    slots = np.arange(len(topk_row))
    return np.where(slots < own, block, np.where(slots == own, position % block + 1, later))


def _rows(query, key, topk_indices, head_num, select_block_size, actual_seq_qlen, actual_seq_kvlen,
          sparse_mode, rule=None):
    """Yields (t, n, heads, key rows, visible) for every query row t and KV head n.

    `rule` (one of the mask functions above) applies when sparse_mode is 2; default `causal`."""
    q_tokens, n1, _ = query.shape
    kv_tokens, n2, _ = key.shape
    assert n1 == head_num and n1 % n2 == 0
    group = n1 // n2
    topk = _as_int(topk_indices)
    rule = (rule or causal) if sparse_mode == 2 else no_mask
    for q_begin, q_end, kv_begin, _ in _batches(q_tokens, kv_tokens, actual_seq_qlen, actual_seq_kvlen):
        for t in range(q_begin, q_end):
            for n in range(n2):
                positions, visible = _selection(topk[t, n], select_block_size, t - q_begin, rule)
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


# -- the CANN flavour ---------------------------------------------------------------------------------
FLT_MAX = float(np.finfo(np.float32).max)


def _filled_scores(q, k, t, n, heads, rows, visible, scale_value):
    """Scores over every selected key, masked ones set to -FLT_MAX (CANN's fill, not -inf)."""
    scores = scale_value * q[t, heads] @ k[rows, n].T                        # [G, L]
    return np.where(visible[None, :], scores, -FLT_MAX)


def cann_forward(query, key, value, topk_indices, scale_value, head_num, select_block_size, select_block_count,
                 *, atten_mask=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0):
    """What aclnnNsaSelectedAttention computes (float64): (attention_out, softmax_max, softmax_sum).

    - The mask applies only with sparse_mode 2 *and* a mask tensor (HandleMask runs under ATTEN_ENABLE;
      the op's doc: with a null mask sparse_mode has no effect), by `cann_forward_mask`.
    - Masked scores are -FLT_MAX, so the softmax runs over all β·C selected keys (ProcessSoftmax): a row
      that sees no key gets equal weights on all of them, max = -FLT_MAX, sum = β·C.
    """
    del select_block_count
    q, k, v = _as_float64(query), _as_float64(key), _as_float64(value)
    mode = sparse_mode if atten_mask is not None else 0
    out = np.zeros(q.shape[:2] + (v.shape[2],))
    row_max, row_sum = np.zeros(q.shape[:2]), np.zeros(q.shape[:2])
    for t, n, heads, rows, visible in _rows(q, k, topk_indices, head_num, select_block_size, actual_seq_qlen,
                                            actual_seq_kvlen, mode, rule=cann_forward_mask):
        scores = _filled_scores(q, k, t, n, heads, rows, visible, scale_value)
        m = scores.max(axis=1, keepdims=True)
        e = np.exp(scores - m)
        row_max[t, heads], row_sum[t, heads] = m[:, 0], e.sum(axis=1)
        out[t, heads] = (e / e.sum(axis=1, keepdims=True)) @ v[rows, n]
    widen = lambda x: np.repeat(x[..., None], SOFTMAX_STAT_WIDTH, axis=-1)  # noqa: E731
    return out, widen(row_max), widen(row_sum)


def cann_backward(grad, query, key, value, attention_out, softmax_max, softmax_sum, topk_indices, scale_value,
                  head_num, select_block_size, select_block_count, *, atten_mask=None, actual_seq_qlen=None,
                  actual_seq_kvlen=None, sparse_mode=0):
    """What aclnnNsaSelectedAttentionGrad computes (float64): (dq, dk, dv).

    - The mask applies whenever sparse_mode is 2, mask tensor or not, by `cann_backward_mask`
      (CalSoftmax: scale, then CalAttenMsk fills -FLT_MAX).
    - P = exp(S - max) / sum with the forward's max and sum (SimpleSoftMax), over all β·C keys;
      dS = P · (dP - Δ) with Δ = <dO, O> (SoftmaxGradFront, CalSoftmaxGrad), dq/dk/dv as in spec §3.
    - Not modelled: rows the forward saw no key of (max = its masked fill). There P depends on how the
      forward's fill (GetExtremeValue's value times the scale) compares with the backward's -FLT_MAX,
      which the sources read do not settle; this reference (like the twin) gives them no gradient.
    """
    del atten_mask, select_block_count
    q, k, v = _as_float64(query), _as_float64(key), _as_float64(value)
    d_out, out = _as_float64(grad), _as_float64(attention_out)
    m_all, l_all = _as_float64(softmax_max)[..., 0], _as_float64(softmax_sum)[..., 0]
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for t, n, heads, rows, visible in _rows(q, k, topk_indices, head_num, select_block_size, actual_seq_qlen,
                                            actual_seq_kvlen, sparse_mode, rule=cann_backward_mask):
        if np.all(m_all[t, heads] <= -FLT_MAX):
            continue
        scores = _filled_scores(q, k, t, n, heads, rows, visible, scale_value)
        p = np.exp(scores - m_all[t, heads][:, None]) / l_all[t, heads][:, None]
        dp = d_out[t, heads] @ v[rows, n].T
        delta = (d_out[t, heads] * out[t, heads]).sum(axis=1, keepdims=True)
        ds = p * (dp - delta)
        dq[t, heads] = scale_value * ds @ k[rows, n]
        np.add.at(dk[:, n], rows, scale_value * ds.T @ q[t, heads])
        np.add.at(dv[:, n], rows, p.T @ d_out[t, heads])
    return dq, dk, dv
