#!/usr/bin/env python3
"""File-sharing throughput: 9p and virtio-fs, with the mount and daemon
settings vexec could use, on one kernel under TCG.

For each setting, one VM reads a 512 MiB host file twice (first read, then
from the guest's cache where the setting allows), creates 10,000 small files
in a read-write share, stats them, and stats them again after dropping the
guest's caches. Prints a table of medians.

Usage: bench/throughput.py [--runs N] [--kernel 6.1] [--only 9p,virtiofs]

Settings that are not vexec's defaults are applied from inside the guest
(remounting the 9p share with other options; needs root) or by wrapping the
virtiofsd to change its cache policy, so the product has no tuning knobs
just for this script. Needs the Rust virtiofsd ($VEXEC_TEST_VIRTIOFSD, as
scripts/test.sh installs it) and, for the C daemon rows, root.
"""

import argparse
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
WORK = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vexec-bench")
RUST_VFSD = os.environ.get("VEXEC_TEST_VIRTIOFSD", os.path.join(KERNELS, "tools/bin/virtiofsd"))
C_VFSD = "/usr/lib/qemu/virtiofsd"
BIG_MIB = 512
SMALL = 10_000

# Runs in the guest: $1 = share, $2 = 9p mount options to remount with ("" = as vexec mounted it).
GUEST = r"""
set -e
d="$1"
if [ -n "$2" ]; then
  umount "$d"
  mount -t 9p -o "$2" vexec-s0 "$d"
fi
exec perl -MTime::HiRes=time -e '
  my ($d, $n) = @ARGV;
  sub rd { my $t = time; open(my $f, "<", "$d/big") or die "open: $!"; my ($b, $sum);
           while (my $r = sysread($f, $b, 1 << 20)) { $sum += $r } return (time - $t, $sum) }
  my ($r1, $bytes) = rd(); my ($r2) = rd();
  mkdir "$d/small" or die "mkdir: $!";
  my $t = time;
  for my $i (1 .. $n) { open(my $f, ">", "$d/small/f$i") or die "create: $!"; print $f "x" x 100; close $f }
  my $c = time - $t;
  $t = time; for my $i (1 .. $n) { my @s = stat("$d/small/f$i") or die "stat: $!" } my $s = time - $t;
  system("sync");
  if (open(my $dc, ">", "/proc/sys/vm/drop_caches")) { print $dc "3\n"; close $dc }
  $t = time; for my $i (1 .. $n) { my @s = stat("$d/small/f$i") or die "stat: $!" } my $sc = time - $t;
  printf "RESULT %.0f %.0f %.3f %.3f %.3f\n", $bytes / $r1 / 1048576, $bytes / $r2 / 1048576, $c, $s, $sc;
' "$d" SMALL
""".replace("SMALL", str(SMALL))


def log(msg):
    print(f"throughput: {msg}", file=sys.stderr, flush=True)


def wrapper(real, label, cache, dir):
    """A virtiofsd that passes everything through, with its cache policy changed."""
    path = os.path.join(dir, f"virtiofsd-{label}-{cache}")
    with open(path, "w") as f:
        f.write(
            "#!/bin/sh\n"
            "n=$#\n"
            'for a in "$@"; do\n'
            f'  case "$a" in *cache=auto*) a=$(printf "%s" "$a" | sed "s/cache=auto/cache={cache}/");; esac\n'
            '  set -- "$@" "$a"\n'
            "done\n"
            'shift "$n"\n'
            f'exec "{real}" "$@"\n'
        )
    os.chmod(path, 0o755)
    return path


