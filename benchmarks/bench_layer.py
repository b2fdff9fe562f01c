"""NativeSparseAttention at long context: training-step time per token and peak RSS, T = 2k ... 64k.

A benchmark, not a test: it asserts nothing. The configuration is issue 13's: hidden 256, 4 query
heads on 2 KV heads, head_dim 64, the layer's defaults (compress block 32, stride 16, select block 64,
16 blocks, window 512), float32, GRAPH_MODE. One step is forward + backward + an SGD update of a
`TrainOneStepCell` over loss = sum(layer(x) * g). Layouts: "one" = a single sequence of T tokens,
"packed" = T tokens packed from sequences of random lengths (multiples of 64, >= 1024, B = T / 2048).
The baseline is the earlier stock-op layer (`EqualBlocksNativeSparseAttention`, block 64, 16 blocks,
window 512), run only where it fits (its compressed branch is dense over the blocks of the packed
batch and its window branch gathers a [T, N2, w, D] copy: ~7 GB at T = 2048).

Each (layer, layout, T) runs in a fresh child process, so its peak RSS (VmHWM over the whole child:
import, compile, the steps) is its own. Writes <out-dir>/bench_layer[_quick].json and .png.

    python benchmarks/bench_layer.py [--quick] [--tokens 2048 4096 ...] [--out-dir docs]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(hidden=256, heads=4, kv_heads=2, head_dim=64, compress_block_size=32, compress_stride=16,
              select_block_size=64, select_block_count=16, window=512, min_seq_len=1024, packed_seq_len=2048)
QUICK = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, compress_block_size=16, compress_stride=16,
             select_block_size=16, select_block_count=4, window=32, min_seq_len=64, packed_seq_len=128)
TOKENS = (2048, 4096, 8192, 16384, 32768, 65536)
QUICK_TOKENS = (256,)
GIB = 2 ** 30


def packed_lengths(tokens, config, seed=0):
    """Random per-sequence lengths (multiples of the select block, >= min_seq_len) summing to tokens."""
    import numpy as np
    unit, minimum = config["select_block_size"], config["min_seq_len"]
    parts = max(2, tokens // config["packed_seq_len"])
    spare = (tokens - parts * minimum) // unit
    cuts = np.sort(np.random.default_rng(seed).integers(0, spare + 1, parts - 1))
    return [int(v) for v in np.diff(np.concatenate([[0], cuts, [spare]])) * unit + minimum]


def child(layer_name, layout, tokens, config, runs, threads):
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor, nn

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    import ms_nsa
    ms_nsa.set_num_threads(threads)
    common = dict(select_block_size=config["select_block_size"], select_block_count=config["select_block_count"],
                  window_size=config["window"])
    args = (config["hidden"], config["heads"], config["kv_heads"], config["head_dim"])
    ms.set_seed(0)
    if layer_name == "nsa":
        layer = ms_nsa.nn.NativeSparseAttention(*args, compress_block_size=config["compress_block_size"],
                                                compress_stride=config["compress_stride"], **common)
    else:
        layer = ms_nsa.nn.EqualBlocksNativeSparseAttention(*args, **common)

    class Loss(nn.Cell):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def construct(self, x, actual_seq_len, weights):
            return (self.layer(x, actual_seq_len) * weights).sum()

    lengths = [tokens] if layout == "one" else packed_lengths(tokens, config)
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((tokens, config["hidden"])).astype(np.float32))
    weights = Tensor((rng.standard_normal((tokens, config["hidden"])) / tokens ** 0.5).astype(np.float32))
    cu_seq_len = Tensor(np.cumsum(lengths).astype(np.int64))
    step = nn.TrainOneStepCell(Loss(), nn.SGD(layer.trainable_params(), learning_rate=1e-3))
    started = time.perf_counter()
    loss = float(step(x, cu_seq_len, weights).asnumpy())     # compiles the graph, then the first step
    first = time.perf_counter() - started
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        loss = float(step(x, cu_seq_len, weights).asnumpy())
        times.append(time.perf_counter() - started)
    print(json.dumps({"seconds": sorted(times)[len(times) // 2], "first_step_seconds": first,
                      "peak_rss": _status_bytes("VmHWM"), "sequences": len(lengths), "loss": loss}))


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(layer_name, layout, tokens, config, runs, threads, timeout, wait_policy):
    command = [sys.executable, os.path.abspath(__file__), "--child", layer_name, layout, str(tokens),
               json.dumps(config), str(runs), str(threads)]
    env = dict(os.environ)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    try:
        out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()] or [f"exit code {out.returncode}"]
        return {"error": lines[-1][:300]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["us_per_token"] = result["seconds"] / tokens * 1e6
    return result


def targets(rows, tokens_16k=16384, rss_limit=3 * GIB):
    """Issue 13's targets, from the "one sequence" rows of the new layer (None where not measured)."""
    one = {r["tokens"]: r["nsa"] for r in rows if r["layout"] == "one" and "seconds" in r["nsa"]}
    rss = one.get(tokens_16k, {}).get("peak_rss")
    ratio = (one[32768]["us_per_token"] / one[4096]["us_per_token"]) if 32768 in one and 4096 in one else None
    ran_64k = any(r["tokens"] == 65536 and "seconds" in r["nsa"] for r in rows)
    return {"peak_rss_16k_gib": None if rss is None else rss / GIB,
            "peak_rss_16k_met": None if rss is None else rss <= rss_limit,
            "time_per_token_32k_over_4k": ratio, "time_per_token_met": None if ratio is None else ratio <= 1.5,
            "t65536_runs": ran_64k if any(r["tokens"] == 65536 for r in rows) else None}


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    fig, (time_ax, rss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    series = [("nsa", "one", "NativeSparseAttention, one sequence", "o-"),
              ("nsa", "packed", "NativeSparseAttention, packed", "s--"),
              ("baseline", "one", "stock-op layer (baseline), one sequence", "x"),
              ("baseline", "packed", "stock-op layer (baseline), packed", "+")]
    for layer_name, layout, label, style in series:
        points = [(r["tokens"], r[layer_name]) for r in rows
                  if r["layout"] == layout and r.get(layer_name) and "seconds" in r[layer_name]]
        if not points:
            continue
        t = [p[0] for p in points]
        time_ax.plot(t, [p[1]["us_per_token"] for p in points], style, label=label, markersize=7)
        rss_ax.plot(t, [p[1]["peak_rss"] / GIB for p in points], style, label=label, markersize=7)
    time_ax.set(xscale="log", xlabel="tokens T", ylabel="µs per token (fwd + bwd + SGD)", title="Time per token",
                ylim=(0, None))
    rss_ax.set(xscale="log", xlabel="tokens T", ylabel="peak RSS (GiB)", title="Peak RSS of the process",
               ylim=(0, None))
    rss_ax.axhline(3, color="gray", linestyle=":", label="3 GiB target (T = 16k)")
    ticks = sorted({r["tokens"] for r in rows})
    for ax in (time_ax, rss_ax):
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(ticks, [f"{t // 1024}k" if t >= 1024 else str(t) for t in ticks])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _title(config, threads):
    return (f"NativeSparseAttention training step (hidden {config['hidden']}, N1 {config['heads']}, N2 "
            f"{config['kv_heads']}, D {config['head_dim']}, l {config['compress_block_size']}, d "
            f"{config['compress_stride']}, l' {config['select_block_size']}, n {config['select_block_count']}, "
            f"w {config['window']}), float32, {threads} threads")


def markdown_table(rows):
    """The docs' table (docs/training.md), one line per (T, layout)."""
    lines = ["| T | layout | B | NSA s/step | NSA µs/token | NSA peak RSS | baseline s/step | baseline µs/token | "
             "baseline peak RSS |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = []
        for name in ("nsa", "baseline"):
            r = row[name]
            if not r:
                cells += ["–"] * 3
            elif "error" in r:
                cells += [f"failed: {r['error'][:60]}", "", ""]
            else:
                cells += [f"{r['seconds']:.2f}", f"{r['us_per_token']:.0f}", f"{r['peak_rss'] / GIB:.2f} GiB"]
        sequences = row["nsa"].get("sequences", "–")
        lines.append(f"| {row['tokens']} | {row['layout']} | {sequences} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(result):
    if not result:
        return f"{'-':>10} {'-':>9} {'-':>9}"
    if "error" in result:
        return f"{'error':>10} {'':>9} {'':>9}"
    return f"{result['seconds']:10.3f} {result['us_per_token']:9.1f} {result['peak_rss'] / GIB:9.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test of the script (seconds)")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"default {list(TOKENS)}")
    parser.add_argument("--layouts", nargs="+", default=["one", "packed"], choices=["one", "packed"])
    parser.add_argument("--baseline-max-tokens", type=int, default=2048,
                        help="largest T for the stock-op baseline (~7 GB at 2048; 4096 passed 12 GB in issue 13)")
    parser.add_argument("--runs", type=int, default=3, help="timed steps per size (median); 1 from T = 32768")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per child process")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY of the children ('' = OpenMP's default): on a shared machine, "
                             "OpenMP threads that spin at barriers wait for CPU time others hold")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "docs"))
    parser.add_argument("--replot", metavar="JSON", help="only redraw the plot of an earlier run's JSON")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:
            report = json.load(f)
        plot(report["rows"], args.replot[:-len(".json")] + ".png", _title(report["config"], report["threads"]))
        return
    if args.child:
        layer_name, layout, tokens, config, runs, threads = args.child
        child(layer_name, layout, int(tokens), json.loads(config), int(runs), int(threads))
        return
    config = QUICK if args.quick else CONFIG
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    baseline_max = QUICK_TOKENS[0] if args.quick else args.baseline_max_tokens
    print(f"NativeSparseAttention training step (fwd + bwd + SGD), GRAPH_MODE, float32, {args.threads} threads, "
          f"OMP_WAIT_POLICY={args.omp_wait_policy or '(default)'}: {json.dumps(config)}")
    print(f"{'T':>6} {'layout':>7} {'B':>3} | {'NSA s':>10} {'µs/token':>9} {'peak GiB':>9} | "
          f"{'baseline s':>10} {'µs/token':>9} {'peak GiB':>9}")
    rows = []
    for t in tokens:
        runs = 1 if args.quick or t >= 32768 else args.runs
        for layout in args.layouts:
            nsa = measure("nsa", layout, t, config, runs, args.threads, args.timeout, args.omp_wait_policy)
            wanted = t <= baseline_max and not (args.quick and layout == "packed")   # quick: 3 children
            baseline = measure("baseline", layout, t, config, runs, args.threads, args.timeout,
                                                   args.omp_wait_policy) if wanted else None
            rows.append({"tokens": t, "layout": layout, "nsa": nsa, "baseline": baseline})
            errors = "; ".join(f"{name}: {r['error']}" for name, r in (("NSA", nsa), ("baseline", baseline))
                               if r and "error" in r)
            print(f"{t:>6} {layout:>7} {nsa.get('sequences', '-'):>3} | {_cell(nsa)} | {_cell(baseline)} {errors}",
                  flush=True)
    report = {"config": config, "threads": args.threads, "omp_wait_policy": args.omp_wait_policy,
              "machine": platform.machine(), "cpus": os.cpu_count(),
              "rows": rows, "targets": targets(rows)}
    print(markdown_table(rows))
    print("targets:", json.dumps(report["targets"]))
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "bench_layer_quick" if args.quick else "bench_layer")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    try:
        plot(rows, stem + ".png", _title(config, args.threads))
    except ImportError:
        print("matplotlib is not installed: no plot")
    print(f"wrote {stem}.json")


if __name__ == "__main__":
    main()
