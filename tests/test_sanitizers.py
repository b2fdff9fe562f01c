"""The C++ kernels under AddressSanitizer + UndefinedBehaviorSanitizer, without MindSpore.

Builds every kernel source (custom_aot/**/*.cc: cores, validation, AOT entry layers) with each driver
in custom_aot/tests/ (sanitize_driver.cc: the selected pair; sanitize_compress_driver.cc: nsa_compress
and nsa_compress_attention; sanitize_window_driver.cc: nsa_window_attention), which call the entry
points the way MindSpore does on exactly-sized buffers: valid problems in every dtype and mode, every
data-dependent error, and 300 random corruptions. Any out-of-bounds access or undefined behaviour
aborts the driver; a wrong status code makes it exit non-zero.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "custom_aot"


# driver -> the kernel folders it links (the top level holds the shared files and the selected pair)
DRIVERS = {"sanitize_driver": ["."], "sanitize_compress_driver": [".", "compress", "compress_attention"],
           "sanitize_window_driver": [".", "window"]}


@pytest.fixture(scope="module", params=sorted(DRIVERS))
def driver(request, tmp_path_factory):
    compiler = shutil.which("g++")
    assert compiler, "g++ is needed to build the sanitizer driver"
    binary = tmp_path_factory.mktemp("sanitize") / request.param
    kernels = sorted(str(p) for folder in DRIVERS[request.param] for p in (KERNELS / folder).glob("*.cc"))
    sources = kernels + [str(KERNELS / "tests" / f"{request.param}.cc")]
    cmd = [compiler, "-std=c++17", "-O1", "-g", "-fopenmp", "-fno-omit-frame-pointer",
           "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-D_GLIBCXX_USE_CXX11_ABI=0",
           f"-I{KERNELS}", *sources, "-o", str(binary)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    return binary


@pytest.mark.parametrize("strategy", ["items", "blocks"])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_kernels_are_clean_under_asan_and_ubsan(driver, threads, strategy):
    # MS_NSA_STRATEGY forces the per-item or the block-outer kernels (custom_aot/nsa_core.cc) for every call.
    env = dict(os.environ, OMP_NUM_THREADS=threads, MS_NSA_STRATEGY=strategy,
               ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    result = subprocess.run([str(driver)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"driver failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert "Sanitizer" not in result.stderr, result.stderr[-4000:]
    summary = re.search(r"(\d+) valid problems, (\d+) invalid problems, (\d+) random corruptions, 0 failures",
                        result.stdout)
    assert summary and all(int(n) > 0 for n in summary.groups()), result.stdout
