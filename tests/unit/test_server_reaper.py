"""The orphan reaper, as a child subreaper, in a subprocess of its own.

The subprocess marks itself PR_SET_CHILD_SUBREAPER, so a double-forked
grandchild is reparented to it, exactly as to PID 1 in a container.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import logging, os, sys, time
    from fwatchdog import reaper

    assert reaper.set_subreaper() and reaper.needed()
    log = logging.getLogger("t")

    # An owned child that exits with 7: the reaper must leave its status alone.
    owned = os.fork()
    if owned == 0:
        os._exit(7)

    # An orphan: the middle process exits, the grandchild is reparented to us.
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        if os.fork() == 0:
            os.read(r, 1)   # wait to be released
            os._exit(0)
        os._exit(0)
    os.waitpid(middle, 0)

    def zombies():
        return set(reaper.zombie_children(os.getpid()))

    os.write(w, b"x")
    deadline = time.monotonic() + 10
    while len(zombies()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    both = zombies()
    assert owned in both and len(both) == 2, both
    orphan = (both - {owned}).pop()

    clock = [100.0]
    r = reaper.Reaper(log, {owned}, grace=2.0, clock=lambda: clock[0])
    assert r.scan() == []            # first sight: within grace
    clock[0] += 1.0
    assert r.scan() == []            # still within grace
    clock[0] += 1.5
    assert r.scan() == [orphan]      # lingered past grace: reaped
    assert zombies() == {owned}      # the owned child is untouched
    pid, status = os.waitpid(owned, 0)
    assert os.waitstatus_to_exitcode(status) == 7
    assert r.scan() == []            # nothing left, no error
    print("ok")
''')


def test_reaper_collects_orphans_but_not_owned_children(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_zombie_children_parses_odd_process_names(tmp_path):
    from fwatchdog.reaper import zombie_children

    proc = tmp_path / "proc"
    for pid, comm, state, ppid in [(10, "a) (b", "Z", 1), (11, "plain", "S", 1),
                                   (12, "x y", "Z", 2), (13, "z", "Z", 1)]:
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) {state} {ppid} 0 0\n")
    (proc / "self").mkdir()
    assert sorted(zombie_children(1, str(proc))) == [10, 13]
