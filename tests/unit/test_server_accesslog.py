"""The access-log line and its size rendering (go-units HumanSize)."""

from __future__ import annotations

import pytest

from fwatchdog.accesslog import format_line, human_size, should_log, status_text


@pytest.mark.parametrize(("size", "text"), [
    (0, "0B"), (13, "13B"), (999, "999B"), (1000, "1kB"), (1500, "1.5kB"),
    (123456, "123.5kB"), (1_000_000, "1MB"), (-1, "-1B"), (5 * 10**12, "5TB"),
])
def test_human_size_matches_go_units(size, text):
    assert human_size(size) == text


def test_status_text_uses_the_reason_phrase():
    assert status_text(200) == "200 OK"
    assert status_text(429) == "429 Too Many Requests"
    assert status_text(200, "Fine") == "200 Fine"
    assert status_text(599) == "599"


def test_line_format_with_and_without_call_id():
    assert format_line("GET", "/a?b=1", 200, "OK", 13, 0.01234) == (
        "GET /a?b=1 - 200 OK - ContentLength: 13B (0.0123s)")
    assert format_line("POST", "/", 500, None, -1, 1.5, "id-1", with_call_id=True) == (
        "POST / - 500 Internal Server Error - ContentLength: -1B (1.5000s) [id-1]")
    assert format_line("GET", "/", 200, "OK", 0, 0, None, with_call_id=True).endswith("[none]")


def test_kube_probe_user_agents_are_not_logged():
    assert not should_log("kube-probe/1.29")
    assert should_log("curl/8.0") and should_log(None) and should_log("")
