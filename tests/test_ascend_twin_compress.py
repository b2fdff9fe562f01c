"""nsa_compress(_grad) and nsa_compress_attention on the Ascend backend, through MindSpore's own compiler
and autodiff on this CPU: the Ascend twin (MS_NSA_BACKEND=ascend_twin, docs/ascend.md).

The Ascend ops (ms_nsa/compress/ascend.py, ms_nsa/compress_attention/ascend.py over the shared
construction in ms_nsa/_ascend_kernels.py) are compiled for the CPU device target against the twin
library: stand-ins for aclnnNsaCompress, aclnnNsaCompressGrad and aclnnNsaCompressAttention reached
through the callback MindSpore generates from the aclnn headers, and, in place of the one call that is not
an aclnn op (MindSpore's FlashAttentionScoreGrad, the gradient of nsa_compress_attention), a stand-in
with its inputs and attributes. Each records every argument; each computes CANN's results with the CPU
cores, reading and writing buffers the way CANN's kernels address them (mask strides, softmax layout).
"""
from __future__ import annotations

import inspect
from dataclasses import replace

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import ms_nsa
from cases import MS_DTYPES, REL_TOL, rel_error, round_to, to_numpy
from ms_nsa import _ascend_kernels as ascend
from ms_nsa.compress import ascend as compress_ascend, reference as compress_reference
from ms_nsa.compress_attention import api as attention_api, ascend as attention_ascend
from ms_nsa.compress_attention import reference as attention_reference
from ms_nsa.op_def import load_op_def
from test_ascend_twin import (_tensor, _use, assert_reg_info_declares_every_argument_an_input_and_no_attr,
                              twin)  # noqa: F401  (twin: the fixture, shared)
from test_nsa_compress_attention import AttnCase, check_topk

DTYPES = ["float16", "bfloat16"]
AGREEMENT = {}   # (op, dtype, mode) -> max abs difference twin vs CPU over all outputs, printed at the end
REFERENCE = {}   # (op, dtype, mode) -> largest relative error of an output vs the float64 reference




def _max_abs(got, want):
    return max(float(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)).max()) for g, w in zip(got, want))


def _int_array(values):
    return "int_array " + ",".join(map(str, values))


# -- nsa_compress ----------------------------------------------------------------------------------------
# Segments 40, 17, 70 with l = 32, d = 16: 2, 0 (shorter than l) and 3 windows.
COMPRESS = dict(lengths=(40, 57, 127), heads=2, dim=32, block=32, stride=16)


def _compress_data(dtype):
    rng = np.random.default_rng(3)
    c = COMPRESS
    tokens = c["lengths"][-1]
    rows = compress_reference.windows(tokens, c["block"], c["stride"], c["lengths"])
    return dict(x=round_to(rng.standard_normal((tokens, c["heads"], c["dim"])), dtype),
                w=round_to(rng.standard_normal((c["block"], c["heads"])) / 6, dtype),
                g=round_to(rng.standard_normal((len(rows), c["heads"], c["dim"])), dtype), windows=len(rows))


class CompressLoss(nn.Cell):
    """(sum(output * g), output): the gradient is nsa_compress_grad fed with g."""

    def __init__(self, g):
        super().__init__()
        self.g = Tensor(g, ms.float32)

    def construct(self, x, w):
        out = ms_nsa.nsa_compress(x, w, COMPRESS["block"], COMPRESS["stride"], actual_seq_len=COMPRESS["lengths"])
        return (out.astype(ms.float32) * self.g).sum(), out


def _compress_run(d, dtype):
    """output, d input, d weight through ms.value_and_grad, then the public gradient function."""
    x, w, g = (Tensor(d[n]).astype(MS_DTYPES[dtype]) for n in ("x", "w", "g"))
    (_, out), grads = ms.value_and_grad(CompressLoss(d["g"]), grad_position=(0, 1), has_aux=True)(x, w)
    public = ms_nsa.nsa_compress_grad(g, x, w, COMPRESS["block"], COMPRESS["stride"], actual_seq_len=COMPRESS["lengths"])
    return [to_numpy(t) for t in (out,) + tuple(grads) + tuple(public)]


