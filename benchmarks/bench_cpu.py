"""CPU benchmark of ms_nsa's selected-attention kernels (a benchmark, not a test: it asserts nothing).

One run prints a table and writes docs/bench_cpu.json and docs/bench_cpu.png:
  * ms_nsa forward, backward and forward+backward in GRAPH_MODE (median of several runs after warm-up);
  * the same computation from stock MindSpore ops (ms_nsa/composed.py: gather + matmul + softmax, autodiff
    for the backward), also GRAPH_MODE: what a user would write without ms_nsa;
  * the machine's float32 matrix-multiply rate, measured in the same run (NumPy `a @ b` at 2048, same
    thread count), both as NumPy ships and with OpenBLAS told the real core type (see `sgemm_rate`);
  * float16/bfloat16 vs float32, T2 = 4096 vs 65536 with the same selection, sweeps over G, D and C*beta;
  * the small-group sweep (issue 15): G = 1..32 at T1 = T2 = 4096 with random and NSA-like selections,
    forward+backward as % of the sgemm rate, the kernels' per-call strategy choice side by side with
    the per-item kernels forced (what every call ran before the block strategy existed);
  * peak resident memory of a process that runs only the op, against the bytes of its inputs and outputs.
Measurements that are compared are interleaved (A, B, A, B, ...) so machine noise hits both alike.

    python benchmarks/bench_cpu.py [--quick] [--group-sweep] [--threads 2] [--out-dir docs]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The reference problem: T1=1024, T2=4096, N1=16, N2=1, D=192, Dv=128, beta=64, C=16.
MAIN = dict(t1=1024, t2=4096, n1=16, n2=1, d=192, dv=128, beta=64, count=16, dtype="float32")
QUICK = dict(t1=64, t2=512, n1=4, n2=1, d=64, dv=32, beta=32, count=4, dtype="float32")
# The small-group sweep (issue 15): N1 = 16 query heads (32 for G = 32), N2 = N1 / G.
GROUP_SWEEP = dict(t1=4096, t2=4096, d=192, dv=128, beta=64, count=16, dtype="float32")
GROUP_SWEEP_QUICK = dict(t1=128, t2=128, d=32, dv=16, beta=16, count=4, dtype="float32")
GROUPS, GROUPS_QUICK = (1, 2, 4, 8, 16, 32), (1, 4)


def flops(shape, part):
    """GFLOP counted the way the issue does: T1*N1*C*beta*(2D+2Dv) forward, *(6D+4Dv) backward."""
    per_key = {"fwd": 2 * shape["d"] + 2 * shape["dv"], "bwd": 6 * shape["d"] + 4 * shape["dv"]}
    per_key["fwd+bwd"] = per_key["fwd"] + per_key["bwd"]
    return shape["t1"] * shape["n1"] * shape["count"] * shape["beta"] * per_key[part] / 1e9


# ----------------------------------------------------------------------------------------------------
# sgemm ceiling, measured in a child process (OpenBLAS reads its thread count and core type at load).

SGEMM_CHILD = """
import sys, time, numpy as np
n = int(sys.argv[1]); reps = int(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32); b = rng.standard_normal((n, n), dtype=np.float32)
a @ b
times = []
for _ in range(reps):
    t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)
