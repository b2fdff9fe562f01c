"""Which backend runs the op: CPU kernels or CANN's aclnn kernels, chosen from MindSpore's device target.

The functional API and the Cell call only this module, so the API logic exists once and a backend
only supplies its op construction. Every backend's forward/gradient op is called with the same
inputs, `call_inputs(op_def)`: the yaml's tensors and int arrays in aclnn order, without the reserved
mask (each backend decides the mask itself).
"""
from __future__ import annotations

import functools

import mindspore as ms

from . import _ascend_kernels, _cpu_kernels
from ._dtypes import dtype_name  # noqa: F401  (re-exported for the API layer)

_BACKENDS = {"CPU": _cpu_kernels, "Ascend": _ascend_kernels}

call_inputs = _cpu_kernels.kernel_inputs


# MindSpore's graph compiler parses plain Python functions into the graph, but runs C-level callables
# such as functools.lru_cache wrappers as Python at compile time (their arguments are constants here).
# maxsize=0 gives such a wrapper without caching, so the device target is read on every call.
_at_compile_time = functools.lru_cache(maxsize=0)


def current():
    """The kernel module for MindSpore's current device target."""
    device_target = ms.get_context("device_target")
    if device_target not in _BACKENDS:
        raise RuntimeError(f"ms_nsa runs on the CPU and on Ascend (Atlas A2); the device target is "
                           f"{device_target!r}")
    return _BACKENDS[device_target]


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