def _compress_records(dtype, windows):
    """aclnnNsaCompress(input, weight, actSeqLenOptional, layoutOptional, compressBlockSize, compressStride,
    actSeqLenType, output, workspaceSize, executor) and aclnnNsaCompressGrad(outputGrad, input, weight,
    actSeqLenOptionalOptional, compressBlockSize, compressStride, actSeqLenType, layoutOptionalOptional,
    inputGradOut, weightGradOut, workspaceSize, executor): typed from the prototypes, not the yaml."""
    c = COMPRESS
    x, w = _tensor(dtype, c["lengths"][-1], c["heads"], c["dim"]), _tensor(dtype, c["block"], c["heads"])
    y = _tensor(dtype, windows, c["heads"], c["dim"])
    lengths, block, stride = _int_array(c["lengths"]), f"int {c['block']}", f"int {c['stride']}"
    forward = [x, w, lengths, "str TND", block, stride, "int 0", y, "workspace_size", "executor"]
    grad = [y, x, w, lengths, block, stride, "int 0", "str TND", x, w, "workspace_size", "executor"]
    return forward, grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_twin_compress_forward_and_gradient(dtype, mode, twin, monkeypatch):
    d = _compress_data(dtype)
    got = _compress_run(d, dtype)

    calls = twin.calls()
    forward, grad = _compress_records(dtype, d["windows"])
    assert [name for name, _ in calls] == ["aclnnNsaCompress", "aclnnNsaCompressGrad", "aclnnNsaCompressGrad"]
    assert calls[0][1] == forward and calls[1][1] == grad and calls[2][1] == grad

    kwargs = dict(actual_seq_len=COMPRESS["lengths"])
    want = [compress_reference.forward(d["x"], d["w"], COMPRESS["block"], COMPRESS["stride"], **kwargs)]
    want += list(compress_reference.backward(d["g"], d["x"], d["w"], COMPRESS["block"], COMPRESS["stride"], **kwargs))
    for label, g, w, tol in zip(("output", "input_grad", "weight_grad"), got, want, (1, 1, 2)):
        assert rel_error(g, w) < tol * REL_TOL[dtype], f"{label} vs the float64 reference: {rel_error(g, w):.2e}"
    REFERENCE[("nsa_compress", dtype, mode)] = max(rel_error(g, w) for g, w in zip(got, want))
    np.testing.assert_array_equal(got[1], got[3])   # ms.grad's gradient is nsa_compress_grad's
    np.testing.assert_array_equal(got[2], got[4])

    _use(monkeypatch, "cpu")
    cpu = _compress_run(d, dtype)
    for label, g, w in zip(("output", "input_grad", "weight_grad", "input_grad (public)", "weight_grad (public)"),
                           got, cpu):
        np.testing.assert_array_equal(g, w, err_msg=f"{label}: twin vs CPU backend")
    AGREEMENT[("nsa_compress", dtype, mode)] = _max_abs(got, cpu)


# -- nsa_compress_attention ---------------------------------------------------------------------------------
# "masks": both masks, larger than needed (every batch uses their top-left corner), a fully masked row per
# batch, varlen with a short batch. "plain": no masks, G = 2, Dv < D, l = d = 16, l' = 32.
ATTENTION = {
    "masks": AttnCase(q_lens=(37, 5, 21), cmp_lens=(11, 9, 13), atten="random", forced=True),
    "plain": AttnCase(q_lens=(9, 14), cmp_lens=(12, 7), q_heads=2, kv_heads=1, head_dim=64, v_head_dim=32,
                      block=16, stride=16, select=32, count=3),
}


class AttentionLoss(nn.Cell):
    """(sum(attention_out * d_out), the four outputs)."""

    def __init__(self, case, data):
        super().__init__()
        self.attrs = case.attrs
        self.atten_mask = Tensor(data["atten_mask"]) if "atten_mask" in data else None
        self.topk_mask = Tensor(data["topk_mask"]) if "topk_mask" in data else None
        self.cu_q, self.cu_kv = case.lengths["actual_seq_qlen"], case.lengths["actual_cmp_seq_kvlen"]
        self.d_out = Tensor(data["d_out"], ms.float32)

    def construct(self, q, k, v):
        out, topk, softmax_max, softmax_sum = ms_nsa.nsa_compress_attention(
            q, k, v, *self.attrs, topk_mask=self.topk_mask, atten_mask=self.atten_mask, actual_seq_qlen=self.cu_q,
            actual_cmp_seq_kvlen=self.cu_kv)
        return (out.astype(ms.float32) * self.d_out).sum(), out, topk, softmax_max, softmax_sum


