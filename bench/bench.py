#!/usr/bin/env python3
"""Side-by-side boot-to-command benchmark: vexec, virtme-ng (vng), danobi's
vmtest where it can run, and a floor (the same kernel booted by QEMU the
fastest way we know into a static init that powers off at once).

Runs alternate between tools so that a noisy machine penalises all alike.
Everything runs under TCG. Prints medians, the median peak RSS of each
tool's largest process (QEMU), and the ratios vexec/vng and vexec/floor per
kernel.

Usage: bench/bench.py [--runs N] [--kernels 6.1,6.12,builtin] [--skip vng,vmtest]

Kernels come from $VEXEC_TEST_KERNELS (scripts/fetch-test-kernels.sh;
`builtin` from scripts/build-test-kernel.sh). Installs what it needs: a venv
with virtme-ng and `cargo install vmtest`, under ~/.cache/vexec-bench.
vng needs the kernel's modules at /lib/modules/REL: as root, the script
links them there for the run and removes the links afterwards.
"""

import argparse
import glob
import os
import re
import shutil
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
QBOOT = "/usr/share/qemu/qboot.rom"

FLOOR_INIT = r"""
#include <sys/reboot.h>
#include <unistd.h>
int main(void) { reboot(RB_POWER_OFF); for (;;) pause(); }
"""


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def newc(entries):
    """A cpio newc archive of (name, mode, data)."""
    out = bytearray()
    ino = 0

    def hdr(name, mode, size):
        nonlocal ino
        ino += 1
        fields = [ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name) + 1, 0]
        h = b"070701" + b"".join(b"%08x" % f for f in fields) + name.encode() + b"\0"
        out.extend(h)
        while len(out) % 4:
            out.append(0)

    for name, mode, data in entries:
        hdr(name, mode, len(data))
        out.extend(data)
        while len(out) % 4:
            out.append(0)
    hdr("TRAILER!!!", 0, 0)
    while len(out) % 512:
        out.append(0)
    return bytes(out)


def floor_initrd():
    path = os.path.join(WORK, "floor-initrd")
    if os.path.exists(path):
        return path
    os.makedirs(WORK, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "init.c")
        with open(src, "w") as f:
            f.write(FLOOR_INIT)
        exe = os.path.join(d, "init")
        subprocess.run(["gcc", "-static", "-O2", "-o", exe, src], check=True)
        with open(exe, "rb") as f:
            data = f.read()
    with open(path + ".tmp", "wb") as f:
        f.write(newc([("init", 0o100755, data)]))
    os.rename(path + ".tmp", path)
    return path


def kernel_image(name):
    imgs = glob.glob(os.path.join(KERNELS, name, "boot", "vmlinuz-*"))
    if not imgs:
        return None
    return imgs[0]


def vexec_bin():
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    return os.path.join(ROOT, "target", "release", "vexec")


def vexec_boot(vexec, image):
    """(image, kernel command line) vexec boots with: the cached PVH vmlinux
    when there is one, and the arguments that spare the kernel probing and
    calibrating, which the floor uses too so that it stays the floor."""
    out = subprocess.run(
        [vexec, "--accel", "tcg", "-q", "--dry-run", "-k", image, "--", "true"],
        check=True, capture_output=True, text=True,
    ).stdout
    kernel = re.search(r" -kernel (\S+)", out).group(1)
    append = re.search(r" -append '([^']*)'", out).group(1)
    return kernel, append


def ensure_vng():
    venv = os.path.join(WORK, "venv")
    vng = os.path.join(venv, "bin", "vng")
    if not os.path.exists(vng):
        log("installing virtme-ng into " + venv)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "virtme-ng"], check=True)
    return vng


def ensure_vmtest():
    root = os.path.join(WORK, "cargo")
    exe = os.path.join(root, "bin", "vmtest")
    if not os.path.exists(exe):
        log("installing vmtest with cargo into " + root)
        subprocess.run(["cargo", "install", "-q", "--locked", "vmtest", "--root", root], check=True)
    # vmtest runs the host's qemu-ga in the guest to run the command.
    if not shutil.which("qemu-ga"):
        log("installing qemu-guest-agent (vmtest runs it in the guest)")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(sudo + ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install",
                               "-y", "-qq", "--no-install-recommends", "qemu-guest-agent"],
                       check=True, stdout=subprocess.DEVNULL)
    return exe


# vng exits 255 when it cannot find its virtio-serial script ports (no udev
# on the host to load virtio_console) and then runs the command on the
# console instead; the run is complete when the guest reports this line.
VNG_OK = b"script exited with code 0"


def timed(cmd, timeout=300, ok_marker=None):
    """(seconds, peak RSS in MiB, error). The peak RSS is that of the largest
    process in the run's tree (for vexec and vng: QEMU), from wait4's rusage,
    which covers every descendant the tool itself waited for."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                p.kill()
                p.wait()
                return None, None, "timed out"
            time.sleep(0.01)
        took = time.monotonic() - start
        # Reaped here, for the rusage; tell Popen so it does not wait again.
        p.returncode = rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read()
    if rc == 0 or (ok_marker and ok_marker in output):
        return took, usage.ru_maxrss / 1024, None
    last = output.decode(errors="replace").strip().splitlines()[-1:]
    return None, None, f"exit {rc}: {last}"


GO_TEST = """package p{n}

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

