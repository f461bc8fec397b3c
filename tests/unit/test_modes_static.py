"""StaticMode in-process: files, index, redirects, traversal, symlinks, methods, types."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from fwatchdog.config import from_env
from fwatchdog.modes.base import ModeContext, StartError
from fwatchdog.modes.static import StaticMode, sniff


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "public"
    (root / "sub").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "index.html").write_text("<h1>home</h1>")
    (root / "sub" / "index.html").write_text("<h1>sub</h1>")
    (root / "app.js").write_text("let x = 1;")
    (root / "style.css").write_text("body{}")
    (root / "data.json").write_text("{}")
    (root / "README").write_text("plain words\n")
    (root / "blob").write_bytes(b"\x00\x01\x02binary")
    (root / "a b.txt").write_text("spaced")
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    (root / "leak").symlink_to(tmp_path / "secret.txt")
    (root / "leakdir").symlink_to(tmp_path)
    (root / "alias.txt").symlink_to(root / "README")
    os.mkfifo(root / "fifo")
    return root


def ctx_for(root: Path) -> ModeContext:
    return ModeContext(config=from_env({"mode": "static", "static_path": str(root)}),
                       log=logging.getLogger("test.static"), stdout=io.StringIO(),
                       stderr=io.StringIO())


@contextlib.asynccontextmanager
async def served(root: Path) -> AsyncIterator[TestClient]:
    mode = StaticMode(ctx_for(root))
    app = web.Application()

    async def route(request: web.Request) -> web.StreamResponse:
        return await mode.handle(request)

    app.router.add_route("*", "/{tail:.*}", route)
    await mode.start()
    async with TestClient(TestServer(app)) as client:
        yield client
    await mode.stop()


async def raw(port: int | None, target: str, method: str = "GET") -> tuple[int, bytes]:
    """Send ``target`` exactly as written (a client library would normalise it)."""
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_start_fails_clearly_without_the_folder(tmp_path: Path) -> None:
    mode = StaticMode(ctx_for(tmp_path / "missing"))
    with pytest.raises(StartError, match="static_path=.*missing.*not a folder"):
        asyncio.run(mode.start())


def test_files_index_and_types(site: Path) -> None:
    async def main() -> None:
        async with served(site) as c:
            resp = await c.get("/")
            assert resp.status == 200
            assert await resp.text() == "<h1>home</h1>"
            assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
            expected = {
                "/app.js": "text/javascript; charset=utf-8",
                "/style.css": "text/css; charset=utf-8",
                "/data.json": "application/json",
                "/README": "text/plain; charset=utf-8",
                "/blob": "application/octet-stream",
                "/alias.txt": "text/plain; charset=utf-8",
            }
            for path, kind in expected.items():
                resp = await c.get(path)
                assert resp.status == 200, path
                assert resp.headers["Content-Type"] == kind, path
            resp = await c.get("/sub/")
            assert await resp.text() == "<h1>sub</h1>"
            resp = await c.get("/a%20b.txt")
            assert await resp.text() == "spaced"

    asyncio.run(main())


def test_head_has_headers_and_no_body(site: Path) -> None:
    async def main() -> None:
        async with served(site) as c:
            status, body = await raw(c.port, "/README", method="HEAD")
            assert status == 200
            assert body == b""
            resp = await c.head("/README")
            assert resp.headers["Content-Length"] == str(len("plain words\n"))

    asyncio.run(main())


def test_missing_and_listing_are_404(site: Path) -> None:
    async def main() -> None:
        async with served(site) as c:
            assert (await c.get("/nope.html")).status == 404
            assert (await c.get("/empty/")).status == 404  # no directory listing
            assert (await c.get("/fifo")).status == 404
            assert (await c.get("/README/x")).status == 404

    asyncio.run(main())


@pytest.mark.parametrize(
    "target",
    [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/sub/../../secret.txt",
        "/sub/%2e%2e/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/leak",
        "/leakdir/secret.txt",
        "/a%00b",
    ],
)
def test_no_way_out_of_the_root(site: Path, target: str) -> None:
    async def main() -> None:
        async with served(site) as c:
            status, body = await raw(c.port, target)
            assert status == 404, target
            assert b"TOP SECRET" not in body

    asyncio.run(main())


def test_go_style_redirects(site: Path) -> None:
    async def main() -> None:
        async with served(site) as c:
            resp = await c.get("/sub", allow_redirects=False)
            assert (resp.status, resp.headers["Location"]) == (301, "sub/")
            resp = await c.get("/sub?x=1", allow_redirects=False)
            assert resp.headers["Location"] == "sub/?x=1"
            resp = await c.get("/index.html", allow_redirects=False)
            assert (resp.status, resp.headers["Location"]) == (301, "./")
            resp = await c.get("/README/", allow_redirects=False)
            assert (resp.status, resp.headers["Location"]) == (301, "../README")
            resp = await c.get("/sub")
            assert await resp.text() == "<h1>sub</h1>"

    asyncio.run(main())


def test_only_get_and_head(site: Path) -> None:
    async def main() -> None:
        async with served(site) as c:
            resp = await c.post("/README", data=b"x")
            assert resp.status == 405
            assert resp.headers["Allow"] == "GET, HEAD"

    asyncio.run(main())


def test_ranges_and_conditional_requests(site: Path) -> None:
    async def main() -> None:
        async with served(site) as c:
            resp = await c.get("/README", headers={"Range": "bytes=0-4"})
            assert resp.status == 206
            assert await resp.read() == b"plain"
            last = (await c.get("/README")).headers["Last-Modified"]
            resp = await c.get("/README", headers={"If-Modified-Since": last})
            assert resp.status == 304

    asyncio.run(main())


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"\x89PNG\r\n\x1a\nxxxx", "image/png"),
        (b"  <!DOCTYPE html><html>", "text/html; charset=utf-8"),
        (b"<p>hi</p>", "text/html; charset=utf-8"),
        (b"%PDF-1.7", "application/pdf"),
        (b"just text\n", "text/plain; charset=utf-8"),
        (b"", "text/plain; charset=utf-8"),
        (b"\x00\x00", "application/octet-stream"),
    ],
)
def test_sniff(head: bytes, kind: str) -> None:
    assert sniff(head) == kind
