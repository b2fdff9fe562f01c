"""nsa_compress and nsa_compress_attention on an Ascend NPU: against the float64 references and against
MindSpore's built-in ops.nsa_compress / ops.nsa_compress_attention (the same CANN kernels called by
MindSpore's own kernel mods), forward and gradient, PyNative and GRAPH_MODE.

Skipped, with the reason printed, where no NPU exists (tests/ascend/conftest.py). Run:
    python -m pytest --confcutdir=tests/ascend -rs tests/ascend
What these check that the twin cannot: CANN's kernels themselves (the twin computes CANN's rules as read
from its sources with the CPU core), MindSpore's Ascend kernel selection and input conversion for these
Custom ops, and MindSpore's FlashAttentionScoreGrad as the gradient of nsa_compress_attention.
"""
from dataclasses import replace

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

import ms_nsa
from cases import MS_DTYPES, REL_TOL, rel_error, round_to, to_numpy
from modes import mode  # noqa: F401  (the fixture; tests/conftest.py is kept out here)
from ms_nsa import _ascend_kernels
from ms_nsa.compress import reference as compress_reference
from ms_nsa.compress_attention import reference as attention_reference
from test_nsa_compress_attention import AttnCase, check_topk

DTYPES = ["float16", "bfloat16"]


# -- nsa_compress --------------------------------------------------------------------------------------
# (cumulative lengths, N, D, l, d): MindSpore's docstring example, and the paper's l = 32, d = 16 with a
# segment shorter than l.
COMPRESS = {
    "l64-d16": ((80, 176, 256), 8, 128, 64, 16),
    "paper-l32-d16": ((45, 52, 152, 185), 4, 192, 32, 16),
}


def _compress_case(name, dtype):
    lengths, heads, dim, block, stride = COMPRESS[name]
    rng = np.random.default_rng(7)
    rows = compress_reference.windows(lengths[-1], block, stride, lengths)
    return dict(x=round_to(rng.standard_normal((lengths[-1], heads, dim)), dtype),
                w=round_to(rng.standard_normal((block, heads)) / block ** 0.5, dtype),
                g=round_to(rng.standard_normal((len(rows), heads, dim)), dtype), lengths=lengths, block=block,
                stride=stride)


def _weighted(function, c, g):
    def loss(x, w):
        out = function(x, w, c["block"], c["stride"], actual_seq_len=c["lengths"])
        return (out.astype(ms.float32) * g).sum()
    return loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(COMPRESS))
def test_compress_matches_reference_and_builtin(name, dtype, mode):
    c = _compress_case(name, dtype)
    x, w = (Tensor(c[n]).astype(MS_DTYPES[dtype]) for n in ("x", "w"))
    g = Tensor(c["g"], ms.float32)
    kwargs = dict(actual_seq_len=c["lengths"])
    out = ms_nsa.nsa_compress(x, w, c["block"], c["stride"], **kwargs)
    builtin = ops.nsa_compress(x, w, c["block"], c["stride"], **kwargs)
    want = compress_reference.forward(c["x"], c["w"], c["block"], c["stride"], **kwargs)
    assert rel_error(to_numpy(out), want) < REL_TOL[dtype]
    np.testing.assert_array_equal(to_numpy(out), to_numpy(builtin))   # the same aclnn call

    grads = ms.grad(_weighted(ms_nsa.nsa_compress, c, g), grad_position=(0, 1))(x, w)
    builtin_grads = ms.grad(_weighted(ops.nsa_compress, c, g), grad_position=(0, 1))(x, w)
    want = compress_reference.backward(c["g"], c["x"], c["w"], c["block"], c["stride"], **kwargs)
    for label, got, ref, theirs, tol in zip(("input_grad", "weight_grad"), grads, want, builtin_grads, (1, 2)):
        assert rel_error(to_numpy(got), ref) < tol * REL_TOL[dtype], f"{label} vs the float64 reference"
        assert rel_error(to_numpy(got), to_numpy(theirs)) < REL_TOL[dtype], f"{label} vs ops.nsa_compress"


# -- nsa_compress_attention ------------------------------------------------------------------------------
# "causal": NSA's shape (queries are the tokens, keys their compressed windows, the compressed-causal mask,
# forced blocks); its first l - 1 rows of each batch see no key. "random": a random mask in which every row
# sees key 0, so no row is fully masked (what CANN's flash-attention gradient does with such rows is the
# one rule of the gradient not read from its sources; "causal" tests it against the reference).
ATTENTION = {
    "causal": AttnCase(q_lens=(131, 97), cmp_lens=(7, 5), q_heads=8, kv_heads=2, head_dim=128, v_head_dim=128,
                       atten="causal", forced=True),
    "random": AttnCase(q_lens=(37, 70), cmp_lens=(23, 41), q_heads=16, kv_heads=1, head_dim=192, v_head_dim=128,
                       block=32, stride=16, select=64, count=4, atten="random", forced=True),
}