def _attention_run(case, data):
    """attention_out, topk_indices, softmax_max, softmax_sum, dq, dk, dv (ms.grad), dq, dk, dv (the public
    gradient function fed with the forward's outputs), as float64 arrays (which waits for every kernel)."""
    (q, k, v), _ = case.inputs(data)
    (_, out, topk, softmax_max, softmax_sum), grads = ms.value_and_grad(
        AttentionLoss(case, data), grad_position=(0, 1, 2), has_aux=True)(q, k, v)
    d_out = Tensor(data["d_out"]).astype(MS_DTYPES[case.dtype])
    mask = {"atten_mask": Tensor(data["atten_mask"])} if "atten_mask" in data else {}
    public = ms_nsa.nsa_compress_attention_grad(d_out, q, k, v, out, softmax_max, softmax_sum, *case.attrs,
                                                **mask, **case.lengths)
    return [to_numpy(t) for t in [out, topk, softmax_max, softmax_sum] + list(grads) + list(public)]


def _blocks(case):
    return [attention_reference.selection_blocks(n, case.stride, case.select) for n in case.cmp_lens]


def _attention_records(case, data):
    """aclnnNsaCompressAttention's 20 arguments + workspaceSize, executor (its prototype's order), then
    FlashAttentionScoreGrad's 15 inputs, 8 attributes and 4 outputs: typed from the prototypes."""
    dt, t1, t2 = case.dtype, sum(case.q_lens), sum(case.cmp_lens)
    n1, n2, dim, dv = case.q_heads, case.kv_heads, case.head_dim, case.v_head_dim
    max_q, max_kv, max_blocks = max(case.q_lens), max(case.cmp_lens), max(_blocks(case))
    atten = _tensor("bool", max_q, max_kv) if "atten_mask" in data else "null"   # the top-left corner
    topk = _tensor("bool", max_q, max_blocks) if "topk_mask" in data else "null"
    cu_q, cu_kv = _int_array(np.cumsum(case.q_lens)), _int_array(np.cumsum(case.cmp_lens))
    query, key, value = _tensor(dt, t1, n1, dim), _tensor(dt, t2, n2, dim), _tensor(dt, t2, n2, dv)
    stats, out = _tensor("float32", t1, n1, 8), _tensor(dt, t1, n1, dv)
    forward = [query, key, value, atten, topk, cu_q, cu_kv, _int_array(np.cumsum(_blocks(case))),
               f"double {float(np.float32(case.attrs[0])):.17g}", f"int {n1}", "str TND", "int 1",
               f"int {case.block}", f"int {case.stride}", f"int {case.select}", f"int {case.count}",
               stats, stats, out, _tensor("int32", t1, n2, case.count), "workspace_size", "executor"]
    flash = [query, key, value, out, "null", "null", "null", atten, stats, stats, "null", out, "null", cu_q, cu_kv,
             f"attr head_num {n1}", "attr keep_prob 1", f"attr scale_value {np.float32(case.attrs[0]):.9g}",
             "attr pre_tokens 2147483647", "attr next_tokens 2147483647", "attr inner_precise 0",
             "attr input_layout TND", f"attr sparse_mode {1 if 'atten_mask' in data else 0}",
             query, key, value, _tensor(dt, 1)]
    return forward, flash


