"""The CPU backend: MindSpore `Custom` ops (func_type="aot") over custom_aot/'s shared library.

One primitive per distinct attribute set, cached, so graph mode sees the same primitive object for
the same attributes and PyNative does not rebuild ops per call. The forward primitive carries the
bprop that calls the gradient primitive, so `ms.grad` and friends differentiate through it.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import List

import numpy as np
import mindspore as ms
from mindspore import ops
from mindspore.graph.api import _pynative_executor

from . import _errors
from ._dtypes import dtype_name, ms_dtype
from .op_def import BACKWARD, FORWARD, OpDef, load_op_def

LIBRARY_NAME = "libms_nsa_cpu.so"
BACKEND = "cpu"

def library_path() -> str:
    path = Path(__file__).resolve().parent / LIBRARY_NAME
    if not path.is_file():
        raise ImportError(f"ms_nsa's CPU kernel library {path} is missing: install the package with "
                          f"`pip install .` (or `pip install -e .`), which compiles custom_aot/")
    return str(path)


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(library_path())
    lib.ms_nsa_last_error_message.restype = ctypes.c_char_p
    lib.ms_nsa_last_error_status.restype = ctypes.c_int
    lib.ms_nsa_get_num_threads.restype = ctypes.c_int
    lib.ms_nsa_set_num_threads.argtypes = [ctypes.c_int]
    lib.ms_nsa_validate.restype = ctypes.c_int
    lib.ms_nsa_force_strategy.argtypes = [ctypes.c_int]
    lib.ms_nsa_force_strategy.restype = ctypes.c_int
    lib.ms_nsa_force_block_tile.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.ms_nsa_force_block_tile.restype = None
    return lib


def set_num_threads(num_threads: int) -> None:
    """Threads the CPU kernels use (0 = OpenMP's default, the core count). Results do not depend on it."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
        raise ValueError(f"set_num_threads: num_threads must be an int >= 0, got {num_threads!r}")
    _library().ms_nsa_set_num_threads(num_threads)


def get_num_threads() -> int:
    return int(_library().ms_nsa_get_num_threads())


def validate_data(function: str, sizes, cu_seqlens_q, cu_seqlens_kv, select_block_size, select_block_count,
                  causal, topk_indices) -> None:
    """The kernels' data checks (custom_aot/nsa_validate.cc) on host arrays; raises what a call would.

    sizes = (T1, T2, N1, N2, D, Dv, B); the lengths are int64 arrays [B], topk_indices int32 [T1, N2, C]."""
    arrays = [np.ascontiguousarray(sizes, np.int64), np.ascontiguousarray(cu_seqlens_q, np.int64),
              np.ascontiguousarray(cu_seqlens_kv, np.int64), np.ascontiguousarray(topk_indices, np.int32)]
    pointers = [a.ctypes.data_as(ctypes.c_void_p) for a in arrays]
    lib = _library()
    status = lib.ms_nsa_validate(pointers[0], pointers[1], pointers[2], ctypes.c_int64(select_block_size),
                                 ctypes.c_int64(select_block_count), ctypes.c_int(int(causal)), pointers[3])
    if status:
        raise _errors.kernel_exception(function, status, lib.ms_nsa_last_error_message().decode())


_STRATEGIES = {"auto": 0, "items": 1, "blocks": 2}


def _force_strategy(name: str) -> str:
    """For tests and the benchmark, not part of the API: make every call use the per-item ("items") or
    the block-outer ("blocks") kernels, or let each call choose ("auto"). Returns the previous setting."""
    if name not in _STRATEGIES:
        raise ValueError(f"_force_strategy: name must be one of {sorted(_STRATEGIES)}, got {name!r}")
    previous = _library().ms_nsa_force_strategy(_STRATEGIES[name])
    return {v: k for k, v in _STRATEGIES.items()}[previous]


def _force_block_tile(rows: int, kv_heads: int) -> None:
    """For tests, not part of the API: the block strategy's tiles forced to `rows` query rows by
    `kv_heads` KV heads; 0 for either lets each call choose it again."""
    for name, value in (("rows", rows), ("kv_heads", kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"_force_block_tile: {name} must be an int >= 0, got {value!r}")
    _library().ms_nsa_force_block_tile(rows, kv_heads)


def kernel_inputs(op_def: OpDef) -> List[str]:
    """The CPU kernel's inputs: every tensor and int array of the yaml, in order, but reserved ones."""
    return [a.name for a in op_def.args
            if a.kind in ("tensor", "int_array") and not a.rules.get("reserved", False)]


class _KernelOp(ops.Custom):
    """A Custom op whose PyNative calls turn a kernel status into the kernel's own error message.

    Graph mode runs the primitive inside the graph without calling this method; there the message is
    printed to stderr by the kernel and MindSpore raises a RuntimeError carrying the status number.
    """

    def __call__(self, *args):
        lib = _library()
        lib.ms_nsa_clear_error()
        try:
            outputs = super().__call__(*args)
            # PyNative launches kernels asynchronously; wait so a kernel error is raised here, at the
            # call that caused it, rather than at some later asnumpy().
            _pynative_executor.sync()
            return outputs
        except RuntimeError as err:
            status = lib.ms_nsa_last_error_status()
            if status == 0:
                raise
            message = lib.ms_nsa_last_error_message().decode()
            raise _errors.kernel_exception(self._nsa_function, status, message) from err


def build_op(op_def: OpDef, attrs: dict, bprop=None, *, absent=(), derived_dims=None, flags=None) -> _KernelOp:
    """The Custom op of `op_def` for these (checked) attributes: the one construction every CPU op uses.

    `absent`: optional inputs the caller replaces by a placeholder (their shapes and dtypes are not
    checked; the kernel learns of it from `flags`, extra int attributes such as has_atten_mask).
    `derived_dims`: output dimensions no input binds (e.g. nsa_compress's window count).
    """
    names = kernel_inputs(op_def)
    single = len(op_def.outputs) == 1

    # Called by MindSpore with the inputs' shapes and dtypes: in PyNative per call, in graph mode at
    # compile time, so bad shapes and dtypes fail before the kernel runs, with the yaml's messages.
    def infer_shape(*shapes):
        dims = op_def.bind_dims({n: s for n, s in zip(names, shapes) if n not in absent}, attrs, BACKEND)
        dims.update(derived_dims or {})
        inferred = op_def.infer_shapes(dims, attrs)
        return inferred[0] if single else tuple(inferred)

    def infer_dtype(*dtypes):
        named = {name: dtype_name(d) for name, d in zip(names, dtypes) if name not in absent}
        op_def.check_dtypes(named, BACKEND)
        inferred = [ms_dtype(dtype) for dtype in op_def.infer_dtypes(named)]
        return inferred[0] if single else tuple(inferred)

    op = _KernelOp(f"{library_path()}:{op_def.cpu_entry}", out_shape=infer_shape, out_dtype=infer_dtype,
                   func_type="aot", bprop=bprop)
    op._nsa_function = op_def.python["function"]
    for name, value in attrs.items():
        op.add_prim_attr(name, float(value) if op_def.arg(name).kind == "float" else value)
    for name, value in (flags or {}).items():
        op.add_prim_attr(name, int(value))
    return op


def _attrs(op_def: OpDef, scale_value, head_num, sparse_mode, select_block_size, select_block_count):
    return op_def.check_attrs(dict(scale_value=scale_value, head_num=head_num, sparse_mode=sparse_mode,
                                   select_block_size=select_block_size,
                                   select_block_count=select_block_count), BACKEND)


# The factories are lru_cache objects on purpose: in graph mode MindSpore runs such opaque callables at
# compile time (their arguments are constants) instead of parsing them into the graph. typed=True keeps
# 1 and True (or 2 and np.int64(2)) apart so each is checked on its own.
@functools.lru_cache(maxsize=None, typed=True)
def grad_op(scale_value, head_num, sparse_mode, select_block_size, select_block_count) -> _KernelOp:
    """The gradient primitive for these attributes (checked against the yaml and normalised)."""
    op_def = load_op_def(BACKWARD)
    return build_op(op_def, _attrs(op_def, scale_value, head_num, sparse_mode, select_block_size,
                                 select_block_count))


@functools.lru_cache(maxsize=None, typed=True)
def forward_op(scale_value, head_num, sparse_mode, select_block_size, select_block_count) -> _KernelOp:
    """The forward primitive, with its bprop, for these attributes (checked against the yaml)."""
    op_def = load_op_def(FORWARD)
    attrs = _attrs(op_def, scale_value, head_num, sparse_mode, select_block_size, select_block_count)
    backward = grad_op(*(attrs[name] for name in ("scale_value", "head_num", "sparse_mode",
                                                  "select_block_size", "select_block_count")))

    # Gradients flow into query, key and value only; softmax_max/softmax_sum are not differentiated
    # (their incoming gradients are ignored) and the integer inputs get zeros.
    def bprop(query, key, value, topk_indices, actual_seq_qlen, actual_seq_kvlen, out, dout):
        softmax_max, softmax_sum, attention_out = out
        dq, dk, dv = backward(query, key, value, attention_out, dout[2], softmax_max, softmax_sum,
                              topk_indices, actual_seq_qlen, actual_seq_kvlen)
        return (dq, dk, dv, ops.zeros_like(topk_indices), ops.zeros_like(actual_seq_qlen),
                ops.zeros_like(actual_seq_kvlen))

    return build_op(op_def, attrs, bprop=bprop)


def int_array(values):
    """Cumulative lengths as the 1-D int64 tensor the kernels read."""
    return ms.Tensor(np.array(values, dtype=np.int64))


def check_length_tensor(name, function):
    """Length tensors are fine here: the kernels read and check their values on each call."""
