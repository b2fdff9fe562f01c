"""The C++ core on other architectures: cross-compiled, run under qemu user emulation, checked here.

For each target (aarch64: the Kunpeng hosts of Atlas A2 servers, with NEON kernels; riscv64: an
architecture with neither x86 nor Arm code, which must get the portable baseline):
- the kernel library builds with setup.py's own flags (what `pip install .` does there);
- the three standalone drivers of custom_aot/tests/ (every op's entry points, called as MindSpore
  calls them: valid problems in every dtype, every data-dependent error, 300 random corruptions each)
  run under qemu and report every status as expected;
- every successful call of those runs is dumped (MS_NSA_DUMP_DIR, driver_common.h) and checked here
  against the float64 reference of its op, within the dtype tolerances of the rest of the suite;
- the same calls give the same bits with 1 and 2 threads (aarch64, NEON kernels).
On aarch64 both instruction sets of nsa_isa.h run (neon, and the portable baseline forced), and the
selected pair's driver also with each kernel strategy (per item, block-outer) forced.

Needs {arch}-linux-gnu-g++ and qemu-{arch} (Debian: g++-aarch64-linux-gnu, g++-riscv64-linux-gnu,
qemu-user; .ci/run installs them). Without them the tests skip, saying so; MS_NSA_REQUIRE_CROSS=1 (set
by CI) turns that skip into a failure. The Python suite under emulated aarch64 is tools/aarch64/.
"""
import ast
import inspect
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ms_nsa import reference as select_reference
from ms_nsa._cpu_kernels import kernel_inputs
from ms_nsa.compress import reference as compress_reference
from ms_nsa.compress_attention import reference as compress_attention_reference
from ms_nsa.op_def import load_op_def
from ms_nsa.window import reference as window_reference

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "custom_aot"
REL_TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}

# driver -> the kernel folders it links (as in test_sanitizers.py)
DRIVERS = {"sanitize_driver": ["."], "sanitize_compress_driver": [".", "compress", "compress_attention"],
           "sanitize_window_driver": [".", "window"]}

# what each driver calls: the entry points whose names start so
DRIVER_OPS = {"sanitize_driver": "NsaSelect", "sanitize_compress_driver": "NsaCompress",
              "sanitize_window_driver": "NsaWindow"}
# entry point -> (reference function, the names of what it returns, in its order)
REFERENCES = {
    "NsaSelectAttention": (select_reference.forward, ("attention_out", "softmax_max", "softmax_sum")),
    "NsaSelectAttentionGrad": (select_reference.backward, ("dq", "dk", "dv")),
    "NsaCompress": (compress_reference.forward, ("output",)),
    "NsaCompressGrad": (compress_reference.backward, ("input_grad", "weight_grad")),
    "NsaCompressAttention": (compress_attention_reference.forward,
                             ("attention_out", "topk_indices", "softmax_max", "softmax_sum")),
    "NsaCompressAttentionGrad": (compress_attention_reference.backward, ("dq", "dk", "dv")),
    "NsaWindowAttention": (window_reference.forward, ("attention_out", "softmax_max", "softmax_sum")),
    "NsaWindowAttentionGrad": (window_reference.backward, ("dq", "dk", "dv")),
}
# Optional kernel inputs the drivers always pass, with the int attribute saying whether they count.
PRESENCE_FLAGS = {"atten_mask": "has_atten_mask", "topk_mask": "has_topk_mask",
                  "actual_sel_seq_kvlen": "has_actual_sel_seq_kvlen"}
TARGETS = {"aarch64": ["neon", "baseline"], "riscv64": ["baseline"]}


