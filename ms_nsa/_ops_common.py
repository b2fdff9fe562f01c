"""What the Python faces of the newer ops share beyond functional.py's length and tensor checks:
the backend choice (cpu, ascend, or ascend_twin: the Ascend ops built for the CPU target), the gate
for ops without an Ascend side, and the
placeholder for an absent optional tensor input (the CPU kernel learns of it from a has_<name>
attribute)."""
from __future__ import annotations

import functools

import numpy as np
import mindspore as ms

from . import _backend


def backend_choice() -> str:
    """cpu, ascend or ascend_twin (compile time in graph mode: _backend.choice is a C-level callable)."""
    return _backend.choice()


@functools.lru_cache(maxsize=None)
def cpu_only(function: str, backend: str) -> None:
    """Raises unless the backend is the CPU (compile time in graph mode; pass `_backend.name()`): for the
    ops ms_nsa defines itself that have no Ascend side (nsa_window_attention)."""
    if backend != "cpu":
        raise NotImplementedError(f"{function}: only the CPU backend is implemented so far (CANN has no such op); the "
                                  f"current backend is {backend!r}")


def rules_for(backend: str) -> str:
    """The yaml rule set of a backend choice: the twin builds the Ascend ops, under Ascend's rules."""
    return "cpu" if backend == "cpu" else "ascend"


@functools.lru_cache(maxsize=None)
def placeholder_mask():
    """A 1x1 bool tensor standing in for an absent mask input (never read by the kernel)."""
    return ms.Tensor(np.zeros((1, 1), np.bool_))


def backend_name():
    return _backend.name()
