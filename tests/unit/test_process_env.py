"""The pure parts of fwatchdog.process: the child's environment, timeouts, exit text."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwatchdog.process import (
    UnsafeEnvironment,
    canonical_header_key,
    describe_exit,
    effective_timeout,
    env_name_for_header,
    request_environment,
)

PORTABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("content-type", "Content-Type"),
        ("CONTENT-TYPE", "Content-Type"),
        ("x-call-id", "X-Call-Id"),
        ("X-CALL-ID", "X-Call-Id"),
        ("x_foo", "X_foo"),  # Go only capitalises after '-'
        ("accept", "Accept"),
        ("x--y", "X--Y"),
        ("bad header", "bad header"),  # not a token: Go leaves it as it is
    ],
)
def test_canonical_header_key_matches_go(header: str, expected: str) -> None:
    assert canonical_header_key(header) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("content-type", "Http_Content_Type"),
        ("X-Call-Id", "Http_X_Call_Id"),
        ("x-call-id", "Http_X_Call_Id"),
        ("User-Agent", "Http_User_Agent"),
        ("X.Dotted+Name", "Http_X_dotted_name"),
    ],
)
def test_env_name_for_header(header: str, expected: str) -> None:
    assert env_name_for_header(header) == expected


@settings(deadline=None)  # pure and fast, but the test machine is shared
@given(st.text(min_size=1, max_size=40))
def test_any_header_name_maps_to_a_portable_env_name(name: str) -> None:
    env_name = env_name_for_header(name)
    assert PORTABLE.match(env_name), env_name
    assert env_name.startswith("Http_")
    assert env_name_for_header(name) == env_name  # deterministic


@settings(deadline=None)  # pure and fast, but the test machine is shared
@given(st.text(alphabet=TCHAR, min_size=1, max_size=30))
def test_header_names_differing_only_in_case_map_alike(name: str) -> None:
    assert env_name_for_header(name.lower()) == env_name_for_header(name.upper())


@settings(deadline=None)  # pure and fast, but the test machine is shared
@given(
    st.lists(
        st.tuples(st.text(alphabet=TCHAR, min_size=1, max_size=12),
                  st.text(alphabet=string.printable.replace("\x0b", "").replace("\x0c", ""),
                          max_size=20)),
        max_size=12,
    )
)
def test_first_value_wins_and_is_deterministic(headers: list[tuple[str, str]]) -> None:
    env = request_environment({}, headers, method="GET", path="/", raw_query="")
    assert env == request_environment({}, headers, method="GET", path="/", raw_query="")
    skipped = {"host", "transfer-encoding"}
    chunked = any(n.lower() == "transfer-encoding" and "chunked" in v.lower() for n, v in headers)
    if chunked:
        skipped |= {"content-length", "trailer"}
    expected: dict[str, str] = {}
    for name, value in headers:
        if name.lower() not in skipped:
            expected.setdefault(env_name_for_header(name), value)
    for key, value in expected.items():
        if key not in ("Http_Method", "Http_Path", "Http_Query", "Http_Transfer_Encoding"):
            assert env[key] == value
    assert all(PORTABLE.match(k) for k in env)


def test_request_environment_like_of_watchdog() -> None:
    base = {"PATH": "/bin", "Http_X_Preset": "from-watchdog"}
    headers = [
        ("Host", "example.com"),
        ("Content-Type", "text/plain"),
        ("x-call-id", "abc"),
        ("X-Call-Id", "second"),
        ("X-Preset", "from-client"),
        ("Method", "spoofed"),
    ]
    env = request_environment(base, headers, method="POST", path="/a b", raw_query="x=%20y+z&a")
    assert env["PATH"] == "/bin"
    assert env["Http_Content_Type"] == "text/plain"
    assert env["Http_X_Call_Id"] == "abc"
    assert env["Http_X_Preset"] == "from-client"  # a header overrides the inherited variable
    assert env["Http_Method"] == "POST"  # the request line wins over a header
    assert env["Http_Path"] == "/a b"
    assert env["Http_Query"] == "x=%20y+z&a"  # raw, as Go's RawQuery
    assert "Http_Host" not in env  # Go moves Host out of the header map
    assert "Http_Transfer_Encoding" not in env


def test_no_query_means_no_http_query() -> None:
    env = request_environment({}, [], method="GET", path="/", raw_query="")
    assert "Http_Query" not in env
    assert env["Http_Path"] == "/"


def test_chunked_request_exports_transfer_encoding_not_content_length() -> None:
    headers = [("Transfer-Encoding", "chunked"), ("Content-Length", "5"), ("Trailer", "X")]
    env = request_environment({}, headers, method="POST", path="/", raw_query="")
    assert env["Http_Transfer_Encoding"] == "chunked"
    assert "Http_Content_Length" not in env
    assert "Http_Trailer" not in env


def test_content_length_exported_when_not_chunked() -> None:
    env = request_environment({}, [("Content-Length", "5")], method="POST", path="/",
                              raw_query="")
    assert env["Http_Content_Length"] == "5"


@pytest.mark.parametrize("where", ["header", "path", "query"])
def test_nul_bytes_are_refused(where: str) -> None:
    headers = [("X-A", "a\x00b")] if where == "header" else []
    with pytest.raises(UnsafeEnvironment):
        request_environment({}, headers, method="GET",
                            path="/\x00" if where == "path" else "/",
                            raw_query="a=\x00" if where == "query" else "")


@pytest.mark.parametrize(
    ("exec_timeout", "header", "expected"),
    [
        (10.0, None, 10.0),
        (10.0, "", 10.0),
        (10.0, "2s", 2.0),
        (10.0, "500ms", 0.5),
        (10.0, "3", 3.0),
        (10.0, "1m", 10.0),  # may only shorten
        (10.0, "nonsense", 10.0),
        (10.0, "0", 10.0),
        (10.0, "-1s", 10.0),
        (0.0, "2s", 2.0),  # any limit is shorter than none
        (0.0, None, 0.0),
    ],
)
def test_effective_timeout(exec_timeout: float, header: str | None, expected: float) -> None:
    assert effective_timeout(exec_timeout, header) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("returncode", "text"),
    [(0, "exit status 0"), (3, "exit status 3"), (-9, "signal: killed"),
     (-15, "signal: terminated"), (-11, "signal: segmentation fault")],
)
def test_describe_exit_uses_go_wording(returncode: int, text: str) -> None:
    assert describe_exit(returncode) == text
