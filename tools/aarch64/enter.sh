#!/bin/sh
# enter.sh DIR WORKDIR CMD...: runs CMD inside DIR/rootfs (made by setup-rootfs.sh) under proot +
# qemu-aarch64, with WORKDIR mounted at /work and DIR/wheels at /wheels. The command starts in /work, or
# in /work/$ENTER_SUBDIR if that is set. EXTRA_ENV="A=1 B=2" adds environment variables. The host's CA
# bundle is bound in so that pip inside reaches the package registry.
B=$(cd "$1" && pwd); W=$(cd "$2" && pwd); shift 2
exec env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
  PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DEFAULT_TIMEOUT=180 PIP_DISABLE_PIP_VERSION_CHECK=1 \
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} ${EXTRA_ENV:-} \
  proot -q "$B/qemu-fix/qemu-aarch64" -r "$B/rootfs" -w "/work${ENTER_SUBDIR:+/$ENTER_SUBDIR}" \
    -b /proc -b /dev -b /sys -b /etc/resolv.conf -b /etc/ssl/certs/ca-certificates.crt \
    -b "$B/qemu-fix" -b "$B/wheels:/wheels" -b "$W:/work" "$@"
