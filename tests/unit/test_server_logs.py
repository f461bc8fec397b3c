"""Structured log lines."""

from __future__ import annotations

import io

from fwatchdog.logs import kv, setup


def test_kv_quotes_only_when_needed():
    assert kv("serving", port=8080) == "event=serving port=8080"
    assert kv("x", cmd="python app.py", empty="", eq="a=b") == (
        'event=x cmd="python app.py" empty="" eq="a=b"')
    assert kv("x", q='say "hi"\n') == 'event=x q="say \\"hi\\"\\n"'


def test_setup_writes_go_style_timestamps():
    stream = io.StringIO()
    log = setup(stream, name="fwatchdog-test-logs")
    log.info(kv("hello"))
    line = stream.getvalue()
    date, clock, rest = line.split(" ", 2)
    assert len(date) == 10 and date[4] == "/" and date[7] == "/"
    assert len(clock) == 8 and rest == "event=hello\n"
