"""StreamingMode in-process, behind a one-route aiohttp app, with real children."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import shlex
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from fwatchdog.config import from_env
from fwatchdog.modes.base import BODY_BYTES_KEY, ModeContext
from fwatchdog.modes.streaming import StreamingMode
from tests.conftest import alive, async_wait_until

PY = shlex.quote(sys.executable)
BASE_ENV = {"PATH": "/usr/bin:/bin", "FROM_WATCHDOG": "yes"}


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fn.py"
    path.write_text(body)
    return f"{PY} {shlex.quote(str(path))}"


@contextlib.asynccontextmanager
async def served(env: Mapping[str, str]) -> AsyncIterator[tuple[TestClient, StreamingMode, io.StringIO]]:  # noqa: E501
    stderr = io.StringIO()
    ctx = ModeContext(config=from_env({"mode": "streaming", **env}),
                      log=logging.getLogger("test.streaming"), stdout=io.StringIO(), stderr=stderr)
    mode = StreamingMode(ctx, base_env=BASE_ENV)
    app = web.Application()

    async def route(request: web.Request) -> web.StreamResponse:
        return await mode.handle(request)

    app.router.add_route("*", "/{tail:.*}", route)
    await mode.start()
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        yield client, mode, stderr
    finally:
        await client.close()
        await mode.stop()
        assert ctx.children == set()  # every pid handed back to the reaper's care


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return asyncio.run if request.param == "asyncio" else uvloop.run


def test_body_echo_with_content_type(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with served({"fprocess": "cat", "content_type": "text/plain"}) as (client, _, _e):
            resp = await client.post("/", data=b"hello world")
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/plain"
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            assert await resp.read() == b"hello world"

    run(main())


def test_large_body_streams_through(run) -> None:  # type: ignore[no-untyped-def]
    payload = bytes(range(256)) * 20000  # 5 MB: more than any pipe or buffer holds

    async def main() -> None:
        async with served({"fprocess": "cat"}) as (client, _, _e):
            resp = await client.post("/", data=payload)
            assert resp.status == 200
            assert await resp.read() == payload

    run(main())


def test_environment_mapping(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fn = script(tmp_path, "import json, os; print(json.dumps(dict(os.environ)))")

    async def main() -> None:
        async with served({"fprocess": fn}) as (client, _, _e):
            resp = await client.post("/some/path?a=1&b=%20c", data=b"x",
                                     headers={"X-Call-Id": "id-1", "Content-Type": "text/csv"})
            env = json.loads(await resp.read())
            assert env["Http_Method"] == "POST"
            assert env["Http_Path"] == "/some/path"
            assert env["Http_Query"] == "a=1&b=%20c"
            assert env["Http_X_Call_Id"] == "id-1"
            assert env["Http_Content_Type"] == "text/csv"
            assert env["Http_Content_Length"] == "1"
            assert env["FROM_WATCHDOG"] == "yes"
            assert "Http_Transfer_Encoding" not in env

            async def chunks() -> AsyncIterator[bytes]:
                yield b"a"

            resp = await client.put("/", data=chunks())
            env = json.loads(await resp.read())
            assert env["Http_Transfer_Encoding"] == "chunked"
            assert env["Http_Method"] == "PUT"
            assert "Http_Query" not in env

    run(main())


def test_first_chunk_arrives_before_the_child_ends(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    go = tmp_path / "go"
    fn = script(tmp_path, f"""
import os, sys, time
sys.stdout.write("first\\n"); sys.stdout.flush()
while not os.path.exists({str(go)!r}):
    time.sleep(0.01)
