#!/usr/bin/env bash
# Sets vexec up on a Debian or Ubuntu machine and runs a first command in a VM:
#   1. installs QEMU (and kmod, for modprobe in the guest) if missing,
#   2. installs vexec with cargo,
#   3. if /boot has no kernel readable by you, fetches the distribution's
#      current kernel package into vexec's kernel store
#      (`vexec kernel fetch`, ~/.cache/vexec/kernels),
#   4. runs `vexec -- uname -a` on the default kernel.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v depmod >/dev/null; then
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 kmod
fi

cargo install --locked --quiet --path .
bin="${CARGO_HOME:-$HOME/.cargo}/bin/vexec"

readable_kernel=""
for img in /boot/vmlinuz-*; do
  [ -r "$img" ] && readable_kernel="$img"
done
if [ -z "$readable_kernel" ]; then
  # The kernel metapackage of this distribution, fetched by vexec through
  # its own apt configuration (no root, the host's package state untouched).
  package=linux-image-amd64
  . /etc/os-release
  case " ${ID:-} ${ID_LIKE:-} " in *" ubuntu "*) package=linux-image-generic ;; esac
  echo "quickstart: no readable kernel in /boot; fetching $package with vexec kernel fetch" >&2
  "$bin" kernel fetch --arch amd64 "$package"
fi

echo "quickstart: running: vexec -- uname -a" >&2
exec "$bin" -- uname -a
