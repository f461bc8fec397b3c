"""mode=streaming through the real fwatchdog: one child per request, stdout streamed.

Each test is one row of docs/contract.md (or one of our fixes) seen from outside:
a real HTTP client, a real watchdog, real child processes.
"""

from __future__ import annotations

import http.client
import json
import re
import shlex
import socket
import sys
from pathlib import Path

import pytest

from tests.conftest import alive, fetch, wait_until

PY = shlex.quote(sys.executable)


def start(factory, tmp_path: Path, **env: str):  # type: ignore[no-untyped-def]
    # healthcheck_interval=0: stopping the watchdog at the end must not wait 30 s.
    wd = factory({"mode": "streaming", "healthcheck_interval": "0", **env})
    wd.wait_ready()
    return wd


def fn(tmp_path: Path, source: str) -> str:
    path = tmp_path / "fn.py"
    path.write_text(source)
    return f"{PY} {shlex.quote(str(path))}"


def open_stream(wd, method: str = "GET", path: str = "/", body: bytes | None = None,  # type: ignore[no-untyped-def]
                headers: dict[str, str] | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", wd.port, timeout=15)
    conn.request(method, path, body=body, headers=headers or {})
    return conn, conn.getresponse()


def test_body_echoed_as_octet_stream_by_default(watchdog_factory, tmp_path: Path) -> None:
    wd = start(watchdog_factory, tmp_path, fprocess="cat")
    reply = fetch(wd.url + "/", "POST", body=b"hello\x00world")
    assert reply.status == 200
    assert reply.body == b"hello\x00world"
    assert reply.header("Content-Type") == "application/octet-stream"
    assert reply.header("Transfer-Encoding") == "chunked"


def test_content_type_setting(watchdog_factory, tmp_path: Path) -> None:
    wd = start(watchdog_factory, tmp_path, fprocess="cat", content_type="text/csv")
    reply = fetch(wd.url + "/", "POST", body=b"a,b\n")
    assert reply.header("Content-Type") == "text/csv"


def test_child_environment(watchdog_factory, tmp_path: Path) -> None:
    src = "import json, os, sys; sys.stdin.read(); print(json.dumps(dict(os.environ)))"
    wd = start(watchdog_factory, tmp_path, fprocess=fn(tmp_path, src), MARKER="inherited")
    reply = fetch(wd.url + "/a/b?x=1&y=%20z", "POST", body=b"{}",
                  headers={"Content-Type": "application/json", "x-call-id": "call-7"})
    env = json.loads(reply.body)
    assert env["Http_Method"] == "POST"
    assert env["Http_Path"] == "/a/b"
    assert env["Http_Query"] == "x=1&y=%20z"
    assert env["Http_Content_Type"] == "application/json"
    assert env["Http_X_Call_Id"] == "call-7"
    assert env["MARKER"] == "inherited"
    assert "Http_Transfer_Encoding" not in env

    conn = http.client.HTTPConnection("127.0.0.1", wd.port, timeout=15)
    try:
        conn.request("PUT", "/", body=iter([b"chunk"]), encode_chunked=True)
        env = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    assert env["Http_Transfer_Encoding"] == "chunked"
    assert env["Http_Method"] == "PUT"
    assert "Http_Query" not in env


def test_first_chunk_arrives_before_the_child_ends(watchdog_factory, tmp_path: Path) -> None:
    go = tmp_path / "go"
    src = f"""
import os, sys, time
sys.stdout.write("first\\n"); sys.stdout.flush()
while not os.path.exists({str(go)!r}):
    time.sleep(0.01)
sys.stdout.write("second\\n")
"""
    wd = start(watchdog_factory, tmp_path, fprocess=fn(tmp_path, src))
    conn, resp = open_stream(wd)
    try:
        assert resp.status == 200
        assert resp.read1(65536) == b"first\n"  # the child is still waiting for "go"
        go.touch()
        assert resp.read() == b"second\n"
    finally:
        conn.close()


def test_exec_timeout_kills_the_process_group(watchdog_factory, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    wd = start(watchdog_factory, tmp_path, exec_timeout="500ms",
               fprocess=f"sh -c 'sleep 300 & echo $! > {pidfile}; wait'")
    reply = fetch(wd.url + "/", timeout=15)
    assert reply.status == 500
    assert b"exec_timeout of 500ms exceeded" in reply.body
    grandchild = int(pidfile.read_text())
    wait_until(lambda: not alive(grandchild), timeout=10, what="the grandchild to be killed")


def test_failure_before_output_is_500_with_the_reason(watchdog_factory, tmp_path: Path) -> None:
    wd = start(watchdog_factory, tmp_path, fprocess="sh -c 'exit 3'")
    reply = fetch(wd.url + "/")
    assert reply.status == 500
    assert b"exit status 3" in reply.body


def test_command_that_cannot_start_is_500(watchdog_factory, tmp_path: Path) -> None:
    wd = start(watchdog_factory, tmp_path, fprocess=str(tmp_path / "missing-fn"))
    reply = fetch(wd.url + "/")
    assert reply.status == 500
    assert b"missing-fn" in reply.body


def test_failure_after_output_cuts_the_stream(watchdog_factory, tmp_path: Path) -> None:
    wd = start(watchdog_factory, tmp_path, fprocess="sh -c 'echo partial; exit 4'")
    conn, resp = open_stream(wd)
    try:
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
    finally:
        conn.close()
    wd.wait_output("exit status 4")


def test_stderr_forwarded_with_prefix_and_huge_lines_split(watchdog_factory,
                                                           tmp_path: Path) -> None:
    src = ("import sys; sys.stderr.write('x' * 200000 + '\\n'); sys.stderr.write('after\\n');"
           "sys.stderr.flush(); print('done')")
    wd = start(watchdog_factory, tmp_path, fprocess=fn(tmp_path, src), log_buffer_size="4096")
    reply = fetch(wd.url + "/")
    assert (reply.status, reply.body) == (200, b"done\n")
    wd.wait_output("stderr: after")
    pieces = [ln for ln in wd.output if "stderr: x" in ln]
    assert len(pieces) == -(-200000 // 4096)
    assert re.match(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d stderr: x{4096}$", pieces[0].rstrip("\n"))
    # The watchdog is still fine afterwards.
    assert fetch(wd.url + "/").status == 200


def test_client_disconnect_kills_the_child(watchdog_factory, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    wd = start(watchdog_factory, tmp_path, exec_timeout="0",
               fprocess=f"sh -c 'echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; "
                        f"exec sleep 300'")
    with socket.create_connection(("127.0.0.1", wd.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(pidfile.exists, timeout=10, what="the child to start")
        pid = int(pidfile.read_text())
        assert alive(pid)
    wait_until(lambda: not alive(pid), timeout=10, what="the child to be killed")
    wd.wait_output("client disconnected")


def test_child_that_never_reads_stdin(watchdog_factory, tmp_path: Path) -> None:
    wd = start(watchdog_factory, tmp_path, fprocess="sh -c 'exec 0<&-; echo fine'")
    reply = fetch(wd.url + "/", "POST", body=b"z" * (4 * 1024 * 1024), timeout=30)
    assert (reply.status, reply.body) == (200, b"fine\n")
    assert fetch(wd.url + "/", "POST", body=b"again").status == 200
