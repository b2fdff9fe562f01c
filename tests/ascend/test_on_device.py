"""ms_nsa on an Ascend NPU vs the float64 reference, the CANN flavour of it, and MindSpore's built-in op.

The CPU cases (tests/test_forward.py) use head dims the CPU allows; CANN takes D in {128, 192} with
Dv = 128 and float16/bfloat16 only, so each case runs here with D/Dv = 128/128 and 192/128.
Forward outputs and the gradients through `ms.grad` (the registered bprop -> aclnnNsaSelectedAttentionGrad)
are compared in PyNative and in GRAPH_MODE.
"""
import numpy as np
import pytest
import mindspore as ms

import ms_nsa
from cases import REL_TOL, Case, OutputLoss, rel_error, to_numpy
from modes import mode  # noqa: F401  (the fixture; tests/conftest.py is kept out here)
from test_forward import CASES

HEAD_DIMS = {"d128": (128, 128), "d192-dv128": (192, 128)}
ASCEND_CASES = {f"{name}/{dims}": Case(**{**case.__dict__, "head_dim": HEAD_DIMS[dims][0],
                                          "v_head_dim": HEAD_DIMS[dims][1], "data": {}})
                for name, case in sorted(CASES.items()) for dims in HEAD_DIMS}


def _grads(case, q, k, v, topk, d_out):
    """dq, dk, dv of sum(attention_out * d_out) through the Cell and ms.grad."""
    return ms.grad(OutputLoss(case), grad_position=(0, 1, 2), has_aux=True)(q, k, v, topk, d_out)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("sparse_mode", [0, 2])
@pytest.mark.parametrize("name", sorted(ASCEND_CASES))
def test_forward_and_gradients_match_reference(name, sparse_mode, dtype, mode):
    # With sparse_mode 2, selections shaped as NativeSparseAttention makes them: the set where CANN's
    # rules and ms_nsa's agree (docs/semantics.md); the CPU suite's random rows are outside it.
    case = Case(**{**ASCEND_CASES[name].__dict__, "sparse_mode": sparse_mode, "dtype": dtype,
                   "nsa_shaped": sparse_mode == 2, "data": {}}).make()
    q, k, v, topk, d_out = case.tensors()
    d = case.data
    out, _, _ = ms_nsa.nsa_select_attention(q, k, v, topk, *case.attrs, sparse_mode=sparse_mode, **case.lengths())
    ref_out, _, _ = ms_nsa.reference.forward(d["q"], d["k"], d["v"], d["topk"], *case.attrs,
                                             sparse_mode=sparse_mode, **case.lengths())
    err = rel_error(to_numpy(out), ref_out)
    assert err < REL_TOL[dtype], f"forward: relative error {err:.3e} over {REL_TOL[dtype]:.0e}"

    grads = _grads(case, q, k, v, topk, d_out)
    ref_out64 = ms_nsa.reference.forward(d["q"], d["k"], d["v"], d["topk"], *case.attrs, sparse_mode=sparse_mode,
                                         **case.lengths())
    ref = ms_nsa.reference.backward(d["d_out"], d["q"], d["k"], d["v"], *ref_out64, d["topk"], *case.attrs,
                                    sparse_mode=sparse_mode, **case.lengths())
    for label, got, want in zip(("dq", "dk", "dv"), grads, ref):
        err = rel_error(to_numpy(got), want)
        assert err < REL_TOL[dtype] * 2, f"{label}: relative error {err:.3e} over {2 * REL_TOL[dtype]:.0e}"


