#!/usr/bin/env bash
# Runs vexec's test suite: fetches the Debian test kernels if needed (into
# $VEXEC_TEST_KERNELS, default ~/.cache/vexec-test-kernels), then runs every
# test, unit and VM-booting, with cargo-nextest when installed.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=""
for tool in qemu-system-x86_64 qemu-system-aarch64 busybox aarch64-linux-gnu-gcc apt-get dpkg-deb python3; do
  command -v "$tool" >/dev/null || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  echo "scripts/test.sh: missing:$missing (Debian/Ubuntu: sudo apt-get install qemu-system-x86 qemu-system-arm qemu-efi-aarch64 busybox-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross kmod libcap-ng-dev libseccomp-dev python3-venv)" >&2
  exit 1
fi

export VEXEC_TEST_KERNELS="${VEXEC_TEST_KERNELS:-${XDG_CACHE_HOME:-$HOME/.cache}/vexec-test-kernels}"
scripts/fetch-test-kernels.sh "$VEXEC_TEST_KERNELS" >&2

# The Rust virtiofsd (crates.io), beside the kernels so that the
# unprivileged-user test can run it too.
if [ -z "${VEXEC_TEST_VIRTIOFSD:-}" ]; then
  export VEXEC_TEST_VIRTIOFSD="$VEXEC_TEST_KERNELS/tools/bin/virtiofsd"
  if [ ! -x "$VEXEC_TEST_VIRTIOFSD" ]; then
    echo "scripts/test.sh: installing the Rust virtiofsd (needs libcap-ng-dev and libseccomp-dev)" >&2
    cargo install --quiet --locked --root "$VEXEC_TEST_KERNELS/tools" virtiofsd >&2
    chmod -R a+rX "$VEXEC_TEST_KERNELS/tools"
  fi
fi

# A Python with the protocol clients users have (QEMU's QMP library), for
# the tests that check vexec's protocols against real clients.
if [ -z "${VEXEC_TEST_PYTHON:-}" ]; then
  venv="$VEXEC_TEST_KERNELS/tools/venv"
  if ! "$venv/bin/python3" -c 'import qemu.qmp' 2>/dev/null; then
    echo "scripts/test.sh: making a Python venv with qemu.qmp (needs python3-venv)" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet qemu.qmp==0.0.6 >&2
    chmod -R a+rX "$venv"
  fi
  export VEXEC_TEST_PYTHON="$venv/bin/python3"
fi

# Runs that hung leave vexec's report of where they stood here (tests set
# VEXEC_HANG_REPORTS); shown at the end even when a retry passed.
reports="${CARGO_TARGET_DIR:-target}/tmp/hang-reports"
rm -rf "$reports"
rc=0
if cargo nextest --version >/dev/null 2>&1; then
  runner=(cargo nextest run --no-fail-fast)
else
  runner=(cargo test --no-fail-fast)
fi
"${runner[@]}" "$@" || rc=$?
# The core tests run warm (restored guests) once their machine is saved;
# run them again booted cold, so both paths keep every core behaviour.
if [ $# -eq 0 ]; then
  echo "scripts/test.sh: the core tests again, every run booted cold (VEXEC_COLD=1)" >&2
  VEXEC_COLD=1 "${runner[@]}" --test core || rc=$?
fi
if [ -n "$(ls -A "$reports" 2>/dev/null)" ]; then
  echo "scripts/test.sh: runs that hung during the tests (stopped by vexec's timeout), retried or not:" >&2
  for f in "$reports"/*; do echo "== $f" >&2; cat "$f" >&2; done
fi
exit "$rc"
