"""Random NSA problems for the tests: varlen batches, grouped heads, valid selections."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor

MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}

# Relative Frobenius error against the float64 reference (docs/semantics.md, "Tolerances").
REL_TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


@dataclass
class Case:
    q_lens: Tuple[int, ...]          # per-batch query lengths
    kv_blocks: Tuple[int, ...]       # per-batch KV lengths in blocks
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    v_head_dim: int = 32
    select_block_size: int = 16
    select_block_count: int = 2
    sparse_mode: int = 0
    dtype: str = "float32"
    duplicates: bool = False         # allow repeated block indices within a row
    keep_diagonal: bool = False      # always select the block holding the query's own position
    nsa_shaped: bool = False         # NativeSparseAttention's shape: own block, then past blocks, then
                                     # future ones only when too few past blocks exist; slots shuffled
    seed: int = 0
    data: dict = field(default_factory=dict, repr=False)

    @property
    def kv_lens(self):
        return tuple(b * self.select_block_size for b in self.kv_blocks)

    @property
    def actual_seq_qlen(self):
        return tuple(int(x) for x in np.cumsum(self.q_lens))

    @property
    def actual_seq_kvlen(self):
        return tuple(int(x) for x in np.cumsum(self.kv_lens))

    @property
    def scale_value(self):
        return float(self.head_dim) ** -0.5

    @property
    def attrs(self):
        return (self.scale_value, self.q_heads, self.select_block_size, self.select_block_count)

    def make(self):
        """Fills self.data with NumPy arrays (already rounded to the dtype, stored as float32)."""
        rng = np.random.default_rng(self.seed)
        t1, t2 = sum(self.q_lens), sum(self.kv_lens)
        q = rng.standard_normal((t1, self.q_heads, self.head_dim)).astype(np.float32)
        k = rng.standard_normal((t2, self.kv_heads, self.head_dim)).astype(np.float32)
        v = rng.standard_normal((t2, self.kv_heads, self.v_head_dim)).astype(np.float32)
        d_out = rng.standard_normal((t1, self.q_heads, self.v_head_dim)).astype(np.float32)
        topk = np.zeros((t1, self.kv_heads, self.select_block_count), np.int32)
        row = 0
        for q_len, blocks in zip(self.q_lens, self.kv_blocks):
            for s in range(q_len):
                for n in range(self.kv_heads):
                    if self.duplicates:
                        choice = rng.integers(0, blocks, self.select_block_count)
                    else:
                        choice = rng.permutation(blocks)[: self.select_block_count]
                    if self.nsa_shaped:
                        own = min(s // self.select_block_size, blocks - 1)   # rows past the keys: all past
                        past, future = rng.permutation(own), own + 1 + rng.permutation(blocks - own - 1)
                        choice = rng.permutation(np.concatenate([[own], past, future])[: self.select_block_count])
                    if self.keep_diagonal:
                        choice[0] = min(s // self.select_block_size, blocks - 1)
                        if not self.duplicates:
                            rest = [b for b in rng.permutation(blocks) if b != choice[0]]
                            choice[1:] = rest[: self.select_block_count - 1]
                    topk[row + s, n] = choice
            row += q_len
        self.data = dict(q=round_to(q, self.dtype), k=round_to(k, self.dtype), v=round_to(v, self.dtype),
                         d_out=round_to(d_out, self.dtype), topk=topk)
        return self

    def tensors(self):
        """query, key, value, topk_indices, grad as MindSpore Tensors of the case's dtype."""
        dtype = MS_DTYPES[self.dtype]
        d = self.data
        return tuple(Tensor(d[name]).astype(dtype) for name in ("q", "k", "v")) + (
            Tensor(d["topk"]), Tensor(d["d_out"]).astype(dtype))

    def lengths(self, as_tensor=False):
        if as_tensor:
            return dict(actual_seq_qlen=Tensor(np.array(self.actual_seq_qlen, np.int64)),
                        actual_seq_kvlen=Tensor(np.array(self.actual_seq_kvlen, np.int64)))
        return dict(actual_seq_qlen=self.actual_seq_qlen, actual_seq_kvlen=self.actual_seq_kvlen)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Rounds float32 values to `dtype` (nearest even) and returns them as float32."""
    x = np.asarray(x, np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).astype(np.uint32)
    return np.where(np.isnan(x), x, rounded.view(np.float32))


def to_numpy(t) -> np.ndarray:
    if t.dtype == ms.bfloat16:
        t = t.astype(ms.float32)
    return t.asnumpy().astype(np.float64)


def layer_inputs(hidden, seq_lens, seed=0):
    """(x, cumulative sequence lengths, d_out) for a layer test: packed [tokens, hidden] float32 inputs."""
    rng = np.random.default_rng(seed)
    tokens = sum(seq_lens)
    return (Tensor(rng.standard_normal((tokens, hidden)).astype(np.float32)),
            Tensor(np.cumsum(seq_lens).astype(np.int64)),
            Tensor(rng.standard_normal((tokens, hidden)).astype(np.float32)))


def assert_packed_sequences_isolated(layer, x, cu_seq_len, seq_lens):
    """A layer's output on a packed batch equals its output on each sequence alone."""
    packed = layer(x, cu_seq_len).asnumpy()
    begin = 0
    for seq_len in seq_lens:
        alone = layer(x[begin:begin + seq_len], None).asnumpy()
        np.testing.assert_allclose(packed[begin:begin + seq_len], alone, rtol=1e-5, atol=1e-6)
        begin += seq_len


