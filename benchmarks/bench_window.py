"""Sliding-window attention: the fused op (ms_nsa.nsa_window_attention) against the stock-op window
branch of the equal-blocks layer (ms_nsa/nsa_layer_equal_blocks.py: gather a [T, N2, w, D] copy of keys and values,
matmul, masked softmax), forward + backward in GRAPH_MODE. A benchmark, not a test: it asserts nothing.

Each (implementation, T) runs in its own child process, so each peak RSS (VmHWM after compiling and
one warm-up, reset before the timed runs) is that computation's alone; the two implementations
alternate T by T in one run, so machine noise hits both alike. The same inputs feed both, and the
gradients' sums are printed as a check that both computed the same thing.

    python benchmarks/bench_window.py [--quick] [--tokens 2048 4096 8192 16384] [--stock-max-tokens 2048]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench_cpu import reset_peak_rss, status_bytes  # the same /proc probes as the selected-op benchmark

SHAPE = dict(q_heads=4, kv_heads=2, head_dim=64, window=512)   # issue 13: 4 heads, head_dim 64, w = 512
QUICK = dict(q_heads=4, kv_heads=2, head_dim=16, window=64)


def child(which, tokens, shape, runs, threads):
    import time

    import numpy as np
    import mindspore as ms
    from mindspore import Tensor, nn, ops

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    import ms_nsa
    from ms_nsa.nsa_layer_equal_blocks import EqualBlocksNativeSparseAttention, _sequence_geometry
    ms_nsa.set_num_threads(threads)

    n1, n2, dim, window = shape["q_heads"], shape["kv_heads"], shape["head_dim"], shape["window"]
    rng = np.random.default_rng(0)
    q, k, v, g = (Tensor(rng.standard_normal(s).astype(np.float32)) for s in
                  ((tokens, n1, dim), (tokens, n2, dim), (tokens, n2, dim), (tokens, n1, dim)))
    scale = dim ** -0.5

    class Fused(nn.Cell):
        def construct(self, query, key, value, weights):
            out, _, _ = ms_nsa.nsa_window_attention(query, key, value, scale, n1, window)
            return (out * weights).sum()

    class Stock(nn.Cell):
        def __init__(self):
            super().__init__()
            self.layer = EqualBlocksNativeSparseAttention(n1 * dim, n1, n2, dim, window_size=window, branches=("window",))

        def construct(self, query, key, value, weights):
            seq = _sequence_geometry(tokens, None, self.layer.block)
            out = self.layer.window(query.reshape(tokens, n2, n1 // n2, dim), key, value, seq)
            return (out.reshape(tokens, n1, dim) * weights).sum()

    grad = ms.grad(Fused() if which == "fused" else Stock(), grad_position=(0, 1, 2))

    def run():
        grads = grad(q, k, v, g)
        return [x.asnumpy() for x in grads]

    run()                                 # compiles the graph and warms the allocator
    reset_peak_rss()                      # so the high-water mark below is the timed runs'
    rss_before = status_bytes("VmRSS")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        grads = run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": sorted(times)[len(times) // 2], "peak_rss": status_bytes("VmHWM"),
                      "rss_before": rss_before, "grad_sums": [float(np.float64(x).sum()) for x in grads]}))


def measure(which, tokens, shape, runs, threads):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", which, str(tokens), json.dumps(shape),
                          str(runs), str(threads)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["exit code %d" % out.returncode])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the script)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--stock-max-tokens", type=int, default=2048,
                        help="largest T for the stock-op branch: its memory grows with T * w (7.6 GiB at "
                             "T = 2048, w = 512; ~15 GiB at 4096 would crowd a 24 GB machine)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        which, tokens, shape, runs, threads = args.child
        child(which, int(tokens), json.loads(shape), int(runs), int(threads))
        return
    shape, tokens = (QUICK, [256, 512]) if args.quick else (SHAPE, args.tokens)
    runs = 1 if args.quick else args.runs
    print(f"window attention fwd+bwd, GRAPH_MODE, float32, N1={shape['q_heads']} N2={shape['kv_heads']} "
          f"D={shape['head_dim']} w={shape['window']}, {args.threads} threads, median of {runs}")
    print(f"{'T':>6} | {'fused s':>8} {'fused peak RSS':>14} | {'stock s':>8} {'stock peak RSS':>14} | "
          f"{'time ratio':>10} {'RSS ratio':>9} | grad sums fused / stock")
    results = []
    for t in tokens:
        fused = measure("fused", t, shape, runs, args.threads)
        stock = measure("stock", t, shape, runs, args.threads) if t <= args.stock_max_tokens else None
        results.append({"tokens": t, "fused": fused, "stock": stock})
        gib = lambda r: f"{r['peak_rss'] / 2 ** 30:11.2f} GiB" if r and "peak_rss" in r else f"{'-':>14}"  # noqa: E731
        secs = lambda r: f"{r['seconds']:8.3f}" if r and "seconds" in r else f"{'-':>8}"  # noqa: E731
        ratio = (f"{stock['seconds'] / fused['seconds']:9.1f}x {stock['peak_rss'] / fused['peak_rss']:8.1f}x"
                 if stock and "seconds" in stock and "seconds" in fused else f"{'-':>10} {'-':>9}")
        sums = " / ".join(",".join(f"{s:.4g}" for s in r["grad_sums"]) for r in (fused, stock) if r and "grad_sums" in r)
        notes = "; ".join(f"{name}: {r['error']}" for name, r in (("fused", fused), ("stock", stock))
                          if r and "error" in r)
        print(f"{t:>6} | {secs(fused)} {gib(fused)} | {secs(stock)} {gib(stock)} | {ratio} | {sums} {notes}")
    print(json.dumps({"shape": shape, "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
