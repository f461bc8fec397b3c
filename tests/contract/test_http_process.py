"""mode=http: the function's process (start, readiness, death)."""

from __future__ import annotations

import sys
import time

from tests.conftest import fetch, http_status, wait_until


def test_lock_file_appears_only_after_the_upstream_listens(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(UPSTREAM_WAIT_BEFORE_LISTEN="listen-now"))
    # The listener is up, the function is not: health says so, no lock file.
    wait_until(lambda: http_status(wd.url + "/_/health") == 503, what="health 503 while starting")
    assert not wd.lock_path.exists()
    assert http_status(wd.url + "/_/ready") == 503
    upstream.signal("listen-now")
    wd.wait_ready()
    assert wd.lock_path.exists() and wd.lock_path.read_bytes() == b""


def test_a_slow_start_says_it_is_still_starting(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(UPSTREAM_WAIT_BEFORE_LISTEN="listen-now"))
    # Every few seconds while the function loads, so a terminal never looks hung.
    wd.wait_output("event=still_starting mode=http seconds=5 start_timeout=5m0s", timeout=20)
    assert "event=serving" not in wd.text()
    upstream.signal("listen-now")
    wd.wait_ready()


def test_requests_before_start_wait_for_the_function(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(UPSTREAM_WAIT_BEFORE_LISTEN="listen-now"))
    wait_until(lambda: http_status(wd.url + "/_/health") == 503, what="listener up")

    import threading
    replies = []
    thread = threading.Thread(target=lambda: replies.append(fetch(wd.url + "/echo", timeout=20)))
    thread.start()
    upstream.signal("listen-now")
    thread.join(20)
    assert replies and replies[0].status == 200  # not of-watchdog's early 500


def test_upstream_that_never_listens_fails_within_start_timeout(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(UPSTREAM_WAIT_BEFORE_LISTEN="never",
                                       start_timeout="1500ms"))
    started = time.monotonic()
    rc = wd.proc.wait(30)
    assert rc != 0
    assert time.monotonic() - started < 15
    wd.wait_output("upstream never started")
    assert "start_timeout=1.5s" in wd.text()
    assert not wd.lock_path.exists()


def test_function_that_exits_at_start_fails_at_once(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(UPSTREAM_EXIT_AT_START="3", start_timeout="60s"))
    started = time.monotonic()
    rc = wd.proc.wait(30)
    assert rc == 1
    assert time.monotonic() - started < 15  # not the 60 s deadline
    wd.wait_output("upstream never started")
    assert "exited with code 3" in wd.text()


def test_missing_fprocess_binary_fails_clearly(watchdog_factory, upstream, tmp_path):
    env = upstream.env(fprocess=str(tmp_path / "no-such-binary"))
    wd = watchdog_factory(env)
    assert wd.proc.wait(30) == 1
    wd.wait_output("upstream never started")


def test_function_death_makes_the_watchdog_exit_non_zero(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    assert fetch(wd.url + "/die?code=3").status == 200
    rc = wd.proc.wait(20)
    assert rc == 1
    wd.wait_output("code=3")
    assert not wd.lock_path.exists()


def test_fprocess_is_split_shell_style(watchdog_factory, upstream, tmp_path):
    # A path with a space, quoted: of-watchdog would split it at the space.
    spaced = tmp_path / "dir with space"
    spaced.mkdir()
    script = spaced / "up.py"
    script.write_text(upstream.script.read_text())
    wd = watchdog_factory(upstream.env(fprocess=f'{sys.executable} "{script}" {upstream.port}'))
    wd.wait_ready()
    assert fetch(wd.url + "/echo").status == 200
