#!/usr/bin/env bash
# Fetch the Debian kernels vexec's integration tests boot, into a cache
# outside the repository, using a private apt configuration so the host's
# own package state is left untouched.
#
# The archive's host is derived from this machine's apt sources, and ABI
# numbers are resolved from the meta-packages, so the script keeps working
# as Debian publishes new kernels.
#
# Usage: scripts/fetch-test-kernels.sh [--only NAME] [DEST]
#   DEST defaults to $VEXEC_TEST_KERNELS, else ~/.cache/vexec-test-kernels.
#   NAME is one of 5.10, 6.1, 6.1-cloud, 6.12, arm64-6.1, arm64-busybox,
#   kselftest.
#   arm64-6.1 is Debian's arm64 kernel and arm64-busybox its busybox-static
#   (busybox at DEST/arm64-busybox/bin/busybox), for the arm64 guest tests.
#   kselftest is two of the kernel's own selftests (timens, timerfd), built
#   from Debian's linux-source-6.1 into DEST/kselftest: real KTAP producers
#   for the --results tests.
# Prints one line per kernel: NAME RELEASE DIR
set -euo pipefail

only=""
if [ "${1:-}" = "--only" ]; then
  only="$2"
  shift 2
fi
dest="${1:-${VEXEC_TEST_KERNELS:-${XDG_CACHE_HOME:-$HOME/.cache}/vexec-test-kernels}}"
mkdir -p "$dest"

# name           suite     arch   meta-package (or plain package)
kernels=(
  "5.10           bullseye  amd64  linux-image-amd64"
  "6.1            bookworm  amd64  linux-image-amd64"
  "6.1-cloud      bookworm  amd64  linux-image-cloud-amd64"
  "6.12           trixie    amd64  linux-image-amd64"
  "arm64-6.1      bookworm  arm64  linux-image-arm64"
  "arm64-busybox  bookworm  arm64  busybox-static"
)

# The Debian archive this machine already uses (first deb822 URIs or
# one-line "deb" entry whose suites are plain Debian ones).
archive_uri() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    uri=$(awk '/^URIs:/ {u=$2} /^Suites:/ && u!="" && $2 !~ /security/ {print u; exit}' "$f")
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    uri=$(awk '$1=="deb" && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' "$f")
    [ -n "$uri" ] && { echo "$uri"; return; }
  done
  echo "fetch-test-kernels: no Debian archive found in /etc/apt sources" >&2
  exit 1
}
mirror=$(archive_uri)
mirror="${mirror%/}"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || { echo "fetch-test-kernels: $keyring missing (apt-get install debian-archive-keyring)" >&2; exit 1; }

aptdir="$dest/.apt"
mkdir -p "$aptdir/lists/partial" "$aptdir/archives/partial" "$aptdir/etc/preferences.d" "$aptdir/etc/apt.conf.d"
: > "$aptdir/sources.list"
for suite in bullseye bookworm trixie; do
  # arm64 indexes only where an arm64 package is fetched (bookworm).
  archs=amd64
  [ "$suite" = bookworm ] && archs=amd64,arm64
  echo "deb [signed-by=$keyring arch=$archs] $mirror $suite main" >> "$aptdir/sources.list"
done
# bookworm's point releases lag its security updates; include them so the
# meta-package and the image it names agree.
security="${mirror%/debian}/debian-security"
echo "deb [signed-by=$keyring arch=amd64,arm64] $security bookworm-security main" >> "$aptdir/sources.list"
: > "$aptdir/status"

apt_opts=(
  -o "Dir::Etc::SourceList=$aptdir/sources.list"
  -o "Dir::Etc::SourceParts=-"
  -o "Dir::Etc::Parts=$aptdir/etc/apt.conf.d"
  -o "Dir::Etc::PreferencesParts=$aptdir/etc/preferences.d"
  -o "Dir::State::Lists=$aptdir/lists"
  -o "Dir::State::status=$aptdir/status"
  -o "Dir::Cache=$aptdir/cache"
  -o "APT::Architecture=amd64"
  -o "APT::Architectures::=amd64"
  -o "APT::Architectures::=arm64"
  -o "Debug::NoLocking=1"
)
mkdir -p "$aptdir/cache"
apt-get "${apt_opts[@]}" -qq update

