#!/usr/bin/env python3
"""What `--tcg-threads single` costs against the default (multi), side by
side: a cold boot to `true`, a warm start to `true`, and two busy processes
in the guest at once (the work a second vCPU thread speeds up). Runs
alternate between the two so that a noisy machine penalises both alike.
Prints medians and the ratio single/multi.

Usage: bench/tcg-threads.py [--runs N] [--kernel 6.1] [--vexec PATH]

Kernels come from $VEXEC_TEST_KERNELS (scripts/fetch-test-kernels.sh).
"""

import argparse
import glob
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.environ.get(
    "VEXEC_TEST_KERNELS",
    os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vexec-test-kernels"),
)
# Two shell loops at once: CPU-bound work for both vCPUs.
BUSY = "b() { i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; }; b & b; wait"
WORKLOADS = [
    ("cold boot, true", ["--cold", "--", "true"]),
    ("warm start, true", ["--", "true"]),
    ("2 busy processes", ["--", "sh", "-c", BUSY]),
]


def timed(cmd):
    t0 = time.monotonic()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode()[-500:]}")
    return time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--vexec", default=os.path.join(ROOT, "target", "debug", "vexec"))
    a = ap.parse_args()
    images = glob.glob(os.path.join(KERNELS, a.kernel, "boot", "vmlinuz-*"))
    if not images:
        sys.exit(f"bench: no kernel {a.kernel} in {KERNELS}; run scripts/fetch-test-kernels.sh")
    base = [a.vexec, "-q", "--accel", "tcg", "-k", images[0]]
    print(f"{'workload':<20} {'multi':>8} {'single':>8}  single/multi")
    for name, args in WORKLOADS:
        times = {"multi": [], "single": []}
        for mode in times:
            # One untimed run: a warm start needs its snapshot first.
            timed(base + ["--tcg-threads", mode] + args)
        for _ in range(a.runs):
            for mode in times:
                times[mode].append(timed(base + ["--tcg-threads", mode] + args))
        m, s = (statistics.median(times[k]) for k in ("multi", "single"))
        print(f"{name:<20} {m:>7.2f}s {s:>7.2f}s  {s / m:.2f}", flush=True)


if __name__ == "__main__":
    main()
