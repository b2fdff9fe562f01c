"""CPU benchmark of nsa_compress and nsa_compress_attention against the same computation from stock
MindSpore ops (ms_nsa/compress/composed.py, ms_nsa/compress_attention/composed.py), side by side in one
run (interleaved A, B, A, B so machine noise hits both alike), GRAPH_MODE, median of --reps runs.
A benchmark, not a test: it asserts nothing.

Problem: one causal sequence of T tokens (default 16384), the paper's l = 32, d = 16, l' = 64, n = 16,
N1 = 4 query heads on N2 = 1 KV head, D = Dv = 128, float32; the keys/values of the attention are the
T_cmp = (T - l) / d + 1 compressed tokens, with the compressed-causal mask.
The stock-op attention materialises the [N1, T, T_cmp] scores (and autodiff keeps several of them).

    python benchmarks/bench_compress.py [--tokens 16384] [--reps 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

import ms_nsa
from ms_nsa.compress.composed import composed_compress, window_rows
from ms_nsa.compress_attention.composed import (composed_attention, composed_probabilities, composed_topk,
                                                importance_matrix, masks)

L, D_STRIDE, L_SEL, COUNT = 32, 16, 64, 16


class Compress(nn.Cell):
    def __init__(self, rows, composed):
        super().__init__()
        self.rows, self.composed = rows, composed

    def construct(self, x, w):
        return composed_compress(x, w, self.rows) if self.composed else ms_nsa.nsa_compress(x, w, L, D_STRIDE)


class Loss(nn.Cell):
    """sum(first output * weights): its gradient is the op's backward for d out = weights."""

    def __init__(self, op, weights):
        super().__init__()
        self.op, self.weights = op, weights

    def construct(self, *inputs):
        out = self.op(*inputs)
        if isinstance(out, tuple):
            out = out[0]
        return (out * self.weights).sum()


class Attention(nn.Cell):
    """(attention_out, topk_indices) through ms_nsa or stock ops."""

    def __init__(self, mask, scale, composed, tokens, cmp_tokens):
        super().__init__()
        self.scale, self.composed = scale, composed
        self.mask = Tensor(mask)
        self.masked, self.foreign = masks(tokens, cmp_tokens, mask)
        self.weights = importance_matrix(cmp_tokens, L, D_STRIDE, L_SEL)

    def construct(self, q, k, v):
        if self.composed:
            out = composed_attention(q, k, v, self.scale, self.masked, self.foreign)
            topk = composed_topk(composed_probabilities(q, k, self.scale, self.masked, self.foreign), self.weights,
                                 COUNT)
            return out, topk
        out, topk, _, _ = ms_nsa.nsa_compress_attention(q, k, v, self.scale, q.shape[1], L, D_STRIDE, L_SEL, COUNT,
                                                        atten_mask=self.mask)
        return out, topk


def timed(fn, *args):
    start = time.perf_counter()
    outputs = fn(*args)
    for out in outputs if isinstance(outputs, tuple) else (outputs,):
        out.asnumpy()
    return time.perf_counter() - start


def compare(name, ours, theirs, args, reps):
    timed(ours, *args), timed(theirs, *args)   # compile and warm up
    a, b = [], []
    for _ in range(reps):
        a.append(timed(ours, *args))
        b.append(timed(theirs, *args))
    ours_s, theirs_s = statistics.median(a), statistics.median(b)
    print(f"{name:<34} ms_nsa {ours_s * 1e3:9.1f} ms   stock ops {theirs_s * 1e3:9.1f} ms   "
          f"speed-up {theirs_s / ours_s:5.2f}x", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    ms_nsa.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    tokens, heads, dim = args.tokens, args.heads, 128
    cmp_tokens = (tokens - L) // D_STRIDE + 1
    print(f"T = {tokens}, T_cmp = {cmp_tokens}, N1 = {heads}, N2 = 1, D = Dv = {dim}, l = {L}, d = {D_STRIDE}, "
          f"l' = {L_SEL}, n = {COUNT}, float32, {args.threads} threads, median of {args.reps}", flush=True)

    x = Tensor(rng.standard_normal((tokens, 1, dim), dtype=np.float32))
    w = Tensor(rng.standard_normal((L, 1), dtype=np.float32) / L ** 0.5)
    rows = window_rows(tokens, L, D_STRIDE)
    weights = Tensor(rng.standard_normal((cmp_tokens, 1, dim), dtype=np.float32))
    ours, theirs = Compress(rows, False), Compress(rows, True)
    compare("nsa_compress fwd", ours, theirs, (x, w), args.reps)
    compare("nsa_compress fwd+bwd", ms.grad(Loss(ours, weights), grad_position=(0, 1)),
            ms.grad(Loss(theirs, weights), grad_position=(0, 1)), (x, w), args.reps)

    q = Tensor(rng.standard_normal((tokens, heads, dim), dtype=np.float32))
    k = Tensor(rng.standard_normal((cmp_tokens, 1, dim), dtype=np.float32))
    v = Tensor(rng.standard_normal((cmp_tokens, 1, dim), dtype=np.float32))
    mask = np.arange(cmp_tokens)[None, :] * D_STRIDE + L - 1 > np.arange(tokens)[:, None]
    scale = dim ** -0.5
    ours, theirs = Attention(mask, scale, False, tokens, cmp_tokens), Attention(mask, scale, True, tokens, cmp_tokens)
    compare("nsa_compress_attention fwd+top-k", ours, theirs, (q, k, v), args.reps)
    d_out = Tensor(rng.standard_normal((tokens, heads, dim), dtype=np.float32))
    compare("nsa_compress_attention fwd+bwd", ms.grad(Loss(ours, d_out), grad_position=(0, 1, 2)),
            ms.grad(Loss(theirs, d_out), grad_position=(0, 1, 2)), (q, k, v), args.reps)


if __name__ == "__main__":
    main()
