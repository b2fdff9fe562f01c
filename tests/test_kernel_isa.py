"""Every instruction set the library has for this machine's architecture, each forced in turn.

The library picks its best instruction set at load time (custom_aot/nsa_isa.h); MS_NSA_ISA forces
a lesser one: on x86-64 the AVX2 and baseline kernels (the AVX-512 ones run in the rest of the suite
wherever the CPU has AVX-512), on aarch64 the NEON and baseline kernels (tools/aarch64/ runs this file
under emulation). Each path runs in a child process on a varlen, causal, GQA case with duplicates, a
partially visible diagonal block and a width that is not a multiple of the vector: forward and
backward against the float64 reference, and the same bits for 1 and 3 threads, with each of the two
kernel strategies (per item, per KV block) forced in turn.
"""
import json
import os
import platform
import subprocess
import sys

import pytest

from cases import REL_TOL

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, sys
import numpy as np
import mindspore as ms
ms.set_device("CPU")
import ms_nsa
from ms_nsa import _cpu_kernels
from cases import Case, rel_error, to_numpy

def run(case):
    q, k, v, topk, d_out = case.tensors()
    kw = dict(sparse_mode=case.sparse_mode, **case.lengths())
    outs = ms_nsa.nsa_select_attention(q, k, v, topk, *case.attrs, **kw)
    grads = ms_nsa.nsa_select_attention_grad(d_out, q, k, v, *outs, topk, *case.attrs, **kw)
    return outs, grads

errors, same_bits = {}, True
for strategy, dtype in ((s, d) for s in ("items", "blocks") for d in ("float32", "float16", "bfloat16")):
    _cpu_kernels._force_strategy(strategy)
    for group, head_dim in ((3, 40), (12, 72)):
        case = Case(q_lens=(37, 20), kv_blocks=(5, 3), q_heads=2 * group, kv_heads=2, head_dim=head_dim,
                    v_head_dim=24, select_block_size=16, select_block_count=3, sparse_mode=2, dtype=dtype,
                    duplicates=True, keep_diagonal=True).make()
        d = case.data
        ms_nsa.set_num_threads(1)
        (out, smax, ssum), grads = run(case)
        ref_out = ms_nsa.reference.forward(d["q"], d["k"], d["v"], d["topk"], *case.attrs,
                                           sparse_mode=2, **case.lengths())[0]
        ref_grads = ms_nsa.reference.backward(d["d_out"], d["q"], d["k"], d["v"], to_numpy(out), to_numpy(smax),
                                              to_numpy(ssum), d["topk"], *case.attrs, sparse_mode=2,
                                              **case.lengths())
        key = f"{dtype}/{strategy}/G{group}/D{head_dim}"
        errors[key] = [rel_error(to_numpy(out), ref_out)] + [
            rel_error(to_numpy(g), r) for g, r in zip(grads, ref_grads)]
        ms_nsa.set_num_threads(3)
        (out3, _, _), grads3 = run(case)
        for a, b in zip((out,) + tuple(grads), (out3,) + tuple(grads3)):
            same_bits &= bool(np.array_equal(to_numpy(a).view(np.uint64), to_numpy(b).view(np.uint64)))
import ctypes
from ms_nsa._cpu_kernels import library_path
lib = ctypes.CDLL(library_path())
lib.ms_nsa_kernel_isa.restype = ctypes.c_char_p
print(json.dumps({"isa": lib.ms_nsa_kernel_isa().decode(), "errors": errors, "same_bits": same_bits}))
"""


def cpu_has(flag):
    with open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and flag in line.split() for line in f)


def run_forced(isa, child):
    """Runs `child` (Python that prints a JSON report {isa, errors, same_bits} last) with MS_NSA_ISA=isa
    and checks the report: that ISA ran, the same bits for 1 and 3 threads, errors {case: [out, dq,
    dk, dv]} within the reference tolerances (the gradients get twice the room)."""
    if isa == "avx2" and not (cpu_has("avx2") and cpu_has("fma") and cpu_has("f16c")):
        pytest.skip("this CPU has no AVX2/FMA/F16C")
    env = dict(os.environ, MS_NSA_ISA=isa, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["isa"] == isa
    assert report["same_bits"], "results changed with the thread count"
    for key, errs in report["errors"].items():
        dtype = key.split("/")[0]
        assert errs[0] < REL_TOL[dtype], f"{key} attention_out: {errs[0]:.2e}"
        for name, err in zip(("dq", "dk", "dv"), errs[1:]):
            assert err < 2 * REL_TOL[dtype], f"{key} {name}: {err:.2e}"


# nsa_isa.h's sets per architecture, but the best x86 one (which the rest of the suite runs there)
FORCED_ISAS = {"x86_64": ["avx2", "baseline"], "aarch64": ["neon", "baseline"]}.get(platform.machine(), ["baseline"])


@pytest.mark.parametrize("isa", FORCED_ISAS)
def test_forced_instruction_set_matches_reference(isa):
    run_forced(isa, CHILD)
