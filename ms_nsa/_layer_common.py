"""What NativeSparseAttention (nsa_layer.py) is made of besides its Cell, and what the equal-blocks
layer shares with it: the input and configuration checks, the sequence geometry, the rotary
embedding. A module of its own because ms.amp's O1 pass re-creates the layer's class from its source
in a new module that only repeats the source file's import statements (so the class must reach every
helper through an import)."""
from __future__ import annotations

import functools
import math
import numbers

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ms_nsa.compress.api import OP as COMPRESS_OP
from ms_nsa.compress_attention.api import OP as COMPRESS_ATTENTION_OP
from ms_nsa.op_def import FORWARD as SELECT_OP, load_op_def
from ms_nsa.window.api import OP as WINDOW_OP

BRANCHES = ("compressed", "selected", "window")
LAYER = "NativeSparseAttention"
FLOAT_DTYPES = (ms.float32, ms.float16, ms.bfloat16)

# Runs at compile time in graph mode (a C-level callable, not parsed), on every call in PyNative.
at_compile_time = functools.lru_cache(maxsize=0)


def check_branches(branches):
    """The branch names in canonical order (selection needs the compressed branch, which comes first)."""
    if isinstance(branches, str) or not isinstance(branches, (tuple, list)):
        raise TypeError(f"{LAYER}: branches must be a tuple of names from {BRANCHES}, got {branches!r}")
    unknown = [b for b in branches if b not in BRANCHES]
    if unknown or not branches or len(set(branches)) != len(tuple(branches)):
        raise ValueError(f"{LAYER}: branches must be distinct names from {BRANCHES}, got {branches!r}")
    if "selected" in branches and "compressed" not in branches:
        raise ValueError(f"{LAYER}: the selected branch takes its blocks from the compressed branch's top-k; "
                         f"add 'compressed' to branches")
    return tuple(b for b in BRANCHES if b in branches)


@functools.lru_cache(maxsize=None)
def check_input(layer, shape, dtype, hidden_size):
    """x is [T, hidden_size] of a float dtype (compile time in graph mode)."""
    if len(shape) != 2:
        hint = ""
        if len(shape) == 3:
            batch, seq, width = shape
            hint = (f": a batch of {batch} sequences of {seq} tokens is passed packed, as "
                    f"x.reshape({batch * seq}, {width}) with actual_seq_len = "
                    f"Tensor(np.arange(1, {batch + 1}) * {seq}) (cumulative lengths)")
        raise ValueError(f"{layer}: x must be 2-D [T, hidden_size] (the sequences of a batch packed one after "
                         f"another), got shape {tuple(shape)}{hint}")
    if shape[1] != hidden_size:
        raise ValueError(f"{layer}: x.shape[1] = {shape[1]} must equal hidden_size = {hidden_size}")
    if shape[0] < 1:
        raise ValueError(f"{layer}: x has no tokens (shape {tuple(shape)})")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{layer}: x has dtype {dtype}; allowed: float32, float16, bfloat16")


@functools.lru_cache(maxsize=None)
def check_length_tensor(layer, dtype, ndim):
    if dtype not in (ms.int32, ms.int64) or ndim != 1:
        raise TypeError(f"{layer}: actual_seq_len must be a 1-D int32/int64 Tensor of cumulative lengths, got a "
                        f"{ndim}-D Tensor of {dtype}: pass Tensor(np.cumsum(lengths).astype(np.int64)), e.g. "
                        f"lengths 1024, 2048 -> Tensor([1024, 3072])")


@at_compile_time
def reject_length_constant(layer, lengths):
    """Tuples/lists (and any other non-Tensor) are refused: as graph constants they would recompile the
    graph for every new value, and a length must be an int."""
    raise TypeError(f"{layer}: actual_seq_len must be a 1-D int32/int64 Tensor of cumulative lengths (or None "
                    f"for one sequence), got {type(lengths).__name__} {lengths!r}: pass "
                    f"Tensor(np.array(...), ms.int64), e.g. lengths 1024, 2048 -> Tensor([1024, 3072]); a "
                    f"Tensor's values may change from step to step without recompiling a graph")


