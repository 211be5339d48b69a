#!/usr/bin/env bash
# Fixed-budget fuzzing on stable Rust: runs the property tests of
# tests/fuzz.rs (protocol decoder on both ends, kernel-image, decompressor,
# modinfo, kconfig, module-list and cpio code) with many more cases than
# the suite does, optimised. A failing case is shrunk by proptest and kept
# in tests/fuzz.proptest-regressions, so the suite replays it from then on.
#
# Usage: bench/fuzz.sh [CASES]   (default 20000 cases per property)
set -euo pipefail
cd "$(dirname "$0")/.."
cases="${1:-20000}"
start=$(date +%s)
PROPTEST_CASES="$cases" cargo test --release --quiet --test fuzz -- --test-threads=2
echo "bench/fuzz.sh: $cases cases per property, no failure, $(( $(date +%s) - start )) s" >&2
