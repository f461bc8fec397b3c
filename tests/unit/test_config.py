"""The configuration table: every variable, its aliases, defaults and bad values."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwatchdog.config import (
    DEFAULT_CONTENT_TYPE,
    DEFAULT_LOG_BUFFER_SIZE,
    DEFAULT_STATIC_PATH,
    NO_IDLE_LIMIT,
    ConfigError,
    Mode,
    Warmup,
    from_env,
)

BASE = {"fprocess": "cat"}


def cfg(**env: str):
    return from_env({**BASE, **env})


def problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_env(env)
    return info.value.problems


def test_defaults() -> None:
    c = from_env({"fprocess": "cat"})
    assert c.mode is Mode.STREAMING
    assert c.fprocess == ("cat",)
    assert c.upstream_url is None
    assert c.port == 8080
    assert c.metrics_port == 8081
    assert (c.read_timeout, c.write_timeout, c.exec_timeout) == (30.0, 30.0, 30.0)
    assert c.healthcheck_interval == 30.0
    assert c.max_inflight == 0
    assert c.max_body_size == 0
    assert c.prefix_logs is True
    assert c.log_buffer_size == DEFAULT_LOG_BUFFER_SIZE
    assert c.log_callid is False
    assert c.buffer_http is False
    assert c.content_type == DEFAULT_CONTENT_TYPE
    assert c.suppress_lock is False
    assert c.static_path == DEFAULT_STATIC_PATH
    assert c.ready_path == ""
    assert c.tmpdir == "/tmp"
    assert c.lock_path == "/tmp/.lock"
    assert c.knative is False


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        ({"function_process": "python index.py"}, "fprocess", ("python", "index.py")),
        ({"fprocess": "a", "function_process": "b"}, "fprocess", ("b",)),
        # Fix: shell-style quoting instead of splitting on single spaces.
        ({"fprocess": "python -c 'print(1 + 1)'"}, "fprocess", ("python", "-c", "print(1 + 1)")),
        ({"mode": "http", "upstream_url": "http://127.0.0.1:5000"}, "upstream_url",
         "http://127.0.0.1:5000"),
        ({"mode": "http", "upstream_url": "http://a:1", "http_upstream_url": "http://b:2/"},
         "upstream_url", "http://b:2"),
        ({"port": "9000"}, "port", 9000),
        ({"PORT": "9001"}, "port", 9001),
        ({"PORT": "9001", "port": "9002"}, "port", 9002),
        ({"metrics_port": "9100"}, "metrics_port", 9100),
        ({"read_timeout": "5"}, "read_timeout", 5.0),
        ({"write_timeout": "1m30s"}, "write_timeout", 90.0),
        ({"write_timeout": "1m30s"}, "healthcheck_interval", 90.0),
        ({"write_timeout": "10s", "healthcheck_interval": "2s"}, "healthcheck_interval", 2.0),
        ({"exec_timeout": "500ms"}, "exec_timeout", 0.5),
        ({"exec_timeout": "0"}, "exec_timeout", 0.0),
        ({"max_inflight": "3"}, "max_inflight", 3),
        ({"max_body_size": "1048576"}, "max_body_size", 1048576),
        ({"prefix_logs": "false"}, "prefix_logs", False),
        ({"log_buffer_size": "128"}, "log_buffer_size", 128),
        ({"log_callid": "true"}, "log_callid", True),
        ({"log_call_id": "true"}, "log_callid", True),  # Fix: the README's spelling
        ({"buffer_http": "true"}, "buffer_http", True),
        ({"http_buffer_req_body": "true"}, "buffer_http", True),
        ({"buffer_http": "true", "http_buffer_req_body": "false"}, "buffer_http", True),
        ({"buffer_http": "false", "http_buffer_req_body": "1"}, "buffer_http", True),
        ({"prefix_logs": "F"}, "prefix_logs", False),
        ({"suppress_lock": "TRUE"}, "suppress_lock", True),
        ({"content_type": "text/plain"}, "content_type", "text/plain"),
        ({"suppress_lock": "true"}, "suppress_lock", True),
        ({"static_path": "/srv"}, "static_path", "/srv"),
        ({"ready_path": "/ready"}, "ready_path", "/ready"),
        ({"TMPDIR": "/var/tmp"}, "tmpdir", "/var/tmp"),
        ({"K_SERVICE": "fn"}, "knative", True),
        ({"mode": "serializing"}, "mode", Mode.SERIALIZING),
    ],
)
def test_variable(env: dict[str, str], field: str, expected: object) -> None:
    assert getattr(cfg(**env), field) == expected


def test_lock_path_follows_tmpdir() -> None:
    assert cfg(TMPDIR="/var/tmp/").lock_path == "/var/tmp/.lock"


def test_static_mode_needs_no_fprocess() -> None:
    assert from_env({"mode": "static"}).fprocess == ()


def test_llm_mode_needs_no_fprocess_and_has_its_defaults() -> None:
    config = from_env({"mode": "llm"})
    assert config.mode is Mode.LLM and config.fprocess == ()
    assert config.function_dir == "/home/app/function"
    assert config.template_dir == "/home/app/.fwatchdog/template"
    assert (config.llm_handlers, config.llm_spares, config.llm_max_requests,
            config.llm_max_requests_jitter, config.llm_gpu_idle_timeout) == (1, 1, 0, 0, 0.0)
    assert config.llm_warmup is Warmup.AUTO and config.llm_device == "auto"


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        ({"function_dir": "/srv/fn"}, "function_dir", "/srv/fn"),
        ({"template_dir": "/srv/t"}, "template_dir", "/srv/t"),
        ({"llm_handlers": "4"}, "llm_handlers", 4),
        ({"llm_spares": "0"}, "llm_spares", 0),
        ({"llm_max_requests": "1"}, "llm_max_requests", 1),
        ({"llm_max_requests_jitter": "10"}, "llm_max_requests_jitter", 10),
        ({"llm_gpu_idle_timeout": "90s"}, "llm_gpu_idle_timeout", 90.0),
        ({"llm_gpu_idle_timeout": "2"}, "llm_gpu_idle_timeout", 2.0),
        ({"llm_warmup": "full"}, "llm_warmup", Warmup.FULL),
        ({"llm_device": "cuda:1"}, "llm_device", "cuda:1"),
        ({}, "llm_template_verify", "full"),
        ({"llm_template_verify": "quick"}, "llm_template_verify", "quick"),
    ],
)
def test_llm_variable(env: dict[str, str], field: str, expected: object) -> None:
    assert getattr(from_env({"mode": "llm", **env}), field) == expected


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"fprocess": "cat", "mode": "grpc"}, "mode='grpc': unknown mode"),
        ({"mode": "llm", "llm_handlers": "0"}, "llm_handlers='0': must be between 1 and 64"),
        ({"mode": "llm", "llm_spares": "-1"}, "llm_spares='-1'"),
        ({"mode": "llm", "llm_max_requests": "one"}, "llm_max_requests='one': expected a whole"),
        ({"mode": "llm", "llm_max_requests_jitter": "-2"}, "llm_max_requests_jitter='-2'"),
        ({"mode": "llm", "llm_gpu_idle_timeout": "soon"}, "llm_gpu_idle_timeout='soon'"),
        ({"mode": "llm", "llm_warmup": "always"}, "llm_warmup='always': expected one of"),
        ({"mode": "llm", "llm_device": "tpu"}, "llm_device='tpu': expected auto, cpu"),
        ({"mode": "llm", "llm_template_verify": "none"},
         "llm_template_verify='none': expected full or quick"),
        ({"mode": "llm", "function_dir": "function"}, "function_dir='function': must be an abs"),
        ({"mode": "llm", "template_dir": "./t"}, "template_dir='./t': must be an absolute"),
        ({}, "fprocess: required"),
        ({"fprocess": "  "}, "fprocess: required"),
        ({"fprocess": "python -c 'unclosed"}, "cannot split"),
        ({"fprocess": "x", "mode": "http"}, "upstream_url: required"),
        ({"fprocess": "x", "mode": "http", "upstream_url": "localhost:5000"}, "expected an http://"),
        ({"fprocess": "x", "mode": "http", "upstream_url": "http://127.0.0.1:8080"},
         "points at the watchdog's own port 8080"),
        ({"fprocess": "x", "mode": "http", "upstream_url": "http://localhost", "port": "80"},
         "points at the watchdog's own port 80"),
        ({"fprocess": "x", "mode": "http", "upstream_url": "http://127.0.0.1:99999"},
         "upstream_url='http://127.0.0.1:99999': Port out of range"),
        ({"fprocess": "x", "mode": "http", "upstream_url": "http://127.0.0.1:abc"},
         "upstream_url='http://127.0.0.1:abc'"),
        ({"fprocess": "x", "port": "http"}, "port='http': expected a whole number"),
        ({"fprocess": "x", "port": "0"}, "port='0': must be between 1 and 65535"),
        ({"fprocess": "x", "PORT": "70000"}, "PORT='70000'"),
        ({"fprocess": "x", "port": "8081"}, "must differ"),
        ({"fprocess": "x", "read_timeout": "soon"}, "read_timeout='soon': invalid duration"),
        ({"fprocess": "x", "exec_timeout": "-1s"}, "exec_timeout='-1s': negative"),
        ({"fprocess": "x", "write_timeout": "0"}, "write_timeout=0: must be greater than zero"),
        ({"fprocess": "x", "write_timeout": "0s"}, "write_timeout=0"),
        ({"fprocess": "x", "max_inflight": "-1"}, "max_inflight='-1': must be >= 0"),
        ({"fprocess": "x", "max_inflight": "many"}, "max_inflight='many'"),
        ({"fprocess": "x", "log_buffer_size": "0"}, "log_buffer_size='0'"),
        ({"fprocess": "x", "prefix_logs": "maybe"}, "prefix_logs='maybe': expected true or false"),
        ({"fprocess": "x", "jwt_auth": "true"}, "jwt_auth=true"),
        ({"fprocess": "x", "ready_path": "ready"}, "ready_path='ready': must start with /"),
    ],
)
def test_bad_value(env: dict[str, str], needle: str) -> None:
    assert any(needle in p for p in problems(env)), problems(env)


def test_every_bad_variable_is_reported_together() -> None:
    found = problems(
        {"mode": "http", "port": "x", "read_timeout": "1y", "max_inflight": "-2",
         "prefix_logs": "nah"}
    )
    joined = "\n".join(found)
    for name in ("fprocess", "upstream_url", "port", "read_timeout", "max_inflight", "prefix_logs"):
        assert name in joined
    assert len(found) == 6


def test_error_message_lists_each_problem_on_its_own_line() -> None:
    with pytest.raises(ConfigError) as info:
        from_env({"port": "x"})
    text = str(info.value)
    assert text.startswith("invalid configuration:")
    assert "\n  - fprocess: required" in text
    assert "\n  - port='x'" in text


def test_empty_values_mean_default() -> None:
    c = cfg(port="", read_timeout="", content_type="", max_inflight="")
    assert (c.port, c.read_timeout, c.content_type, c.max_inflight) == (
        8080, 30.0, DEFAULT_CONTENT_TYPE, 0)


def test_reading_does_not_touch_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("port", "1234")
    assert from_env({"fprocess": "cat"}).port == 8080


NAMES = ["mode", "fprocess", "function_process", "upstream_url", "http_upstream_url", "port",
         "PORT", "metrics_port", "read_timeout", "write_timeout", "exec_timeout",
         "healthcheck_interval", "max_inflight", "max_body_size", "prefix_logs",
         "log_buffer_size", "log_callid", "buffer_http", "content_type", "suppress_lock",
         "static_path", "ready_path", "jwt_auth", "start_timeout", "TMPDIR", "K_SERVICE"]


@given(st.dictionaries(st.sampled_from(NAMES), st.text(max_size=30), max_size=8))
def test_any_environment_gives_a_config_or_a_config_error(env: dict[str, str]) -> None:
    try:
        from_env(env)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


def test_read_timeout_zero_means_no_limit() -> None:
    # Go's http.Server.ReadTimeout, which of-watchdog sets from it: 0 is no timeout.
    c = cfg(read_timeout="0")
    assert c.read_timeout == 0.0
    assert c.read_limit is None
    # aiohttp closes a connection right after its response at keepalive_timeout=0.
    assert c.keepalive_timeout >= NO_IDLE_LIMIT > 24 * 3600
    c = cfg(read_timeout="2s")
    assert (c.read_limit, c.keepalive_timeout) == (2.0, 2.0)