def settings(tmp, root):
    p9 = "trans=virtio,version=9p2000.L,access=client,posixacl"
    rows = [
        ("9p", "msize=128KiB, cache=mmap", ["--transport", "9p"], f"{p9},msize=131072,cache=mmap"),
        ("9p", "msize=512000, cache=mmap (default)", ["--transport", "9p"], ""),
        ("9p", "msize=512000, cache=loose", ["--transport", "9p"], f"{p9},msize=512000,cache=loose"),
    ]
    if os.path.exists(RUST_VFSD):
        for cache in ["auto", "always", "metadata", "never"]:
            d = RUST_VFSD if cache == "auto" else wrapper(RUST_VFSD, "rust", cache, tmp)
            note = " (default)" if cache == "auto" else ""
            rows.append(("virtiofs, Rust daemon", f"cache={cache}{note}", ["--transport", "virtiofs", "--virtiofsd", d], ""))
    else:
        log(f"no Rust virtiofsd at {RUST_VFSD}; run scripts/test.sh once or set VEXEC_TEST_VIRTIOFSD")
    if os.path.exists(C_VFSD) and root:
        for cache in ["auto", "always"]:
            d = C_VFSD if cache == "auto" else wrapper(C_VFSD, "c", cache, tmp)
            note = " (default)" if cache == "auto" else ""
            rows.append(("virtiofs, C daemon", f"cache={cache}{note}", ["--transport", "virtiofs", "--virtiofsd", d], ""))
    return rows


def kernel_image(name):
    boot = os.path.join(KERNELS, name, "boot")
    for f in sorted(os.listdir(boot)):
        if f.startswith("vmlinuz-"):
            return os.path.join(boot, f)
    sys.exit(f"throughput: no kernel in {boot}; run scripts/fetch-test-kernels.sh")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--kernel", default="6.1")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    root = os.geteuid() == 0
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    vexec = os.path.join(ROOT, "target/release/vexec")
    image = kernel_image(args.kernel)
    os.makedirs(WORK, exist_ok=True)
    share = os.path.join(WORK, "share")
    os.makedirs(share, exist_ok=True)
    big = os.path.join(share, "big")
    if not os.path.exists(big) or os.path.getsize(big) != BIG_MIB << 20:
        log(f"writing a {BIG_MIB} MiB test file")
        with open(big, "wb") as f:
            for _ in range(BIG_MIB):
                f.write(os.urandom(1 << 20))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows = settings(tmp, root)
        if args.only:
            rows = [r for r in rows if any(r[0].startswith(o) for o in args.only.split(","))]
        for run in range(args.runs):
            for transport, setting, opts, remount in rows:
                if remount and not root:
                    log(f"skipping {transport} {setting}: remounting needs root")
                    continue
                subprocess.run(["rm", "-rf", os.path.join(share, "small")], check=True)
                cmd = [vexec, "--accel", "tcg", "-q", "-k", image, "--no-cwd", "--rw", share, *opts,
                       "--", "sh", "-c", GUEST, "sh", share, remount]
                t0 = time.monotonic()
                out = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
                log(f"{transport}, {setting}: VM ran {time.monotonic() - t0:.0f} s")
                line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
                if out.returncode != 0 or line is None:
                    log(f"{transport} {setting} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
                    continue
                vals = [float(x) for x in line.split()[1:]]
                results.setdefault((transport, setting), []).append(vals)
                log(f"run {run + 1}: {transport}, {setting}: {vals}")
        subprocess.run(["rm", "-rf", os.path.join(share, "small")], check=True)
    print(f"\nkernel {os.path.basename(image)}, TCG, {BIG_MIB} MiB read twice, {SMALL:,} small files; medians of {args.runs}\n")
    print("| transport | setting | read 1st MB/s | read 2nd MB/s | create s | stat s | stat, cold s |")
    print("|---|---|---|---|---|---|---|")
    for transport, setting, _, _ in rows:
        runs = results.get((transport, setting))
        if not runs:
            print(f"| {transport} | {setting} | failed | | | | |")
            continue
        med = [statistics.median(col) for col in zip(*runs)]
        print(f"| {transport} | {setting} | {med[0]:.0f} | {med[1]:.0f} | {med[2]:.2f} | {med[3]:.2f} | {med[4]:.2f} |")


if __name__ == "__main__":
    main()
