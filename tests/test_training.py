"""Data-parallel training under msrun (2 CPU workers) matches single-process training on the
combined batch: examples/train_dp.py, launched the way the docs say."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_dp.py"
STEPS = 4
TIMEOUT_S = 300


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command, log_dir, env):
    """Runs `command` in its own process group; on timeout the whole group (msrun's scheduler and
    workers included) is killed, and the workers' logs are shown in the failure."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{command[0]} timed out after {TIMEOUT_S} s\n{output[-3000:]}{worker_logs(log_dir)}")
    assert process.returncode == 0, f"{' '.join(command)} failed\n{output[-3000:]}{worker_logs(log_dir)}"


def worker_logs(log_dir):
    logs = sorted(Path(log_dir).glob("worker_*.log")) if log_dir else []
    return "".join(f"\n--- {log.name} (tail) ---\n{log.read_text(errors='replace')[-2000:]}" for log in logs)


def load(path):
    saved = np.load(path)
    return saved["losses"], {name: saved[name] for name in saved.files if name != "losses"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_dp")
    env = dict(os.environ)
    # msrun starts its workers with the first `python` on PATH: make it this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The workers run examples/train_dp.py (sys.path[0] = examples/): let them import this tree's ms_nsa.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    msrun = Path(sys.executable).parent / "msrun"
    log_dir = out / "logs"
    run([str(msrun), "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}", "--join=True",
         f"--log_dir={log_dir}", str(SCRIPT), "--steps", str(STEPS), "--out", str(out)], log_dir, env)
    run([sys.executable, str(SCRIPT), "--single", "--world-size", "2", "--steps", str(STEPS), "--out", str(out)],
        None, env)
    return {tag: load(out / f"params_{tag}.npz") for tag in ("rank0", "rank1", "single")}


def test_both_ranks_end_with_identical_parameters(runs):
    (_, rank0), (_, rank1) = runs["rank0"], runs["rank1"]
    assert rank0.keys() == rank1.keys() and len(rank0) > 10
    for name in rank0:
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=name)


def test_data_parallel_equals_single_process_on_the_combined_batch(runs):
    (losses0, rank0), (losses1, _), (single_losses, single) = runs["rank0"], runs["rank1"], runs["single"]
    assert len(single_losses) == STEPS
    # Each rank's loss is a mean over the same number of query tokens: their mean is the combined loss.
    np.testing.assert_allclose((losses0 + losses1) / 2, single_losses, rtol=1e-5)
    assert not np.allclose(losses0, losses1)          # the ranks really saw different data
    assert rank0.keys() == single.keys()
    for name in rank0:
        np.testing.assert_allclose(rank0[name], single[name], rtol=1e-4, atol=2e-5, err_msg=name)
