"""nsa_compress_attention (aclnnNsaCompressAttention: attention over compressed keys plus top-k
selection) and its gradient. Folder layout as for every op: api.py, reference.py, composed.py.
yaml: ops_yaml/nsa_compress_attention*.yaml; kernel: custom_aot/compress_attention/; tests:
tests/test_nsa_compress_attention.py."""
from .api import nsa_compress_attention, nsa_compress_attention_grad

__all__ = ["nsa_compress_attention", "nsa_compress_attention_grad"]