def kernel_flags():
    """setup.py's KERNEL_FLAGS, read from the file (the one list `pip install .` compiles with)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "KERNEL_FLAGS":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no KERNEL_FLAGS")


def toolchain(arch):
    compiler, emulator = shutil.which(f"{arch}-linux-gnu-g++"), shutil.which(f"qemu-{arch}")
    sysroot = Path(f"/usr/{arch}-linux-gnu")
    if compiler and emulator and sysroot.is_dir():
        return compiler, emulator, sysroot
    reason = (f"no {arch} cross toolchain ({arch}-linux-gnu-g++: {compiler}, qemu-{arch}: {emulator}); "
              f"install g++-{arch}-linux-gnu and qemu-user (Debian), as .ci/run does")
    if os.environ.get("MS_NSA_REQUIRE_CROSS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def kernel_sources(folders):
    return sorted(str(p) for folder in folders for p in (KERNELS / folder).glob("*.cc"))


@pytest.fixture(scope="module", params=sorted(TARGETS))
def target(request, tmp_path_factory):
    """(arch, emulator, sysroot, {driver: binary}) once the library and the drivers built for arch."""
    arch = request.param
    compiler, emulator, sysroot = toolchain(arch)
    out = tmp_path_factory.mktemp(arch)
    all_kernels = [s for s in kernel_sources(["."] + [p.name for p in KERNELS.iterdir()
                                                     if p.is_dir() and p.name not in ("tests", "twin")])]
    jobs = [subprocess.Popen([compiler, *kernel_flags(), "-shared", f"-I{KERNELS}", *all_kernels, "-o",
                              str(out / "libms_nsa_cpu.so")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)]
    binaries = {name: out / name for name in DRIVERS}
    for name, folders in DRIVERS.items():
        flags = [f for f in kernel_flags() if f != "-fPIC"]
        jobs.append(subprocess.Popen([compiler, *flags, f"-I{KERNELS}", *kernel_sources(folders),
                                      str(KERNELS / "tests" / f"{name}.cc"), "-o", str(binaries[name])],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for job in jobs:
        log, _ = job.communicate(timeout=900)
        assert job.returncode == 0, f"{arch} build failed: {' '.join(job.args[:3])} ...\n{log[-4000:]}"
    return arch, emulator, sysroot, binaries


def run_driver(target, name, isa, threads, dump_dir, strategy=None):
    arch, emulator, sysroot, binaries = target
    dump_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MS_NSA_ISA=isa, MS_NSA_DUMP_DIR=str(dump_dir))
    env.pop("MS_NSA_STRATEGY", None)
    if strategy:  # the selected pair's per-item or block-outer kernels for every call (nsa_core.cc)
        env["MS_NSA_STRATEGY"] = strategy
    result = subprocess.run([emulator, "-L", str(sysroot), str(binaries[name])], capture_output=True, text=True,
                            timeout=900, env=env)
    assert result.returncode == 0, f"{arch} {name} ({isa}, {threads} threads):\n{result.stdout}\n{result.stderr[-4000:]}"
    summary = re.search(r"(\d+) valid problems, (\d+) invalid problems, (\d+) random corruptions, 0 failures",
                        result.stdout)
    assert summary and all(int(n) > 0 for n in summary.groups()), result.stdout
    return sorted(dump_dir.glob("case_*.txt"), key=lambda p: int(p.stem.split("_")[1]))


def load_case(manifest):
    """(entry, attrs, [(dtype, array)]) of one dumped call; half types come back as float32 values."""
    entry, attrs, tensors = None, {}, []
    for line in manifest.read_text().splitlines():
        kind, *fields = line.split()
        if kind == "entry":
            entry = fields[0]
        elif kind in ("int", "float"):
            attrs[fields[0]] = int(fields[1]) if kind == "int" else float(fields[1])
        else:
            dtype, shape = fields[0], tuple(int(d) for d in fields[1:])
            raw = np.fromfile(manifest.with_name(f"{manifest.stem}_{len(tensors)}.bin"),
                              {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
                               "int32": np.int32, "int64": np.int64, "bool": np.bool_, "uint8": np.uint8}[dtype])
            if dtype == "bfloat16":
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            tensors.append((dtype, raw.reshape(shape)))
    return entry, attrs, tensors


def snake_case(entry):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", entry).lower()


def check_against_reference(manifest):
    """Asserts that one dumped call's outputs are its op's float64 reference; returns the worst
    relative error per output (for the report)."""
    entry, attrs, tensors = load_case(manifest)
    op_def = load_op_def(snake_case(entry))
    inputs, outputs = kernel_inputs(op_def), list(op_def.output_names)
    assert len(tensors) == len(inputs) + len(outputs), f"{manifest.name}: {len(tensors)} tensors for {entry}"
    named = dict(zip(inputs + outputs, tensors))
    function, returned = REFERENCES[entry]
    parameters = inspect.signature(function).parameters
    kwargs = {}
    for name in parameters:
        if name in named and name not in outputs:
            dtype, array = named[name]
            if PRESENCE_FLAGS.get(name) and not attrs.get(PRESENCE_FLAGS[name]):
                continue
            kwargs[name] = tuple(int(x) for x in array) if dtype == "int64" else array
        elif name in named:       # a gradient op's forward outputs are its inputs
            kwargs[name] = named[name][1]
        elif name in attrs:
            kwargs[name] = attrs[name]
    expected = function(**kwargs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    errors = {}
    for name, want in zip(returned, expected):
        dtype, got = named[name]
        want = np.broadcast_to(np.asarray(want, np.float64).reshape(want.shape + (1,) * (got.ndim - want.ndim)),
                               got.shape) if want.ndim < got.ndim else np.asarray(want, np.float64)
        if name == "topk_indices":
            check_topk(kwargs, attrs, got, want, manifest)
            continue
        # non-finite values (fully masked rows' -inf statistics, NaN inputs) must be the reference's, exactly
        finite = np.isfinite(want)
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[np.isinf(want)],
                                                                             want[np.isinf(want)]), (
            f"{manifest.name} {entry} {name}: non-finite values differ from the reference")
        got, want = got[finite], want[finite]
        # relative to the values' norm, or to unit RMS where they are smaller (the drivers' data are N(0, 1);
        # some gradients are exactly 0, e.g. dq and dk of a one-key window)
        err = float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), np.sqrt(want.size), 1e-30))
        # stats are float32 whatever the dtype; gradients get twice the room, as in the rest of the suite
        tol = REL_TOL["float32" if dtype == "float32" else named[inputs[0]][0]] * (2 if name.startswith("d") or
                                                                                name.endswith("_grad") else 1)
        assert err < tol, f"{manifest.name} {entry} {name} ({named[inputs[0]][0]}): rel error {err:.2e} > {tol:.0e}"
        errors[name] = err
    return entry, named[inputs[0]][0], errors


def check_topk(kwargs, attrs, got, want, manifest):
    """The kernel's top-k is right if each row's chosen blocks score at least as high (in the float64
    reference's scores) as every block it left out, up to rounding; exact ties may break either way."""
    if np.array_equal(got, want):
        return
    params = inspect.signature(compress_attention_reference.block_scores).parameters
    scores = compress_attention_reference.block_scores(**{k: v for k, v in kwargs.items() if k in params})
    scores = np.asarray(scores, np.float64)
    for row in zip(*np.nonzero((got != want).any(axis=-1))):
        row_scores = scores[row]
        chosen = set(int(b) for b in got[row] if b >= 0)
        left_out = [s for b, s in enumerate(row_scores) if b not in chosen and np.isfinite(s)]
        worst_chosen = min(row_scores[b] for b in chosen)
        assert not left_out or worst_chosen >= max(left_out) - 1e-3 * max(1.0, abs(max(left_out))), (
            f"{manifest.name}: row {row} chose {sorted(chosen)}, reference {sorted(want[row].tolist())}")


def output_bits(manifests):
    return [manifest.with_name(f"{manifest.stem}_{i}.bin").read_bytes()
            for manifest in manifests for i in range(sum(1 for line in manifest.read_text().splitlines()
                                                          if line.startswith("tensor")))]


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_drivers_match_reference_under_emulation(target, driver, tmp_path):
    arch = target[0]
    # the selected pair's driver once more per strategy with the best instruction set (the default run
    # lets the shapes choose)
    runs = [(isa, None) for isa in TARGETS[arch]]
    if driver == "sanitize_driver":
        runs += [(TARGETS[arch][0], "items"), (TARGETS[arch][0], "blocks")]
    for isa, strategy in runs:
        manifests = run_driver(target, driver, isa, threads=2, dump_dir=tmp_path / f"{isa}-{strategy}",
                               strategy=strategy)
        entries = {}
        for manifest in manifests:
            entry, dtype, _ = check_against_reference(manifest)
            entries.setdefault(entry, set()).add(dtype)
        # every entry point of the driver ran successfully in every dtype and was checked
        expected = {e for e in REFERENCES if e.startswith(DRIVER_OPS[driver])}
        assert set(entries) == expected, f"{arch}/{isa}: checked {sorted(entries)}"
        assert all(dtypes == {"float32", "float16", "bfloat16"} for dtypes in entries.values()), entries


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_same_bits_for_one_and_two_threads_under_emulation(target, driver, tmp_path):
    arch = target[0]
    isa = TARGETS[arch][0]
    two = run_driver(target, driver, isa, threads=2, dump_dir=tmp_path / "two")
    one = run_driver(target, driver, isa, threads=1, dump_dir=tmp_path / "one")
    assert len(one) == len(two) > 0
    assert output_bits(one) == output_bits(two), f"{arch}/{isa}: results changed with the thread count"


def test_python_suite_under_emulated_aarch64():
    """tools/aarch64/run-tests.sh: `pip install .` inside an arm64 Debian with MindSpore 2.10's aarch64
    wheel (proot + qemu-aarch64), then the Python suite's core files there (the NEON kernels through
    MindSpore's compiler and autodiff, both modes, vs the float64 reference). The root filesystem
    takes ~15 minutes to build, so this test only uses one that exists (.ci/run builds it first)."""
    rootfs = Path(os.environ.get("MS_NSA_AARCH64_DIR", Path.home() / ".cache/ms_nsa/aarch64"))
    missing = [tool for tool in ("proot", "qemu-aarch64") if not shutil.which(tool)]
    if missing or not (rootfs / ".ready").exists():
        reason = (f"no emulated aarch64 environment ({rootfs}/.ready: {(rootfs / '.ready').exists()}, "
                  f"missing tools: {missing}); build it with `bash tools/aarch64/setup-rootfs.sh` (as root, ~15 min)")
        if os.environ.get("MS_NSA_REQUIRE_CROSS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run(["bash", str(ROOT / "tools/aarch64/run-tests.sh")], capture_output=True, text=True,
                            timeout=3600)
    tail = result.stdout[-3000:] + result.stderr[-2000:]
    print(tail)
    assert result.returncode == 0, tail
    summary = re.search(r"(\d+) passed", result.stdout)
    assert summary and int(summary.group(1)) >= 100, tail
    assert not re.search(r"\d+ (failed|errors?)\b", result.stdout), tail
