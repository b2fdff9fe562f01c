"""Gradient kernel vs the float64 reference, and ms.grad through the Cell vs autodiff of stock ops."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import ms_nsa
from ms_nsa.composed import composed_forward, row_geometry
from cases import REL_TOL, Case, rel_error, to_numpy
from test_forward import CASES

# The backward chains more roundings (dS, and dO/O enter in the input dtype), so it gets 2x the room.
GRAD_TOL = {dtype: 2 * tol for dtype, tol in REL_TOL.items()}


def run_backward(case, outputs=None):
    q, k, v, topk, d_out = case.tensors()
    if outputs is None:
        outputs = ms_nsa.nsa_select_attention(q, k, v, topk, *case.attrs, sparse_mode=case.sparse_mode,
                                              **case.lengths())
    out, softmax_max, softmax_sum = outputs
    return ms_nsa.nsa_select_attention_grad(d_out, q, k, v, out, softmax_max, softmax_sum, topk, *case.attrs,
                                            sparse_mode=case.sparse_mode, **case.lengths()), outputs


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("sparse_mode", [0, 2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_grad_op_matches_reference(name, sparse_mode, dtype):
    case = Case(**{**CASES[name].__dict__, "sparse_mode": sparse_mode, "dtype": dtype, "data": {}}).make()
    (dq, dk, dv), (out, softmax_max, softmax_sum) = run_backward(case)
    d = case.data
    # The reference backward reads the same forward outputs the kernel was given.
    ref = ms_nsa.reference.backward(d["d_out"], d["q"], d["k"], d["v"], to_numpy(out), to_numpy(softmax_max),
                                    to_numpy(softmax_sum), d["topk"], *case.attrs, sparse_mode=sparse_mode,
                                    **case.lengths())
    for name_, got, want, like in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, (d["q"], d["k"], d["v"])):
        assert got.shape == like.shape
        err = rel_error(to_numpy(got), want)
        assert err < GRAD_TOL[dtype], f"{name_}: relative error {err:.3e} over {GRAD_TOL[dtype]:.0e}"


def test_unselected_key_rows_get_zero_gradient():
    case = Case(q_lens=(4,), kv_blocks=(4,), select_block_count=1).make()
    case.data["topk"][:] = 1  # every query picks block 1 only
    (_, dk, dv), _ = run_backward(case)
    dk, dv = to_numpy(dk), to_numpy(dv)
    rows = np.arange(dk.shape[0])
    outside = (rows < 16) | (rows >= 32)
    assert np.all(dk[outside] == 0) and np.all(dv[outside] == 0)
    assert np.any(dk[~outside] != 0) and np.any(dv[~outside] != 0)


def test_fully_masked_rows_pass_no_gradient():
    case = Case(q_lens=(4,), kv_blocks=(4,), select_block_count=2, sparse_mode=2).make()
    case.data["topk"][0] = [[2, 3], [1, 3]]  # row 0 sees nothing
    (dq, _, _), _ = run_backward(case)
    assert np.all(to_numpy(dq)[0] == 0) and np.all(np.isfinite(to_numpy(dq)))


class Loss(ms.nn.Cell):
    """sum(attention_out * weights): a loss whose gradient w.r.t. attention_out is `weights`."""

    def __init__(self, attention, weights):
        super().__init__()
        self.attention = attention
        self.weights = weights

    def construct(self, query, key, value, topk_indices, actual_seq_qlen, actual_seq_kvlen):
        out = self.attention(query, key, value, topk_indices, actual_seq_qlen, actual_seq_kvlen)
        return (out.astype(ms.float32) * self.weights).sum()


class ComposedAttention(ms.nn.Cell):
    def __init__(self, case):
        super().__init__()
        self.case = case
        self.kv_begin, self.position = row_geometry(sum(case.q_lens), sum(case.kv_lens), case.actual_seq_qlen,
                                                    case.actual_seq_kvlen)

    def construct(self, query, key, value, topk_indices, actual_seq_qlen, actual_seq_kvlen):
        return composed_forward(query, key, value, topk_indices, self.case.scale_value,
                                self.case.select_block_size, self.kv_begin, self.position,
                                self.case.sparse_mode)


@pytest.mark.parametrize("sparse_mode", [0, 2])
@pytest.mark.parametrize("name", ["varlen-odd", "g8", "d192-dv128", "duplicates"])
def test_ms_grad_through_cell_matches_composed_autodiff(mode, name, sparse_mode):
    # keep_diagonal: every causal row sees at least its own block, as NSA's selection guarantees; the
    # composed softmax has no answer for a row that sees nothing.
    case = Case(**{**CASES[name].__dict__, "sparse_mode": sparse_mode, "keep_diagonal": True, "data": {}}).make()
    q, k, v, topk, d_out = case.tensors()
    lengths = case.lengths(as_tensor=True)
    weights = Tensor(case.data["d_out"])
    cell = ms_nsa.nn.NsaSelectAttention(case.q_heads, case.select_block_size, case.select_block_count,
                                        sparse_mode=sparse_mode)
    grad_fn = ms.grad(Loss(cell, weights), grad_position=(0, 1, 2))
    ref_fn = ms.grad(Loss(ComposedAttention(case), weights), grad_position=(0, 1, 2))
    got = grad_fn(q, k, v, topk, lengths["actual_seq_qlen"], lengths["actual_seq_kvlen"])
    want = ref_fn(q, k, v, topk, lengths["actual_seq_qlen"], lengths["actual_seq_kvlen"])
    for name_, g, w in zip(("dq", "dk", "dv"), got, want):
        err = rel_error(to_numpy(g), to_numpy(w))
        assert err < 1e-5, f"{name_}: ms.grad through the Cell differs from composed autodiff by {err:.3e}"