def test_expected_records_have_the_prototypes_lengths():
    forward, grad = _compress_records("float16", 5)
    assert (len(forward), len(grad)) == (10, 12)    # 8 and 10 kernel parameters + workspace, executor
    case = replace(ATTENTION["masks"], dtype="float16")
    forward, flash = _attention_records(case, case.make())
    assert (len(forward), len(flash)) == (22, 15 + 8 + 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_twin_compress_attention_forward_and_gradient(name, dtype, mode, twin, monkeypatch):
    case = replace(ATTENTION[name], dtype=dtype, seed=len(name))
    data = case.make()
    got = _attention_run(case, data)

    # Every argument reached the stand-ins in prototype order: the forward, the flash-attention gradient
    # for ms.grad, and again for the public gradient function.
    calls = twin.calls()
    forward, flash = _attention_records(case, data)
    assert [c for c, _ in calls] == ["aclnnNsaCompressAttention", "FlashAttentionScoreGrad", "FlashAttentionScoreGrad"]
    assert calls[0][1] == forward and calls[1][1] == flash and calls[2][1] == flash

    # The float64 reference (statistics in ms_nsa's query-row order), top-k with CANN's tie-breaking.
    masks = {n: data[n] for n in ("atten_mask", "topk_mask") if n in data}
    ref_out, _, ref_max, ref_sum = attention_reference.forward(data["q"], data["k"], data["v"], *case.attrs, **masks,
                                                               **case.lengths)
    assert rel_error(got[0], ref_out) < REL_TOL[dtype]
    np.testing.assert_allclose(got[2], ref_max, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[3], ref_sum, rtol=1e-5)
    check_topk(case, data, Tensor(got[1].astype(np.int32)))
    ref_grads = attention_reference.backward(
        data["d_out"], data["q"], data["k"], data["v"], got[0], got[2], got[3], *case.attrs,
        **{n: data[n] for n in ("atten_mask",) if n in data}, **case.lengths)
    for label, g, w in zip(("dq", "dk", "dv"), got[4:7], ref_grads):
        assert rel_error(g, w) < 2 * REL_TOL[dtype], f"{label} vs the float64 reference: {rel_error(g, w):.2e}"
    REFERENCE[(f"nsa_compress_attention/{name}", dtype, mode)] = max(
        rel_error(g, w) for g, w in zip([got[0]] + got[4:7], [ref_out] + list(ref_grads)))
    for g, p in zip(got[4:7], got[7:]):
        np.testing.assert_array_equal(g, p)   # ms.grad's gradient is the public function's

    _use(monkeypatch, "cpu")
    cpu = _attention_run(case, data)
    labels = ("attention_out", "topk_indices", "softmax_max", "softmax_sum", "dq", "dk", "dv", "dq (public)",
              "dk (public)", "dv (public)")
    for label, g, w in zip(labels, got, cpu):
        np.testing.assert_array_equal(g, w, err_msg=f"{label}: twin vs CPU backend")
    AGREEMENT[(f"nsa_compress_attention/{name}", dtype, mode)] = _max_abs(got, cpu)


def test_print_agreement():
    """The figures of the runs above (pytest -s shows them)."""
    for key, value in sorted(AGREEMENT.items()):
        print(f"[twin vs cpu] {key[0]} {key[1]} {key[2]}: max abs difference {value:.3e}; largest relative "
              f"error vs the float64 reference {REFERENCE[key]:.3e}")


# -- the fixes, broken once each: the twin must notice --------------------------------------------------------
@pytest.fixture
def fresh_ops():
    """Ops built in a test that changes the construction must not leak into other tests."""
    caches = (attention_api._forward_op, attention_api._grad_op, attention_ascend.forward_op,
              attention_ascend.grad_op)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def _forward_outputs(case, data):
    (q, k, v), kwargs = case.inputs(data)
    return [to_numpy(t) for t in ms_nsa.nsa_compress_attention(q, k, v, *case.attrs, **kwargs)]


def test_without_the_mask_corner_cann_reads_other_mask_values(twin, monkeypatch, fresh_ops):
    """CANN reads mask rows at the stride of the longest batch, not the mask's own width; passing the
    whole (wider) mask instead of its corner changes the results."""
    case = replace(ATTENTION["masks"], dtype="float16")
    data = case.make()
    good = _forward_outputs(case, data)
    prepare = attention_ascend.CompressAttentionCall.prepare

    def whole_masks(self, inputs):
        prepared, context = prepare(self, inputs)
        return prepared[:3] + inputs[3:5] + prepared[5:], context

    monkeypatch.setattr(attention_ascend.CompressAttentionCall, "prepare", whole_masks)
    for cache in (attention_api._forward_op, attention_ascend.forward_op):
        cache.cache_clear()
    broken = _forward_outputs(case, data)
    assert twin.calls()[-1][1][3] == _tensor("bool", *data["atten_mask"].shape)
    assert rel_error(broken[0], good[0]) > 10 * REL_TOL["float16"]


def test_without_the_layout_conversion_the_statistics_are_cann_ordered(twin, monkeypatch, fresh_ops):
    case = replace(ATTENTION["masks"], dtype="float16")
    data = case.make()
    good = _forward_outputs(case, data)
    monkeypatch.setattr(ascend, "softmax_from_cann", lambda stat, cu_seq_q: stat)
    broken = _forward_outputs(case, data)
    np.testing.assert_array_equal(broken[0], good[0])
    assert not np.array_equal(broken[2], good[2])
    # which is CANN's layout: batch by batch [N1, S1_b, 8]
    rows, begin = [], 0
    for length in case.q_lens:
        rows.append(good[2][begin:begin + length].transpose(1, 0, 2).reshape(-1, 8))
        begin += length
    np.testing.assert_array_equal(broken[2].reshape(-1, 8), np.concatenate(rows))


# -- the construction ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_bprop, op_name", [(compress_ascend.make_bprop, "nsa_compress"),
                                                 (attention_ascend.make_bprop, "nsa_compress_attention")])
