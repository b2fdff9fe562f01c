#!/bin/bash
# Builds (once) an arm64 Debian bookworm root filesystem with Python 3.11, g++ and a venv (/opt/venv)
# holding MindSpore 2.10.0's aarch64 wheel, numpy<2, pyyaml and pytest, runnable on an x86-64 host with
# no binfmt_misc and no Arm machine: proot + qemu-aarch64 user emulation (enter.sh).
#   Usage: setup-rootfs.sh [DIR]     DIR defaults to $MS_NSA_AARCH64_DIR or ~/.cache/ms_nsa/aarch64
# About 2 GB and ~15 minutes on 2 cores the first time; an existing set-up is reused (a few ms).
# Needs root for mmdebstrap's dpkg stage and Debian's mmdebstrap, proot, patchelf, qemu-user (installed
# here with apt-get when missing).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
B=${1:-${MS_NSA_AARCH64_DIR:-$HOME/.cache/ms_nsa/aarch64}}
mkdir -p "$B" && B=$(cd "$B" && pwd)
[[ -f $B/.ready ]] && { echo "[aarch64] root filesystem ready: $B"; exit 0; }
need=()
for tool in mmdebstrap proot patchelf qemu-aarch64; do command -v "$tool" >/dev/null || need+=("$tool"); done
if ((${#need[@]})); then
  echo "[aarch64] installing ${need[*]} (apt-get)"
  apt-get install -y -qq mmdebstrap proot patchelf qemu-user >/dev/null
fi
mkdir -p "$B/bin" "$B/qemu-fix" "$B/wheels" "$B/work"
# proot 5.1 does not translate the faccessat2/statx syscalls that qemu 7.2 and glibc use: a preloaded
# shim routes faccessat to the old syscall and makes statx report ENOSYS (qemu then uses fstatat).
gcc -O2 -shared -fPIC -o "$B/qemu-fix/libqemufix.so" "$here/qemufix.c" -ldl
cp "$(command -v qemu-aarch64)" "$B/qemu-fix/qemu-aarch64"
patchelf --add-needed "$B/qemu-fix/libqemufix.so" "$B/qemu-fix/qemu-aarch64"
# mmdebstrap's dpkg stage calls chroot(2); this fake chroot runs it under proot instead. --variant=custom
# sends every package through `dpkg --install` via that script (apt's own chroot would exec arm64
# binaries natively).
cat > "$B/bin/chroot" <<EOC
#!/bin/sh
root="\$1"; shift; [ \$# -eq 0 ] && set -- /bin/sh
exec proot -q $B/qemu-fix/qemu-aarch64 -b $B/qemu-fix -r "\$root" -w / "\$@"
EOC
chmod +x "$B/bin/chroot"
if [[ ! -x $B/rootfs/usr/bin/python3 ]]; then
  echo "[aarch64] building the arm64 Debian root filesystem (mmdebstrap, ~6 min)"
  rm -rf "$B/rootfs"
  PATH=$B/bin:$PATH mmdebstrap --arch=arm64 --variant=custom --mode=root --skip=check/qemu \
    --setup-hook=/usr/share/mmdebstrap/hooks/merged-usr/setup00.sh \
    --include='?essential' --include=apt,usr-is-merged,python3,python3-venv,python3-pip,g++,libgomp1 \
    bookworm "$B/rootfs"
fi
echo "[aarch64] MindSpore 2.10.0's aarch64 wheel and the test dependencies into /opt/venv (~5 min)"
pip download -q --no-deps --platform manylinux2014_aarch64 --python-version 3.11 --only-binary=:all: \
  -d "$B/wheels" mindspore==2.10.0
wheel=$(cd "$B/wheels" && ls mindspore-2.10.0-*.whl | head -1)
"$here/enter.sh" "$B" "$B/work" python3 -m venv /opt/venv
"$here/enter.sh" "$B" "$B/work" /opt/venv/bin/pip install -q "/wheels/$wheel" "numpy<2" pyyaml pytest setuptools wheel
touch "$B/.ready"
echo "[aarch64] root filesystem ready: $B"
