"""float64 NumPy reference of nsa_compress_attention and its gradient, for clarity, not speed.

Written from CANN's aclnnNsaCompressAttention doc, its kernel as read in ops-transformer
(attention/nsa_compress_attention) and Huawei's CPU golden (op-plugin
test/test_custom_ops/test_npu_nsa_compress_attention.py, `generate_golden`); the gradient from
torch_npu's derivatives.yaml (flash-attention backward with the same mask). Each rule cites its source.
"""
from __future__ import annotations

import numpy as np

from ..reference import SOFTMAX_STAT_WIDTH, _as_float64, _as_int, _batches

FLT_MAX = float(np.finfo(np.float32).max)
MASKED = -FLT_MAX   # kernel: masked scores become -FLT_MAX (golden: adds -40000); a fully masked row averages V
FORCED = FLT_MAX    # kernel: +FLT_MAX for topk_mask (golden: masked_fill with 23333, above any real score)


def selection_blocks(cmp_len, compress_stride, select_block_size):
    """Blocks per batch: ceil(S_cmp / (l'/d)) (the doc's S_sel; the golden reads actual_sel_seq_kvlen)."""
    per_block = select_block_size // compress_stride
    return -(-cmp_len // per_block)


def _mask(mask):
    return None if mask is None else _as_int(mask).astype(bool)


def _scores(q, k, scale_value, atten_mask, position, kv_len):
    """scale * q k^T for one query row (any leading head axes), masked with the mask's top-left corner:
    golden `atten_mask[:cur_seq_q, :cur_cmp_seq_k]` for every batch, rows from the batch's first query."""
    scores = scale_value * q @ k.T
    if atten_mask is not None:
        scores = np.where(atten_mask[position, :kv_len], MASKED, scores)
    return scores


def importance(probs, compress_block_size, compress_stride, select_block_size):
    """Score of each selection block from one row's P over the compressed keys (already summed over the
    G heads of a KV group, golden `trans_back.sum(dim=2)`; summing first is the same linear map).

    score[j] = sum_{a < m} sum_{b < nn} P[m (j + 1) - a - b], m = l'/d, nn = l/d, keys outside
    [0, S_cmp) dropped: the golden's compute_impscore (`sum_res[i - 1] += trans[m * i - j] * times`
    for i = 1..S_sel) and the kernel; the doc's formula holds only with j counted from 1.
    """
    m, nn = select_block_size // compress_stride, compress_block_size // compress_stride
    kv_len = probs.shape[-1]
    blocks = selection_blocks(kv_len, compress_stride, select_block_size)
    scores = np.zeros(blocks)
    for j in range(blocks):
        for a in range(m):
            for b in range(nn):
                key = m * (j + 1) - a - b
                if 0 <= key < kv_len:
                    scores[j] += probs[key]
    return scores


def top_blocks(scores, select_block_count):
    """Descending, equal scores lower block first: golden torch.sort(descending=True, stable=True)."""
    return np.argsort(-scores, kind="stable")[:select_block_count]


def forward(query, key, value, scale_value, head_num, compress_block_size, compress_stride, select_block_size,
            select_block_count, *, topk_mask=None, atten_mask=None, actual_seq_qlen=None, actual_cmp_seq_kvlen=None,
            actual_sel_seq_kvlen=None):
    """Returns (attention_out, topk_indices, softmax_max, softmax_sum), MindSpore's output order.

    softmax_max/sum are [T1, N1, 8] in query's row order (ms_nsa's layout; CANN's buffer is
    [N1, S1_b, 8] batch by batch).
    """
    q, k, v = _as_float64(query), _as_float64(key), _as_float64(value)
    atten, forced = _mask(atten_mask), _mask(topk_mask)
    t1, n1, _ = q.shape
    n2 = k.shape[1]
    assert head_num == n1 and n1 % n2 == 0
    group = n1 // n2
    out = np.zeros((t1, n1, v.shape[2]))
    topk = np.zeros((t1, n2, select_block_count), np.int32)
    row_max, row_sum = np.zeros((t1, n1)), np.zeros((t1, n1))
    batches = _batches(t1, k.shape[0], actual_seq_qlen, actual_cmp_seq_kvlen)
    for b, (q_begin, q_end, kv_begin, kv_end) in enumerate(batches):
        kv_len = kv_end - kv_begin
        if actual_sel_seq_kvlen is not None:
            sel = np.diff(np.concatenate([[0], _as_int(actual_sel_seq_kvlen)]))
            assert sel[b] == selection_blocks(kv_len, compress_stride, select_block_size)
        for t in range(q_begin, q_end):
            position = t - q_begin
            for n in range(n2):
                heads = slice(n * group, (n + 1) * group)
                scores = _scores(q[t, heads], k[kv_begin:kv_end, n], scale_value, atten, position, kv_len)
                m = scores.max(axis=1, keepdims=True)
                e = np.exp(scores - m)
                probs = e / e.sum(axis=1, keepdims=True)                       # P_cmp = softmax
                out[t, heads] = probs @ v[kv_begin:kv_end, n]                   # attentionOut = P_cmp V
                row_max[t, heads], row_sum[t, heads] = m[:, 0], e.sum(axis=1)
                block_scores = importance(probs.sum(axis=0), compress_block_size, compress_stride,
                                          select_block_size)                    # P_slc' = sum over heads
                if forced is not None:                                          # topk_mask: top-left corner
                    block_scores = np.where(forced[position, :block_scores.size], FORCED, block_scores)
                topk[t, n] = top_blocks(block_scores, select_block_count)
    widen = lambda x: np.repeat(x[..., None], SOFTMAX_STAT_WIDTH, axis=-1)  # noqa: E731
    return out, topk, widen(row_max), widen(row_sum)


def block_scores(query, key, scale_value, head_num, compress_block_size, compress_stride, select_block_size, *,
                 topk_mask=None, atten_mask=None, actual_seq_qlen=None, actual_cmp_seq_kvlen=None):
    """The per-row block scores the top-k ranks: {(t, n): scores} (for checking near-ties)."""
    q, k = _as_float64(query), _as_float64(key)
    atten, forced = _mask(atten_mask), _mask(topk_mask)
    n2 = k.shape[1]
    group = q.shape[1] // n2
    result = {}
    for q_begin, q_end, kv_begin, kv_end in _batches(q.shape[0], k.shape[0], actual_seq_qlen, actual_cmp_seq_kvlen):
        for t in range(q_begin, q_end):
            for n in range(n2):
                scores = _scores(q[t, n * group:(n + 1) * group], k[kv_begin:kv_end, n], scale_value, atten,
                                 t - q_begin, kv_end - kv_begin)
                e = np.exp(scores - scores.max(axis=1, keepdims=True))
                probs = (e / e.sum(axis=1, keepdims=True)).sum(axis=0)
                s = importance(probs, compress_block_size, compress_stride, select_block_size)
                if forced is not None:
                    s = np.where(forced[t - q_begin, :s.size], FORCED, s)
                result[t, n] = s
    return result


def backward(grad, query, key, value, attention_out, softmax_max, softmax_sum, scale_value, head_num,
             compress_block_size, compress_stride, select_block_size, select_block_count, *, atten_mask=None,
             actual_seq_qlen=None, actual_cmp_seq_kvlen=None):
    """(dq, dk, dv): softmax-attention backward over the compressed keys with the same mask, from the
    given forward outputs (torch_npu: npu_fusion_attention_grad on TND, sparse_mode 1). A masked score
    is the constant -FLT_MAX, so it passes no gradient to q or k; dv takes P at every key."""
    del compress_block_size, compress_stride, select_block_size, select_block_count
    q, k, v = _as_float64(query), _as_float64(key), _as_float64(value)
    d_out, out = _as_float64(grad), _as_float64(attention_out)
    m_all, l_all = _as_float64(softmax_max)[..., 0], _as_float64(softmax_sum)[..., 0]
    atten = _mask(atten_mask)
    n2 = k.shape[1]
    group = head_num // n2
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for q_begin, q_end, kv_begin, kv_end in _batches(q.shape[0], k.shape[0], actual_seq_qlen, actual_cmp_seq_kvlen):
        keys = slice(kv_begin, kv_end)
        for t in range(q_begin, q_end):
            for n in range(n2):
                heads = slice(n * group, (n + 1) * group)
                scores = _scores(q[t, heads], k[keys, n], scale_value, atten, t - q_begin, kv_end - kv_begin)
                p = np.exp(scores - m_all[t, heads][:, None]) / l_all[t, heads][:, None]
                dp = d_out[t, heads] @ v[keys, n].T
                delta = (d_out[t, heads] * out[t, heads]).sum(axis=1, keepdims=True)
                ds = p * (dp - delta)
                if atten is not None:
                    ds = np.where(atten[t - q_begin, :kv_end - kv_begin], 0.0, ds)
                dq[t, heads] = scale_value * ds @ k[keys, n]
                dk[keys, n] += scale_value * ds.T @ q[t, heads]
                dv[keys, n] += p.T @ d_out[t, heads]
    return dq, dk, dv
