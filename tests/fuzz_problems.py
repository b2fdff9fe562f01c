"""Hypothesis strategies for NSA problems, valid and deliberately broken (tests/test_fuzz.py and
tests/fuzz_invalid_worker.py)."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from cases import Case


@st.composite
def valid_cases(draw, max_batches=4):
    """Any problem the contract allows (on the CPU: small head dims for speed)."""
    block = draw(st.sampled_from([16, 32, 48, 64, 128]))
    count = draw(st.integers(1, 32 if block == 16 else 5))
    batches = draw(st.integers(1, max_batches))
    q_lens = draw(st.lists(st.integers(0, 9), min_size=batches, max_size=batches).filter(lambda l: sum(l) > 0))
    kv_blocks = [draw(st.integers(count, count + 2)) if q else draw(st.integers(0, 2)) for q in q_lens]
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    head_dim = draw(st.sampled_from([8, 16, 24, 40]))
    return Case(q_lens=tuple(q_lens), kv_blocks=tuple(kv_blocks), q_heads=kv_heads * group, kv_heads=kv_heads,
                head_dim=head_dim, v_head_dim=draw(st.integers(1, head_dim)), select_block_size=block,
                select_block_count=count, sparse_mode=draw(st.sampled_from([0, 2])),
                dtype=draw(st.sampled_from(["float32", "float16", "bfloat16"])),
                duplicates=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def first_batch_with_queries(case):
    return next(b for b, q in enumerate(case.q_lens) if q > 0)


def row_limits(case):
    """Per query row: the number of blocks its batch has."""
    return np.repeat([kv // case.select_block_size for kv in case.kv_lens], case.q_lens)


# Each corruption: (name, function(call, case, data) -> None, exception types, words one of which the
# message must contain, graph_too). `call` is a dict of the public function's arguments, edited in place;
# `data` is a hypothesis data object for extra draws.
def _set_index(call, case, data, negative):
    topk = call["topk_indices"].copy()
    t = data.draw(st.integers(0, topk.shape[0] - 1))
    n, i = data.draw(st.integers(0, topk.shape[1] - 1)), data.draw(st.integers(0, topk.shape[2] - 1))
    limit = int(row_limits(case)[t])
    topk[t, n, i] = data.draw(st.integers(-2**31, -1) if negative else st.integers(limit, 2**31 - 1))
    call["topk_indices"] = topk


def _lengths(call, name, values, as_tensor):
    call[name] = np.asarray(values, np.int64) if as_tensor else tuple(int(v) for v in values)


def _decrease(call, case, data, as_tensor):
    cu_q, cu_kv = list(case.actual_seq_qlen), list(case.actual_seq_kvlen)
    if data.draw(st.booleans()):  # an extra leading batch that ends past the total: the next entry drops
        cu_q, cu_kv = [cu_q[-1] + 1] + cu_q, [cu_kv[0]] + cu_kv
    else:                         # a negative first entry
        cu_q[0] = -data.draw(st.integers(1, 5))
    _lengths(call, "actual_seq_qlen", cu_q, as_tensor)
    _lengths(call, "actual_seq_kvlen", cu_kv, as_tensor)


def _wrong_total(call, case, data, as_tensor):
    cu = list(case.actual_seq_kvlen)
    cu[-1] += data.draw(st.sampled_from([-1, 1, case.select_block_size]))
    _lengths(call, "actual_seq_kvlen", cu, as_tensor)
    _lengths(call, "actual_seq_qlen", case.actual_seq_qlen, as_tensor)


def _kv_not_multiple(call, case, data):
    cu = list(case.actual_seq_kvlen)
    b = first_batch_with_queries(case)
    cu[b] -= data.draw(st.integers(1, case.select_block_size - 1))
    cu = [min(c, cu[b]) if j < b else c for j, c in enumerate(cu)]
    _lengths(call, "actual_seq_kvlen", cu, as_tensor=True)
    _lengths(call, "actual_seq_qlen", case.actual_seq_qlen, as_tensor=True)


def _kv_too_short(call, case, data):
    """Shrinks the first batch with queries below block * count (moving its keys to the next batch)."""
    cu = list(case.actual_seq_kvlen)
    b = first_batch_with_queries(case)
    begin = cu[b - 1] if b else 0
    cu[b] = begin + case.select_block_size * (case.select_block_count - 1)
    cu = [min(c, cu[b]) if j < b else max(c, cu[b]) for j, c in enumerate(cu)]
    _lengths(call, "actual_seq_kvlen", cu, as_tensor=True)
    _lengths(call, "actual_seq_qlen", case.actual_seq_qlen, as_tensor=True)


def _replace(name, make):
    def corrupt(call, case, data):
        call[name] = make(call, case, data)
    return corrupt


def _astype(name, dtype):
    return _replace(name, lambda call, case, data: np.asarray(call[name]).astype(dtype))


def _slice_last(name, size):
    return _replace(name, lambda call, case, data: np.asarray(call[name])[..., :size(case)])


KERNEL = (ValueError,)        # raised by the kernel's checks (RuntimeError with the message in graph mode)
CHECK = (ValueError, TypeError)

CORRUPTIONS = [
    ("index_too_large", lambda c, k, d: _set_index(c, k, d, negative=False), KERNEL, ["out of range"], True),
    ("index_negative", lambda c, k, d: _set_index(c, k, d, negative=True), KERNEL, ["out of range"], True),
    ("lengths_decrease_tuple", lambda c, k, d: _decrease(c, k, d, False), CHECK,
     ["cumulative", "never decrease", "must end at"], True),
    ("lengths_decrease_tensor", lambda c, k, d: _decrease(c, k, d, True), KERNEL,
     ["smaller than the entry before", "must equal T1"], True),
    # (a last entry moved down can also fall below the one before it)
    ("lengths_total_tuple", lambda c, k, d: _wrong_total(c, k, d, False), CHECK, ["must end at", "never decrease"],
     True),
    ("lengths_total_tensor", lambda c, k, d: _wrong_total(c, k, d, True), KERNEL,
     ["must equal T2", "smaller than the entry before"], True),
    ("kv_not_multiple", _kv_not_multiple, KERNEL, ["KV length", "actual_seq_kvlen"], True),
    ("kv_too_short", _kv_too_short, KERNEL, ["KV length", "actual_seq_kvlen"], True),
    ("block_size_bad", _replace("select_block_size", lambda c, k, d: d.draw(st.sampled_from([0, 8, 24, 144, -16]))),
     CHECK, ["select_block_size"], True),
    ("block_count_bad", _replace("select_block_count", lambda c, k, d: d.draw(st.sampled_from([0, 33, -1]))),
     CHECK, ["select_block_count"], True),
    ("sparse_mode_bad", _replace("sparse_mode", lambda c, k, d: d.draw(st.sampled_from([1, 3, -1, 4]))),
     CHECK, ["sparse_mode"], True),
    ("head_num_bad", _replace("head_num", lambda c, k, d: k.q_heads + d.draw(st.sampled_from([-1, 1, 7]))),
     CHECK, ["head_num", "N1"], True),
    ("scale_bad", _replace("scale_value", lambda c, k, d: d.draw(st.sampled_from([float("nan"), float("inf"),
                                                                                 "0.1", None]))),
     CHECK, ["scale_value"], True),
    ("key_dtype", _astype("key", np.float64), CHECK, ["key"], True),
    ("topk_dtype", _astype("topk_indices", np.int64), CHECK, ["topk_indices"], True),
    ("head_dim_mismatch", _slice_last("key", lambda k: k.head_dim - 1), CHECK, ["D"], True),
    ("v_dim_too_big", _replace("value", lambda c, k, d: np.concatenate([c["value"]] * (k.head_dim + 1), -1)),
     CHECK, ["Dv"], True),
    ("topk_count_mismatch", _replace("topk_indices", lambda c, k, d: np.concatenate([c["topk_indices"]] * 2, -1)),
     CHECK, ["topk_indices.shape[2]", "select_block_count"], True),
    ("query_rank", _replace("query", lambda c, k, d: c["query"][None]), CHECK, ["query"], True),
    ("lengths_only_one", _replace("actual_seq_kvlen", lambda c, k, d: None), CHECK, ["was given but"], True),
    ("lengths_count_mismatch", _replace("actual_seq_kvlen", lambda c, k, d: tuple(c["actual_seq_kvlen"]) + (
        c["actual_seq_kvlen"][-1],)), CHECK, ["length of actual_seq", "must agree", "B"], True),
    ("mask_bad", _replace("atten_mask", lambda c, k, d: d.draw(st.sampled_from(
        [np.zeros((2, 3, 4), bool), np.zeros((4, 4), np.float32)]))), CHECK, ["atten_mask"], True),
    ("not_a_tensor", _replace("value", lambda c, k, d: d.draw(st.sampled_from([None, 3.0, [1, 2]]))),
     (TypeError,), ["must be a mindspore Tensor"], False),
]

# Only for nsa_select_attention_grad (the arguments only it has).
GRAD_CORRUPTIONS = [
    ("grad_shape", _replace("grad", lambda c, k, d: c["grad"][:-1]), CHECK, ["grad.shape", "T1"], True),
    ("stats_dtype", _astype("softmax_max", np.float16), CHECK, ["softmax_max"], True),
    ("stats_shape", _slice_last("softmax_sum", lambda k: 4), CHECK, ["softmax_sum.shape[2]"], True),
    ("out_dim", _replace("attention_out", lambda c, k, d: np.concatenate([c["attention_out"]] * 2, -1)),
     CHECK, ["attention_out", "Dv"], True),
]
