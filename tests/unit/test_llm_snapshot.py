"""The zygote checkpoint's CRIU side (fwatchdog.llm.snapshot).

With a CRIU of at least 4.0 (``FWATCHDOG_TEST_CRIU`` names one, else the one on
PATH) and the privileges it needs, a real process with a socket channel and an
output pipe is dumped, killed, restored with new channels, talked to and waited
for. Without one those tests are skipped; the refusals (no criu, an old one, a
fingerprint that does not match, a damaged image, a failed dump) use a stand-in
``criu`` script and always run.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fwatchdog.llm import snapshot


def fake_criu(tmp_path: Path, version: str, dump_code: int = 0) -> str:
    path = tmp_path / "criu"
    path.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = "--version" ]; then echo "Version: {version}"; exit 0; fi
        if [ "$1" = "dump" ]; then
          dir=""; while [ $# -gt 0 ]; do [ "$1" = "-D" ] && dir="$2"; shift; done
          echo "Error (criu/cr-dump.c:1): Dumping FAILED." > "$dir/dump.log"
          exit {dump_code}
        fi
        exit 1
        """))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_missing_or_old_criu_is_refused_with_a_reason(tmp_path: Path) -> None:
    assert "no criu" in str(snapshot.find_criu(str(tmp_path / "absent")))
    old = snapshot.find_criu(fake_criu(tmp_path, "3.17.1"))
    assert isinstance(old, str) and "3.17.1" in old and "older than 4.0" in old
    new = snapshot.find_criu(fake_criu(tmp_path, "4.1.1"))
    assert isinstance(new, snapshot.Criu) and new.version == (4, 1, 1)


