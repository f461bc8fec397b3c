"""SerializingMode in-process, behind a one-route aiohttp app, with real children."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import shlex
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from fwatchdog.config import from_env
from fwatchdog.modes.base import ModeContext
from fwatchdog.modes.serializing import SerializingMode
from tests.conftest import alive, async_wait_until

PY = shlex.quote(sys.executable)
BASE_ENV = {"PATH": "/usr/bin:/bin"}
DURATION = re.compile(r"^\d+\.\d{6}$")  # Go's %f


@contextlib.asynccontextmanager
async def served(env: Mapping[str, str]) -> AsyncIterator[tuple[TestClient, io.StringIO]]:
    stderr = io.StringIO()
    ctx = ModeContext(config=from_env({"mode": "serializing", **env}),
                      log=logging.getLogger("test.serializing"), stdout=io.StringIO(),
                      stderr=stderr)
    mode = SerializingMode(ctx, base_env=BASE_ENV)
    app = web.Application()

    async def route(request: web.Request) -> web.StreamResponse:
        return await mode.handle(request)

    app.router.add_route("*", "/{tail:.*}", route)
    await mode.start()
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, stderr
    finally:
        await client.close()
        await mode.stop()
        assert ctx.children == set()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return asyncio.run if request.param == "asyncio" else uvloop.run


def test_success_is_200_with_duration_and_content_type(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with served({"fprocess": "cat", "content_type": "application/json"}) as (c, _):
            resp = await c.post("/", data=b'{"a": 1}')
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/json"
            assert DURATION.match(resp.headers["X-Duration-Seconds"])
            assert resp.headers["Content-Length"] == "8"
            assert await resp.read() == b'{"a": 1}'

    run(main())


def test_body_over_one_mebibyte_without_a_limit(run) -> None:  # type: ignore[no-untyped-def]
    payload = b"0123456789abcdef" * 200_000  # 3.2 MB: past aiohttp's default client_max_size

    async def main() -> None:
        async with served({"fprocess": "cat"}) as (c, _):
            resp = await c.post("/", data=payload)
            assert resp.status == 200
            assert await resp.read() == payload

    run(main())


def test_failure_is_500_with_the_exit_status(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with served({"fprocess": "sh -c 'echo out; echo why >&2; exit 3'"}) as (c, err):
            resp = await c.post("/", data=b"x")
            assert resp.status == 500
            assert await resp.text() == "exit status 3"  # of-watchdog's exact body
            assert DURATION.match(resp.headers["X-Duration-Seconds"])
            await async_wait_until(lambda: "why" in err.getvalue(), what="stderr forwarded")

    run(main())


def test_cannot_start_is_500(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with served({"fprocess": "/nonexistent/fn"}) as (c, _):
            resp = await c.post("/", data=b"x")
            assert resp.status == 500
            assert "/nonexistent/fn" in await resp.text()

    run(main())


def test_timeout_is_500_and_kills_the_group(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pidfile = tmp_path / "pid"

    async def main() -> None:
        fn = f"sh -c 'sleep 300 & echo $! > {pidfile}; wait'"
        async with served({"fprocess": fn, "exec_timeout": "500ms"}) as (c, _):
            started = time.monotonic()
            resp = await c.post("/", data=b"x")
            assert resp.status == 500
            assert "exec_timeout of 500ms exceeded" in await resp.text()
            assert time.monotonic() - started < 5
            grandchild = int(pidfile.read_text())
            await async_wait_until(lambda: not alive(grandchild), what="grandchild killed")

    run(main())


def test_x_timeout_shortens(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with served({"fprocess": "sleep 300", "exec_timeout": "0"}) as (c, _):
            resp = await c.post("/", data=b"", headers={"X-Timeout": "200ms"})
            assert resp.status == 500
            assert "200ms" in await resp.text()

    run(main())


@pytest.mark.parametrize("declared", [True, False])
def test_max_body_size_is_413(run, declared: bool) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with served({"fprocess": "cat", "max_body_size": "10"}) as (c, _):
            ok = await c.post("/", data=b"0123456789")
            assert ok.status == 200

            async def chunked() -> AsyncIterator[bytes]:
                yield b"01234"
                yield b"567890"

            resp = await c.post("/", data=b"0123456789X" if declared else chunked())
            assert resp.status == 413
            assert "max_body_size" in await resp.text()

    run(main())


def test_environment_mapping(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fn = tmp_path / "fn.py"
    fn.write_text("import json, os, sys; sys.stdin.read(); print(json.dumps(dict(os.environ)))")

    async def main() -> None:
        async with served({"fprocess": f"{PY} {shlex.quote(str(fn))}"}) as (c, _):
            resp = await c.patch("/p?q=1", data=b"x", headers={"X-Call-Id": "7"})
            env = json.loads(await resp.read())
            assert (env["Http_Method"], env["Http_Path"], env["Http_Query"]) == ("PATCH", "/p",
                                                                                 "q=1")
            assert env["Http_X_Call_Id"] == "7"

    run(main())


def test_child_that_never_reads_stdin(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with served({"fprocess": "sh -c 'exec 0<&-; echo fine'"}) as (c, _):
            resp = await c.post("/", data=b"z" * (2 * 1024 * 1024))
            assert resp.status == 200
            assert await resp.read() == b"fine\n"

    run(main())