# A C-level callable: graph mode runs it at compile time, and ms.amp's source rewrite (O1) leaves it
# alone (it cannot locate the source of an lru_cache wrapper, and fails on one in an `if`).
context_mode = functools.partial(ms.get_context, "mode")


def cumulative_lengths(tokens, actual_seq_len):
    """The cumulative lengths as the ops take them, [B] int64 (None = one sequence of all tokens)."""
    if actual_seq_len is None:
        return ops.full((1,), tokens, dtype=ms.int64)
    return actual_seq_len.astype(ms.int64)


def sequence_positions(tokens, cu_seq_len):
    """Each token's position in its own sequence, [T] int32, in-graph (no [T, B] intermediate)."""
    rows = ops.arange(tokens, dtype=ms.int64)
    sequence = ops.searchsorted(cu_seq_len, rows, right=True)
    start = ops.gather(cu_seq_len, ops.maximum(sequence - 1, 0), 0) * (sequence > 0).astype(ms.int64)
    return (rows - start).astype(ms.int32)


def project(x, weight):
    # float32 whatever an amp pass did to the matmul (O1 runs MatMul in float16).
    return ops.matmul(x, weight).astype(ms.float32)


def rotary_tables(position, rope):
    """(cos, sin [T, 1, D] float32 of position * frequency, the half-rotation matrix [D, D]);
    rope = (frequencies [D], each repeated for channels i and i + D/2, rotation matrix)."""
    frequencies, rotation = rope
    angles = position.astype(ms.float32).reshape(-1, 1) * frequencies.reshape(1, -1)
    return ops.cos(angles).expand_dims(1), ops.sin(angles).expand_dims(1), rotation


def rotary_constants(head_dim, base):
    """The host-side constants of `rotate`: frequencies base^(-2i/D) for channel pairs (i, i + D/2),
    and the matrix R with x @ R = (-x2, x1) for x = (x1, x2)."""
    half = head_dim // 2
    frequencies = float(base) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    rotation = np.zeros((head_dim, head_dim), np.float32)
    rotation[half + np.arange(half), np.arange(half)] = -1.0
    rotation[np.arange(half), half + np.arange(half)] = 1.0
    return Tensor(np.tile(frequencies, 2).astype(np.float32)), Tensor(rotation)


def rotate(x, rotary):
    """Rotary embedding of x [T, N, D] (channel i paired with i + D/2, as in GPT-NeoX / LLaMA):
    (x1 cos - x2 sin, x2 cos + x1 sin); rotary = rotary_tables(...). No concat or slicing: ms.amp's
    O1 source rewrite parses this function and cannot parse every op."""
    cos, sin, rotation = rotary
    tokens, heads, dim = x.shape
    half_turn = ops.matmul(x.reshape(tokens * heads, dim), rotation).reshape(tokens, heads, dim)
    return x * cos + half_turn * sin


def compressed_token_count(tokens, sequences, compress_block_size, compress_stride):
    """nsa_compress's row count when every one of the `sequences` lengths (summing to `tokens`) is a
    multiple of the stride d and at least the block l: sum_b (L_b - l) // d + 1 = T/d - B (ceil(l/d) - 1)."""
    return tokens // compress_stride - sequences * (-(-compress_block_size // compress_stride) - 1)


@functools.lru_cache(maxsize=None)
def check_token_count(tokens, block, block_count, selection):
    """Shapes are constants, so in graph mode this fails at compile time, with this message."""
    if not selection:
        return
    if tokens % block:
        raise ValueError(f"{LAYER}: the token count T = {tokens} (x.shape[0]) must be a multiple of "
                         f"select_block_size = {block}: every sequence length must be one. Pad each "
                         f"sequence to a multiple of {block} tokens (with zero loss weight on the padding)")
    if tokens < block * block_count:
        raise ValueError(f"{LAYER}: the token count T = {tokens} (x.shape[0]) is less than select_block_size "
                         f"* select_block_count = {block} * {block_count} = {block * block_count}; every "
                         f"sequence must be at least that long. Use longer (or padded) sequences, or a "
                         f"smaller select_block_count or select_block_size")