def rel_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


def low_precision_forward(case: Case) -> np.ndarray:
    """attention_out as a same-dtype composed implementation would compute it: float32 matmuls whose
    results are rounded to the dtype (scores, probabilities, output), softmax in float32."""
    from ms_nsa.reference import _rows
    d, dt = case.data, case.dtype
    out = np.zeros((d["q"].shape[0], case.q_heads, case.v_head_dim), np.float32)
    for t, n, heads, rows, visible in _rows(d["q"], d["k"], d["topk"], case.q_heads, case.select_block_size,
                                            case.actual_seq_qlen, case.actual_seq_kvlen, case.sparse_mode):
        if not visible.any():
            continue
        sel = rows[visible]
        scores = round_to(case.scale_value * (d["q"][t, heads] @ d["k"][sel, n].T), dt)
        e = np.exp(scores - scores.max(axis=1, keepdims=True))
        probs = round_to(e / e.sum(axis=1, keepdims=True), dt)
        out[t, heads] = round_to(probs @ d["v"][sel, n], dt)
    return out


class OutputLoss(ms.nn.Cell):
    """(sum(attention_out * d_out), attention_out) through ms_nsa.nn.NsaSelectAttention: the loss's
    gradient is the gradient op fed with grad = d_out."""

    def __init__(self, case):
        super().__init__()
        import ms_nsa
        self.case = case
        self.attn = ms_nsa.nn.NsaSelectAttention(case.q_heads, case.select_block_size, case.select_block_count,
                                                 scale_value=case.scale_value, sparse_mode=case.sparse_mode)

    def construct(self, q, k, v, topk, d_out):
        out = self.attn(q, k, v, topk, self.case.actual_seq_qlen, self.case.actual_seq_kvlen)
        return (out.astype(ms.float32) * d_out.astype(ms.float32)).sum(), out


def output_bits(outputs):
    """The raw bytes of each output (bfloat16 via float32, which is exact)."""
    return [to_numpy(o).tobytes() for o in outputs]


def assert_same_bits_for_threads(run, expected, threads=(1, 3)):
    """`run()` gives bitwise `expected` (output_bits) with each kernel thread count."""
    import ms_nsa
    previous = ms_nsa.get_num_threads()
    try:
        for count in threads:
            ms_nsa.set_num_threads(count)
            assert output_bits(run()) == expected, f"{count} threads changed the bits"
    finally:
        ms_nsa.set_num_threads(previous)


def assert_signature(function, mindspore_parameters):
    """Positional and keyword parameters are the yaml's, and all of MindSpore's op's, in its order."""
    import inspect
    from ms_nsa.op_def import load_op_def
    op_def = load_op_def(function.__name__)
    params = inspect.signature(function).parameters
    assert [p for p in params if params[p].kind == params[p].POSITIONAL_OR_KEYWORD] == op_def.python["positional"]
    assert [p for p in params if params[p].kind == params[p].KEYWORD_ONLY] == op_def.python["keyword"]
    if mindspore_parameters is not None:
        assert list(params)[:len(mindspore_parameters)] == list(mindspore_parameters)
