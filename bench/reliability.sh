#!/usr/bin/env bash
# Boots the same kernel N times in a row (default 200) with `vexec -- true`
# and counts failures and hangs (a run over 90 s counts as a hang and is
# killed). Also checks that no QEMU is left behind.
#
# Usage: bench/reliability.sh [N] [KERNEL]
#   KERNEL defaults to Debian's 6.1 from $VEXEC_TEST_KERNELS.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-200}"
kernels="${VEXEC_TEST_KERNELS:-${XDG_CACHE_HOME:-$HOME/.cache}/vexec-test-kernels}"
kernel="${2:-$(ls "$kernels"/6.1/boot/vmlinuz-* | head -1)}"
cargo build --release -q
bin=target/release/vexec

# Each run's console and vexec's stderr, kept for the runs that go wrong.
logs="$(mktemp -d "${TMPDIR:-/tmp}/vexec-reliability.XXXXXX")"
fails=0 hangs=0
times=()
for i in $(seq "$n"); do
  start=$(date +%s%N)
  set +e
  # Longer than vexec's own 60 s boot timeout, so that a stuck boot is
  # reported by vexec (with the console's last lines) before it is killed.
  timeout -s KILL 90 "$bin" -q --accel tcg -k "$kernel" --console-log "$logs/console-$i" -- true 2>"$logs/stderr-$i"
  rc=$?
  set -e
  if [ "$rc" = 0 ]; then rm -f "$logs/console-$i" "$logs/stderr-$i"; fi
  end=$(date +%s%N)
  ms=$(( (end - start) / 1000000 ))
  times+=("$ms")
  if [ "$rc" = 137 ]; then
    hangs=$((hangs + 1)); echo "run $i: hang (killed after 90 s)" >&2
  elif [ "$rc" != 0 ]; then
    fails=$((fails + 1)); echo "run $i: exit $rc: $(tail -c 2000 "$logs/stderr-$i")" >&2
  fi
  if [ $((i % 20)) = 0 ]; then echo "reliability: $i/$n done, $fails failed, $hangs hung" >&2; fi
done
left=$(pgrep -f "qemu-system-x86_64.*vexec.ctl" || true)
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
median=$(echo "$sorted" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
max=$(echo "$sorted" | tail -1)
if [ -z "$(ls -A "$logs")" ]; then rmdir "$logs"; else echo "reliability: consoles and stderr of the failed runs in $logs" >&2; fi
echo "reliability: $n boots of $(basename "$kernel"): $fails failed, $hangs hung, median ${median} ms, max ${max} ms, QEMU left running: ${left:-none}"
[ "$fails" = 0 ] && [ "$hangs" = 0 ] && [ -z "$left" ]