@functools.lru_cache(maxsize=None)
def check_length_values(values, tokens, block, block_count, selection):
    hint = ""
    if len(values) > 1 and min(values) >= 0 and sum(values) == tokens:
        hint = f"; if these are per-sequence lengths, pass their running sum {[int(v) for v in np.cumsum(values)]}"
    previous = 0
    for i, value in enumerate(values):
        if value < previous:
            raise ValueError(f"{LAYER}: actual_seq_len = {list(values)} decreases at entry {i} ({value} < "
                             f"{previous}); it holds cumulative lengths (lengths 1024, 2048 -> [1024, 3072]){hint}")
        previous = value
    if not values or values[-1] != tokens:
        raise ValueError(f"{LAYER}: actual_seq_len = {list(values)} must end at the token count T = {tokens} "
                         f"(x.shape[0]): it holds cumulative lengths{hint}")
    if not selection:
        return
    need = block * block_count
    for i, (begin, end) in enumerate(zip((0,) + values[:-1], values)):
        length = end - begin
        if length % block or length < need:
            raise ValueError(f"{LAYER}: actual_seq_len = {list(values)} gives sequence {i} a length of {length}; "
                             f"every sequence must be a multiple of select_block_size = {block} and at least "
                             f"select_block_size * select_block_count = {block} * {block_count} = {need} tokens "
                             f"(the selected branch attends to select_block_count whole blocks of its own "
                             f"sequence). Pad it (with zero loss weight on the padding), pack it together with "
                             f"a neighbour, or use a smaller select_block_count / select_block_size")


def check_rope(rope, rope_base, head_dim):
    if not rope:
        return
    if head_dim % 2:
        raise ValueError(f"{LAYER}: rope=True rotates pairs of channels, so head_dim must be even, got "
                         f"head_dim = {head_dim}")
    if isinstance(rope_base, bool) or not isinstance(rope_base, numbers.Real) or not math.isfinite(rope_base) \
            or rope_base <= 1:
        raise ValueError(f"{LAYER}: rope_base must be a finite number > 1 (10000 is usual), got {rope_base!r}")


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{LAYER}: {name} must be an int >= 1, got {value!r}")


def check_ops_accept(layer, backend):
    """The configuration against each op's own rules (ops_yaml/: attributes, head counts and sizes), so a
    bad one fails when the layer is built, with the op's rule and the layer's context."""
    heads = dict(query=(1, layer.head_num, layer.head_dim), key=(1, layer.kv_head_num, layer.head_dim),
                 value=(1, layer.kv_head_num, layer.value_head_dim))
    common = dict(scale_value=layer.scale, head_num=layer.head_num)
    checks = []
    if layer.use_compressed:
        compression = dict(compress_block_size=layer.compress_block_size, compress_stride=layer.compress_stride)
        checks += [(COMPRESS_OP, compression, dict(input=(1, layer.kv_head_num, layer.head_dim))),
                   (COMPRESS_ATTENTION_OP, dict(common, **compression, select_block_size=layer.select_block_size,
                                                select_block_count=layer.select_block_count), heads)]
    if layer.use_selected:
        checks.append((SELECT_OP, dict(common, select_block_size=layer.select_block_size,
                                       select_block_count=layer.select_block_count, sparse_mode=2), heads))
    if layer.use_window:
        checks.append((WINDOW_OP, dict(common, window_size=layer.window_size), heads))
    for op_name, attrs, shapes in checks:
        op_def = load_op_def(op_name)
        try:
            op_def.bind_dims(shapes, op_def.check_attrs(attrs, backend), backend)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{LAYER}: this configuration is outside what {op_name} supports on {backend} "
                              f"(head_num = {layer.head_num}, kv_head_num = {layer.kv_head_num}, head_dim = "
                              f"{layer.head_dim}, value_head_dim = {layer.value_head_dim}): {error}") from error
