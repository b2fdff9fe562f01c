"""`NativeSparseAttention`: the NSA attention layer (compressed + selected + sliding window) on ms_nsa's
fused ops.

Native Sparse Attention (Yuan et al., 2025) runs three attention branches over the same queries, each
with its own keys and values, and mixes them with learned per-head sigmoid gates:

- compressed: `nsa_compress` turns every window of `compress_block_size` (l) keys / values, one
  starting every `compress_stride` (d) tokens, into one compressed key / value (a learned weighted
  sum, weights [l, N2]); `nsa_compress_attention` attends over the compressed tokens that end at or
  before the query (the compressed-causal `atten_mask`) and ranks the selection blocks of
  `select_block_size` (l') tokens by the attention probabilities, summed over the G query heads of a
  KV group; the first block of the sequence and the `select_local_blocks` blocks ending at the query
  (its own block and the ones before it) are forced through `topk_mask`;
- selected: `nsa_select_attention` (sparse_mode=2, causal) attends, token by token, to the
  `select_block_count` blocks the compressed branch picked;
- sliding window: `nsa_window_attention` attends to the last `window_size` tokens.

Input is a packed batch of sequences in one [T, hidden] tensor with cumulative sequence lengths
(TND-style varlen) as a 1-D int Tensor: new length values never recompile a graph, because every
shape (the compressed token count included) follows from T and the number of sequences alone.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

# Absolute imports, and every helper from a module: ms.amp's O1 rewrite re-creates the Cells it parses
# from their module's source in a new file, repeating only the import statements.
from ms_nsa import _backend
from ms_nsa._layer_common import BRANCHES, LAYER, check_branches, check_input, check_length_tensor, \
    check_length_values, check_ops_accept, check_positive_int, check_rope, check_token_count, compressed_token_count, \
    context_mode, cumulative_lengths, project, reject_length_constant, rotary_constants, rotary_tables, rotate, \
    sequence_positions
from ms_nsa.compress.api import compress_rows
from ms_nsa.compress_attention import nsa_compress_attention
from ms_nsa.functional import nsa_select_attention
from ms_nsa.window import nsa_window_attention

__all__ = ["NativeSparseAttention", "BRANCHES"]


class NativeSparseAttention(nn.Cell):
    r"""NSA attention layer over a packed batch of sequences: [T, hidden_size] -> [T, hidden_size].

    Defaults are the paper's configuration: l = 32, d = 16, l' = 64, n = 16 (the first block and
    2 local blocks always selected), window 512.

    Args:
        hidden_size (int): model width (input and output features).
        head_num (int): N1, query heads.
        kv_head_num (int): N2, key/value heads per branch; head_num must be a multiple of it.
        head_dim (int): D, query/key head size (even if rope=True).
        compress_block_size (int): l, tokens per compressed key/value, 16..128, a multiple of 16.
        compress_stride (int): d, tokens between two compression windows, 16..64, a multiple of 16, <= l.
        select_block_size (int): l', tokens per selection block, 16..128, a multiple of 16 and of d, >= l.
        select_block_count (int): n, blocks each query attends to in the selected branch, 1..32,
            at least 1 + select_local_blocks.
        window_size (int): w, tokens each query sees in the sliding-window branch (itself included).
        value_head_dim (int, optional): Dv <= D; default D.
        select_local_blocks (int): blocks ending at the query that are always selected (its own block
            and the ones just before it), >= 1; default 2, as in the paper.
        branches (tuple of str): the branches to run, a subset of ("compressed", "selected",
            "window"); default all three. ("window",) is a sliding-window-only baseline. The selected
            branch needs the compressed one (its top-k).
        rope (bool): rotary position embedding on the queries and every branch's keys (before
            compression), positions counted from 0 in each packed sequence; default False.
        rope_base (float): the rotary base (theta), default 10000.
        init_std (float): standard deviation of the normal weight initialisation.

    Inputs:
        x (Tensor): [T, hidden_size], float32, float16 or bfloat16. Projections, gates and the rotary
            embedding run in float32 (the parameters are float32), the three attention ops in x's
            dtype; the output has x's dtype.
        actual_seq_len (Tensor, optional): cumulative sequence lengths, a 1-D int32/int64 Tensor whose
            last entry is T (lengths 1024, 2048 -> [1024, 3072]); None means one sequence. With the
            compressed branch, every sequence length must be a multiple of select_block_size and at
            least select_block_size * select_block_count (see `check_lengths`).

    Outputs:
        Tensor [T, hidden_size] in x's dtype.

    Examples:
        >>> import numpy as np, mindspore as ms, ms_nsa
        >>> attn = ms_nsa.nn.NativeSparseAttention(hidden_size=128, head_num=4, kv_head_num=2, head_dim=32,
        ...                                        select_block_count=4, window_size=64)
        >>> x = ms.Tensor(np.random.randn(768, 128).astype(np.float32))
        >>> actual_seq_len = ms.Tensor(np.array([256, 256 + 512], np.int64))   # sequences of 256 and 512 tokens
        >>> attn(x, actual_seq_len).shape
        (768, 128)
    """

    def __init__(self, hidden_size, head_num, kv_head_num, head_dim, *, compress_block_size=32, compress_stride=16,
                 select_block_size=64, select_block_count=16, window_size=512, value_head_dim=None,
                 select_local_blocks=2, branches=BRANCHES, rope=False, rope_base=10000.0, init_std=0.02):
        super().__init__()
        value_head_dim = head_dim if value_head_dim is None else value_head_dim
        for name, value in (("hidden_size", hidden_size), ("head_num", head_num), ("kv_head_num", kv_head_num),
                            ("head_dim", head_dim), ("value_head_dim", value_head_dim),
                            ("select_local_blocks", select_local_blocks)):
            check_positive_int(name, value)
        self.branches = check_branches(branches)
        if head_num % kv_head_num:
            raise ValueError(f"{LAYER}: head_num = {head_num} must be a multiple of kv_head_num = {kv_head_num} "
                             f"(the query heads of a KV head share its keys and its block selection)")
        if value_head_dim > head_dim:
            raise ValueError(f"{LAYER}: value_head_dim = {value_head_dim} is larger than head_dim = {head_dim}; the "
                             f"attention ops need value_head_dim <= head_dim: give a value_head_dim of at most "
                             f"{head_dim} (None means head_dim) or a larger head_dim")
        check_rope(rope, rope_base, head_dim)
        self.use_compressed = "compressed" in self.branches
        self.use_selected = "selected" in self.branches
        self.use_window = "window" in self.branches
        if self.use_compressed and select_local_blocks + 1 > select_block_count:
            raise ValueError(f"{LAYER}: select_block_count = {select_block_count} leaves no room for the forced "
                             f"blocks: the first block and select_local_blocks = {select_local_blocks} local blocks "
                             f"are always selected, so select_block_count must be at least "
                             f"{select_local_blocks + 1}; raise select_block_count or lower select_local_blocks")
        self.hidden_size, self.head_num, self.kv_head_num = hidden_size, head_num, kv_head_num
        self.group = head_num // kv_head_num
        self.head_dim, self.value_head_dim = head_dim, value_head_dim
        self.compress_block_size, self.compress_stride = compress_block_size, compress_stride
        self.select_block_size, self.select_block_count = select_block_size, select_block_count
        self.select_local_blocks, self.window_size = select_local_blocks, window_size
        self.scale = head_dim ** -0.5
        self.rope = bool(rope)
        self.needs_positions = self.rope or self.use_compressed
        check_ops_accept(self, _backend.name())

        def weight(name, *shape):
            return Parameter(initializer(Normal(init_std), shape, ms.float32), name=name)

        # One query projection shared by the branches; each branch has its own keys and values
        # (the paper's choice: it stops one branch's gradients from shaping another's keys).
        self.w_q = weight("w_q", hidden_size, head_num * head_dim)
        self.w_kv = weight("w_kv", hidden_size, len(self.branches) * kv_head_num * (head_dim + value_head_dim))
        if self.use_compressed:
            # nsa_compress's weights [l, N2]: one weight per window position and head; initialised to the
            # window mean, so a compressed key scores like its tokens do from the first step on.
            mean = Tensor(np.full((compress_block_size, kv_head_num), 1.0 / compress_block_size, np.float32))
            self.w_compress_k = Parameter(mean, name="w_compress_k")
            self.w_compress_v = Parameter(Tensor(mean.asnumpy()), name="w_compress_v")
        self.w_gate = weight("w_gate", hidden_size, head_num * len(self.branches))
        self.b_gate = Parameter(Tensor(np.zeros(head_num * len(self.branches), np.float32)), name="b_gate")
        self.w_o = weight("w_o", head_num * value_head_dim, hidden_size)
        if self.rope:
            self.rope_frequencies, self.rope_rotation = rotary_constants(head_dim, rope_base)

    def construct(self, x, actual_seq_len=None):
        # The work is in a staticmethod: ms.amp's O1 pass (a source rewrite, ms.rewrite) parses the
        # construct of custom Cells and every function it reaches outside site-packages, which fails on
        # the compile-time helpers (lru_cache objects) here and in the ops' API; a staticmethod call it
        # leaves as it is. The layer manages its precision itself (projections in float32, the ops in
        # x's dtype), so under O1 it computes what it computes without amp.
        out = self._attention(self, x, actual_seq_len)
        return out

    @staticmethod
    def _attention(self, x, actual_seq_len):  # pylint: disable=bad-staticmethod-argument
        check_input(LAYER, x.shape, x.dtype, self.hidden_size)
        if actual_seq_len is not None:
            if isinstance(actual_seq_len, Tensor):
                check_length_tensor(LAYER, actual_seq_len.dtype, actual_seq_len.ndim)
            else:
                reject_length_constant(LAYER, actual_seq_len)
        tokens = x.shape[0]
        check_token_count(tokens, self.select_block_size, self.select_block_count, self.use_compressed)
        if context_mode() == ms.PYNATIVE_MODE and actual_seq_len is not None:
            self.check_lengths(actual_seq_len, tokens)
        cu_seq_len = cumulative_lengths(tokens, actual_seq_len)
        dtype = x.dtype
        xf = x.astype(ms.float32)
        q = project(xf, self.w_q).reshape(tokens, self.head_num, self.head_dim)
        kv = project(xf, self.w_kv).reshape(tokens, len(self.branches), self.kv_head_num,
                                             self.head_dim + self.value_head_dim)
        gates = ops.sigmoid(project(xf, self.w_gate) + self.b_gate).reshape(tokens, self.head_num,
                                                                               len(self.branches))
        # Only what a configuration uses is computed: graph mode's parameter elimination fails on
        # unused values that depend on the inputs ("The pointer[manager] is null").
        position = sequence_positions(tokens, cu_seq_len) if self.needs_positions else None
        rotary = rotary_tables(position, (self.rope_frequencies, self.rope_rotation)) if self.rope else None
        if self.rope:
            q = rotate(q, rotary)

        # q stays float32 and is cast once per op: its gradients then add up in float32 (the CPU graph
        # backend has no bfloat16 AddN). Branch outputs [T, N1, Dv] in the order of self.branches (the
        # slots of kv and gates), which is canonical: compressed is slot 0, selected 1, window the last.
        outs = ()
        if self.use_compressed:
            key, value = self._kv_slot(kv, 0, rotary, dtype)
            compressed, topk_indices = self.compressed(q.astype(dtype), key, value, cu_seq_len, position)
            outs += (compressed,)
            if self.use_selected:
                key, value = self._kv_slot(kv, 1, rotary, dtype)
                outs += (self.selected(q.astype(dtype), key, value, topk_indices, cu_seq_len),)
        if self.use_window:
            key, value = self._kv_slot(kv, len(self.branches) - 1, rotary, dtype)
            outs += (self.window(q.astype(dtype), key, value, cu_seq_len),)
        out = gates[:, :, 0:1] * outs[0].astype(ms.float32)
        for slot in range(1, len(self.branches)):
            out = out + gates[:, :, slot:slot + 1] * outs[slot].astype(ms.float32)
        return project(out.reshape(tokens, self.head_num * self.value_head_dim), self.w_o).astype(dtype)

    def _kv_slot(self, kv, slot, rotary, dtype):
        """The keys [T, N2, D] (rotated if rope) and values [T, N2, Dv] of the branch in `slot`, in dtype."""
        key, value = kv[:, slot, :, :self.head_dim], kv[:, slot, :, self.head_dim:]
        if self.rope:
            key = rotate(key, rotary)
        return key.astype(dtype), value.astype(dtype)

    def compressed(self, q, key, value, cu_seq_len, position):
        """The compressed branch: (output [T, N1, Dv] float32, topk_indices [T, N2, n] int32, batch-relative)."""
        tokens, sequences = q.shape[0], cu_seq_len.shape[0]
        l, d, l_sel = self.compress_block_size, self.compress_stride, self.select_block_size
        rows = compressed_token_count(tokens, sequences, l, d)
        # Every sequence length L_b is a multiple of d (of l', which d divides), so sequence b has
        # L_b / d - (ceil(l / d) - 1) compressed tokens and their running sum is cu_b / d - (b + 1)(ceil(l / d) - 1).
        cu_cmp = cu_seq_len // d - (ops.arange(sequences, dtype=ms.int64) + 1) * (-(-l // d) - 1)
        cmp_key = compress_rows(key, self.w_compress_k.astype(q.dtype), l, d, cu_seq_len, rows)
        cmp_value = compress_rows(value, self.w_compress_v.astype(q.dtype), l, d, cu_seq_len, rows)
        # The masks' top-left corner serves every sequence (rows = positions in the sequence, columns =
        # its compressed tokens / blocks), so [T, rows] and [T, T / l'] cover the longest one.
        local_row = ops.arange(tokens, dtype=ms.int32).reshape(tokens, 1)
        # Compressed token c covers positions c*d .. c*d + l - 1: the query at s sees it once s >= c*d + l - 1.
        future = ops.arange(rows, dtype=ms.int32).reshape(1, rows) * d + (l - 1) > local_row
        own_block = local_row // l_sel
        block = ops.arange(tokens // l_sel, dtype=ms.int32).reshape(1, -1)
        forced = ops.logical_or(block == 0, ops.logical_and(block <= own_block,
                                                            block > own_block - self.select_local_blocks))
        # Outputs read by index: unpacking unused ones into `_` leaves tuple_getitem nodes that graph
        # mode's auto-monad pass reports as "side effect nodes eliminated by mistake".
        outputs = nsa_compress_attention(
            q, cmp_key, cmp_value, self.scale, self.head_num, l, d, l_sel, self.select_block_count,
            topk_mask=forced, atten_mask=future, actual_seq_qlen=cu_seq_len, actual_cmp_seq_kvlen=cu_cmp)
        out, topk_indices = outputs[0], outputs[1]
        # The first l - 1 positions of a sequence see no compressed token: the op averages every
        # compressed value of the sequence there (CANN's rule), future ones included. They get zero
        # (in float32: MindSpore's CPU graph kernels do not even reshape bfloat16).
        sees_one = (position >= l - 1).astype(ms.float32).reshape(tokens, 1, 1)
        return out.astype(ms.float32) * sees_one, topk_indices

    def selected(self, q, key, value, topk_indices, cu_seq_len):
        """Token-level attention over the chosen blocks, causal (sparse_mode=2): [T, N1, Dv]."""
        return nsa_select_attention(q, key, value, topk_indices, self.scale, self.head_num, self.select_block_size,
                                    self.select_block_count, actual_seq_qlen=cu_seq_len, actual_seq_kvlen=cu_seq_len,
                                    sparse_mode=2)[0]

    def window(self, q, key, value, cu_seq_len):
        """Causal sliding-window attention over the last window_size tokens of the sequence: [T, N1, Dv]."""
        return nsa_window_attention(q, key, value, self.scale, self.head_num, self.window_size,
                                    actual_seq_len=cu_seq_len)[0]

    def check_lengths(self, actual_seq_len, tokens):
        """Raises the layer's ValueError if these cumulative lengths do not suit it (host values).

        PyNative calls run this on every call. In GRAPH_MODE the values are not known when the graph
        is compiled, so a bad length is found by a kernel (a RuntimeError naming the op): call
        `layer.check_lengths(actual_seq_len, T)` on your batches before a long graph-mode run."""
        values = actual_seq_len.asnumpy() if isinstance(actual_seq_len, Tensor) else np.asarray(actual_seq_len)
        check_length_values(tuple(int(v) for v in values.reshape(-1)), tokens, self.select_block_size,
                             self.select_block_count, self.use_compressed)

    def extend_repr(self):
        return (f"hidden_size={self.hidden_size}, head_num={self.head_num}, kv_head_num={self.kv_head_num}, "
                f"head_dim={self.head_dim}, value_head_dim={self.value_head_dim}, "
                f"compress_block_size={self.compress_block_size}, compress_stride={self.compress_stride}, "
                f"select_block_size={self.select_block_size}, select_block_count={self.select_block_count}, "
                f"select_local_blocks={self.select_local_blocks}, window_size={self.window_size}, "
                f"branches={self.branches}, rope={self.rope}")
