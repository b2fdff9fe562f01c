"""The demo prints what a user should read: no MindSpore warnings (side-effect nodes, deprecated APIs)."""
import subprocess
import sys


def test_demo_prints_no_warnings(tmp_path):
    # Two steps: too few to learn the task (the demo then reports NSA not beating the baseline and
    # exits 1), enough to compile and run both models, the plot and the op check.
    result = subprocess.run([sys.executable, "-m", "ms_nsa.demo", "--steps", "2", "--out", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert "op check passed" in result.stdout, output[-4000:]
    for noise in ("WARNING", "Warning", "deprecated", "side effect"):
        assert noise not in output, output[-4000:]
    assert (tmp_path / "nsa_vs_window.png").is_file()
