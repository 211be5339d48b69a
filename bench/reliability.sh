#!/usr/bin/env bash
# Boots the same kernel N times in a row (default 200) with `vexec -- true`
# and counts failures and hangs (a run over 60 s counts as a hang and is
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

fails=0 hangs=0
times=()
for i in $(seq "$n"); do
  start=$(date +%s%N)
  set +e
  timeout -s KILL 60 "$bin" -q --accel tcg -k "$kernel" -- true
  rc=$?
  set -e
  end=$(date +%s%N)
  ms=$(( (end - start) / 1000000 ))
  times+=("$ms")
  if [ "$rc" = 137 ]; then
    hangs=$((hangs + 1)); echo "run $i: hang (killed after 60 s)" >&2
  elif [ "$rc" != 0 ]; then
    fails=$((fails + 1)); echo "run $i: exit $rc" >&2
  fi
  if [ $((i % 20)) = 0 ]; then echo "reliability: $i/$n done, $fails failed, $hangs hung" >&2; fi
done
left=$(pgrep -f "qemu-system-x86_64.*vexec.ctl" || true)
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
median=$(echo "$sorted" | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
max=$(echo "$sorted" | tail -1)
echo "reliability: $n boots of $(basename "$kernel"): $fails failed, $hangs hung, median ${median} ms, max ${max} ms, QEMU left running: ${left:-none}"
[ "$fails" = 0 ] && [ "$hangs" = 0 ] && [ -z "$left" ]
