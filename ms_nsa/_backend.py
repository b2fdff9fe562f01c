"""Which backend runs the op: CPU kernels or CANN's aclnn kernels.

The environment variable MS_NSA_BACKEND chooses: `cpu`, `ascend`, or `ascend_twin` (the Ascend backend's
ops, compiled by MindSpore for the CPU device target against a stand-in aclnn library: docs/ascend.md).
Unset or empty, MindSpore's device target decides (CPU -> cpu, Ascend -> ascend).

The functional API and the Cell call only this module, so the API logic exists once and a backend
only supplies its op construction. Every backend's forward/gradient op is called with the same
inputs, `call_inputs(op_def)`: the yaml's tensors and int arrays in aclnn order, without the reserved
mask (each backend decides the mask itself).
"""
from __future__ import annotations

import functools
import os

import mindspore as ms

from . import _ascend_kernels, _cpu_kernels
from ._dtypes import dtype_name  # noqa: F401  (re-exported for the API layer)

BACKEND_ENV = "MS_NSA_BACKEND"
_BY_DEVICE_TARGET = {"CPU": "cpu", "Ascend": "ascend"}
# The device target each backend needs.
_DEVICE_TARGETS = {"cpu": "CPU", "ascend": "Ascend", "ascend_twin": "CPU"}

call_inputs = _cpu_kernels.kernel_inputs


class _AscendTwin:
    """The Ascend backend with its ops built as twins (same construction, CPU target, stand-in aclnn)."""

    BACKEND = _ascend_kernels.BACKEND
    int_array = staticmethod(_ascend_kernels.int_array)
    check_length_tensor = staticmethod(_ascend_kernels.check_length_tensor)

    @staticmethod
    def forward_op(*attrs):
        return _ascend_kernels.forward_op(*attrs, twin=True)

    @staticmethod
    def grad_op(*attrs):
        return _ascend_kernels.grad_op(*attrs, twin=True)


_MODULES = {"cpu": _cpu_kernels, "ascend": _ascend_kernels, "ascend_twin": _AscendTwin}


# MindSpore's graph compiler parses plain Python functions into the graph, but runs C-level callables
# such as functools.lru_cache wrappers as Python at compile time (their arguments are constants here).
# maxsize=0 gives such a wrapper without caching, so the device target is read on every call.
_at_compile_time = functools.lru_cache(maxsize=0)


def selected() -> str:
    """The backend's name: MS_NSA_BACKEND if set, else from MindSpore's device target."""
    device_target = ms.get_context("device_target")
    choice = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not choice:
        if device_target not in _BY_DEVICE_TARGET:
            raise RuntimeError(f"ms_nsa runs on the CPU and on Ascend (Atlas A2); the device target is "
                               f"{device_target!r}")
        return _BY_DEVICE_TARGET[device_target]
    if choice not in _MODULES:
        raise ValueError(f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r} is not a backend; use one of "
                         f"{', '.join(sorted(_MODULES))}, or leave it unset to follow the device target")
    if _DEVICE_TARGETS[choice] != device_target:
        raise RuntimeError(f"{BACKEND_ENV}={choice} needs MindSpore's device target "
                           f"{_DEVICE_TARGETS[choice]!r}, but it is {device_target!r}: call "
                           f"ms.set_device({_DEVICE_TARGETS[choice]!r}) or change {BACKEND_ENV}")
    return choice


def current():
    """The kernel module of the selected backend."""
    return _MODULES[selected()]


@_at_compile_time
def choice() -> str:
    """The selected backend including the twin: cpu, ascend or ascend_twin (for ops that build their
    primitives per backend themselves)."""
    return selected()


@_at_compile_time
def name() -> str:
    """The backend name the yaml's rules are resolved for ("cpu" or "ascend")."""
    return current().BACKEND


@_at_compile_time
def forward_op(scale_value, head_num, sparse_mode, select_block_size, select_block_count):
    return current().forward_op(scale_value, head_num, sparse_mode, select_block_size, select_block_count)


@_at_compile_time
def grad_op(scale_value, head_num, sparse_mode, select_block_size, select_block_count):
    return current().grad_op(scale_value, head_num, sparse_mode, select_block_size, select_block_count)


@_at_compile_time
def int_array(values):
    """Checked cumulative lengths (a tuple of ints) in the form the backend's op takes them."""
    return current().int_array(values)


@_at_compile_time
def check_length_tensor(name_of_lengths, function):
    """Raises if the backend cannot take cumulative lengths as a Tensor."""
    current().check_length_tensor(name_of_lengths, function)
