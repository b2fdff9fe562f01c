"""nsa_window_attention and its gradient: causal sliding-window attention over packed sequences (NSA's
third branch). One folder per op, as for every op of ms_nsa: api.py (the public functions, their CPU
primitives and the Cell), reference.py (float64 NumPy), composed.py (stock MindSpore ops). yaml:
ops_yaml/nsa_window_attention*.yaml; kernel: custom_aot/window/; tests: tests/test_nsa_window_attention.py."""
from . import reference
from .api import NsaWindowAttention, nsa_window_attention, nsa_window_attention_grad

__all__ = ["NsaWindowAttention", "nsa_window_attention", "nsa_window_attention_grad", "reference"]
