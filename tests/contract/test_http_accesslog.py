"""The access log line (docs/contract.md, endpoints): format, call id, kube-probe."""

from __future__ import annotations

import re

from tests.conftest import fetch

LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (\S+) (\S+) - (\d{3} [^-]*?) - "
                  r"ContentLength: (\S+) \((\d+\.\d{4})s\)(?: \[(.*)\])?$")


def _lines(wd) -> list[re.Match[str]]:
    return [m for m in (LINE.match(line.rstrip("\n")) for line in wd.output) if m]


def test_access_line_format(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    fetch(wd.url + "/status/201?a=1", "POST", body=b"x")
    wd.wait_output("/status/201?a=1")
    (match,) = [m for m in _lines(wd) if m.group(2) == "/status/201?a=1"]
    assert match.group(1) == "POST"
    assert match.group(3) == "201 Created"
    assert match.group(4) == "6B"  # "status", go-units HumanSize
    assert match.group(6) is None


def test_kube_probe_requests_are_not_logged(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    fetch(wd.url + "/echo?probe=1", headers={"User-Agent": "kube-probe/1.29"})
    fetch(wd.url + "/echo?after=1")
    wd.wait_output("/echo?after=1")
    assert "/echo?probe=1" not in wd.text()


def test_call_id_is_appended_with_log_callid(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(log_callid="true"))
    wd.wait_ready()
    fetch(wd.url + "/echo?with=1", headers={"X-Call-Id": "abc-123"})
    fetch(wd.url + "/echo?without=1")
    wd.wait_output("/echo?without=1")
    ids = {m.group(2): m.group(6) for m in _lines(wd)}
    assert ids["/echo?with=1"] == "abc-123"
    assert ids["/echo?without=1"] == "none"


def test_log_call_id_spelling_is_accepted(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(log_call_id="true"))
    wd.wait_ready()
    fetch(wd.url + "/echo?x=1", headers={"X-Call-Id": "zz"})
    wd.wait_output("[zz]")
