"""http mode: strict parsing of the function's responses and one relay for both fronts.

A raw upstream (``relay_helpers.RAW_UPSTREAM``) sends whatever bytes the test
asks for. Each case runs through the lean front (``/x``) and through aiohttp
(``/%78``, which the lean front hands over), and what the client receives is
parsed by a strict parser (llhttp without leniencies). The differential test
holds both fronts to the same client-visible result; the property test lets
hypothesis write the function's responses.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import free_port, http_status
from tests.contract.relay_helpers import PATHS, Seen, assert_well_formed, exchange, raw_env

OK = b"HTTP/1.1 200 OK\r\n"
BAD = 502

# (name, method, upstream bytes, expected status, expected body or None when not checked)
CORPUS: list[tuple[str, str, bytes, int, bytes | None]] = [
    ("plain", "GET", OK + b"Content-Length: 3\r\nX-A: 1\r\n\r\nabc", 200, b"abc"),
    ("bare-lf-in-a-header-line", "GET",
     OK + b"X-A: a\nX-Injected: yes\r\nContent-Length: 2\r\n\r\nok", 200, b"ok"),
    ("bare-lf-head", "GET", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", 200, b"ok"),
    ("bare-cr-in-a-value", "GET", OK + b"X-A: a\rX-B: b\r\nContent-Length: 2\r\n\r\nok", BAD, None),
    ("nul-in-a-value", "GET", OK + b"X-A: a\x00b\r\nContent-Length: 2\r\n\r\nok", BAD, None),
    ("del-in-a-value", "GET", OK + b"X-A: a\x7fb\r\nContent-Length: 2\r\n\r\nok", BAD, None),
    ("obs-fold", "GET", OK + b"X-A: a\r\n folded\r\nContent-Length: 2\r\n\r\nok", BAD, None),
    ("space-before-colon", "GET", OK + b"X-A : a\r\nContent-Length: 2\r\n\r\nok", BAD, None),
    ("chunked-and-length", "GET",
     OK + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
     BAD, None),
    ("length-and-chunked", "GET",
     OK + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
     BAD, None),
    ("two-lengths", "GET", OK + b"Content-Length: 3\r\nContent-Length: 5\r\n\r\nabcde", BAD, None),
    ("same-length-twice", "GET", OK + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
     BAD, None),
    ("length-list", "GET", OK + b"Content-Length: 3, 3\r\n\r\nabc", BAD, None),
    ("length-plus", "GET", OK + b"Content-Length: +3\r\n\r\nabc", BAD, None),
    ("length-underscore", "GET", OK + b"Content-Length: 0_3\r\n\r\nabc", BAD, None),
    ("length-minus-one", "GET", OK + b"Content-Length: -1\r\n\r\nabc", BAD, None),
    ("length-hex", "GET", OK + b"Content-Length: 0x3\r\n\r\nabc", BAD, None),
    ("length-empty", "GET", OK + b"Content-Length: \r\n\r\nabc", BAD, None),
    ("length-overflow", "GET", OK + b"Content-Length: 99999999999999999999999\r\n\r\n", BAD, None),
    ("length-padded", "GET", OK + b"Content-Length:   3  \r\n\r\nabc", 200, b"abc"),
    ("chunk-size-0x", "GET", OK + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
     BAD, None),
    ("chunk-size-minus", "GET", OK + b"Transfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n",
     BAD, None),
    ("chunk-size-underscore", "GET",
     OK + b"Transfer-Encoding: chunked\r\n\r\n1_0\r\n0123456789abcdef\r\n0\r\n\r\n", BAD, None),
    ("chunk-data-overrun", "GET", OK + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n",
     BAD, None),
    ("chunked-with-extension-and-trailer", "GET",
     OK + b"Transfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n", 200, b"abc"),
    ("te-gzip", "GET", OK + b"Transfer-Encoding: gzip\r\n\r\nabc", BAD, None),
    ("te-gzip-chunked", "GET",
     OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", BAD, None),
    ("te-twice", "GET",
     OK + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
     BAD, None),
    ("http2-status-line", "GET", b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok", BAD, None),
    ("two-digit-status", "GET", b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok", BAD, None),
    ("not-http", "GET", b"NOT HTTP AT ALL\r\n\r\n", BAD, None),
    ("switching-protocols", "GET",
     b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nxx", BAD, None),
    ("not-utf8-value", "GET", OK + b"X-A: caf\xe9\r\nContent-Length: 2\r\n\r\nok", BAD, None),
    ("utf8-value", "GET", OK + "X-A: café\r\n".encode() + b"Content-Length: 2\r\n\r\nok",
     200, b"ok"),
    ("tab-in-value", "GET", OK + b"X-A: a\tb\r\nContent-Length: 2\r\n\r\nok", 200, b"ok"),
    ("interim-103", "GET",
     b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK + b"Content-Length: 2\r\n\r\nok",
     200, b"ok"),
    ("no-content-with-length", "GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
     204, b""),
    ("not-modified-with-length", "GET",
     b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", 304, b""),
    ("http10-until-eof", "GET", b"HTTP/1.0 200 OK\r\nX-A: 1\r\n\r\nall of it", 200, b"all of it"),
    ("over-sent", "GET", OK + b"Content-Length: 2\r\n\r\nokEXTRA", 200, b"ok"),
    ("second-response-smuggled", "GET",
     OK + b"Content-Length: 2\r\n\r\nok" + OK + b"Content-Length: 5\r\n\r\nPWNED", 200, b"ok"),
    ("short-body", "GET", OK + b"Content-Length: 10\r\n\r\nabc", BAD, None),
    ("reason-not-ascii", "GET", "HTTP/1.1 200 Café\r\n".encode() + b"Content-Length: 2\r\n\r\nok",
     200, b"ok"),
    ("reason-empty", "GET", b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok", 200, b"ok"),
    ("no-reason", "GET", b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", 200, b"ok"),
    ("custom-status", "GET", b"HTTP/1.1 599 Custom\r\nContent-Length: 2\r\n\r\nok", 599, b"ok"),
    ("hop-by-hop", "GET",
     OK + b"Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n"
     b"Upgrade: x\r\nTrailer: X-T\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nok", 200, b"ok"),
    ("set-cookie-twice", "GET",
     OK + b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 2\r\n\r\nok", 200, b"ok"),
    ("head-with-length", "HEAD", OK + b"Content-Length: 5\r\n\r\n", 200, b""),
    ("head-over-sent", "HEAD", OK + b"Content-Length: 5\r\n\r\nhello", 200, b""),
    ("head-malformed", "HEAD", OK + b"Content-Length: -1\r\n\r\n", BAD, b""),
]

EXPECTED_REASON = {"reason-not-ascii": b"OK", "reason-empty": b"OK", "no-reason": b"OK",
                   "custom-status": b"Custom"}


@pytest.fixture
def raw_watchdog(watchdog_factory, tmp_path):
    wd = watchdog_factory(raw_env(tmp_path, free_port()))
    wd.wait_ready()
    return wd


def _check_case(name: str, seen: Seen, status: int, body: bytes | None) -> None:
    assert_well_formed(seen)
    assert seen.status == status, (name, seen)
    if status == BAD:
        assert seen.header("X-OpenFaaS-Internal") == b"of-watchdog", seen
    if body is not None:
        assert seen.body == body and seen.complete, (name, seen)
    assert seen.reason == EXPECTED_REASON.get(name, seen.reason)


@pytest.mark.parametrize("front", sorted(PATHS))
def test_corpus_on_each_front(raw_watchdog, front):
    """Every case of the corpus, on one front: status, body and a well-formed head."""
    for name, method, raw, status, body in CORPUS:
        seen = exchange(raw_watchdog.port, method, PATHS[front], raw)
        _check_case(name, seen, status, body)
        names = [k.lower() for k, _ in seen.headers]
        if name == "bare-lf-in-a-header-line":
            assert seen.header("X-A") == b"a" and seen.header("X-Injected") == b"yes"
        if name == "hop-by-hop":
            assert b"x-secret" not in names and b"keep-alive" not in names
            assert b"upgrade" not in names and b"trailer" not in names
            assert seen.header("X-Kept") == b"k"
        if name == "set-cookie-twice":
            assert [v for k, v in seen.headers if k.lower() == b"set-cookie"] == [b"a=1", b"b=2"]
        if name in ("no-content-with-length", "not-modified-with-length"):
            assert b"content-length" not in names
        if name in ("head-with-length", "head-over-sent"):
            assert seen.header("Content-Length") == b"5"
        if name == "utf8-value":
            assert seen.header("X-A") == "café".encode()
        if name == "interim-103":
            assert b"link" not in names
        if name == "chunked-with-extension-and-trailer":
            assert b"x-t" not in names
    assert http_status(raw_watchdog.url + "/_/health") == 200


def test_both_fronts_give_the_same_answer_to_the_same_bytes(raw_watchdog):
    """The differential test: one corpus, two fronts, one client-visible result."""
    differences = []
    for name, method, raw, _, _ in CORPUS:
        lean = exchange(raw_watchdog.port, method, PATHS["lean"], raw)
        other = exchange(raw_watchdog.port, method, PATHS["aiohttp"], raw)
        if lean.comparable() != other.comparable():
            differences.append((name, lean.comparable(), other.comparable()))
    assert not differences, "\n".join(f"{d[0]}:\n  lean    {d[1]}\n  aiohttp {d[2]}"
                                       for d in differences)


# -- generated responses -------------------------------------------------------

_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
                 min_size=1, max_size=12)
_ANY_BYTES = st.binary(max_size=24)
_VALUE = st.one_of(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
                           max_size=16).map(lambda t: t.encode()), _ANY_BYTES)
_NUMBER = st.one_of(st.integers(0, 40).map(lambda n: str(n).encode()),
                    st.sampled_from([b"+3", b"-1", b"0x3", b"3, 3", b"", b" 3 ", b"1_0",
                                     b"99999999999999999999999"]))


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    """A response as a function might send it: mostly sane, sometimes hostile."""
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1",
                                    b"HTTP/1.1"]))
    status = draw(st.sampled_from([b"200", b"201", b"204", b"304", b"404", b"500", b"103",
                                   b"101", b"599", b"20", b"abc"]))
    reason = draw(st.sampled_from([b"OK", b"", b"Caf\xc3\xa9", b"Weird Reason", b"x\x00y"]))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    lines = [version + b" " + status + (b" " + reason if reason else b"")]
    body = draw(st.binary(max_size=64))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(b"Content-Length: " + draw(_NUMBER))
        elif kind == 1:
            lines.append(b"Transfer-Encoding: " + draw(st.sampled_from(
                [b"chunked", b"gzip", b"gzip, chunked", b"Chunked", b"identity"])))
        elif kind == 2:
            lines.append(draw(_TOKEN).encode() + b": " + draw(_VALUE))
        elif kind == 3:
            lines.append(b" folded")
        elif kind == 4:
            lines.append(b"Connection: " + draw(st.sampled_from([b"close", b"keep-alive",
                                                                 b"X-A"])))
        else:
            lines.append(draw(_TOKEN).encode() + b": " + draw(_TOKEN).encode())
    framing = draw(st.sampled_from(["length", "chunked", "none", "as-is"]))
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        sizes = draw(st.sampled_from([b"%x", b"%X", b"0x%x", b"%x;ext=1", b"%x "]))
        payload = (sizes % len(body) + b"\r\n" + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        payload = body
    extra = draw(st.sampled_from([b"", b"", b"EXTRA", b"HTTP/1.1 200 OK\r\n\r\n"]))
    return eol.join(lines) + eol + eol + payload + extra


def _check_generated(seen: Seen) -> None:
    assert_well_formed(seen)
    if seen.status == BAD and seen.header("X-OpenFaaS-Internal") == b"of-watchdog":
        return
    if not seen.complete:
        return  # a visibly cut stream: the head went out before the framing broke
    length = seen.header("Content-Length")
    if length is not None and seen.status not in (204, 304):
        assert int(length) == len(seen.body), seen
    assert 200 <= seen.status <= 999, seen


@pytest.mark.parametrize("front", sorted(PATHS))
def test_whatever_the_function_sends_the_client_gets_a_well_formed_answer(
        watchdog_factory, tmp_path, front):
    wd = watchdog_factory(raw_env(tmp_path, free_port()))
    wd.wait_ready()

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(responses())
    def check(raw: bytes) -> None:
        _check_generated(exchange(wd.port, "GET", PATHS[front], raw))

    check()
    assert http_status(wd.url + "/_/health") == 200
    assert wd.proc.poll() is None