sys.stdout.write("second\\n")
""")

    async def main() -> None:
        async with served({"fprocess": fn}) as (client, _, _e):
            resp = await client.get("/")
            assert resp.status == 200
            first = await asyncio.wait_for(resp.content.readline(), 10)
            assert first == b"first\n"
            go.touch()
            assert await asyncio.wait_for(resp.content.read(), 10) == b"second\n"

    run(main())


def test_failure_before_output_is_500(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with served({"fprocess": "sh -c 'echo oops >&2; exit 3'"}) as (client, _, err):
            resp = await client.get("/")
            assert resp.status == 500
            assert "exit status 3" in await resp.text()
            await async_wait_until(lambda: "oops" in err.getvalue(), what="stderr forwarded")

    run(main())


def test_exec_failure_is_500(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with served({"fprocess": "/nonexistent/fn"}) as (client, _, _e):
            resp = await client.get("/")
            assert resp.status == 500
            assert "/nonexistent/fn" in await resp.text()

    run(main())


def test_clean_exit_without_output_is_empty_200(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with served({"fprocess": "true", "content_type": "text/x-y"}) as (client, _, _e):
            resp = await client.get("/")
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/x-y"
            assert await resp.read() == b""

    run(main())


def test_failure_after_output_aborts_the_stream(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with served({"fprocess": "sh -c 'echo partial; exit 4'"}) as (client, _, _e):
            resp = await client.get("/")
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()

    run(main())


def test_timeout_before_output_kills_the_group_and_is_500(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pidfile = tmp_path / "pid"

    async def main() -> None:
        fn = f"sh -c 'sleep 300 & echo $! > {pidfile}; wait'"
        async with served({"fprocess": fn, "exec_timeout": "500ms"}) as (client, _, _e):
            started = time.monotonic()
            resp = await client.get("/")
            assert resp.status == 500
            assert "exec_timeout" in await resp.text()
            assert time.monotonic() - started < 5
            grandchild = int(pidfile.read_text())
            await async_wait_until(lambda: not alive(grandchild), what="grandchild killed")

    run(main())


def test_grandchild_holding_stdout_cannot_outlive_the_deadline(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        fn = "sh -c 'echo early; sleep 300 & exit 0'"
        async with served({"fprocess": fn, "exec_timeout": "500ms"}) as (client, _, _e):
            resp = await client.get("/")
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(resp.read(), 10)

    run(main())


def test_x_timeout_shortens_exec_timeout(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with served({"fprocess": "sleep 300", "exec_timeout": "60s"}) as (client, _, _e):
            started = time.monotonic()
            resp = await client.get("/", headers={"X-Timeout": "300ms"})
            assert resp.status == 500
            assert "300ms" in await resp.text()
            assert time.monotonic() - started < 5

    run(main())


def test_client_disconnect_kills_the_child(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pidfile = tmp_path / "pid"

    async def main() -> None:
        fn = f"sh -c 'echo $$ > {pidfile}; exec sleep 300'"
        async with served({"fprocess": fn, "exec_timeout": "0"}) as (client, mode, _e):
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await async_wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(),
                                   what="child")
            pid = int(pidfile.read_text())
            writer.close()
            await async_wait_until(lambda: not alive(pid), what="child killed after disconnect")
            await async_wait_until(lambda: len(mode._children) == 0, what="child reaped")

    run(main())


def test_child_that_never_reads_stdin(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with served({"fprocess": "sh -c 'exec 0<&-; echo fine'"}) as (client, _, _e):
            resp = await client.post("/", data=b"z" * (2 * 1024 * 1024))
            assert resp.status == 200
            assert await resp.read() == b"fine\n"

    run(main())


def test_huge_stderr_line_is_split_and_forwarding_goes_on(run) -> None:  # type: ignore[no-untyped-def]
    fn = f"{PY} -c \"import sys; sys.stderr.write('e' * 300000 + '\\nafter\\n'); print('ok')\""

    async def main() -> None:
        env = {"fprocess": fn, "log_buffer_size": "1000", "prefix_logs": "false"}
        async with served(env) as (client, _, err):
            resp = await client.get("/")
            assert resp.status == 200
            assert await resp.read() == b"ok\n"
            await async_wait_until(lambda: "after\n" in err.getvalue(),
                                   what="stderr after the long line")
            lines = err.getvalue().splitlines()
            assert lines[:300] == ["e" * 1000] * 300
            assert lines[300] == "after"

    run(main())


def test_body_bytes_recorded_for_the_access_log(run) -> None:  # type: ignore[no-untyped-def]
    seen: list[int] = []

    async def main() -> None:
        stderr = io.StringIO()
        ctx = ModeContext(config=from_env({"mode": "streaming", "fprocess": "cat"}),
                          log=logging.getLogger("t"), stdout=io.StringIO(), stderr=stderr)
        mode = StreamingMode(ctx, base_env=BASE_ENV)

        async def route(request: web.Request) -> web.StreamResponse:
            resp = await mode.handle(request)
            seen.append(resp[BODY_BYTES_KEY])
            return resp

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", route)
        async with TestClient(TestServer(app)) as client:
            resp = await client.post("/", data=b"12345")
            assert await resp.read() == b"12345"
        await mode.stop()

    run(main())
    assert seen == [5]


def test_nul_in_path_is_400_not_a_crash(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with served({"fprocess": "cat"}) as (client, _, _e):
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(b"GET /a%00b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert head.startswith(b"HTTP/1.1 400")

    run(main())