func TestFiles{n}(t *testing.T) {{
	dir := t.TempDir()
	for i := 0; i < 50; i++ {{
		if err := os.WriteFile(filepath.Join(dir, "f"), []byte("data"), 0o644); err != nil {{
			t.Fatal(err)
		}}
	}}
	entries, err := os.ReadDir("/usr/share/doc")
	if err != nil || len(entries) == 0 {{
		t.Fatal(err)
	}}
}}

func TestExec{n}(t *testing.T) {{
	out, err := exec.Command("uname", "-r").Output()
	if err != nil || len(out) == 0 {{
		t.Fatal(err)
	}}
}}
"""


def go_module(packages):
    """A Go module of `packages` test packages (files, a directory listing
    of the host, a child process each), in the bench's work directory."""
    mod = os.path.join(WORK, f"gomod-{packages}")
    shutil.rmtree(mod, ignore_errors=True)
    os.makedirs(mod)
    with open(os.path.join(mod, "go.mod"), "w") as f:
        f.write("module vexecbench\n\ngo 1.19\n")
    for n in range(packages):
        os.makedirs(os.path.join(mod, f"p{n}"))
        with open(os.path.join(mod, f"p{n}", f"p{n}_test.go"), "w") as f:
            f.write(GO_TEST.format(n=n))
    return mod


def go_workload(vexec, image, packages, runs):
    """`go test -count=1 -exec 'vexec ...' ./...`, warm and cold, against
    the same on the host; test binaries are built first (not timed)."""
    if not shutil.which("go") or not image:
        print("note: Go workload skipped (no go, or no kernel)")
        return
    mod = go_module(packages)
    env = dict(os.environ, GOFLAGS="-mod=mod", GO111MODULE="on", GOPROXY="off")
    subprocess.run(["go", "test", "-count=1", "-run", "^$", "./..."], cwd=mod, env=env,
                   check=True, capture_output=True)
    base = f"{vexec} --accel tcg -q -k {image}"
    nine = base + " --transport 9p"
    for warm in (base, nine):
        subprocess.run(["go", "test", "-count=1", "-exec", warm, "./..."], cwd=mod, env=env,
                       check=True, capture_output=True)
    variants = {"host": [], "vexec warm": ["-exec", base], "vexec warm 9p": ["-exec", nine],
                "vexec cold": ["-exec", base + " --cold"]}
    took = {v: [] for v in variants}
    for r in range(runs):
        for v, extra in variants.items():
            t = time.monotonic()
            res = subprocess.run(["go", "test", "-count=1", *extra, "./..."], cwd=mod, env=env,
                                 capture_output=True, text=True)
            if res.returncode != 0:
                print(f"note: Go workload {v} failed: {res.stdout[-500:]}{res.stderr[-500:]}")
                return
            took[v].append(time.monotonic() - t)
        log(f"go: round {r + 1}: " + ", ".join(f"{v} {t[-1]:.1f}s" for v, t in took.items()))
    med = {v: statistics.median(t) for v, t in took.items()}
    print(f"\ngo test -exec vexec ./... ({packages} packages): host {med['host']:.1f}s, "
          f"warm {med['vexec warm']:.1f}s (over 9p {med['vexec warm 9p']:.1f}s), cold {med['vexec cold']:.1f}s, "
          f"cold/warm {med['vexec cold'] / med['vexec warm']:.2f}x")