def test_bprops_take_the_aclnn_arguments_then_out_dout(make_bprop, op_name):
    bprop = make_bprop(lambda *args: None)
    assert list(inspect.signature(bprop).parameters) == [a.name for a in load_op_def(op_name).args] + ["out", "dout"]


@pytest.mark.parametrize("op_name", ["nsa_compress", "nsa_compress_grad", "nsa_compress_attention"])
def test_reg_info_declares_every_argument_an_input_and_no_attr(op_name):
    assert_reg_info_declares_every_argument_an_input_and_no_attr(op_name)


@pytest.mark.parametrize("op_name", ["nsa_compress", "nsa_compress_grad", "nsa_compress_attention"])
def test_twin_headers_declare_the_yaml_prototype(op_name):
    """MindSpore's own parser reads the twin's header into the types the yaml implies."""
    from mindspore.ops.operations._custom_ops_utils import CustomInfoGenerator
    op_def = load_op_def(op_name)
    with ascend._environment(ASCEND_OPP_PATH=str(ascend.TWIN_CANN / "opp"), ASCEND_CUSTOM_OPP_PATH=None):
        assert CustomInfoGenerator(op_def.aclnn).get_aclnn_api_types() == ascend.prototype_types(op_def)


@pytest.mark.parametrize("heads, lengths", [(2, (3, 3, 7)), (3, (1,)), (4, (0, 5, 5, 6))])
def test_softmax_layout_conversion_round_trips(heads, lengths):
    t1 = lengths[-1]
    stat = Tensor(np.random.default_rng(0).standard_normal((t1, heads, 8)).astype(np.float32))
    cann = ascend.softmax_to_cann(stat, lengths)
    np.testing.assert_array_equal(ascend.softmax_from_cann(cann, lengths).asnumpy(), stat.asnumpy())
    begin, rows = 0, []
    for end in lengths:
        rows.append(stat.asnumpy()[begin:end].transpose(1, 0, 2).reshape(-1, 8))
        begin = end
    np.testing.assert_array_equal(cann.asnumpy().reshape(-1, 8), np.concatenate(rows))


