#!/usr/bin/env python3
"""Persistent VMs: how long `vexec up` takes (cold, a first run saving a
snapshot, and warm: a restored snapshot; over virtio-fs, vexec's default
where a virtiofsd is found), and the overhead of
`vexec exec NAME -- true` (median of N), beside a warm plain run of the same
command for scale. Everything under TCG.

Usage: bench/persistent.py [--runs N] [--kernel 6.1]

Kernels come from $VEXEC_TEST_KERNELS (scripts/fetch-test-kernels.sh). VMs
live in a private runtime directory of this script's and are taken down at
the end.
"""

import argparse
import glob
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.environ.get(
    "VEXEC_TEST_KERNELS",
    os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vexec-test-kernels"),
)


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def timed(cmd, env):
    start = time.monotonic()
    subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--kernel", default="6.1")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    vexec = os.path.join(ROOT, "target", "release", "vexec")
    image = sorted(glob.glob(os.path.join(KERNELS, args.kernel, "boot", "vmlinuz-*")))[-1]
    runtime = tempfile.mkdtemp(prefix="vxb")
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime)
    up = [vexec, "up", "-q", "--accel", "tcg", "-k", image]
    down = [vexec, "down", "--all"]
    try:
        rounds = max(3, args.runs // 5)
        ups = {"up cold": [], "up first (saves)": [], "up warm": []}
        for r in range(rounds):
            ups["up cold"].append(timed(up + ["--cold", "--name", "c"], env))
            # A kernel argument new to this round: no snapshot yet.
            first = up + ["--kernel-arg", f"vexec.bench={os.getpid()}.{r}"]
            ups["up first (saves)"].append(timed(first + ["--name", "f"], env))
            ups["up warm"].append(timed(first + ["--name", "w"], env))
            subprocess.run(down, env=env, check=True, stderr=subprocess.DEVNULL)
            log(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in ups.items()))
        subprocess.run(up + ["--name", "x"], env=env, check=True)
        plain = [vexec, "-q", "--accel", "tcg", "-k", image, "--", "true"]
        subprocess.run(plain, env=env, check=True)
        execs = {"exec -- true": [], "plain warm run -- true": [], "host: true": []}
        for _ in range(args.runs):
            execs["exec -- true"].append(timed([vexec, "exec", "-q", "x", "--", "true"], env))
            execs["plain warm run -- true"].append(timed(plain, env))
            execs["host: true"].append(timed(["true"], env))
    finally:
        subprocess.run(down, env=env, stderr=subprocess.DEVNULL)
    print(f"\n{'what':<24} {'median':>8} {'min':>7} {'max':>7}  runs")
    for name, v in list(ups.items()) + list(execs.items()):
        print(f"{name:<24} {statistics.median(v):8.3f} {min(v):7.3f} {max(v):7.3f}  {len(v):>4}")
    e = statistics.median(execs["exec -- true"])
    p = statistics.median(execs["plain warm run -- true"])
    print(f"\nexec overhead {e * 1000:.0f} ms (median of {args.runs}); {e / p:.2f}x a warm plain run")


if __name__ == "__main__":
    main()
