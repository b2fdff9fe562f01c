#!/bin/bash
# The Python suite's core tests on aarch64, under emulation: `pip install .` of this checkout inside the
# arm64 Debian of setup-rootfs.sh (MindSpore 2.10's aarch64 wheel, the NEON kernels built by setup.py),
# then pytest on the files below, from the installed package.
#   Usage: tools/aarch64/run-tests.sh [pytest args...]       (extra args replace the default subset)
# The subset (docs/aarch64.md says why): forward and backward of the selected pair against the float64
# reference in every dtype, both modes and ms.grad (test_forward, test_backward, test_modes), each of
# aarch64's instruction sets forced with the same bits for 1 and 3 threads (test_kernel_isa), and the
# compress and window ops' reference checks (test_nsa_compress, test_nsa_window_attention -k reference).
# Everything else of the suite is architecture-independent Python or is covered by tests/test_cross_arch.py.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
B=${MS_NSA_AARCH64_DIR:-$HOME/.cache/ms_nsa/aarch64}
bash "$here/setup-rootfs.sh" "$B"
# A fresh copy of the checkout's files (tracked and new, not ignored): no build or venv of the host's.
src=$B/work/ms_nsa
rm -rf "$src" && mkdir -p "$src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - --ignore-failed-read) \
  | tar -xf - -C "$src"
start=$(date +%s)
echo "[aarch64] pip install . (builds the kernels with the aarch64 g++, under emulation)"
"$here/enter.sh" "$B" "$src" /opt/venv/bin/pip install -q --force-reinstall --no-deps .
echo "[aarch64] built and installed in $(( $(date +%s) - start )) s"
if [ $# -eq 0 ]; then
  set -- test_forward.py test_backward.py test_modes.py test_kernel_isa.py test_nsa_compress.py \
    test_nsa_window_attention.py
fi
# From tests/: the installed ms_nsa is imported, not the source folder at the top of the copy.
ENTER_SUBDIR=tests EXTRA_ENV="${EXTRA_ENV:-} PYTHONDONTWRITEBYTECODE=1" "$here/enter.sh" "$B" "$src" \
  /opt/venv/bin/python -m pytest -q -p no:cacheprovider "$@"
echo "[aarch64] done in $(( $(date +%s) - start )) s"
