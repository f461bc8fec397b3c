"""Duration parsing: a table of examples and properties over generated input."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwatchdog.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0), ("0", 0.0), ("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5),
        ("1h", 3600.0), ("1.5h", 5400.0), ("2h45m", 9900.0), ("100us", 1e-4),
        ("100µs", 1e-4), ("7ns", 7e-9), (" 10s ", 10.0), ("+5s", 5.0), (".5s", 0.5),
        ("1m0.5s", 60.5), ("007", 7.0),
    ],
)
def test_examples(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "s", "10x", "1m30", "-1s", "-5", "1.2.3s", "ten", "5 s", "1e3s", "inf", "nan", "0x10"],
)
def test_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@given(st.integers(min_value=0, max_value=10**9))
def test_bare_integers_are_seconds(n: int) -> None:
    assert parse_duration(str(n)) == n


@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(sorted(UNITS))), min_size=1,
                max_size=5))
def test_parts_add_up(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{u}" for n, u in parts)
    expected = sum(n * UNITS[u] for n, u in parts)
    assert parse_duration(text) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(st.text(max_size=12))
def test_never_fails_except_with_value_error(text: str) -> None:
    try:
        value = parse_duration(text)
    except ValueError:
        return
    assert value >= 0 and math.isfinite(value)


@given(st.integers(min_value=0, max_value=10**7).map(lambda ms: ms / 1000))
def test_format_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-9)
