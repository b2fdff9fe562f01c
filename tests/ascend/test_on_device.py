"""ms_nsa on an Ascend NPU vs the float64 reference: the CPU suite's cases, within CANN's contract.

The CPU cases (tests/test_forward.py) use head dims the CPU allows; CANN takes D in {128, 192} with
Dv = 128 and float16/bfloat16 only, so each case runs here with D/Dv = 128/128 and 192/128.
Forward outputs and the gradients through `ms.grad` (the registered bprop -> aclnnNsaSelectedAttentionGrad)
are compared in PyNative and in GRAPH_MODE.
"""
import numpy as np
import pytest
import mindspore as ms

import ms_nsa
from cases import REL_TOL, Case, rel_error, to_numpy
from modes import mode  # noqa: F401  (the fixture; tests/conftest.py is kept out here)
from test_forward import CASES

HEAD_DIMS = {"d128": (128, 128), "d192-dv128": (192, 128)}
ASCEND_CASES = {f"{name}/{dims}": Case(**{**case.__dict__, "head_dim": HEAD_DIMS[dims][0],
                                          "v_head_dim": HEAD_DIMS[dims][1], "data": {}})
                for name, case in sorted(CASES.items()) for dims in HEAD_DIMS}


class _Loss(ms.nn.Cell):
    """sum(attention_out * d_out): its gradient is the gradient op fed with grad = d_out."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        self.attn = ms_nsa.nn.NsaSelectAttention(case.q_heads, case.select_block_size, case.select_block_count,
                                                 scale_value=case.scale_value, sparse_mode=case.sparse_mode)

    def construct(self, q, k, v, topk, d_out):
        out = self.attn(q, k, v, topk, self.case.actual_seq_qlen, self.case.actual_seq_kvlen)
        return (out.astype(ms.float32) * d_out.astype(ms.float32)).sum()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("sparse_mode", [0, 2])
@pytest.mark.parametrize("name", sorted(ASCEND_CASES))
def test_forward_and_gradients_match_reference(name, sparse_mode, dtype, mode):
    case = Case(**{**ASCEND_CASES[name].__dict__, "sparse_mode": sparse_mode, "dtype": dtype, "data": {}}).make()
    q, k, v, topk, d_out = case.tensors()
    d = case.data
    out, _, _ = ms_nsa.nsa_select_attention(q, k, v, topk, *case.attrs, sparse_mode=sparse_mode, **case.lengths())
    ref_out, _, _ = ms_nsa.reference.forward(d["q"], d["k"], d["v"], d["topk"], *case.attrs,
                                             sparse_mode=sparse_mode, **case.lengths())
    err = rel_error(to_numpy(out), ref_out)
    assert err < REL_TOL[dtype], f"forward: relative error {err:.3e} over {REL_TOL[dtype]:.0e}"

    grads = ms.grad(_Loss(case), grad_position=(0, 1, 2))(q, k, v, topk, d_out)
    ref_out64 = ms_nsa.reference.forward(d["q"], d["k"], d["v"], d["topk"], *case.attrs, sparse_mode=sparse_mode,
                                         **case.lengths())
    ref = ms_nsa.reference.backward(d["d_out"], d["q"], d["k"], d["v"], *ref_out64, d["topk"], *case.attrs,
                                    sparse_mode=sparse_mode, **case.lengths())
    for label, got, want in zip(("dq", "dk", "dv"), grads, ref):
        err = rel_error(to_numpy(got), want)
        assert err < REL_TOL[dtype] * 2, f"{label}: relative error {err:.3e} over {2 * REL_TOL[dtype]:.0e}"
