"""Both kernel strategies, each forced, against the float64 reference.

The CPU kernels have two strategies (custom_aot/nsa_core.cc, docs/performance.md): per (query row, KV
head) item, and per KV block of a tile of query rows (nsa_block_kernels.h). Each call picks one from the
shapes; here every call is forced to one of them (a hidden hook, not the API), so each is checked on
every shape, including the ones the automatic choice would give to the other: forward and backward
vs the reference, NaN/Inf patterns, and the same bits for 1, 2, 3 and 5 threads. The two strategies
agree with each other to float32 rounding, not bit for bit (their softmax sums run in other orders).
"""
import numpy as np
import pytest

import ms_nsa
from ms_nsa import _cpu_kernels
from cases import REL_TOL, Case, rel_error, to_numpy
from test_backward import GRAD_TOL, run_backward
from test_forward import CASES, reference_forward, run_forward
from test_modes import assert_same_bits, forward_and_backward
import test_nonfinite
from test_nonfinite import INJECTIONS

STRATEGIES = ["items", "blocks"]


@pytest.fixture(params=STRATEGIES)
def strategy(request):
    previous = _cpu_kernels._force_strategy(request.param)
    yield request.param
    _cpu_kernels._force_strategy(previous)


def check_against_reference(case):
    out, softmax_max, softmax_sum = run_forward(case)
    ref_out, ref_max, ref_sum = reference_forward(case)
    assert rel_error(to_numpy(out), ref_out) < REL_TOL[case.dtype]
    finite = np.isfinite(ref_max)
    np.testing.assert_array_equal(np.isneginf(to_numpy(softmax_max)), np.isneginf(ref_max))
    np.testing.assert_allclose(to_numpy(softmax_max)[finite], ref_max[finite], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(softmax_sum), ref_sum, rtol=1e-5, atol=0)
    (dq, dk, dv), outs = run_backward(case, (out, softmax_max, softmax_sum))
    d = case.data
    ref = ms_nsa.reference.backward(d["d_out"], d["q"], d["k"], d["v"], *(to_numpy(x) for x in outs), d["topk"],
                                    *case.attrs, sparse_mode=case.sparse_mode, **case.lengths())
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), ref):
        err = rel_error(to_numpy(got), want)
        assert err < GRAD_TOL[case.dtype], f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("sparse_mode", [0, 2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forced_strategy_matches_reference(strategy, name, sparse_mode):
    check_against_reference(Case(**{**CASES[name].__dict__, "sparse_mode": sparse_mode, "data": {}}).make())


# Shapes that stress the block strategy's bookkeeping: many rows per tile sharing blocks (long chunks,
# chunks whose uses see different numbers of rows of a causal diagonal block), a block size that is not
# a power of two, the largest group (a chunk of only 4 uses), several batches with different KV lengths.
BLOCK_CASES = {
    "shared-blocks": Case(q_lens=(150, 90), kv_blocks=(5, 4), q_heads=4, kv_heads=4, head_dim=48, v_head_dim=40,
                          select_block_size=32, select_block_count=3, keep_diagonal=True),
    "beta-48": Case(q_lens=(60, 39), kv_blocks=(4, 3), q_heads=6, kv_heads=2, head_dim=20, v_head_dim=12,
                    select_block_size=48, select_block_count=2),
    # G = 2 on causal diagonals: a chunk mixes uses that see 1..beta rows of a block with full ones.
    "diagonal-g2": Case(q_lens=(96, 70), kv_blocks=(3, 3), q_heads=4, kv_heads=2, head_dim=24, v_head_dim=16,
                        select_block_size=32, select_block_count=3, keep_diagonal=True),
    "g32-n3": Case(q_lens=(21, 13), kv_blocks=(2, 2), q_heads=96, kv_heads=3, head_dim=16, v_head_dim=8,
                   select_block_count=2),
}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("sparse_mode", [0, 2])
@pytest.mark.parametrize("name", sorted(BLOCK_CASES))
def test_forced_strategy_on_block_shapes(strategy, name, sparse_mode, dtype):
    case = Case(**{**BLOCK_CASES[name].__dict__, "sparse_mode": sparse_mode, "dtype": dtype, "data": {}}).make()
    check_against_reference(case)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forced_strategy_is_independent_of_thread_count(strategy, dtype):
    case = Case(q_lens=(40, 33, 70), kv_blocks=(4, 3, 5), q_heads=8, kv_heads=2, select_block_count=3,
                duplicates=True, sparse_mode=2, dtype=dtype).make()
    try:
        results = []
        for threads in (1, 2, 3, 5):
            ms_nsa.set_num_threads(threads)
            results.append(forward_and_backward(case))
    finally:
        ms_nsa.set_num_threads(0)
    for other in results[1:]:
        assert_same_bits(results[0], other)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_block_tiles_change_no_bits(dtype):
    # The block strategy's tiles (query rows x KV heads, chosen per call) only regroup the work: tiles of
    # a few rows and one or two heads, which split every block's uses across tiles and chunks, give the
    # same bits as the tiles it picks itself (here one tile holds everything).
    case = Case(q_lens=(40, 33, 70), kv_blocks=(4, 3, 5), q_heads=6, kv_heads=3, select_block_count=3,
                duplicates=True, keep_diagonal=True, sparse_mode=2, dtype=dtype).make()
    previous = _cpu_kernels._force_strategy("blocks")
    try:
        results = [forward_and_backward(case)]
        for rows, kv_heads in ((7, 1), (1, 2), (64, 3)):
            _cpu_kernels._force_block_tile(rows, kv_heads)
            results.append(forward_and_backward(case))
    finally:
        _cpu_kernels._force_block_tile(0, 0)
        _cpu_kernels._force_strategy(previous)
    check_against_reference(case)
    for other in results[1:]:
        assert_same_bits(results[0], other)
    with pytest.raises(ValueError, match="kv_heads must be an int >= 0, got -1"):
        _cpu_kernels._force_block_tile(8, -1)


@pytest.mark.parametrize("sparse_mode", [0, 2])
@pytest.mark.parametrize("injection", sorted(INJECTIONS))
def test_forced_strategy_follows_reference_on_nonfinite_inputs(strategy, injection, sparse_mode):
    test_nonfinite.test_nonfinite_inputs_follow_the_reference(injection, sparse_mode, "float32")


def test_strategies_agree_and_force_hook_restores():
    case = Case(q_lens=(9, 14), kv_blocks=(3, 4), q_heads=4, kv_heads=2, select_block_count=2, sparse_mode=2).make()
    results = {}
    for name in STRATEGIES:
        previous = _cpu_kernels._force_strategy(name)
        try:
            results[name] = forward_and_backward(case)
        finally:
            assert _cpu_kernels._force_strategy(previous) == name
    for a, b in zip(results["items"], results["blocks"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="items"):
        _cpu_kernels._force_strategy("fastest")