# -- what the Ascend backend rejects before any aclnn call --------------------------------------------------
def _ascend_bad_calls():
    q = Tensor(np.zeros((10, 4, 32), np.float16))
    k = v = Tensor(np.zeros((12, 2, 32), np.float16))
    attrs = (0.1, 4, 32, 16, 64, 2)
    lens = dict(actual_seq_qlen=(4, 10), actual_cmp_seq_kvlen=(6, 12))
    f, c = ms_nsa.nsa_compress_attention, ms_nsa.nsa_compress
    x, w = Tensor(np.zeros((40, 2, 32), np.float16)), Tensor(np.zeros((32, 2), np.float16))
    return [
        ("Tensor lengths", lambda: f(q, k, v, *attrs, actual_seq_qlen=Tensor(np.array([4, 10])),
                                     actual_cmp_seq_kvlen=(6, 12)), TypeError,
         "on Ascend actual_seq_qlen must be a tuple or list of ints"),
        ("float32", lambda: f(q.astype(ms.float32), k.astype(ms.float32), v.astype(ms.float32), *attrs, **lens),
         TypeError, "allowed on ascend: float16, bfloat16"),
        ("G = 3", lambda: f(Tensor(np.zeros((10, 6, 32), np.float16)), k, v, 0.1, 6, 32, 16, 64, 2, **lens),
         ValueError, "G = 3"),
        ("too few blocks", lambda: f(q, k, v, *attrs, actual_seq_qlen=(4, 10), actual_cmp_seq_kvlen=(2, 12)),
         ValueError, "batch 0 has 2 compressed keys (from actual_cmp_seq_kvlen), i.e. 1 selection blocks; it needs "
                     "at least select_block_count = 2"),
        ("more than 14000 keys", lambda: f(q[:1], Tensor(np.zeros((14001, 2, 32), np.float16)),
                                           Tensor(np.zeros((14001, 2, 32), np.float16)), *attrs),
         ValueError, "at most 14000 compressed keys on Ascend"),
        ("selection lengths wrong", lambda: f(q, k, v, *attrs, actual_sel_seq_kvlen=(2, 5), **lens), ValueError,
         "batch 1 has 3 selection blocks in actual_sel_seq_kvlen but 6 compressed keys give ceil(6 / 4) = 2"),
        ("atten_mask too small", lambda: f(q, k, v, *attrs, atten_mask=Tensor(np.zeros((5, 6), np.bool_)), **lens),
         ValueError, "atten_mask is [5, 6] but batch 1 has 6 queries"),
        ("topk_mask too small", lambda: f(q, k, v, *attrs, topk_mask=Tensor(np.zeros((6, 1), np.bool_)), **lens),
         ValueError, "topk_mask is [6, 1] but batch 0 has 4 queries and 2 selection blocks"),
        ("compress: D = 24", lambda: c(Tensor(np.zeros((40, 2, 24), np.float16)), w, 32, 16), ValueError,
         "D = 24"),
        ("compress grad: Tensor lengths", lambda: ms_nsa.nsa_compress_grad(
            Tensor(np.zeros((1, 2, 32), np.float16)), x, w, 32, 16, actual_seq_len=Tensor(np.array([40]))),
         TypeError, "on Ascend actual_seq_len must be a tuple or list of ints"),
    ]


@pytest.mark.parametrize("what, call, exc, message", _ascend_bad_calls(), ids=[c[0] for c in _ascend_bad_calls()])
def test_ascend_rules_raise_named_errors(what, call, exc, message, twin):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value), f"{what}: {info.value}"
    assert not twin.calls(), "the check must come before any aclnn call"


# -- the on-device suite's bodies, run on the twin -------------------------------------------------------------
def _on_device_module():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent / "ascend" / "test_on_device_compress.py"
    spec = importlib.util.spec_from_file_location("on_device_compress", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", DTYPES)
def test_on_device_bodies_pass_on_the_twin(dtype, twin):
    """tests/ascend/test_on_device_compress.py at CANN's sizes (D 128/192, G 4/16), on the twin: the
    comparisons with the float64 references hold (the built-in ops' are not run: they need an NPU)."""
    on_device = _on_device_module()
    on_device.test_compress_attention_gradient_matches_reference("causal", dtype, None)
    c = on_device._compress_case("paper-l32-d16", dtype)
    x, w = (Tensor(c[n]).astype(MS_DTYPES[dtype]) for n in ("x", "w"))
    out = ms_nsa.nsa_compress(x, w, c["block"], c["stride"], actual_seq_len=c["lengths"])
    want = compress_reference.forward(c["x"], c["w"], c["block"], c["stride"], actual_seq_len=c["lengths"])
    assert rel_error(to_numpy(out), want) < REL_TOL[dtype]
    names = {name for name, _ in twin.calls()}
    assert names == {"aclnnNsaCompressAttention", "FlashAttentionScoreGrad", "aclnnNsaCompress"}, names
