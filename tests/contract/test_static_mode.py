"""mode=static through the real fwatchdog: files, index, traversal, HEAD, start errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import fetch, wait_until


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "public"
    (root / "docs").mkdir(parents=True)
    (root / "index.html").write_text("<p>home</p>")
    (root / "docs" / "guide.txt").write_text("read me")
    (root / "logo.svg").write_text("<svg/>")
    (tmp_path / "secret").write_text("TOP SECRET")
    (root / "escape").symlink_to(tmp_path / "secret")
    return root


def start(factory, root: Path):  # type: ignore[no-untyped-def]
    # No fprocess: static mode does not need one.
    wd = factory({"mode": "static", "static_path": str(root), "healthcheck_interval": "0"})
    wd.wait_ready()
    return wd


def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """A request line exactly as written: client libraries would normalise '..' away."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_index_and_files_with_types(watchdog_factory, site: Path) -> None:
    wd = start(watchdog_factory, site)
    reply = fetch(wd.url + "/")
    assert (reply.status, reply.body) == (200, b"<p>home</p>")
    assert reply.header("Content-Type") == "text/html; charset=utf-8"
    reply = fetch(wd.url + "/docs/guide.txt")
    assert (reply.status, reply.body) == (200, b"read me")
    assert reply.header("Content-Type") == "text/plain; charset=utf-8"
    assert fetch(wd.url + "/logo.svg").header("Content-Type") == "image/svg+xml"


def test_head_and_missing(watchdog_factory, site: Path) -> None:
    wd = start(watchdog_factory, site)
    reply = fetch(wd.url + "/docs/guide.txt", "HEAD")
    assert reply.status == 200
    assert reply.body == b""
    assert reply.header("Content-Length") == "7"
    assert fetch(wd.url + "/nope").status == 404
    assert fetch(wd.url + "/docs/").status == 404  # no listing without index.html


@pytest.mark.parametrize("target", ["/../secret", "/%2e%2e/secret", "/docs/%2E%2E/%2e%2e/secret",
                                    "/escape"])
def test_no_path_leaves_the_root(watchdog_factory, site: Path, target: str) -> None:
    wd = start(watchdog_factory, site)
    status, body = raw_get(wd.port, target)
    assert status == 404
    assert b"TOP SECRET" not in body


def test_missing_static_path_is_a_clear_start_error(watchdog_factory, tmp_path: Path) -> None:
    wd = watchdog_factory({"mode": "static", "static_path": str(tmp_path / "nowhere")})
    wait_until(lambda: wd.proc.poll() is not None, timeout=20, what="fwatchdog to exit")
    assert wd.proc.returncode == 1
    assert "static_path=" in wd.text() and "nowhere" in wd.text()
    assert not wd.lock_path.exists()


def test_files_on_one_keep_alive_connection(watchdog_factory, site: Path) -> None:
    """Browsers reuse connections: every file, HEAD and 404 on one connection, no traceback."""
    import http.client

    wd = start(watchdog_factory, site)
    conn = http.client.HTTPConnection("127.0.0.1", wd.port, timeout=10)
    try:
        answers = []
        for method, target in [("GET", "/"), ("GET", "/docs/guide.txt"), ("HEAD", "/logo.svg"),
                               ("GET", "/nope"), ("GET", "/docs/guide.txt")]:
            conn.request(method, target)
            resp = conn.getresponse()
            answers.append((resp.status, resp.read(), resp.getheader("Connection")))
        assert answers == [(200, b"<p>home</p>", None), (200, b"read me", None),
                           (200, b"", None), (404, b"404 page not found\n", None),
                           (200, b"read me", None)]
    finally:
        conn.close()
    # The access line is written after the response, so a traceback would be in by then.
    wait_until(lambda: wd.text().count("ContentLength:") >= 5, timeout=10,
               what="five access log lines")
    assert "Traceback" not in wd.text()
    assert "Error handling request" not in wd.text()