def test_the_fingerprint_follows_the_software_and_the_template(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    template = tmp_path / "template"
    template.mkdir()
    (template / "manifest.json").write_text('{"a": 1}')
    first = snapshot.fingerprint(template, paths=[str(site)])
    assert snapshot.fingerprint(template, paths=[str(site)]) == first
    dist = site / "torch-2.4.0.dist-info"
    dist.mkdir()
    (dist / "RECORD").write_text("torch/__init__.py,,\n")
    with_torch = snapshot.fingerprint(template, paths=[str(site)])
    assert with_torch != first
    (template / "manifest.json").write_text('{"a": 2}')
    assert snapshot.fingerprint(template, paths=[str(site)]) != with_torch


def test_a_checkpoint_that_does_not_fit_is_never_restored(tmp_path: Path) -> None:
    criu = snapshot.find_criu(fake_criu(tmp_path, "4.1.1"))
    assert isinstance(criu, snapshot.Criu)
    image = tmp_path / "image"
    with pytest.raises(snapshot.SnapshotError, match="no checkpoint"):
        asyncio.run(snapshot.restore(criu, image, "f", {3: 0}))
    image.mkdir()
    (image / snapshot.META).write_text("{not json")
    with pytest.raises(snapshot.SnapshotError, match="unreadable"):
        asyncio.run(snapshot.restore(criu, image, "f", {3: 0}))
    (image / snapshot.META).write_text(json.dumps(
        {"version": snapshot.META_VERSION, "fingerprint": "other", "channels": {"3": "x"}}))
    with pytest.raises(snapshot.SnapshotError, match="fingerprint mismatch"):
        asyncio.run(snapshot.restore(criu, image, "f", {3: 0}))
    (image / snapshot.META).write_text(json.dumps(
        {"version": snapshot.META_VERSION, "fingerprint": "f", "channels": {"3": "x"}}))
    with pytest.raises(snapshot.SnapshotError, match="channels"):
        asyncio.run(snapshot.restore(criu, image, "f", {4: 0}))


def test_a_failed_dump_says_why_and_keeps_the_old_image(tmp_path: Path) -> None:
    criu = snapshot.find_criu(fake_criu(tmp_path, "4.1.1", dump_code=1))
    assert isinstance(criu, snapshot.Criu)
    image = tmp_path / "image"
    image.mkdir()
    (image / "kept").write_text("old")
    with pytest.raises(snapshot.SnapshotError, match="Dumping FAILED"):
        asyncio.run(snapshot.dump(criu, os.getpid(), image, {}, "f"))
    assert (image / "kept").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["criu", "image"]


def real_criu() -> snapshot.Criu | None:
    found = snapshot.find_criu(os.environ.get("FWATCHDOG_TEST_CRIU"))
    if isinstance(found, str):
        return None
    check = subprocess.run([found.path, "check"], capture_output=True, text=True,
                           timeout=60, check=False)
    return found if check.returncode == 0 else None


CHILD = """
import os, random, socket, sys
channel = socket.socket(fileno=int(sys.argv[1]))
sys.stderr.write(f"child {os.getpid()} up\\n"); sys.stderr.flush()
channel.sendall(b"ready\\n")
while True:
    data = channel.recv(100)
    if not data:
        sys.stderr.write("channel closed\\n"); sys.stderr.flush()
        sys.exit(7)
    channel.sendall(b"echo " + data + b" " + str(os.getpid()).encode() + b"\\n")
"""

DRIVER = """
import asyncio, json, os, signal, socket, subprocess, sys
from fwatchdog import reaper
from fwatchdog.llm import snapshot

async def main(criu_path, image, child):
    assert reaper.set_subreaper()
    criu = snapshot.find_criu(criu_path)
    ours, theirs = socket.socketpair()
    err_r, err_w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", child, str(theirs.fileno())],
                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=err_w, start_new_session=True)
    theirs.close(); os.close(err_w)
    assert ours.recv(100) == b"ready\\n"
    channels = {int(n): snapshot.channel_of(proc.pid, int(n))
                for n in os.listdir(f"/proc/{proc.pid}/fd")
                if snapshot.channel_of(proc.pid, int(n)).startswith(("socket:", "pipe:"))}
    seconds = await snapshot.dump(criu, proc.pid, image, channels, "print")
    proc.kill(); proc.wait(); ours.close(); os.close(err_r)
    # The restore: new channels in place of the old ones.
    new_ours, new_theirs = socket.socketpair()
    out_r, out_w = os.pipe()
    fds = {n: (new_theirs.fileno() if r.startswith("socket:") else out_w)
           for n, r in channels.items()}
    pid = await snapshot.restore(criu, image, "print", fds)
    new_theirs.close(); os.close(out_w)
    adopted = snapshot.Adopted(pid)
    new_ours.sendall(b"hello")
    answer = new_ours.recv(100).decode()
    new_ours.close()
    code = await asyncio.wait_for(adopted.wait(), 30)
    log = os.read(out_r, 1000).decode()
    print(json.dumps({"dump_s": seconds, "pid": pid, "original": proc.pid, "answer": answer,
                      "code": code, "log": log, "channels": sorted(channels.values())}))

asyncio.run(main(*sys.argv[1:4]))
"""


def test_a_process_is_restored_with_new_channels_and_adopted(tmp_path: Path) -> None:
    criu = real_criu()
    if criu is None:
        pytest.skip("no working criu >= 4.0 here (FWATCHDOG_TEST_CRIU names one)")
    done = subprocess.run([sys.executable, "-c", DRIVER, criu.path, str(tmp_path / "image"),
                           CHILD], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # The same process (its pid), answering on the new channel and writing to the new
    # pipe; it exits when that channel closes, and its adopter collects the code.
    assert result["pid"] == result["original"]
    assert result["answer"] == f"echo hello {result['pid']}\n"
    assert result["code"] == 7 and result["log"] == "channel closed\n"
    assert any(c.startswith("socket:") for c in result["channels"])
    meta = snapshot.read_meta(tmp_path / "image")
    assert meta["fingerprint"] == "print" and meta["pid"] == result["pid"]
