"""Fuzzing with hypothesis: random valid problems match the reference; random invalid calls fail cleanly.

Invalid calls run in a subprocess (tests/fuzz_invalid_worker.py), so a crash fails the test instead of
killing the suite; the worker names the case it was running when it died.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import ms_nsa
from cases import REL_TOL, rel_error, to_numpy
from fuzz_problems import CORRUPTIONS, GRAD_CORRUPTIONS, valid_cases
from test_backward import run_backward

WORKER = Path(__file__).with_name("fuzz_invalid_worker.py")


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=valid_cases())
def test_random_valid_problems_match_the_reference(case):
    case.make()
    (dq, dk, dv), (out, softmax_max, softmax_sum) = run_backward(case)
    d = case.data
    ref_out, ref_max, ref_sum = ms_nsa.reference.forward(d["q"], d["k"], d["v"], d["topk"], *case.attrs,
                                                         sparse_mode=case.sparse_mode, **case.lengths())
    tol = REL_TOL[case.dtype]
    assert rel_error(to_numpy(out), ref_out) < tol
    np.testing.assert_array_equal(np.isneginf(to_numpy(softmax_max)), np.isneginf(ref_max))
    np.testing.assert_allclose(to_numpy(softmax_sum), ref_sum, rtol=1e-5)
    ref_grads = ms_nsa.reference.backward(d["d_out"], d["q"], d["k"], d["v"], to_numpy(out), to_numpy(softmax_max),
                                          to_numpy(softmax_sum), d["topk"], *case.attrs,
                                          sparse_mode=case.sparse_mode, **case.lengths())
    for got, want in zip((dq, dk, dv), ref_grads):
        assert rel_error(to_numpy(got), want) < 2 * tol


@pytest.mark.parametrize("mode, examples", [("pynative", 8), ("graph", 2)])
def test_random_invalid_calls_raise_cleanly(mode, examples):
    result = subprocess.run([sys.executable, str(WORKER), "--mode", mode, "--examples", str(examples)],
                            capture_output=True, text=True, timeout=1200, cwd=WORKER.parent,
                            env=dict(os.environ, GLOG_v="3"))
    lines = result.stdout.splitlines()
    assert result.returncode == 0, (f"worker exited with {result.returncode} (negative = killed by a signal); "
                                    f"last cases:\n" + "\n".join(lines[-5:]) + "\n" + result.stderr[-3000:])
    counts = json.loads(next(l for l in lines if l.startswith("SUMMARY "))[len("SUMMARY "):])
    kinds = [c[0] for c in CORRUPTIONS + GRAD_CORRUPTIONS if mode == "pynative" or c[4]]
    missing = [k for k in kinds if counts.get(k, 0) < examples]
    assert not missing, f"kinds not exercised {examples} times: {missing}"
    print(f"{mode}: {sum(counts.values())} invalid calls over {len(counts)} kinds, all raised cleanly")