print(2 * n ** 3 / sorted(times)[len(times) // 2] / 1e9)
"""


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_coretype():
    """The OpenBLAS kernel family this CPU can run. NumPy's OpenBLAS (0.3.23, DYNAMIC_ARCH) does not
    recognise newer Xeons and falls back to its Prescott (SSE3) kernels, which understates the machine's
    float32 rate several times; OPENBLAS_CORETYPE picks the right kernels."""
    flags = cpu_flags()
    if "avx512f" in flags:
        return "SkylakeX"
    if "avx2" in flags:
        return "Haswell"
    return None


def sgemm_rate(threads, size, reps, coretype=None):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    env.pop("OPENBLAS_CORETYPE", None)
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    out = subprocess.run([sys.executable, "-c", SGEMM_CHILD, str(size), str(reps)], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# Problems and the timed callables (MindSpore is imported lazily so --help stays fast).

def nsa_like_selection(t1, n2, beta, blocks, count):
    """topk [T1, N2, C] the way NativeSparseAttention's selection looks (docs/training.md) for T1 = T2:
    the first block, the query's own block, then the nearest past blocks; rows with fewer than C
    such blocks take the next future ones, which the causal mask (sparse_mode 2) hides."""
    import numpy as np
    topk = np.zeros((t1, n2, count), np.int32)
    for own in range(blocks):
        chosen = dict.fromkeys([0, *range(own, 0, -1), *range(own + 1, blocks)])
        topk[own * beta:(own + 1) * beta] = np.array(list(chosen)[:count], np.int32)
    return topk


def visible_keys(shape, topk):
    """(query row, KV head, key) triples the mask lets through, times the group: the keys each query
    head really attends to (all C*beta of them without the causal mask)."""
    import numpy as np
    g = shape["n1"] // shape["n2"]
    if not shape.get("sparse_mode"):
        return shape["t1"] * shape["n1"] * shape["count"] * shape["beta"]
    position = np.arange(shape["t1"])[:, None, None]
    visible = np.clip(position - topk.astype(np.int64) * shape["beta"] + 1, 0, shape["beta"])
    return int(visible.sum()) * g


def make_problem(shape, seed=0, t2_override=None):
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor

    rng = np.random.default_rng(seed)
    t1, n1, n2, d, dv = shape["t1"], shape["n1"], shape["n2"], shape["d"], shape["dv"]
    t2 = t2_override or shape["t2"]
    beta, count = shape["beta"], shape["count"]
    dtype = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}[shape["dtype"]]
    # The selection only ever names blocks of the first shape["t2"] keys, so a longer T2 keeps it.
    blocks = shape["t2"] // beta
    if shape.get("selection") == "nsa":
        topk = nsa_like_selection(t1, n2, beta, blocks, count)
    else:
        topk = np.stack([rng.permutation(blocks)[:count] for _ in range(t1 * n2)]).reshape(t1, n2, count)
    arrays = dict(
        query=rng.standard_normal((t1, n1, d), dtype=np.float32),
        key=rng.standard_normal((t2, n2, d), dtype=np.float32),
        value=rng.standard_normal((t2, n2, dv), dtype=np.float32),
        grad=rng.standard_normal((t1, n1, dv), dtype=np.float32))
    tensors = {name: Tensor(a).astype(dtype) for name, a in arrays.items()}
    tensors["topk"] = Tensor(topk.astype(np.int32))
    tensors["topk_numpy"] = topk
    return tensors


def nsa_cells(shape):
    import mindspore as ms
    from mindspore import nn, ops
    import ms_nsa

    attrs = (shape["d"] ** -0.5, shape["n1"], shape["beta"], shape["count"])
    mode = shape.get("sparse_mode", 0)

    class Forward(nn.Cell):
        def construct(self, query, key, value, topk):
            return ms_nsa.nsa_select_attention(query, key, value, topk, *attrs, sparse_mode=mode)

    class Backward(nn.Cell):
        def construct(self, grad, query, key, value, out, smax, ssum, topk):
            return ms_nsa.nsa_select_attention_grad(grad, query, key, value, out, smax, ssum, topk, *attrs,
                                                    sparse_mode=mode)

    class Loss(nn.Cell):
        def construct(self, query, key, value, topk, grad):
            out = ms_nsa.nsa_select_attention(query, key, value, topk, *attrs, sparse_mode=mode)[0]
            return (out.astype(ms.float32) * grad.astype(ms.float32)).sum()

    return Forward(), Backward(), GradGraph(Loss())


def GradGraph(loss_cell):
    """ms.grad of loss_cell w.r.t. query, key, value, compiled as one graph. (Calling ms.grad(...)
    directly from Python would run the gradient through the PyNative pipeline, whose queue thread
    spins on the second core while the kernels run.)"""
    from mindspore import nn
    import mindspore as ms

    class Grad(nn.Cell):
        def __init__(self):
            super().__init__()
            self.grad_fn = ms.grad(loss_cell, grad_position=(0, 1, 2))

        def construct(self, query, key, value, topk, grad):
            return self.grad_fn(query, key, value, topk, grad)

    return Grad()


def composed_cells(shape):
    import mindspore as ms
    from mindspore import nn
    from ms_nsa.composed import composed_forward, row_geometry

    kv_begin, position = row_geometry(shape["t1"], shape["t2"])
    scale, beta = shape["d"] ** -0.5, shape["beta"]

    class Forward(nn.Cell):
        def construct(self, query, key, value, topk):
            return composed_forward(query, key, value, topk, scale, beta, kv_begin, position)

    class Loss(nn.Cell):
        def construct(self, query, key, value, topk, grad):
            out = composed_forward(query, key, value, topk, scale, beta, kv_begin, position)
            return (out * grad.astype(ms.float32)).sum()

    return Forward(), GradGraph(Loss())


def sync(result):
    """Waits for a (tuple of) Tensor(s): asnumpy() of a tiny slice forces execution to finish."""
    first = result[0] if isinstance(result, (tuple, list)) else result
    first.reshape(-1)[:1].asnumpy()
    return result


class Timed:
    """A callable timed as the median of `runs` calls after `warmup` calls."""

    def __init__(self, name, fn, warmup=1):
        self.name, self.fn, self.times = name, fn, []
        for _ in range(warmup):
            sync(fn())

    def run_once(self):
        start = time.perf_counter()
        sync(self.fn())
        self.times.append(time.perf_counter() - start)

    @property
    def median(self):
        return statistics.median(self.times)


def interleave(timed, runs):
    for _ in range(runs):
        for t in timed:
            t.run_once()


def nsa_timers(shape, label, t2_override=None, with_parts=True):
    tensors = make_problem(shape, t2_override=t2_override)
    fwd, bwd, fwd_bwd = nsa_cells(shape)
    q, k, v, topk, g = (tensors[n] for n in ("query", "key", "value", "topk", "grad"))
    outs = sync(fwd(q, k, v, topk))
    timers = {"fwd+bwd": Timed(f"{label} fwd+bwd", lambda: fwd_bwd(q, k, v, topk, g))}
    if with_parts:
        timers["fwd"] = Timed(f"{label} fwd", lambda: fwd(q, k, v, topk))
        timers["bwd"] = Timed(f"{label} bwd", lambda: bwd(g, q, k, v, *outs, topk))
    return timers


# ----------------------------------------------------------------------------------------------------
# Memory probe: a child process that runs only one implementation's forward+backward once.

def memory_probe(which, shape_json, threads):
    import numpy as np
    shape = json.loads(shape_json)
    import ms_nsa
    ms_nsa.set_num_threads(threads)
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE)
    tensors = make_problem(shape)
    q, k, v, topk, g = (tensors[n] for n in ("query", "key", "value", "topk", "grad"))
    if which == "nsa":
        fwd, bwd, fwd_bwd = nsa_cells(shape)
    else:
        fwd, fwd_bwd = composed_cells(shape)
    sync(fwd_bwd(q, k, v, topk, g))       # compiles the graph and warms allocator pools
    reset_peak_rss()                      # so the high-water mark below is the run's, not the compile's
    rss_before = status_bytes("VmRSS")
    grads = sync(fwd_bwd(q, k, v, topk, g))
    peak = status_bytes("VmHWM")
    io_bytes = sum(t.nbytes for t in (q, k, v, topk, g)) + sum(x.nbytes for x in grads)
    print(json.dumps({"rss_before": rss_before, "peak_rss": peak, "io_bytes": io_bytes,
                      "grad_sum": float(np.float64(grads[0].astype(ms.float32).sum().asnumpy()))}))


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def run_memory_probe(which, shape, threads):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-probe", which,
                          "--probe-shape", json.dumps(shape), "--threads", str(threads)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------

def kernel_isa():
    import ctypes
    from ms_nsa._cpu_kernels import library_path
    lib = ctypes.CDLL(library_path())
    lib.ms_nsa_kernel_isa.restype = ctypes.c_char_p
    return lib.ms_nsa_kernel_isa().decode()


def group_sweep(args, quick, sgemm_samples, sgemm_both):
    """fwd+bwd at each G and selection: the per-call strategy choice and the per-item kernels forced,
    interleaved (A, B, A, B, ...) in this process, so machine noise hits both alike."""
    import numpy as np
    from ms_nsa import _cpu_kernels

    base, groups = (GROUP_SWEEP_QUICK, GROUPS_QUICK) if quick else (GROUP_SWEEP, GROUPS)
    runs = args.runs or (1 if quick else 3)
    per_key = 2 * base["d"] + 2 * base["dv"] + 6 * base["d"] + 4 * base["dv"]
    points = []
    for group in groups:
        n1 = max(16, group) if not quick else 4 * group
        for selection, mode in (("random", 0), ("nsa", 2)):
            shape = dict(base, n1=n1, n2=n1 // group, selection=selection, sparse_mode=mode)
            tensors = make_problem(shape)
            _, _, fwd_bwd = nsa_cells(shape)
            q, k, v, topk, g = (tensors[n] for n in ("query", "key", "value", "topk", "grad"))
            gflop = visible_keys(shape, tensors["topk_numpy"]) * per_key / 1e9

            def forced(strategy):
                def run():
                    _cpu_kernels._force_strategy(strategy)
                    return fwd_bwd(q, k, v, topk, g)
                return run

            timers = {name: Timed(f"G={group} {selection} {name}", forced(name)) for name in ("auto", "items")}
            interleave(list(timers.values()), runs)
            _cpu_kernels._force_strategy("auto")
            points.append({"group": group, "n1": n1, "n2": n1 // group, "selection": selection,
                           "sparse_mode": mode, "gflop": gflop,
                           **{name: {"seconds": t.median, "samples": t.times, "gflops": gflop / t.median}
                              for name, t in timers.items()}})
            print(f"[bench] G={group} {selection}: auto {timers['auto'].median * 1e3:.0f} ms, items "
                  f"{timers['items'].median * 1e3:.0f} ms", flush=True)
            del q, k, v, topk, g, tensors
        if group == groups[len(groups) // 2]:
            sgemm_samples.append(sgemm_both())
    return {"shape": base, "points": points}


def print_group_sweep(sweep, sgemm):
    ceiling = sgemm.get("numpy_native_kernels", sgemm["numpy_default"])
    b = sweep["shape"]
    print(f"small-group sweep: T1=T2={b['t1']} D={b['d']} Dv={b['dv']} beta={b['beta']} C={b['count']} "
          f"{b['dtype']}, fwd+bwd, % of the sgemm rate of this run ({ceiling:.1f} GFLOP/s)")
    print("  random: sparse_mode 0, C distinct random blocks per row; nsa: sparse_mode 2, first + own + "
          "nearest past blocks (GFLOP counted over the keys the mask lets through)")
    print("  auto: the strategy each call picks; items: the per-item kernels forced (the only ones before)")
    print(f"{'G':>4s}{'N1':>4s}{'N2':>4s} {'selection':10s}{'auto ms':>10s}{'% sgemm':>9s}"
          f"{'items ms':>10s}{'% sgemm':>9s}{'speed-up':>10s}")
    for pt in sweep["points"]:
        auto, items = pt["auto"], pt["items"]
        print(f"{pt['group']:4d}{pt['n1']:4d}{pt['n2']:4d} {pt['selection']:10s}{auto['seconds'] * 1e3:10.1f}"
              f"{100 * auto['gflops'] / ceiling:8.0f}%{items['seconds'] * 1e3:10.1f}"
              f"{100 * items['gflops'] / ceiling:8.0f}%{items['seconds'] / auto['seconds']:9.2f}x")


def describe(shape):
    g = shape["n1"] // shape["n2"]
    return (f"T1={shape['t1']} T2={shape['t2']} N1={shape['n1']} N2={shape['n2']} G={g} D={shape['d']} "
            f"Dv={shape['dv']} beta={shape['beta']} C={shape['count']} C*beta={shape['count'] * shape['beta']} "
            f"{shape['dtype']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few runs: a smoke test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=None, help="timed runs per measurement")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "docs"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--group-sweep", action="store_true",
                        help="run only the small-group sweep (G = 1..32 at T = 4096) and the sgemm rate")
    parser.add_argument("--memory-probe", choices=("nsa", "composed"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-shape", help=argparse.SUPPRESS)
    args = parser.parse_args()

    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, ROOT)
    if args.memory_probe:
        memory_probe(args.memory_probe, args.probe_shape, args.threads)
        return

    import mindspore as ms
    import ms_nsa

    ms.set_context(mode=ms.GRAPH_MODE)
    ms_nsa.set_num_threads(args.threads)
    quick = args.quick
    main_shape = dict(QUICK if quick else MAIN)
    runs = args.runs or (2 if quick else 5)
    sgemm_size, sgemm_reps = (256, 3) if quick else (2048, 5)
    coretype = native_coretype()
    started = time.time()

    def sgemm_both():
        rates = {"numpy_default": sgemm_rate(args.threads, sgemm_size, sgemm_reps)}
        if coretype:
            rates["numpy_native_kernels"] = sgemm_rate(args.threads, sgemm_size, sgemm_reps, coretype)
        return rates

    if args.group_sweep:
        samples = [sgemm_both()]
        sweep = group_sweep(args, quick, samples, sgemm_both)
        samples.append(sgemm_both())
        sgemm = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        print(f"\nms_nsa CPU benchmark, {args.threads} threads, GRAPH_MODE, median times, {kernel_isa()} kernels")
        print(f"sgemm 2048 (NumPy a @ b): samples " + ", ".join(
            "/".join(f"{v:.0f}" for v in s.values()) for s in samples) + " GFLOP/s (as shipped/native)")
        print_group_sweep(sweep, sgemm)
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, f"bench_cpu_groups{'_quick' if quick else ''}.json"), "w") as f:
            json.dump({"sgemm_gflops": sgemm, "sgemm_samples": samples, "threads": args.threads,
                       "kernel_isa": kernel_isa(), "group_sweep": sweep}, f, indent=1)
        return

    print(f"[bench] {describe(main_shape)}, {args.threads} threads, {runs} timed runs each, "
          f"kernels: {kernel_isa()}", flush=True)
    # Memory first, each in a fresh process, while this one holds nothing big yet.
    memory = {"nsa": run_memory_probe("nsa", main_shape, args.threads)}
    memory["stock"] = run_memory_probe("composed", main_shape, args.threads)
    print(f"[bench] memory probes done ({time.time() - started:.0f} s)", flush=True)
    sgemm_samples = [sgemm_both()]

    # 1. Main shape: ms_nsa vs the stock-op version, interleaved.
    nsa_main = nsa_timers(main_shape, "ms_nsa")
    composed_fwd, composed_fwd_bwd = composed_cells(main_shape)
    tensors = make_problem(main_shape)
    q, k, v, topk, g = (tensors[n] for n in ("query", "key", "value", "topk", "grad"))
    stock = {"fwd": Timed("stock fwd", lambda: composed_fwd(q, k, v, topk)),
             "fwd+bwd": Timed("stock fwd+bwd", lambda: composed_fwd_bwd(q, k, v, topk, g))}
    stock_runs = max(2, runs // 2 + 1)
    interleave(list(nsa_main.values()), runs - stock_runs)
    interleave(list(nsa_main.values()) + list(stock.values()), stock_runs)
    del q, k, v, topk, g, tensors
    sgemm_samples.append(sgemm_both())
    print(f"[bench] main shape done ({time.time() - started:.0f} s)", flush=True)

    # 2. float16 / bfloat16 against float32, and T2 = 4096 vs 16 x longer with the same selection.
    variants = {"float32": nsa_main["fwd+bwd"]}
    for dtype in ("float16", "bfloat16"):
        variants[dtype] = nsa_timers(dict(main_shape, dtype=dtype), dtype, with_parts=False)["fwd+bwd"]
    long_t2 = main_shape["t2"] * 16
    variants["long_t2"] = nsa_timers(main_shape, f"T2={long_t2}", t2_override=long_t2,
                                     with_parts=False)["fwd+bwd"]
    ref = Timed("float32 (again)", nsa_main["fwd+bwd"].fn, warmup=0)
    interleave([ref] + [variants[n] for n in ("float16", "bfloat16", "long_t2")], runs)
    variants["float32"] = ref
    print(f"[bench] dtype / T2 done ({time.time() - started:.0f} s)", flush=True)

    # 3. Sweeps over G, D and C*beta (rates only; each point forward, backward, forward+backward).
    sweep_points = []
    if quick:
        sweep_points = [("G", 2, dict(main_shape, n1=2, n2=1))]
    else:
        for group in (1, 4, 16, 32):
            n2 = max(1, 16 // group)
            sweep_points.append(("G", group, dict(main_shape, n1=group * n2, n2=n2)))
        for d in (128, 192):
            sweep_points.append(("D", d, dict(main_shape, d=d)))
        for count in (4, 8, 16, 32):
            sweep_points.append(("C*beta", count * 64, dict(main_shape, count=count, beta=64)))
    sweep = []
    for axis, value, shape in sweep_points:
        if shape == main_shape:
            timers = nsa_main
        else:
            timers = nsa_timers(shape, f"{axis}={value}")
            interleave(list(timers.values()), max(2, runs - 2))
        sweep.append({"axis": axis, "value": value, "shape": shape,
                      **{part: {"seconds": timers[part].median,
                                "gflops": flops(shape, part) / timers[part].median} for part in timers}})
    sgemm_samples.append(sgemm_both())
    print(f"[bench] sweeps done ({time.time() - started:.0f} s)", flush=True)
    groups = group_sweep(args, quick, sgemm_samples, sgemm_both)
    print(f"[bench] small-group sweep done ({time.time() - started:.0f} s)", flush=True)

    sgemm = {key: statistics.median(s[key] for s in sgemm_samples) for key in sgemm_samples[0]}
    result = build_result(args, main_shape, nsa_main, stock, variants, long_t2, sweep, sgemm, sgemm_samples,
                          memory, coretype, time.time() - started)
    result["group_sweep"] = groups
    print_report(result)
    os.makedirs(args.out_dir, exist_ok=True)
    suffix = "_quick" if quick else ""
    with open(os.path.join(args.out_dir, f"bench_cpu{suffix}.json"), "w") as f:
        json.dump(result, f, indent=1)
    if not args.no_plot:
        plot(result, os.path.join(args.out_dir, f"bench_cpu{suffix}.png"))


def build_result(args, shape, nsa_main, stock, variants, long_t2, sweep, sgemm, sgemm_samples, memory,
                 coretype, elapsed):
    nsa = {part: {"seconds": t.median, "gflops": flops(shape, part) / t.median, "samples": t.times}
           for part, t in nsa_main.items()}
    stock_res = {part: {"seconds": t.median, "gflops": flops(shape, part) / t.median, "samples": t.times}
                 for part, t in stock.items()}
    f32 = variants["float32"].median
    ceiling = sgemm.get("numpy_native_kernels", sgemm["numpy_default"])
    fb = nsa["fwd+bwd"]["gflops"]
    targets = {
        "fwd+bwd / sgemm (numpy default) >= 0.5": fb / sgemm["numpy_default"],
        "fwd+bwd / sgemm (native OpenBLAS kernels) >= 0.5": fb / ceiling,
        "speed-up over stock ops (fwd+bwd) >= 8": stock_res["fwd+bwd"]["seconds"] / nsa["fwd+bwd"]["seconds"],
        "float16 time / float32 time <= 1.3": variants["float16"].median / f32,
        "bfloat16 time / float32 time <= 1.3": variants["bfloat16"].median / f32,
        f"time(T2={long_t2}) / time(T2={shape['t2']}) - 1 < 0.10": variants["long_t2"].median / f32 - 1,
        "peak RSS increase / (input+output bytes)": (memory["nsa"]["peak_rss"]
                                                     - memory["nsa"]["rss_before"])
                                                    / memory["nsa"]["io_bytes"],
    }
    return {
        "shape": shape, "threads": args.threads, "quick": args.quick, "elapsed_seconds": elapsed,
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "openblas_coretype_native": coretype, "kernel_isa": kernel_isa()},
        "sgemm_gflops": sgemm, "sgemm_samples": sgemm_samples,
        "nsa": nsa, "stock": stock_res,
        "variants_fwd_bwd_seconds": {name: t.median for name, t in variants.items()},
        "sweep": sweep, "memory": memory, "targets": targets,
    }


def print_report(r):
    s, sg = r["shape"], r["sgemm_gflops"]
    native = sg.get("numpy_native_kernels")
    print()
    print(f"ms_nsa CPU benchmark: {describe(s)}, {r['threads']} threads, GRAPH_MODE, median times, "
          f"{r['machine']['kernel_isa']} kernels")
    print(f"sgemm 2048 (NumPy a @ b): {sg['numpy_default']:.1f} GFLOP/s as shipped"
          + (f", {native:.1f} GFLOP/s with OPENBLAS_CORETYPE={r['machine']['openblas_coretype_native']}"
             if native else ""))
    ceiling = native or sg["numpy_default"]
    print()
    print(f"{'':28s}{'time ms':>10s}{'GFLOP/s':>10s}{'% sgemm':>9s}{'% native':>9s}")
    for impl in ("nsa", "stock"):
        for part in ("fwd", "bwd", "fwd+bwd"):
            if part not in r[impl]:
                continue
            x = r[impl][part]
            name = ("ms_nsa " if impl == "nsa" else "stock ops ") + part
            print(f"{name:28s}{x['seconds'] * 1e3:10.1f}{x['gflops']:10.1f}"
                  f"{100 * x['gflops'] / sg['numpy_default']:8.0f}%{100 * x['gflops'] / ceiling:8.0f}%")
    print()
    v = r["variants_fwd_bwd_seconds"]
    print("forward+backward, interleaved:  " + ",  ".join(f"{k} {t * 1e3:.1f} ms" for k, t in v.items()))
    print()
    print(f"{'sweep':12s}{'fwd GFLOP/s':>13s}{'bwd GFLOP/s':>13s}{'f+b GFLOP/s':>13s}{'f+b % native':>14s}")
    for p in r["sweep"]:
        print(f"{p['axis'] + '=' + str(p['value']):12s}{p['fwd']['gflops']:13.1f}{p['bwd']['gflops']:13.1f}"
              f"{p['fwd+bwd']['gflops']:13.1f}{100 * p['fwd+bwd']['gflops'] / ceiling:13.0f}%")
    print()
    for impl, m in r["memory"].items():
        grow = (m["peak_rss"] - m["rss_before"]) / 2 ** 20
        print(f"memory {impl:6s}: peak RSS {m['peak_rss'] / 2 ** 20:.0f} MiB, +{grow:.0f} MiB while "
              f"running fwd+bwd; inputs+outputs {m['io_bytes'] / 2 ** 20:.0f} MiB")
    print()
    print_group_sweep(r["group_sweep"], sg)
    print()
    print("targets:")
    for name, value in r["targets"].items():
        print(f"  {name:55s} {value:8.3f}")
    print(f"\n(benchmark took {r['elapsed_seconds']:.0f} s)")


def plot(r, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sg = r["sgemm_gflops"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    parts = ["fwd", "bwd", "fwd+bwd"]
    xs = range(len(parts))
    left.bar([x - 0.2 for x in xs], [r["nsa"][p]["gflops"] for p in parts], 0.4, label="ms_nsa")
    left.bar([x + 0.2 for x in xs], [r["stock"].get(p, {"gflops": 0})["gflops"] for p in parts], 0.4,
             label="stock MindSpore ops")
    left.set_xticks(list(xs), parts)
    left.set_ylabel("GFLOP/s")
    left.set_title(f"T1={r['shape']['t1']} G={r['shape']['n1'] // r['shape']['n2']} D={r['shape']['d']}, "
                   f"{r['threads']} threads")
    labels = [f"{p['axis']}={p['value']}" for p in r["sweep"]]
    right.bar(range(len(labels)), [p["fwd+bwd"]["gflops"] for p in r["sweep"]], color="C0")
    right.set_xticks(range(len(labels)), labels, rotation=30)
    right.set_title("ms_nsa forward+backward across G, D, C*beta")
    for ax in (left, right):
        for key, style in (("numpy_default", ":"), ("numpy_native_kernels", "--")):
            if key in sg:
                ax.axhline(sg[key], color="k", linestyle=style, linewidth=1,
                           label=f"sgemm {key.replace('numpy_', '')} {sg[key]:.0f}")
                ax.axhline(sg[key] / 2, color="r", linestyle=style, linewidth=0.8,
                           label=f"50% of sgemm {key.replace('numpy_', '')}")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
