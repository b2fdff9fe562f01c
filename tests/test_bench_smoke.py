"""benchmarks/bench_cpu.py, bench_window.py and bench_layer.py still run (smoke tests of the scripts: no
timing is asserted)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_writes_its_json(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_cpu.py"), "--quick",
                             "--out-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "targets:" in result.stdout
    with open(tmp_path / "bench_cpu_quick.json") as f:
        report = json.load(f)
    for key in ("shape", "threads", "machine", "sgemm_gflops", "nsa", "stock", "variants_fwd_bwd_seconds",
                "sweep", "memory", "targets"):
        assert key in report, key
    for part in ("fwd", "bwd", "fwd+bwd"):
        assert report["nsa"][part]["seconds"] > 0 and report["nsa"][part]["gflops"] > 0
    assert set(report["variants_fwd_bwd_seconds"]) == {"float32", "float16", "bfloat16", "long_t2"}
    assert report["sgemm_gflops"]["numpy_default"] > 0
    assert (tmp_path / "bench_cpu_quick.png").exists()


def test_quick_window_benchmark_runs():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_window.py"), "--quick"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for row in report["results"]:
        for which in ("fused", "stock"):
            assert row[which]["seconds"] > 0 and row[which]["peak_rss"] > 0, row


def test_quick_layer_benchmark_writes_its_json_and_plot(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_layer.py"), "--quick",
                             "--out-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "targets:" in result.stdout
    with open(tmp_path / "bench_layer_quick.json") as f:
        report = json.load(f)
    assert {row["layout"] for row in report["rows"]} == {"one", "packed"}
    for row in report["rows"]:
        assert row["nsa"]["seconds"] > 0 and row["nsa"]["peak_rss"] > 0, row
        assert row["nsa"]["sequences"] == (1 if row["layout"] == "one" else 2), row
    assert any(row["baseline"] and row["baseline"]["seconds"] > 0 for row in report["rows"])
    assert set(report["targets"]) >= {"peak_rss_16k_met", "time_per_token_met", "t65536_runs"}
    assert (tmp_path / "bench_layer_quick.png").exists()
