"""ms_nsa: NSA selected attention for MindSpore.

`pip install .` compiles the CPU kernels in custom_aot/ into ms_nsa/lib/libms_nsa_cpu.so, the shared
library the MindSpore `Custom` ops (func_type="aot") load, and the Ascend twin's library
libms_nsa_ascend_twin.so (custom_aot/twin/: stand-ins for CANN's aclnn ops over the same math core, and
the CPU-convention shim; docs/ascend.md). Nothing is compiled at import time.
"""
import glob
import os
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# Every op's kernel folder (custom_aot/<op>/) and the shared files at the top; tests/ holds drivers and
# twin/ the Ascend twin's stand-in library (built on its own below).
KERNEL_SOURCES = sorted(path for path in glob.glob("custom_aot/**/*.cc", recursive=True)
                        if not path.startswith(("custom_aot/tests/", "custom_aot/twin/")))
# One stand-in file per aclnn op plus the shared shim; the math core comes from the kernel library, which
# the twin library links (found next to it at run time), so nsa_core.cc is compiled once.
TWIN_SOURCES = sorted(glob.glob("custom_aot/twin/*.cc"))
TWIN_INCLUDES = ["custom_aot", "custom_aot/twin", "ms_nsa/twin_cann/include"]
KERNEL_FLAGS = [
    "-std=c++17", "-O3", "-fopenmp", "-fPIC", "-Wall", "-Wextra",
    # Portable baseline (no -march): the AVX2 and AVX-512 kernels are separate functions with
    # target attributes, chosen at run time (custom_aot/nsa_core.cc). Fused multiply-add is allowed
    # (-ffp-contract=fast; ISO C++ mode would forbid it); -ffast-math is not (NaN/Inf must behave).
    "-ffp-contract=fast",
    # Register allocation region by region (every loop its own): in the block kernels' large inlined
    # bodies GCC's default ("mixed") spilled one or two accumulators of the 4 x 4 register tiles inside
    # the k loops, a store-to-load chain on every FMA; per-loop allocation keeps them in registers
    # (block backward 1.06-1.1x at G = 1..16, docs/performance.md). Registers only: the same bits.
    "-fira-region=all",
    # The SIMD helpers return vector types; they are always inlined, so no call crosses the ABI
    # difference this warning is about.
    "-Wno-psabi",
    # MindSpore passes std::string across the AOT boundary with the old libstdc++ ABI.
    "-D_GLIBCXX_USE_CXX11_ABI=0",
]


class BuildKernelLibrary(build_ext):
    """Builds the kernels as a plain shared library (no Python module init), named for ctypes/AOT."""

    def get_ext_filename(self, ext_name):
        return os.path.join(*ext_name.split(".")) + ".so"

    def get_export_symbols(self, ext):
        return []

    def build_extension(self, ext):
        if "ms_nsa_cpu" in ext.libraries:  # the twin: link the kernel library built just before it
            ext.library_dirs = [os.path.dirname(self.get_ext_fullpath("ms_nsa.libms_nsa_cpu"))]
        # One compiler process per source file, as many at a time as there are cores (setuptools compiles
        # them one by one): the per-ISA kernel files take most of the build, and under emulation
        # (tools/aarch64/) minutes each.
        compile_one = self.compiler.compile

        def compile_all(sources, **kwargs):
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                objects = pool.map(lambda source: compile_one([source], **kwargs), sources)
                return [obj for group in objects for obj in group]

        self.compiler.compile = compile_all
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_one


# Name, version and dependencies are in pyproject.toml; this file adds what needs code: the kernels.
setup(
    packages=["ms_nsa", "ms_nsa.compress", "ms_nsa.compress_attention", "ms_nsa.window", "ms_nsa.ops_yaml"],
    package_dir={"ms_nsa": "ms_nsa", "ms_nsa.ops_yaml": "ops_yaml"},
    package_data={"ms_nsa.ops_yaml": ["*.yaml"], "ms_nsa": ["twin_cann/include/*/*.h", "twin_cann/opp/README"]},
    include_package_data=True,
    ext_modules=[
        Extension(
            "ms_nsa.libms_nsa_cpu",
            sources=KERNEL_SOURCES,
            include_dirs=["custom_aot"],
            depends=sorted(glob.glob("custom_aot/**/*.h", recursive=True)),
            extra_compile_args=KERNEL_FLAGS,
            extra_link_args=["-fopenmp"],
            language="c++",
        ),
        Extension(
            "ms_nsa.libms_nsa_ascend_twin",
            sources=TWIN_SOURCES,
            include_dirs=TWIN_INCLUDES,
            depends=sorted(glob.glob("custom_aot/**/*.h", recursive=True)
                           + glob.glob("ms_nsa/twin_cann/include/*/*.h")),
            extra_compile_args=KERNEL_FLAGS,
            libraries=["ms_nsa_cpu"],
            extra_link_args=["-fopenmp", "-ldl", "-Wl,-rpath,$ORIGIN"],
            language="c++",
        ),
    ],
    cmdclass={"build_ext": BuildKernelLibrary},
)
