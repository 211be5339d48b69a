#!/usr/bin/env bash
# Builds a small kernel with everything vexec's guest needs built in (no
# modules), from Debian's linux-source package: tinyconfig plus
# scripts/kconfig/vexec-builtin.config. Takes ~5 minutes on 2 cores.
#
# Usage: scripts/build-test-kernel.sh [DEST]
#   DEST defaults to $VEXEC_TEST_KERNELS/builtin; the result is
#   DEST/boot/vmlinuz-REL and DEST/boot/config-REL.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
kernels="${VEXEC_TEST_KERNELS:-${XDG_CACHE_HOME:-$HOME/.cache}/vexec-test-kernels}"
dest="${1:-$kernels/builtin}"
if ls "$dest"/boot/vmlinuz-* >/dev/null 2>&1; then
  ls "$dest"/boot/vmlinuz-*
  exit 0
fi

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
need=""
for p in linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils; do
  dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
done
if [ -n "$need" ]; then
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

work="$(mktemp -d "${TMPDIR:-/var/tmp}/vexec-kbuild.XXXXXX")"
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xf /usr/src/linux-source-6.1.tar.xz
src="$(echo "$work"/linux-source-6.1)"
cd "$src"
make -s tinyconfig
scripts/kconfig/merge_config.sh -m -O . .config "$here/kconfig/vexec-builtin.config" >/dev/null
make -s olddefconfig
# Fail loudly if a requested option did not stick.
missing=$(grep -E '^CONFIG_' "$here/kconfig/vexec-builtin.config" | while read -r line; do
  grep -qx "$line" .config || echo "$line"
done)
if [ -n "$missing" ]; then
  echo "build-test-kernel: options not set after olddefconfig:" $missing >&2
  exit 1
fi
make -s -j"$(nproc)" bzImage
rel="$(make -s kernelrelease)"
mkdir -p "$dest.tmp/boot"
cp arch/x86/boot/bzImage "$dest.tmp/boot/vmlinuz-$rel"
cp .config "$dest.tmp/boot/config-$rel"
chmod -R a+rX "$dest.tmp"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "$dest/boot/vmlinuz-$rel"
