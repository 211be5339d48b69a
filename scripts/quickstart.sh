#!/usr/bin/env bash
# Sets vexec up on a Debian or Ubuntu machine and runs a first command in a VM:
#   1. installs QEMU (and kmod, for modprobe in the guest) if missing,
#   2. installs vexec with cargo,
#   3. if /boot has no kernel readable by you, fetches Debian's current 6.1
#      kernel package into vexec's kernel directory (~/.cache/vexec/kernels),
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
  store="${XDG_CACHE_HOME:-$HOME/.cache}/vexec/kernels"
  echo "quickstart: no readable kernel in /boot; fetching Debian's 6.1 kernel into $store" >&2
  scripts/fetch-test-kernels.sh --only 6.1 "$store" >&2
fi

echo "quickstart: running: vexec -- uname -a" >&2
exec "$bin" -- uname -a