def link_modules(name, release):
    """vng finds modules only at /lib/modules/REL; link the package's there."""
    target = f"/lib/modules/{release}"
    if os.path.exists(target):
        return None
    for sub in ("lib/modules", "usr/lib/modules"):
        src = os.path.join(KERNELS, name, sub, release)
        if os.path.isdir(src):
            if os.geteuid() != 0:
                return "not root: cannot link modules into /lib/modules"
            os.makedirs("/lib/modules", exist_ok=True)
            os.symlink(src, target)
            return target
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernels", default="6.1,6.12,builtin")
    ap.add_argument("--skip", default="", help="comma-separated: vng, vmtest")
    ap.add_argument("--go-packages", type=int, default=12,
                    help="packages of the `go test -exec vexec ./...` workload (0: skip it)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    vexec = vexec_bin()
    initrd = floor_initrd()
    vng = None if "vng" in skip else ensure_vng()
    vmtest = None if "vmtest" in skip else ensure_vmtest()
    results = {}
    notes = []
    for name in args.kernels.split(","):
        image = kernel_image(name)
        if not image:
            notes.append(f"{name}: no kernel in {KERNELS}/{name}; skipped")
            continue
        release = os.path.basename(image)[len("vmlinuz-"):]
        boot, append = vexec_boot(vexec, image)
        base = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
                "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1G", "-serial", "null",
                "-kernel", boot, "-initrd", initrd, "-append", append]
        run = [vexec, "--accel", "tcg", "-q", "-k", image]
        # vexec: its default, a warm start (over virtio-fs where a virtiofsd
        # is found), restoring the snapshot this machine's first run saved;
        # and the same over 9p. Cold: a boot. First: a run whose machine has
        # no snapshot yet (a kernel argument makes each round's machine
        # new), which boots and saves.
        nine = run + ["--transport", "9p"]
        rounds = iter(range(1_000_000))
        tools = {
            "vexec": run + ["--", "true"],
            "vexec warm 9p": nine + ["--", "true"],
            "vexec cold": run + ["--cold", "--", "true"],
            "vexec first": lambda: run + ["--kernel-arg", f"vexec.bench={os.getpid()}.{next(rounds)}", "--", "true"],
            "floor q35": base + ["-M", "q35"],
            "floor q35+qboot": base + ["-M", "q35", "-bios", QBOOT],
        }
        linked = None
        if vng:
            linked = link_modules(name, release)
            if isinstance(linked, str) and not linked.startswith("/"):
                notes.append(f"{name}: vng skipped: {linked}")
            else:
                # vng runs virtme-run from PATH.
                path = os.path.dirname(vng) + ":" + os.environ.get("PATH", "")
                tools["vng"] = ["env", "PATH=" + path, vng, "--verbose", "--disable-kvm", "--run", image, "--", "true"]
        if vmtest:
            cfg = os.path.join(KERNELS, name, "boot", f"config-{release}")
            has9p = os.path.exists(cfg) and "CONFIG_9P_FS=y" in open(cfg).read()
            if has9p:
                # vmtest uses KVM whenever /dev/kvm exists: hide it.
                tools["vmtest"] = [os.path.join(ROOT, "bench", "without-kvm.sh"), vmtest, "-k", image, "true"]
            else:
                notes.append(f"{name}: vmtest skipped: it needs 9p built into the kernel (CONFIG_9P_FS=y), this kernel has it as a module")
        # Untimed first runs: vng's first run rewrites the module tree's
        # index (depmod), which makes vexec's machine a new one, so it goes
        # before vexec saves the snapshots its warm runs restore.
        if "vng" in tools:
            timed(tools["vng"], ok_marker=VNG_OK)
        for warm in (run, nine):
            subprocess.run(warm + ["--", "true"], check=True)
        times = {t: [] for t in tools}
        rss = {t: [] for t in tools}
        fails = {}
        log(f"{name}: {args.runs} rounds of {', '.join(tools)}")
        try:
            for r in range(args.runs):
                for tool, cmd in tools.items():
                    cmd = cmd() if callable(cmd) else cmd
                    took, peak, err = timed(cmd, ok_marker=VNG_OK if tool == "vng" else None)
                    if took is None:
                        fails[tool] = err
                    else:
                        times[tool].append(took)
                        rss[tool].append(peak)
                log(f"{name}: round {r + 1}: " + ", ".join(f"{t} {v[-1]:.2f}s" for t, v in times.items() if v))
        finally:
            if linked:
                os.unlink(linked)
        results[name] = (times, rss, fails)

    print()
    print(f"{'kernel':<10} {'tool':<18} {'median':>8} {'min':>7} {'max':>7}  runs  {'peak RSS':>9}")
    for name, (times, rss, fails) in results.items():
        for tool, v in times.items():
            if v:
                print(f"{name:<10} {tool:<18} {statistics.median(v):8.2f} {min(v):7.2f} {max(v):7.2f}  {len(v):>4}"
                      f"  {statistics.median(rss[tool]):5.0f} MiB")
            if tool in fails:
                print(f"{name:<10} {tool:<18}   failed: {fails[tool]}")
    print()
    for name, (times, _, _) in results.items():
        med = {t: statistics.median(v) for t, v in times.items() if v}
        if "vexec" not in med:
            continue
        floors = [v for t, v in med.items() if t.startswith("floor")]
        line = f"{name}: vexec (warm) {med['vexec']:.2f}s"
        if floors:
            line += f", vexec/floor {med['vexec'] / min(floors):.2f}x (floor {min(floors):.2f}s)"
        if "vexec cold" in med:
            line += f", warm/cold {med['vexec'] / med['vexec cold']:.2f}x (cold {med['vexec cold']:.2f}s"
            if floors:
                line += f", cold/floor {med['vexec cold'] / min(floors):.2f}x"
            line += ")"
        if "vexec first" in med and "vexec cold" in med:
            line += f", first run {med['vexec first'] - med['vexec cold']:+.2f}s over a cold boot"
        if "vng" in med:
            line += f", vexec/vng {med['vexec'] / med['vng']:.3f}x (vng {med['vng']:.2f}s)"
        if "vmtest" in med:
            line += f", vexec/vmtest {med['vexec'] / med['vmtest']:.2f}x"
        print(line)
    for n in notes:
        print("note:", n)
    if args.go_packages:
        go_workload(vexec, kernel_image(args.kernels.split(",")[0]), args.go_packages, args.runs)


if __name__ == "__main__":
    import signal
    # Run `finally` blocks (module links in /lib/modules) on SIGTERM too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
