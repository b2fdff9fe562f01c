"""nsa_compress (aclnnNsaCompress) and its gradient (aclnnNsaCompressGrad): one folder per op, as for
every op of ms_nsa: api.py (the public functions and their CPU primitives), reference.py (float64
NumPy), composed.py (stock MindSpore ops). yaml: ops_yaml/nsa_compress*.yaml; kernel:
custom_aot/compress/; tests: tests/test_nsa_compress.py."""
from .api import nsa_compress, nsa_compress_grad

__all__ = ["nsa_compress", "nsa_compress_grad"]