def _attention_case(name, dtype):
    case = replace(ATTENTION[name], dtype=dtype, seed=len(name))
    data = case.make()
    if name == "random":
        data["atten_mask"][:, 0] = False
    # MindSpore's built-in op passes the masks as given: give both exactly CANN's [max S1, max S_cmp/S_sel].
    data["atten_mask"] = data["atten_mask"][:max(case.q_lens), :max(case.cmp_lens)]
    blocks = [attention_reference.selection_blocks(n, case.stride, case.select) for n in case.cmp_lens]
    data["topk_mask"] = data["topk_mask"][:max(case.q_lens), :max(blocks)]
    sel = tuple(int(x) for x in np.cumsum(blocks))
    return case, data, sel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_compress_attention_forward_matches_reference_and_builtin(name, dtype, mode):
    case, data, sel = _attention_case(name, dtype)
    (q, k, v), kwargs = case.inputs(data)
    out, topk, softmax_max, softmax_sum = ms_nsa.nsa_compress_attention(q, k, v, *case.attrs, **kwargs)
    theirs = ops.nsa_compress_attention(q, k, v, *case.attrs, actual_sel_seq_kvlen=sel, **kwargs)
    masks = {n: data[n] for n in ("atten_mask", "topk_mask")}
    ref_out, _, ref_max, ref_sum = attention_reference.forward(data["q"], data["k"], data["v"], *case.attrs, **masks,
                                                               **case.lengths)
    assert rel_error(to_numpy(out), ref_out) < REL_TOL[dtype]
    np.testing.assert_allclose(to_numpy(softmax_max), ref_max, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(to_numpy(softmax_sum), ref_sum, rtol=2e-3)
    check_topk(case, data, topk)
    # The built-in op returns CANN's buffers as they are: its statistics in CANN's [N1, S1_b, 8] layout.
    np.testing.assert_array_equal(to_numpy(out), to_numpy(theirs[0]))
    np.testing.assert_array_equal(topk.asnumpy(), theirs[1].asnumpy())
    cu_q = case.lengths["actual_seq_qlen"]
    for ours, raw in ((softmax_max, theirs[2]), (softmax_sum, theirs[3])):
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(_ascend_kernels.softmax_from_cann(raw, cu_q)))


def _attention_loss(function, case, data, sel=None):
    d_out = Tensor(data["d_out"], ms.float32)
    masks = {n: Tensor(data[n]) for n in ("atten_mask", "topk_mask")}
    extra = {} if sel is None else {"actual_sel_seq_kvlen": sel}

    def loss(q, k, v):
        out = function(q, k, v, *case.attrs, **masks, **extra, **case.lengths)[0]
        return (out.astype(ms.float32) * d_out).sum()
    return loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_compress_attention_gradient_matches_reference(name, dtype, mode):
    """ms.grad: the forward primitive's bprop -> MindSpore's FlashAttentionScoreGrad on TND."""
    case, data, _ = _attention_case(name, dtype)
    (q, k, v), kwargs = case.inputs(data)
    out, _, softmax_max, softmax_sum = ms_nsa.nsa_compress_attention(q, k, v, *case.attrs, **kwargs)
    grads = ms.grad(_attention_loss(ms_nsa.nsa_compress_attention, case, data), grad_position=(0, 1, 2))(q, k, v)
    ref = attention_reference.backward(data["d_out"], data["q"], data["k"], data["v"], to_numpy(out),
                                       to_numpy(softmax_max), to_numpy(softmax_sum), *case.attrs,
                                       atten_mask=data["atten_mask"], **case.lengths)
    for label, got, want in zip(("dq", "dk", "dv"), grads, ref):
        err = rel_error(to_numpy(got), want)
        assert err < 2 * REL_TOL[dtype], f"{label}: relative error {err:.3e} vs the float64 reference"
    # The public gradient function (statistics converted back to CANN's layout) gives the same.
    d_out = Tensor(data["d_out"]).astype(MS_DTYPES[dtype])
    public = ms_nsa.nsa_compress_attention_grad(d_out, q, k, v, out, softmax_max, softmax_sum, *case.attrs,
                                                atten_mask=Tensor(data["atten_mask"]), **case.lengths)
    for got, again in zip(grads, public):
        assert rel_error(to_numpy(again), to_numpy(got)) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_compress_attention_gradient_matches_builtin(dtype, mode):
    """Against ms.grad through ops.nsa_compress_attention, where MindSpore defines its gradient."""
    case, data, sel = _attention_case("random", dtype)
    (q, k, v), _ = case.inputs(data)
    try:
        theirs = ms.grad(_attention_loss(ops.nsa_compress_attention, case, data, sel), grad_position=(0, 1, 2))(q, k, v)
    except RuntimeError as err:   # no bprop registered for the built-in op in this MindSpore
        pytest.skip(f"ms.grad through ops.nsa_compress_attention fails in this MindSpore: {str(err)[:200]}")
    ours = ms.grad(_attention_loss(ms_nsa.nsa_compress_attention, case, data), grad_position=(0, 1, 2))(q, k, v)
    for label, got, want in zip(("dq", "dk", "dv"), ours, theirs):
        err = rel_error(to_numpy(got), to_numpy(want))
        assert err < REL_TOL[dtype], f"{label}: relative error {err:.3e} vs ops.nsa_compress_attention's gradient"
