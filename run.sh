#!/usr/bin/env bash
# One entry point that sets up everything it needs, then runs a job:
#   bash run.sh demo    train a small model on NsaSelectAttention in graph mode, then check the op
#   bash run.sh test    the test suite (what CI runs); bash run.sh test tests/x.py ... runs only those
#   bash run.sh bench   the CPU benchmark (benchmarks/bench_cpu.py)
# Set-up, every time (fast when already done): a venv in .venv with ms_nsa's dependencies as
# pyproject.toml declares them (with the test and demo extras), and the package installed in editable
# mode, which (re)compiles the C++ kernels in custom_aot/.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${MS_NSA_VENV:-.venv}"
PYTHON_BIN="${PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[run.sh] creating $VENV with $("$PYTHON_BIN" --version)"
    "$PYTHON_BIN" -m venv "$VENV"
  fi
  # The stamp is the hash of pyproject.toml: the dependencies are installed again only when it changes.
  local stamp="$VENV/.requirements.sha"
  local want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[run.sh] installing ms_nsa with its dependencies, pip install -e .[test,demo] (mindspore is ~800 MB the first time)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,demo]"
    echo "$want" > "$stamp"
  else
    echo "[run.sh] building the CPU kernels (pip install -e .)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
  fi
}

job="${1:-}"
shift || true
case "$job" in
  demo)
    setup
    exec "$VENV/bin/python" -m ms_nsa.demo "$@"
    ;;
  test)
    setup
    # Test files or node ids among the arguments replace the whole suite (bash run.sh test tests/x.py -x).
    targets=(tests)
    for arg in "$@"; do [[ $arg == -* ]] || { targets=(); break; }; done
    exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${targets[@]}" "$@"
    ;;
  bench)
    setup
    exec "$VENV/bin/python" benchmarks/bench_cpu.py "$@"
    ;;
  *)
    echo "usage: bash run.sh demo|test|bench [args...]" >&2
    exit 2
    ;;
esac
