"""`EqualBlocksNativeSparseAttention`: the first NSA layer of ms_nsa, kept as a baseline and for Ascend.

The same three gated branches as `NativeSparseAttention` (nsa_layer.py), in the paper's l = d = l'
special case: compression blocks are the selection blocks, so the compressed branch's probability of
a block *is* that block's selection score. Only the selected branch is a fused op
(`NsaSelectAttention`, sparse_mode=2); the compressed branch (dense over the T/beta blocks of the
packed batch) and the window branch (a gathered [T, N2, w, D] copy) are stock MindSpore ops, so its
memory grows with T^2/beta and T*w: fine at demo scale, not at long context
(benchmarks/bench_layer.py compares the two layers).

Why it is kept: it runs wherever the selected op runs, i.e. also on the Ascend backend (give
`select_dtype=ms.float16`), where nsa_compress, nsa_compress_attention and nsa_window_attention are
not built yet; and it is the stock-op baseline of the layer benchmark. Inputs are float32; lengths may
be a Tensor or a tuple (CANN takes them as host integers).

- compressed: every query attends to one summary key/value per complete block of `select_block_size`
  past tokens of its sequence (a learned map of the block's flattened keys / values);
- selected: the first block, the query's own block and the past blocks with the highest compressed
  probability (summed over the query heads of a KV group);
- sliding window: every query attends to its last `window_size` tokens.

Every sequence length must be a multiple of `select_block_size` and at least
`select_block_size * select_block_count`.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from .nn import NsaSelectAttention
from ._layer_common import BRANCHES, check_branches

# Masked scores are set to this finite value (not -inf) so that a row with nothing visible -- the
# first block of every sequence sees no complete compressed block -- gives a finite softmax, which
# the visibility mask then zeroes; -inf would turn it into NaN in the forward and the gradient.
_MASKED_SCORE = -1e9
# Selection ranks blocks by compressed-attention probability (in [0, G]); forced blocks rank above
# every probability, blocks of other sequences below everything. Blocks of the query's own sequence
# that lie in its future rank between the two: they are only picked when the query has fewer than
# `select_block_count` past blocks, and then the op's causal mask (sparse_mode=2) hides them.
_FORCED_RANK, _FUTURE_RANK, _OTHER_SEQUENCE_RANK = 1e4, -1.0, -1e4


class EqualBlocksNativeSparseAttention(nn.Cell):
    r"""NSA attention layer over a packed batch of sequences: [T, hidden_size] -> [T, hidden_size].

    Args:
        hidden_size (int): model width (input and output features).
        head_num (int): N1, query heads.
        kv_head_num (int): N2, key/value heads; head_num must be a multiple (G = N1 / N2 <= 32).
        head_dim (int): D, query/key head size.
        select_block_size (int): β, tokens per block (compression and selection), 16..128, multiple of 16.
        select_block_count (int): C, blocks each query attends to in the selected branch, 1..32.
        window_size (int): w, tokens each query sees in the sliding-window branch (itself included).
        value_head_dim (int, optional): Dv <= D; default D.
        branches (tuple of str): the branches to run, a subset of ("compressed", "selected",
            "window"); default all three. ("window",) is a sliding-window-only baseline. The selected
            branch needs the compressed one (its block scores).
        init_std (float): standard deviation of the normal weight initialisation.
        select_dtype (mindspore dtype, optional): the dtype the selected-attention op runs in (its
            inputs are cast to it and its output back to float32); None runs it in float32. On
            Ascend give ms.float16 or ms.bfloat16: CANN's op takes no float32.

    Inputs:
        x (Tensor): [T, hidden_size] float32 (the CPU backend has no bfloat16 matmul), T a multiple
            of select_block_size.
        actual_seq_len (Tensor, tuple or list, optional): cumulative sequence lengths (1-D int32/int64
            if a Tensor), last = T (e.g. lengths 256, 512 -> [256, 768]); None means one sequence. A
            Tensor's values may change from step to step without recompiling a graph; on Ascend pass
            a tuple (CANN takes the lengths as host integers).

    Outputs:
        Tensor [T, hidden_size].

    Examples:
        >>> import numpy as np, mindspore as ms, ms_nsa
        >>> attn = ms_nsa.nn.EqualBlocksNativeSparseAttention(
        ...     hidden_size=128, head_num=4, kv_head_num=2, head_dim=32, select_block_size=16,
        ...     select_block_count=4, window_size=64)
        >>> x = ms.Tensor(np.random.randn(192, 128).astype(np.float32))
        >>> actual_seq_len = ms.Tensor(np.array([64, 64 + 128], np.int64))   # sequences of 64 and 128 tokens
        >>> attn(x, actual_seq_len).shape
        (192, 128)
    """

    def __init__(self, hidden_size, head_num, kv_head_num, head_dim, select_block_size=64,
                 select_block_count=16, window_size=512, value_head_dim=None, branches=BRANCHES,
                 init_std=0.02, select_dtype=None):
        super().__init__()
        branches = check_branches(branches)
        if head_num % kv_head_num:
            raise ValueError(f"EqualBlocksNativeSparseAttention: head_num ({head_num}) must be a multiple of "
                             f"kv_head_num ({kv_head_num})")
        if window_size < 1:
            raise ValueError(f"EqualBlocksNativeSparseAttention: window_size must be >= 1, got {window_size}")
        value_head_dim = head_dim if value_head_dim is None else value_head_dim
        self.hidden_size, self.head_num, self.kv_head_num = hidden_size, head_num, kv_head_num
        self.group = head_num // kv_head_num
        self.head_dim, self.value_head_dim = head_dim, value_head_dim
        self.block, self.block_count, self.window_size = select_block_size, select_block_count, window_size
        self.branches = branches
        self.use_compressed = "compressed" in branches
        self.use_selected = "selected" in branches
        self.use_window = "window" in branches
        self.scale = head_dim ** -0.5
        self.select_dtype = select_dtype

        def weight(name, *shape):
            return Parameter(initializer(Normal(init_std), shape, ms.float32), name=name)

        # One query projection shared by the branches; each branch has its own keys and values
        # (the paper's choice: it stops one branch's gradients from shaping another's keys).
        self.w_q = weight("w_q", hidden_size, head_num * head_dim)
        kv_width = kv_head_num * (head_dim + value_head_dim)
        self.w_kv = weight("w_kv", hidden_size, len(branches) * kv_width)
        if self.use_compressed:
            # Block summary phi: a learned linear map of the block's flattened keys (values); being
            # position-specific it plays the role of the paper's intra-block position encoding.
            # Initialised to the block mean, so from the first step a block's summary key scores
            # like its tokens do and the selection is meaningful before phi has learned anything.
            self.w_compress_k = Parameter(_block_mean(select_block_size, head_dim), name="w_compress_k")
            self.w_compress_v = Parameter(_block_mean(select_block_size, value_head_dim), name="w_compress_v")
        if self.use_selected:
            # Validates the attributes against the op's contract at construction time.
            self.selected_attention = NsaSelectAttention(head_num, select_block_size, select_block_count,
                                                         scale_value=self.scale, sparse_mode=2)
        self.w_gate = weight("w_gate", hidden_size, head_num * len(branches))
        self.b_gate = Parameter(Tensor(np.zeros(head_num * len(branches), np.float32)), name="b_gate")
        self.w_o = weight("w_o", head_num * value_head_dim, hidden_size)

    def construct(self, x, actual_seq_len=None):
        tokens = x.shape[0]
        _check_token_count(tokens, self.block, self.block_count if self.use_selected else 1)
        seq = _sequence_geometry(tokens, actual_seq_len, self.block)
        q = ops.matmul(x, self.w_q).reshape(tokens, self.kv_head_num, self.group, self.head_dim)
        kv = ops.matmul(x, self.w_kv).reshape(tokens, len(self.branches), self.kv_head_num,
                                              self.head_dim + self.value_head_dim)
        gates = ops.sigmoid(ops.matmul(x, self.w_gate) + self.b_gate).reshape(
            tokens, self.kv_head_num, self.group, len(self.branches), 1)

        # Branch outputs [T, N2, G, Dv] in the order of self.branches (the slots of kv and gates);
        # that order is canonical, so compressed is slot 0, selected slot 1 and window the last.
        branch_outs = ()
        if self.use_compressed:
            compressed_out, block_probs = self.compressed(q, *self._kv_slot(kv, 0), seq)
            branch_outs += (compressed_out,)
            if self.use_selected:
                topk_indices = self.select_blocks(block_probs, seq)
                branch_outs += (self.selected(q, *self._kv_slot(kv, 1), topk_indices, seq, actual_seq_len),)
        if self.use_window:
            branch_outs += (self.window(q, *self._kv_slot(kv, len(self.branches) - 1), seq),)
        out = gates[:, :, :, 0] * branch_outs[0]
        for slot in range(1, len(self.branches)):
            out = out + gates[:, :, :, slot] * branch_outs[slot]
        return ops.matmul(out.reshape(tokens, self.head_num * self.value_head_dim), self.w_o)

    def _kv_slot(self, kv, slot):
        """The keys [T, N2, D] and values [T, N2, Dv] of the branch in `slot`."""
        return kv[:, slot, :, :self.head_dim], kv[:, slot, :, self.head_dim:]

    def compressed(self, q, key, value, seq):
        """Attention over block summaries; returns the output [T, N2, G, Dv] and the attention
        probabilities of each complete past block of the query's sequence, [T, N2, G, T/β]."""
        tokens, blocks = q.shape[0], q.shape[0] // self.block
        sequence, block_sequence = seq[1], seq[4]
        key_summary = _summarise_blocks(key, self.w_compress_k, self.block)       # [blocks, N2, D]
        value_summary = _summarise_blocks(value, self.w_compress_v, self.block)   # [blocks, N2, Dv]
        block_end = (ops.arange(blocks, dtype=ms.int32) + 1) * self.block - 1
        visible = ops.logical_and(block_sequence.reshape(1, blocks) == sequence.reshape(tokens, 1),
                                  block_end.reshape(1, blocks) <= ops.arange(tokens, dtype=ms.int32).reshape(
                                      tokens, 1))                                  # [T, blocks]
        scores = ops.matmul(q.transpose(1, 0, 2, 3).reshape(self.kv_head_num, tokens * self.group, self.head_dim),
                            key_summary.transpose(1, 2, 0)) * self.scale            # [N2, T*G, blocks]
        scores = scores.reshape(self.kv_head_num, tokens, self.group, blocks)
        probs = _masked_softmax(scores, visible.reshape(1, tokens, 1, blocks))
        out = ops.matmul(probs.reshape(self.kv_head_num, tokens * self.group, blocks), value_summary.transpose(1, 0, 2))
        out = out.reshape(self.kv_head_num, tokens, self.group, self.value_head_dim).transpose(1, 0, 2, 3)
        return out, probs.transpose(1, 0, 2, 3)

    def select_blocks(self, block_probs, seq):
        """topk_indices [T, N2, C] int32: per query and KV group, the C blocks of highest compressed
        probability (summed over the group's heads), first and own block always included, as block
        numbers relative to the sequence start. Indices are distinct and within the sequence."""
        tokens, blocks = block_probs.shape[0], block_probs.shape[-1]
        # Only the needed fields are read: unpacking into `_` leaves unused tuple_getitem nodes that
        # graph mode's auto-monad pass reports as "side effect nodes eliminated by mistake".
        sequence, first_block, block_sequence = seq[1], seq[3], seq[4]
        importance = ops.stop_gradient(block_probs.sum(axis=2))                    # [T, N2, blocks]
        block_ids = ops.arange(blocks, dtype=ms.int32).reshape(1, blocks)
        own_block = (ops.arange(tokens, dtype=ms.int32) // self.block).reshape(tokens, 1)
        first_block = first_block.reshape(tokens, 1)
        same_sequence = block_sequence.reshape(1, blocks) == sequence.reshape(tokens, 1)
        forced = ops.logical_or(block_ids == own_block, block_ids == first_block)
        past = (block_ids <= own_block).reshape(tokens, 1, blocks)
        rank = ops.where(past, importance, ops.full_like(importance, _FUTURE_RANK))
        rank = ops.where(forced.reshape(tokens, 1, blocks), ops.full_like(rank, _FORCED_RANK), rank)
        rank = ops.where(same_sequence.reshape(tokens, 1, blocks), rank,
                         ops.full_like(rank, _OTHER_SEQUENCE_RANK))
        chosen = ops.topk(rank, self.block_count)[1]                               # global block numbers
        return (chosen.astype(ms.int32) - first_block.reshape(tokens, 1, 1)).astype(ms.int32)

    def selected(self, q, key, value, topk_indices, seq, actual_seq_len):
        """Token-level attention over the chosen blocks (ms_nsa's op), [T, N2, G, Dv]."""
        tokens = q.shape[0]
        # The op takes the lengths as given (a tuple stays a tuple, as the Ascend backend needs).
        lengths = seq[0] if isinstance(actual_seq_len, Tensor) else actual_seq_len
        q = q.reshape(tokens, self.head_num, self.head_dim)
        if self.select_dtype is not None:
            q, key, value = q.astype(self.select_dtype), key.astype(self.select_dtype), value.astype(self.select_dtype)
        out = self.selected_attention(q, key, value, topk_indices, lengths, lengths)
        return out.astype(ms.float32).reshape(tokens, self.kv_head_num, self.group, self.value_head_dim)

    def window(self, q, key, value, seq):
        """Causal sliding-window attention over the last window_size tokens of the sequence, [T, N2, G, Dv]."""
        tokens, start = q.shape[0], seq[2]
        positions = ops.arange(tokens, dtype=ms.int32).reshape(tokens, 1)
        key_rows = positions - self.window_size + 1 + ops.arange(self.window_size, dtype=ms.int32).reshape(1, -1)
        visible = key_rows >= start.reshape(tokens, 1)                         # [T, w]
        key_rows = ops.maximum(key_rows, 0)
        window_keys = _gather_rows(key, key_rows)                                   # [T, N2, w, D]
        window_values = _gather_rows(value, key_rows)                               # [T, N2, w, Dv]
        scores = ops.matmul(q, window_keys.swapaxes(-1, -2)) * self.scale          # [T, N2, G, w]
        probs = _masked_softmax(scores, visible.reshape(tokens, 1, 1, self.window_size))
        return ops.matmul(probs, window_values)

    def extend_repr(self):
        return (f"hidden_size={self.hidden_size}, head_num={self.head_num}, kv_head_num={self.kv_head_num}, "
                f"head_dim={self.head_dim}, value_head_dim={self.value_head_dim}, "
                f"select_block_size={self.block}, select_block_count={self.block_count}, "
                f"window_size={self.window_size}, branches={self.branches}")


def _check_token_count(tokens, block, block_count):
    """Shapes are constants, so in graph mode this fails at compile time, with this message. The
    selected branch attends to `block_count` whole blocks of each sequence, so no sequence, and hence
    not T, may be shorter than that (the per-sequence rule is the kernel's, on the length values)."""
    if tokens % block:
        raise ValueError(f"EqualBlocksNativeSparseAttention: the token count T = {tokens} must be a multiple of "
                         f"select_block_size = {block} (every sequence length must be one)")
    if tokens < block * block_count:
        raise ValueError(f"EqualBlocksNativeSparseAttention: the token count T = {tokens} is less than "
                         f"select_block_size "
                         f"* select_block_count = {block} * {block_count} = {block * block_count}; every "
                         f"sequence must be at least that long. Use longer (or padded) sequences, or a "
                         f"smaller select_block_count or select_block_size")


def _sequence_geometry(tokens, actual_seq_len, block):
    """Where every token and block sits in the packed batch, computed in-graph from the lengths.

    A plain tuple (graph mode compiled a namedtuple's field access into a slow, failing fallback):
    (cu_seq_len [B] int64 as the op reads it, sequence [T] int32 (the token's sequence number),
    start [T] int32 (first token of its sequence), first_block [T] int32 (first block of its
    sequence), block_sequence [T/β] int32 (each block's sequence number))."""
    if actual_seq_len is None:
        cu_seq_len = ops.full((1,), tokens, dtype=ms.int64)
    elif isinstance(actual_seq_len, Tensor):
        cu_seq_len = actual_seq_len.astype(ms.int64)
    else:
        cu_seq_len = Tensor(actual_seq_len, ms.int64)
    ends = cu_seq_len.astype(ms.int32).reshape(1, -1)
    positions = ops.arange(tokens, dtype=ms.int32).reshape(tokens, 1)
    ended = positions >= ends                                                       # [T, B]
    sequence = ended.astype(ms.int32).sum(axis=1).astype(ms.int32)
    start = ops.where(ended, ends, ops.zeros_like(ends)).max(axis=1)
    block_sequence = sequence.reshape(tokens // block, block)[:, 0]
    return cu_seq_len, sequence, start, start // block, block_sequence


def _block_mean(block, dim):
    """[β*d, d] weights that map a flattened block of β rows to their mean."""
    return Tensor(np.tile(np.eye(dim, dtype=np.float32), (block, 1)) / block)


def _summarise_blocks(x, weight, block):
    """[T, N2, d] -> [T/β, N2, d]: each block's flattened rows mapped by `weight` [β*d, d]."""
    tokens, heads, dim = x.shape
    blocks = x.reshape(tokens // block, block, heads, dim).transpose(0, 2, 1, 3)
    return ops.matmul(blocks.reshape(tokens // block, heads, block * dim), weight)


def _masked_softmax(scores, visible):
    """Softmax over the last axis restricted to `visible`; rows with nothing visible give zeros."""
    probs = ops.softmax(ops.masked_fill(scores, ops.logical_not(visible), _MASKED_SCORE), axis=-1)
    return probs * visible.astype(probs.dtype)


def _gather_rows(x, rows):
    """x [T, N2, d] gathered at token rows [T, w] for every head: [T, N2, w, d]."""
    tokens, heads, dim = x.shape
    width = rows.shape[1]
    flat = (rows.reshape(tokens, 1, width) * heads + ops.arange(heads, dtype=ms.int32).reshape(1, heads, 1))
    return ops.gather(x.reshape(tokens * heads, dim), flat.reshape(-1), 0).reshape(tokens, heads, width, dim)
