"""nsa_compress_attention and its gradient: kernel vs the float64 reference (attention, statistics,
top-k with CANN's tie-breaking), gradients vs the reference and vs MindSpore autodiff of stock ops,
both modes, determinism, and every rule of ops_yaml/nsa_compress_attention*.yaml as a named error."""
from dataclasses import dataclass, replace
from typing import Tuple

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import ms_nsa
from ms_nsa.compress_attention import reference
from ms_nsa.compress_attention.composed import composed_attention, masks
from ms_nsa.op_def import load_op_def
from cases import (MS_DTYPES, REL_TOL, assert_same_bits_for_threads, assert_signature, output_bits, rel_error,
                   round_to, to_numpy)


@dataclass(frozen=True)
class AttnCase:
    q_lens: Tuple[int, ...]
    cmp_lens: Tuple[int, ...]
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    v_head_dim: int = 32
    block: int = 32          # compress_block_size l
    stride: int = 16         # compress_stride d
    select: int = 64         # select_block_size l'
    count: int = 2           # select_block_count n
    atten: str = "none"      # none | causal (compressed-causal, NSA's) | random (with fully masked rows)
    forced: bool = False     # topk_mask forcing block 0, the own block and a few random ones
    dtype: str = "float32"
    seed: int = 0

    @property
    def attrs(self):
        return (self.head_dim ** -0.5, self.q_heads, self.block, self.stride, self.select, self.count)

    @property
    def lengths(self):
        return dict(actual_seq_qlen=tuple(int(x) for x in np.cumsum(self.q_lens)),
                    actual_cmp_seq_kvlen=tuple(int(x) for x in np.cumsum(self.cmp_lens)))

    def blocks(self):
        return [reference.selection_blocks(n, self.stride, self.select) for n in self.cmp_lens]

    def make(self):
        rng = np.random.default_rng(self.seed)
        t1, t2 = sum(self.q_lens), sum(self.cmp_lens)
        data = dict(q=rng.standard_normal((t1, self.q_heads, self.head_dim)),
                    k=rng.standard_normal((t2, self.kv_heads, self.head_dim)),
                    v=rng.standard_normal((t2, self.kv_heads, self.v_head_dim)),
                    d_out=rng.standard_normal((t1, self.q_heads, self.v_head_dim)))
        data = {name: round_to(x, self.dtype) for name, x in data.items()}
        rows, cols = max(self.q_lens) + 2, max(self.cmp_lens) + 3   # larger than needed: top-left corner used
        if self.atten == "causal":   # compressed key c covers tokens [c d, c d + l): visible once all are past
            data["atten_mask"] = np.arange(cols)[None, :] * self.stride + self.block - 1 > np.arange(rows)[:, None]
        elif self.atten == "random":
            data["atten_mask"] = rng.random((rows, cols)) < 0.3
            data["atten_mask"][1] = True   # a fully masked row in every batch
        if self.forced:
            forced = rng.random((rows, max(self.blocks()) + 2)) < 0.1
            forced[:, 0] = True
            forced[np.arange(rows), np.minimum(np.arange(rows) // self.select, forced.shape[1] - 1)] = True
            data["topk_mask"] = forced
        return data

    def inputs(self, data, lengths_as_tensor=False):
        dtype = MS_DTYPES[self.dtype]
        tensors = [Tensor(data[n]).astype(dtype) for n in ("q", "k", "v")]
        kwargs = {name: Tensor(data[name]) for name in ("atten_mask", "topk_mask") if name in data}
        lengths = self.lengths
        if lengths_as_tensor:
            lengths = {name: Tensor(np.array(v, np.int64)) for name, v in lengths.items()}
        return tensors, {**kwargs, **lengths}


CASES = {
    "paper-varlen": AttnCase(q_lens=(37, 5, 61), cmp_lens=(11, 9, 23)),
    "g1-l16-d16-l16": AttnCase(q_lens=(9, 14), cmp_lens=(5, 8), q_heads=2, kv_heads=2, block=16, stride=16,
                               select=16, count=3),
    "g8-l64-d32": AttnCase(q_lens=(13, 20), cmp_lens=(9, 17), q_heads=8, kv_heads=1, block=64, stride=32, select=64,
                           count=4, head_dim=64, v_head_dim=48),
    "g16-d192-dv128": AttnCase(q_lens=(6, 3), cmp_lens=(14, 21), q_heads=32, kv_heads=2, head_dim=192,
                               v_head_dim=128, count=3),
    "g32-l48-l96": AttnCase(q_lens=(7, 4), cmp_lens=(19, 30), q_heads=32, kv_heads=1, head_dim=16, v_head_dim=16,
                            block=48, stride=16, select=96),
    "l80-d32-l96-floor": AttnCase(q_lens=(11,), cmp_lens=(25,), block=80, stride=32, select=96, count=5),
    "l128-d64-l128-count32": AttnCase(q_lens=(5, 8), cmp_lens=(66, 64), block=128, stride=64, select=128, count=32,
                                      head_dim=16, v_head_dim=16),
    "zero-query-batch": AttnCase(q_lens=(9, 0, 12), cmp_lens=(10, 3, 12)),
}
# NSA's own shape: queries are the tokens, keys their compressed windows, compressed-causal mask.
NSA_CASE = AttnCase(q_lens=(131, 97), cmp_lens=(7, 5), atten="causal", forced=True)


def run(case, data, lengths_as_tensor=False):
    (q, k, v), kwargs = case.inputs(data, lengths_as_tensor)
    return ms_nsa.nsa_compress_attention(q, k, v, *case.attrs, **kwargs)


def reference_kwargs(case, data):
    return {**{n: data[n] for n in ("atten_mask", "topk_mask") if n in data}, **case.lengths}


def check_topk(case, data, topk):
    """Same blocks as the reference, in its order, except inside near-ties of the float64 scores
    (float32 rounding may swap those); exact ties (zero scores behind the mask, forced blocks) must
    come out lower block first, as CANN's stable sort puts them."""
    got = topk.asnumpy()
    kwargs = reference_kwargs(case, data)
    kwargs.pop("actual_sel_seq_kvlen", None)
    scores = reference.block_scores(data["q"], data["k"], case.attrs[0], case.q_heads, case.block, case.stride,
                                    case.select, **kwargs)
    differing = 0
    for (t, n), s in scores.items():
        want, row = reference.top_blocks(s, case.count), got[t, n]
        if np.array_equal(row, want):
            continue
        differing += 1
        assert len(set(row.tolist())) == case.count and row.min() >= 0 and row.max() < s.size, (t, n, row)
        np.testing.assert_allclose(s[row], s[want], rtol=1e-4, atol=1e-6, err_msg=f"row {t}, head {n}: {row} vs {want}")
        for tie in (0.0, reference.FORCED):
            assert [j for j in row if s[j] == tie] == [j for j in want if s[j] == tie], (t, n, row, want)
    assert differing <= max(1, len(scores) // 50), f"{differing} of {len(scores)} rows differ from the reference"


def check_forward(case, data, outputs):
    out, topk, softmax_max, softmax_sum = outputs
    ref_out, _, ref_max, ref_sum = reference.forward(data["q"], data["k"], data["v"], *case.attrs,
                                                     **reference_kwargs(case, data))
    assert out.shape == ref_out.shape and out.dtype == MS_DTYPES[case.dtype]
    assert topk.dtype == ms.int32 and topk.shape == (sum(case.q_lens), case.kv_heads, case.count)
    err = rel_error(to_numpy(out), ref_out)
    assert err < REL_TOL[case.dtype], f"attention_out: relative error {err:.2e}"
    np.testing.assert_allclose(to_numpy(softmax_max), ref_max, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(softmax_sum), ref_sum, rtol=1e-5)
    check_topk(case, data, topk)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("masks_", ["none", "both"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_grad_match_reference(name, masks_, dtype):
    case = replace(CASES[name], dtype=dtype, atten="random" if masks_ == "both" else "none",
                   forced=masks_ == "both", seed=len(name))
    data = case.make()
    outputs = run(case, data)
    check_forward(case, data, outputs)

    out, _, softmax_max, softmax_sum = outputs
    (q, k, v), kwargs = case.inputs(data)
    kwargs.pop("topk_mask", None)
    d_out = Tensor(data["d_out"]).astype(MS_DTYPES[dtype])
    grads = ms_nsa.nsa_compress_attention_grad(d_out, q, k, v, out, softmax_max, softmax_sum, *case.attrs, **kwargs)
    ref = reference.backward(data["d_out"], data["q"], data["k"], data["v"], to_numpy(out), to_numpy(softmax_max),
                             to_numpy(softmax_sum), *case.attrs, **{n: data[n] for n in ("atten_mask",) if n in data},
                             **case.lengths)
    for grad_name, got, want in zip(("dq", "dk", "dv"), grads, ref):
        assert got.shape == want.shape
        err = rel_error(to_numpy(got), want)
        assert err < 2 * REL_TOL[dtype], f"{grad_name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nsa_shaped_causal_case_with_forced_blocks(dtype):
    case = replace(NSA_CASE, dtype=dtype)
    data = case.make()
    check_forward(case, data, run(case, data))


def test_ties_keep_canns_order():
    # One query row that sees only compressed keys 0..1 (blocks 0 and, through the overlap, none else):
    # all later blocks score exactly 0, so they follow the scored ones in increasing block order.
    case = AttnCase(q_lens=(1,), cmp_lens=(40,), count=6, atten="causal")
    data = case.make()
    data["atten_mask"] = np.ones((1, 43), bool)
    data["atten_mask"][0, :2] = False
    _, topk, _, _ = run(case, data)
    # keys 0 and 1 feed block 0 only (block j reads keys 4j .. 4j + 4)
    assert topk.asnumpy()[0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    # forced blocks first, in increasing block order, then the rest by score
    data["topk_mask"] = np.zeros((1, 12), bool)
    data["topk_mask"][0, [7, 3, 9]] = True
    _, topk, _, _ = run(case, data)
    assert topk.asnumpy()[0, 0].tolist() == [3, 7, 9, 0, 1, 2]


def test_fully_masked_row_averages_values():
    case = AttnCase(q_lens=(3,), cmp_lens=(9,), atten="random")
    data = case.make()
    data["atten_mask"][:] = False
    data["atten_mask"][1] = True
    out, _, softmax_max, softmax_sum = run(case, data)
    np.testing.assert_allclose(out.asnumpy()[1], np.repeat(data["v"].mean(axis=0), 2, axis=0), rtol=1e-5, atol=1e-6)
    assert np.all(softmax_max.asnumpy()[1] == -reference.FLT_MAX) and np.all(softmax_sum.asnumpy()[1] == 9)


def test_selection_lengths_given_equal_derived_and_tensor_lengths_equal_tuples():
    case = CASES["paper-varlen"]
    data = case.make()
    derived = run(case, data)
    (q, k, v), kwargs = case.inputs(data)
    sel = tuple(int(x) for x in np.cumsum(case.blocks()))
    given = ms_nsa.nsa_compress_attention(q, k, v, *case.attrs, actual_sel_seq_kvlen=sel, **kwargs)
    tensors = run(case, data, lengths_as_tensor=True)
    for a, b, c in zip(derived, given, tensors):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
        np.testing.assert_array_equal(a.asnumpy(), c.asnumpy())


class Attention(nn.Cell):
    """sum(attention_out * weights) through ms_nsa or through the stock-op composition."""

    def __init__(self, case, data, composed=False):
        super().__init__()
        self.case, self.composed = case, composed
        self.weights = Tensor(data["d_out"].astype(np.float32))
        self.atten_mask = Tensor(data["atten_mask"]) if "atten_mask" in data else None
        self.masked, self.foreign = masks(sum(case.q_lens), sum(case.cmp_lens), data.get("atten_mask"),
                                          **case.lengths)

    def construct(self, query, key, value, actual_seq_qlen, actual_cmp_seq_kvlen):
        if self.composed:
            out = composed_attention(query, key, value, self.case.attrs[0], self.masked, self.foreign)
        else:
            out, _, _, _ = ms_nsa.nsa_compress_attention(query, key, value, *self.case.attrs,
                                                         atten_mask=self.atten_mask, actual_seq_qlen=actual_seq_qlen,
                                                         actual_cmp_seq_kvlen=actual_cmp_seq_kvlen)
        return (out.astype(ms.float32) * self.weights).sum()


@pytest.mark.parametrize("name, atten", [("paper-varlen", "random"), ("g8-l64-d32", "none"), ("nsa", "causal")])
def test_ms_grad_matches_composed_autodiff(mode, name, atten):
    case = NSA_CASE if name == "nsa" else replace(CASES[name], atten=atten)
    data = case.make()
    (q, k, v), kwargs = case.inputs(data, lengths_as_tensor=True)
    lengths = (kwargs["actual_seq_qlen"], kwargs["actual_cmp_seq_kvlen"])
    got = ms.grad(Attention(case, data), grad_position=(0, 1, 2))(q, k, v, *lengths)
    want = ms.grad(Attention(case, data, composed=True), grad_position=(0, 1, 2))(q, k, v, *lengths)
    for grad_name, g, w in zip(("dq", "dk", "dv"), got, want):
        err = rel_error(g.asnumpy(), w.asnumpy())
        assert err < 2e-5, f"{grad_name}: ms.grad differs from composed autodiff by {err:.2e}"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_graph_mode_same_bits_and_backward_independent_of_threads(dtype):
    case = replace(CASES["paper-varlen"], dtype=dtype, atten="random", forced=True)
    data = case.make()
    (q, k, v), kwargs = case.inputs(data)
    d_out = Tensor(data["d_out"]).astype(MS_DTYPES[dtype])
    grad_kwargs = {n: kwargs[n] for n in ("atten_mask", "actual_seq_qlen", "actual_cmp_seq_kvlen")}

    def both(q, k, v, d_out):
        outs = ms_nsa.nsa_compress_attention(q, k, v, *case.attrs, **kwargs)
        grads = ms_nsa.nsa_compress_attention_grad(d_out, q, k, v, outs[0], outs[2], outs[3], *case.attrs,
                                                   **grad_kwargs)
        return tuple(outs) + tuple(grads)

    expected = output_bits(both(q, k, v, d_out))
    assert output_bits(ms.jit(both)(q, k, v, d_out)) == expected
    assert_same_bits_for_threads(lambda: both(q, k, v, d_out), expected)


def test_signatures_are_the_yamls_and_supersets_of_mindspores():
    # mindspore.ops.nsa_compress_attention (2.10): the same parameters in the same order
    assert_signature(ms_nsa.nsa_compress_attention, [
        "query", "key", "value", "scale_value", "head_num", "compress_block_size", "compress_stride",
        "select_block_size", "select_block_count", "topk_mask", "atten_mask", "actual_seq_qlen",
        "actual_cmp_seq_kvlen", "actual_sel_seq_kvlen"])
    assert_signature(ms_nsa.nsa_compress_attention_grad, None)
    forward = load_op_def("nsa_compress_attention")
    assert forward.output_names == ["softmax_max", "softmax_sum", "attention_out", "topk_indices"]
    assert forward.python["returns"] == ["attention_out", "topk_indices", "softmax_max", "softmax_sum"]


def _bad_calls():
    f = ms_nsa.nsa_compress_attention
    q = Tensor(np.zeros((10, 4, 32), np.float32))
    k = Tensor(np.zeros((12, 2, 32), np.float32))
    v = Tensor(np.zeros((12, 2, 32), np.float32))
    attrs = (0.1, 4, 32, 16, 64, 2)
    lens = dict(actual_seq_qlen=(4, 10), actual_cmp_seq_kvlen=(6, 12))

    def call(*args, query=q, key=k, value=v, **kwargs):
        return lambda: f(query, key, value, *(args or attrs), **{**lens, **kwargs})

    def with_attr(index, value):
        changed = list(attrs)
        changed[index] = value
        return call(*changed)

    out = Tensor(np.zeros((10, 4, 32), np.float32))
    stats = Tensor(np.zeros((10, 4, 8), np.float32))
    grad = ms_nsa.nsa_compress_attention_grad
    return [
        ("query not a Tensor", call(query=np.zeros((10, 4, 32))), TypeError, "query must be a mindspore Tensor"),
        ("query rank", call(query=Tensor(np.zeros((10, 128), np.float32))), ValueError, "query must have shape"),
        ("head_num != N1", with_attr(1, 3), ValueError, "head_num = 3 must equal N1 = 4"),
        ("N1 not a multiple of N2", call(key=Tensor(np.zeros((12, 3, 32), np.float32)),
                                         value=Tensor(np.zeros((12, 3, 32), np.float32))), ValueError,
         "must be a multiple of N2 = 3"),
        ("key head dim != query's", call(key=Tensor(np.zeros((12, 2, 16), np.float32))), ValueError, "dimension D"),
        ("Dv > D", call(value=Tensor(np.zeros((12, 2, 48), np.float32))), ValueError, "Dv = 48"),
        ("value rows != key rows", call(value=Tensor(np.zeros((11, 2, 32), np.float32))), ValueError, "dimension T2"),
        ("key dtype", call(key=Tensor(np.zeros((12, 2, 32), np.float16))), TypeError,
         "key has dtype float16 but must have the dtype of query"),
        ("float64 query", call(query=Tensor(np.zeros((10, 4, 32))), key=Tensor(np.zeros((12, 2, 32))),
                               value=Tensor(np.zeros((12, 2, 32)))), TypeError, "query has dtype float64"),
        ("atten_mask float", call(atten_mask=Tensor(np.zeros((6, 6), np.float32))), TypeError,
         "atten_mask has dtype float32"),
        ("atten_mask 3-D", call(atten_mask=Tensor(np.zeros((1, 6, 6), np.bool_))), ValueError, "atten_mask must have shape"),
        ("topk_mask int32", call(topk_mask=Tensor(np.zeros((6, 2), np.int32))), TypeError, "topk_mask has dtype int32"),
        ("d > l", with_attr(3, 48), ValueError, "compress_stride = 48 must be at most compress_block_size = 32"),
        ("d > 64", call(0.1, 4, 128, 80, 160, 2), ValueError, "compress_stride = 80 is not allowed"),
        ("l not a multiple of 16", with_attr(2, 40), ValueError, "compress_block_size = 40 is not allowed"),
        ("l' < l", with_attr(4, 16), ValueError, "select_block_size = 16 must be at least compress_block_size = 32"),
        ("l' not a multiple of d", call(0.1, 4, 32, 32, 80, 2), ValueError,
         "select_block_size = 80 must be a multiple of compress_stride = 32"),
        ("l' above 128", with_attr(4, 144), ValueError, "select_block_size = 144 is not allowed"),
        ("count 0", with_attr(5, 0), ValueError, "select_block_count = 0 is not allowed"),
        ("count 33", with_attr(5, 33), ValueError, "select_block_count = 33 is not allowed"),
        ("count a bool", with_attr(5, True), TypeError, "select_block_count must be an int"),
        ("scale NaN", with_attr(0, float("nan")), ValueError, "scale_value must be finite"),
        ("only one length array", lambda: f(q, k, v, *attrs, actual_seq_qlen=(4, 10)), ValueError,
         "actual_seq_qlen was given but actual_cmp_seq_kvlen is None"),
        ("lengths of different B", call(actual_cmp_seq_kvlen=(12,)), ValueError, "dimension B"),
        ("q lengths decreasing", call(actual_seq_qlen=(6, 4, 10), actual_cmp_seq_kvlen=(6, 6, 12)), ValueError,
         "actual_seq_qlen[1] = 4 is smaller than the entry before it"),
        ("cmp lengths not ending at T2", call(actual_cmp_seq_kvlen=(6, 11)), ValueError,
         "actual_cmp_seq_kvlen = (6, 11) must end at the token count 12"),
        ("Tensor lengths decreasing (kernel)", call(actual_seq_qlen=Tensor(np.array([4, 10], np.int64)),
                                                    actual_cmp_seq_kvlen=Tensor(np.array([7, 6], np.int64))),
         ValueError, "actual_cmp_seq_kvlen[1] = 6 is smaller than the entry before it"),
        ("too few selection blocks (kernel)", call(actual_cmp_seq_kvlen=(2, 12)), ValueError,
         "batch 0 has 2 compressed keys (from actual_cmp_seq_kvlen), i.e. 1 selection blocks; it needs at least "
         "select_block_count = 2"),
        ("selection lengths wrong (kernel)", call(actual_sel_seq_kvlen=(2, 5)), ValueError,
         "batch 1 has 3 selection blocks in actual_sel_seq_kvlen but 6 compressed keys give ceil(6 / 4) = 2"),
        ("atten_mask too small (kernel)", call(atten_mask=Tensor(np.zeros((5, 6), np.bool_))), ValueError,
         "atten_mask is [5, 6] but batch 1 has 6 queries"),
        ("topk_mask too small (kernel)", call(topk_mask=Tensor(np.zeros((6, 1), np.bool_))), ValueError,
         "topk_mask is [6, 1] but batch 0 has 4 queries and 2 selection blocks"),
        ("grad: softmax_max shape", lambda: grad(out, q, k, v, out, Tensor(np.zeros((10, 4, 4), np.float32)), stats,
                                               *attrs, **lens), ValueError, "softmax_max.shape[2] must be 8"),
        ("grad: grad dtype", lambda: grad(Tensor(np.zeros((10, 4, 32), np.float16)), q, k, v, out, stats, stats, *attrs,
                                        **lens), TypeError, "grad has dtype float16 but must have the dtype of query"),
        ("grad: too few blocks (kernel)", lambda: grad(out, q, k, v, out, stats, stats, *attrs,
                                                       actual_seq_qlen=(4, 10), actual_cmp_seq_kvlen=(2, 12)),
         ValueError, "it needs at least select_block_count = 2"),
    ]


@pytest.mark.parametrize("what, call, exc, message", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_a_named_error(what, call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value), f"{what}: {info.value}"


def test_bad_lengths_in_graph_mode_raise_with_the_kernels_message():
    case = CASES["paper-varlen"]
    data = case.make()
    (q, k, v), _ = case.inputs(data)

    class Call(nn.Cell):
        def construct(self, q, k, v, cu_q, cu_kv):
            return ms_nsa.nsa_compress_attention(q, k, v, *case.attrs, actual_seq_qlen=cu_q, actual_cmp_seq_kvlen=cu_kv)

    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        with pytest.raises(RuntimeError, match="it needs at least select_block_count"):
            Call()(q, k, v, Tensor(np.array([37, 42, 103], np.int64)), Tensor(np.array([1, 20, 43], np.int64)))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_ascend_rules_of_the_yaml():
    # What CANN allows and the CPU relaxes: G with 128 % G == 0, D a multiple of 16, fp16/bf16 only.
    op_def = load_op_def("nsa_compress_attention")
    with pytest.raises(ValueError, match="G = 3 .* not supported on ascend"):
        op_def.bind_dims({"query": (4, 6, 32), "key": (4, 2, 32)}, {}, "ascend")
    op_def.bind_dims({"query": (4, 6, 32), "key": (4, 2, 32)}, {}, "cpu")
    with pytest.raises(ValueError, match="D = 24 .* not supported on ascend"):
        op_def.bind_dims({"query": (4, 2, 24)}, {}, "ascend")
    with pytest.raises(TypeError, match="allowed on ascend: float16, bfloat16"):
        op_def.check_dtypes({"query": "float32"}, "ascend")
