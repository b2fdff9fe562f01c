"""What the Python faces of the newer ops share beyond functional.py's length and tensor checks:
the backend gate (their Ascend side is not built yet) and the placeholder for an absent optional
tensor input (the CPU kernel learns of it from a has_<name> attribute)."""
from __future__ import annotations

import functools

import numpy as np
import mindspore as ms

from . import _backend


@functools.lru_cache(maxsize=None)
def cpu_only(function: str, backend: str) -> None:
    """Raises unless the backend is the CPU (compile time in graph mode; pass `_backend.name()`)."""
    if backend != "cpu":
        raise NotImplementedError(f"{function}: only the CPU backend is implemented so far (the Ascend one, over "
                                  f"CANN's aclnn op, is pending); the current backend is {backend!r}")


@functools.lru_cache(maxsize=None)
def placeholder_mask():
    """A 1x1 bool tensor standing in for an absent mask input (never read by the kernel)."""
    return ms.Tensor(np.zeros((1, 1), np.bool_))


def backend_name():
    return _backend.name()
