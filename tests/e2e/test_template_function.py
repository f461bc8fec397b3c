"""A user's journey with python3-llm, from ``faas-cli new`` to HTTP, minus Docker.

- A user replaces ``handler.py`` with their own python3-http style code (no model):
  the shrinkwrapped build context runs behind fwatchdog and answers, streaming too.
- The default function's own ``handler_test.py`` passes the way the image's test
  stage runs it (``function/__init__.py`` created, pytest from ``function/``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

ECHO_HANDLER = """
import json


def handle(event, context):
    if event.path == "/count":
        n = int(event.query.get("n", "3"))
        return ({"i": i} for i in range(n))
    return {
        "statusCode": 200,
        "headers": {"X-Echo": "yes"},
        "body": {"method": event.method, "body": event.body.decode(), "host": context.hostname},
    }
"""


def fetch(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers=headers or {})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return resp.status, resp.headers, resp.read()


@pytest.mark.timeout(120)
def test_a_custom_handler_serves_behind_fwatchdog(faas_cli: Any, function_factory: Any) -> None:
    faas_cli.template_pull(REPO)
    handler = faas_cli.new("echo", "python3-llm")
    (handler / "handler.py").write_text(ECHO_HANDLER)
    context = faas_cli.shrinkwrap()["echo"]
    fn = function_factory(context, {"HOSTNAME": "echo-1"})
    try:
        status, headers, body = fetch(fn.url + "/anything", b"hello")
        assert status == 200 and headers["X-Echo"] == "yes"
        assert json.loads(body) == {"method": "POST", "body": "hello", "host": "echo-1"}
        status, headers, body = fetch(
            fn.url + "/count?n=3", headers={"Accept": "text/event-stream"}
        )
        assert headers["Content-Type"] == "text/event-stream"
        assert body == b'data: {"i": 0}\n\ndata: {"i": 1}\n\ndata: {"i": 2}\n\n'
        assert "function_loaded" in fn.log()
    finally:
        assert fn.stop() == 0


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_the_default_functions_own_tests_pass_as_in_the_image(
    default_function_context: Path, converted_model: Path
) -> None:
    function = default_function_context / "function"
    (function / "__init__.py").touch()  # as the Dockerfile does before tox runs
    env = {
        **os.environ,
        "MODEL_PATH": str(converted_model),
        "HF_HUB_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "handler_test.py"],
        cwd=function,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