for entry in "${kernels[@]}"; do
  read -r name suite arch meta <<<"$entry"
  if [ -n "$only" ] && [ "$only" != "$name" ]; then
    continue
  fi
  # The meta-package of that suite names the current ABI's image package.
  ver=$(apt-cache "${apt_opts[@]}" madison "$meta:$arch" | awk -v s="$suite" '$0 ~ " "s"[/ -]" {print $3; exit}')
  [ -n "$ver" ] || { echo "fetch-test-kernels: $meta ($arch) not found in $suite" >&2; exit 1; }
  case "$meta" in
    linux-image-*)
      pkg=$(apt-cache "${apt_opts[@]}" show "$meta:$arch=$ver" | awk -F': ' '/^Depends:/ {print $2; exit}' \
            | tr ',' '\n' | sed 's/^ *//; s/ .*//' | grep '^linux-image-' | head -1)
      [ -n "$pkg" ] || { echo "fetch-test-kernels: cannot resolve $meta=$ver" >&2; exit 1; }
      pkg="$pkg:$arch" ;;
    *) pkg="$meta:$arch=$ver" ;;
  esac
  out="$dest/$name"
  if [ -f "$out/.complete" ] && [ "$(cat "$out/.complete")" = "$pkg" ]; then
    rel=$(find "$out/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' 2>/dev/null | sed -n 's/^vmlinuz-//p' | head -1 || true)
    echo "$name ${rel:-$pkg} $out"
    continue
  fi
  tmp=$(mktemp -d "$dest/.tmp.XXXXXX")
  (cd "$tmp" && apt-get "${apt_opts[@]}" -qq download "$pkg" >/dev/null)
  deb=$(ls "$tmp"/*.deb)
  mkdir "$tmp/root"
  dpkg-deb -x "$deb" "$tmp/root"
  rm -f "$deb"
  echo "$pkg" > "$tmp/root/.complete"
  # Readable by everyone, so other users (and tests run as them) can boot it.
  chmod -R a+rX "$tmp/root"
  rm -rf "$out"
  mv "$tmp/root" "$out"
  rmdir "$tmp"
  rel=$(find "$out/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' 2>/dev/null | sed -n 's/^vmlinuz-//p' | head -1 || true)
  echo "$name ${rel:-$pkg} $out"
done

# Two kselftests built from Debian's kernel source: they print KTAP.
if [ -z "$only" ] || [ "$only" = kselftest ]; then
  out="$dest/kselftest"
  if [ ! -x "$out/timerfd" ]; then
    tmp=$(mktemp -d "$dest/.tmp.XXXXXX")
    (cd "$tmp" && apt-get "${apt_opts[@]}" -qq download linux-source-6.1 >/dev/null)
    sel=linux-source-6.1/tools/testing/selftests
    dpkg-deb --fsys-tarfile "$tmp"/linux-source-6.1_*.deb \
      | tar -xO ./usr/src/linux-source-6.1.tar.xz \
      | tar -xJ -C "$tmp" --wildcards "$sel/kselftest*.h" "$sel/timens/*"
    mkdir "$tmp/bin"
    for t in timens timerfd; do
      gcc -O2 -I"$tmp/$sel" -o "$tmp/bin/$t" "$tmp/$sel/timens/$t.c" -lrt -lpthread
    done
    chmod -R a+rX "$tmp/bin"
    rm -rf "$out"
    mv "$tmp/bin" "$out"
    rm -rf "$tmp"
  fi
  echo "kselftest linux-source-6.1 $out"
fi
