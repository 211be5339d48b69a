#!/bin/sh
# Runs a command in a private mount namespace whose /dev lacks kvm, for
# tools that use KVM whenever /dev/kvm exists (danobi/vmtest). Needs root.
# Usage: bench/without-kvm.sh COMMAND [ARGS...]
set -eu
exec unshare -m sh -c '
  set -eu
  new=$(mktemp -d)
  mount -t tmpfs -o mode=0755 vexec-bench-dev "$new"
  for e in /dev/* /dev/.[!.]*; do
    [ -e "$e" ] || [ -L "$e" ] || continue
    n=${e##*/}
    [ "$n" = kvm ] && continue
    if [ -L "$e" ]; then cp -a "$e" "$new/$n"
    elif [ -d "$e" ]; then mkdir "$new/$n"; mount --rbind "$e" "$new/$n"
    else touch "$new/$n"; mount --bind "$e" "$new/$n"
    fi
  done
  mount --move "$new" /dev
  exec "$@"
' sh "$@"
