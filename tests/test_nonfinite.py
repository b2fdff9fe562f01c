"""NaN/Inf inputs give the reference's NaN/Inf pattern (never a crash), and zero-length batches work."""
import numpy as np
import pytest

import ms_nsa
from cases import Case, to_numpy
from test_backward import run_backward
from test_forward import reference_forward, run_forward

# The reference itself computes with NaN/Inf on purpose here.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

INJECTIONS = {
    "nan-query": ("q", (2, 1, 3), np.nan),
    # key/value rows early in their batch, so that causal rows see them too (through the diagonal block)
    "inf-key": ("k", (2, 0, 5), np.inf),
    "neg-inf-key": ("k", (49, 1, 0), -np.inf),
    "neg-inf-value": ("v", (3, 1, 2), -np.inf),
    "nan-value": ("v", (50, 0, 7), np.nan),
    "nan-grad": ("d_out", (5, 2, 1), np.nan),
    "inf-grad": ("d_out", (9, 0, 4), np.inf),
}


def assert_same_pattern(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN pattern differs")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want), err_msg=f"{what}: +inf pattern differs")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"{what}: -inf pattern differs")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("sparse_mode", [0, 2])
@pytest.mark.parametrize("injection", sorted(INJECTIONS))
def test_nonfinite_inputs_follow_the_reference(injection, sparse_mode, dtype):
    case = Case(q_lens=(6, 7), kv_blocks=(3, 4), sparse_mode=sparse_mode, dtype=dtype, keep_diagonal=True).make()
    array, index, value = INJECTIONS[injection]
    case.data[array][index] = value

    out, softmax_max, softmax_sum = run_forward(case)
    ref_out, ref_max, ref_sum = reference_forward(case)
    assert np.isnan(ref_out).any() or np.isinf(ref_out).any() or array == "d_out"  # the case bites
    assert_same_pattern(to_numpy(out), ref_out, "attention_out")
    assert_same_pattern(to_numpy(softmax_max), ref_max, "softmax_max")
    assert_same_pattern(to_numpy(softmax_sum), ref_sum, "softmax_sum")

    (dq, dk, dv), (out, softmax_max, softmax_sum) = run_backward(case, (out, softmax_max, softmax_sum))
    d = case.data
    ref = ms_nsa.reference.backward(d["d_out"], d["q"], d["k"], d["v"], to_numpy(out), to_numpy(softmax_max),
                                    to_numpy(softmax_sum), d["topk"], *case.attrs, sparse_mode=sparse_mode,
                                    **case.lengths())
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        assert_same_pattern(to_numpy(got), want, name)


@pytest.mark.parametrize("sparse_mode", [0, 2])
def test_zero_length_batches_match_the_reference(sparse_mode):
    # Empty query batches, one of them with keys and one with none, between and after real batches.
    case = Case(q_lens=(0, 5, 0, 3, 0), kv_blocks=(2, 3, 0, 2, 0), sparse_mode=sparse_mode).make()
    out, softmax_max, softmax_sum = run_forward(case)
    ref_out, ref_max, ref_sum = reference_forward(case)
    np.testing.assert_allclose(to_numpy(out), ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(softmax_sum), ref_sum, rtol=1e-5)
    (dq, dk, dv), outs = run_backward(case)
    d = case.data
    ref = ms_nsa.reference.backward(d["d_out"], d["q"], d["k"], d["v"], *(to_numpy(x) for x in outs), d["topk"],
                                    *case.attrs, sparse_mode=sparse_mode, **case.lengths())
    for got, want in zip((dq, dk, dv), ref):
        np.testing.assert_allclose(to_numpy(got), want, rtol=1e-4, atol=1e-5)
