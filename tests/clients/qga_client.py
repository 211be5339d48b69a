"""Drives a QEMU guest agent socket with QEMU's own Python QMP library
(PyPI qemu.qmp), as QEMU's qemu-ga-client does: every request carries an
id, and a reply is matched to its request by that id. Prints one line per
step; exits non-zero on the first surprise.

Usage: python3 qga_client.py SOCKET
"""

import asyncio
import base64
import sys

from qemu.qmp import ExecuteError, QMPClient


async def main(path: str) -> None:
    qga = QMPClient("vexec-test")
    # The guest agent sends no greeting and takes no capabilities.
    qga.await_greeting = False
    qga.negotiate = False
    await qga.connect(path)
    print("ping", await qga.execute("guest-ping"))
    # An error reply must carry the id too, or the library drops the
    # connection: the next request proves it kept it.
    for name, args in [
        ("guest-no-such-command", None),
        ("guest-sync", {}),
        ("guest-file-open", {"path": "/no/such", "mode": "r"}),
    ]:
        try:
            await qga.execute(name, args)
            raise SystemExit(f"{name}: no error")
        except ExecuteError as e:
            print("error", name, e.error_class)
    print("sync", await qga.execute("guest-sync", {"id": 42}))
    pid = (
        await qga.execute(
            "guest-exec",
            {"path": "/bin/sh", "arg": ["-c", "echo from-guest; exit 3"], "capture-output": True},
        )
    )["pid"]
    while True:
        st = await qga.execute("guest-exec-status", {"pid": pid})
        if st["exited"]:
            break
        await asyncio.sleep(0.05)
    out = base64.b64decode(st["out-data"]).decode()
    print("exec", st["exitcode"], out.strip())
    # A session of its own and the limits of whoever started the VM.
    script = "ulimit -Sn; cut -d' ' -f6 /proc/self/stat"
    pid = (await qga.execute("guest-exec", {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True}))["pid"]
    while not (st := await qga.execute("guest-exec-status", {"pid": pid}))["exited"]:
        await asyncio.sleep(0.05)
    nofile, sid = base64.b64decode(st["out-data"]).decode().split()
    print("limits", nofile, "session", "above 0" if int(sid) > 0 else sid)
    await qga.disconnect()


asyncio.run(main(sys.argv[1]))
