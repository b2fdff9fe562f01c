"""Forward kernel vs the float64 reference over many random problems."""
import numpy as np
import pytest

import ms_nsa
from cases import REL_TOL, Case, low_precision_forward, rel_error, to_numpy

CASES = {
    "varlen-odd": Case(q_lens=(3, 7, 1, 5), kv_blocks=(4, 3, 2, 5)),
    "g1": Case(q_lens=(5, 4), kv_blocks=(3, 4), q_heads=2, kv_heads=2),
    "g8": Case(q_lens=(5, 4), kv_blocks=(3, 4), q_heads=8, kv_heads=1),
    "g32": Case(q_lens=(3, 2), kv_blocks=(2, 3), q_heads=32, kv_heads=1, head_dim=16, v_head_dim=16),
    "g16-n2": Case(q_lens=(4, 3), kv_blocks=(2, 3), q_heads=32, kv_heads=2, head_dim=16, v_head_dim=8),
    "d128": Case(q_lens=(6, 3), kv_blocks=(2, 3), head_dim=128, v_head_dim=128, select_block_size=64),
    "d192-dv128": Case(q_lens=(5, 4), kv_blocks=(3, 2), q_heads=8, kv_heads=2, head_dim=192, v_head_dim=128,
                       select_block_size=64, select_block_count=2),
    "block128": Case(q_lens=(4, 5), kv_blocks=(2, 3), select_block_size=128, select_block_count=2),
    "count16": Case(q_lens=(5, 3), kv_blocks=(16, 18), select_block_size=16, select_block_count=16),
    "count32": Case(q_lens=(4, 2), kv_blocks=(33, 32), select_block_size=16, select_block_count=32,
                    head_dim=16, v_head_dim=16),
    "duplicates": Case(q_lens=(6, 5), kv_blocks=(9, 8), select_block_count=8, duplicates=True),
    "one-batch": Case(q_lens=(9,), kv_blocks=(4,), select_block_size=32, select_block_count=3),
    "zero-len-batch": Case(q_lens=(3, 0, 4), kv_blocks=(2, 2, 3)),
}


def run_forward(case, lengths_as_tensor=False):
    q, k, v, topk, _ = case.tensors()
    return ms_nsa.nsa_select_attention(q, k, v, topk, *case.attrs, sparse_mode=case.sparse_mode,
                                       **case.lengths(lengths_as_tensor))


def reference_forward(case):
    d = case.data
    return ms_nsa.reference.forward(d["q"], d["k"], d["v"], d["topk"], *case.attrs, sparse_mode=case.sparse_mode,
                                    **case.lengths())


def check_stats(softmax_max, softmax_sum, ref_max, ref_sum):
    got_max, got_sum = to_numpy(softmax_max), to_numpy(softmax_sum)
    assert got_max.shape == ref_max.shape and got_max.shape[-1] == 8
    # Fully masked rows: -inf and 0 exactly; every other row finite and close.
    np.testing.assert_array_equal(np.isneginf(got_max), np.isneginf(ref_max))
    finite = np.isfinite(ref_max)
    np.testing.assert_allclose(got_max[finite], ref_max[finite], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_sum, ref_sum, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("sparse_mode", [0, 2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_reference(name, sparse_mode, dtype):
    case = Case(**{**CASES[name].__dict__, "sparse_mode": sparse_mode, "dtype": dtype, "data": {}}).make()
    out, softmax_max, softmax_sum = run_forward(case)
    ref_out, ref_max, ref_sum = reference_forward(case)

    assert out.shape == ref_out.shape and out.dtype == case.tensors()[0].dtype
    err = rel_error(to_numpy(out), ref_out)
    assert err < REL_TOL[dtype], f"relative error {err:.3e} over {REL_TOL[dtype]:.0e}"
    if dtype != "float32":
        # flash-attention's convention: no worse than twice a same-dtype composed implementation.
        lowp_err = rel_error(low_precision_forward(case), ref_out)
        assert err <= 2 * lowp_err, f"kernel error {err:.3e} vs same-dtype composed {lowp_err:.3e}"
    check_stats(softmax_max, softmax_sum, ref_max, ref_sum)


def test_fully_masked_rows_are_zero():
    # Causal, and row 0 of the batch selects only blocks past its position: it sees no key.
    case = Case(q_lens=(4,), kv_blocks=(4,), select_block_count=2, sparse_mode=2).make()
    case.data["topk"][0] = [[2, 3], [1, 3]]
    out, softmax_max, softmax_sum = run_forward(case)
    assert np.all(to_numpy(out)[0] == 0)
    assert np.all(np.isneginf(to_numpy(softmax_max)[0])) and np.all(to_numpy(softmax_sum)[0] == 0)
    assert np.all(np.isfinite(to_numpy(out)))


def test_lengths_as_tensors_equal_tuples():
    case = CASES["varlen-odd"].make()
    a = run_forward(case, lengths_as_tensor=False)
    b = run_forward(case, lengths_as_tensor=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.asnumpy(), y.asnumpy())


def test_causal_mask_is_batch_local():
    # The second batch's first query may see only key 0 of its own batch: its output is exactly V there.
    case = Case(q_lens=(2, 3), kv_blocks=(2, 2), q_heads=2, kv_heads=1, select_block_count=1,
                sparse_mode=2).make()
    case.data["topk"][:] = 0
    out, _, _ = run_forward(case)
    v = case.data["v"]
    np.testing.assert_allclose(to_numpy(out)[2, :, :], np.repeat(v[32:33, 0], 2, axis=0), rtol=1e-6)