# -- CANN's own rules, and MindSpore's built-in op ------------------------------------------------------
def _sorted_case(case):
    """The case with each row sorted, as the Ascend path passes it to CANN."""
    d = dict(case.data, topk=np.sort(case.data["topk"], axis=-1))
    return d


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(ASCEND_CASES))
def test_matches_the_cann_flavour(name, dtype, mode):
    """CANN's kernels against the CANN-flavour reference (ms_nsa.reference.cann_*), on every case, in
    or out of the set where CANN and ms_nsa agree (docs/semantics.md): a failure here means CANN does
    not do what its sources say (as read for the reference); a failure above but not here, that the
    input is outside the agreeing set."""
    # Every row keeps its own block, so none sees no key (CANN's gradient of such a row is not modelled).
    case = Case(**{**ASCEND_CASES[name].__dict__, "sparse_mode": 2, "dtype": dtype, "keep_diagonal": True,
                   "data": {}}).make()
    q, k, v, topk, d_out = case.tensors()
    d = _sorted_case(case)
    mask = ms_nsa._ascend_kernels.causal_mask()   # what ms_nsa passes for sparse_mode 2
    kwargs = dict(atten_mask=mask, sparse_mode=2, **case.lengths())
    out, _, _ = ms_nsa.nsa_select_attention(q, k, v, topk, *case.attrs, sparse_mode=2, **case.lengths())
    ref = ms_nsa.reference.cann_forward(d["q"], d["k"], d["v"], d["topk"], *case.attrs, **kwargs)
    err = rel_error(to_numpy(out), ref[0])
    assert err < REL_TOL[dtype], f"forward vs CANN flavour: {err:.3e}"
    grads = _grads(case, q, k, v, topk, d_out)
    ref_grads = ms_nsa.reference.cann_backward(d["d_out"], d["q"], d["k"], d["v"], *ref, d["topk"], *case.attrs,
                                               **kwargs)
    for label, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        err = rel_error(to_numpy(got), want)
        assert err < 2 * REL_TOL[dtype], f"{label} vs CANN flavour: {err:.3e}"


# MindSpore's built-in op documents only select_block_size 64 and select_block_count 16.
BUILTIN_CASE = Case(q_lens=(70, 130), kv_blocks=(16, 18), q_heads=4, kv_heads=1, head_dim=192, v_head_dim=128,
                    select_block_size=64, select_block_count=16, sparse_mode=2, nsa_shaped=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_matches_mindspore_builtin_op(dtype, mode):
    """ms_nsa vs ops.nsa_select_attention given a 2-D bool mask (so its forward is causal too; its
    default, no mask, is a non-causal forward with a causal gradient), forward and gradient."""
    case = Case(**{**BUILTIN_CASE.__dict__, "dtype": dtype, "data": {}}).make()
    q, k, v, topk, d_out = case.tensors()
    mask = ms_nsa._ascend_kernels.causal_mask()
    sorted_topk = ms.Tensor(np.sort(case.data["topk"], axis=-1))

    def builtin(q, k, v):
        out, _, _ = ms.ops.nsa_select_attention(q, k, v, sorted_topk, case.scale_value, case.q_heads, 64, 16,
                                                atten_mask=mask, **case.lengths())
        return (out.astype(ms.float32) * d_out.astype(ms.float32)).sum()

    def ours(q, k, v):
        out, _, _ = ms_nsa.nsa_select_attention(q, k, v, topk, case.scale_value, case.q_heads, 64, 16,
                                                sparse_mode=2, **case.lengths())
        return (out.astype(ms.float32) * d_out.astype(ms.float32)).sum()

    want_value, want_grads = ms.value_and_grad(builtin, grad_position=(0, 1, 2))(q, k, v)
    got_value, got_grads = ms.value_and_grad(ours, grad_position=(0, 1, 2))(q, k, v)
    assert abs(float(got_value.asnumpy()) - float(want_value.asnumpy())) <= 1e-3 * abs(float(want_value.asnumpy()))
    for label, got, want in zip(("dq", "dk", "dv"), got_grads, want_grads):
        err = rel_error(to_numpy(got), to_numpy(want))
        assert err < REL_TOL[dtype], f"{label} vs ops.nsa_select_attention: {err:.3e}"
