"""The mode=llm wire format: exact bytes, file descriptors, and hostile frames."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwatchdog.llm import wire


def test_a_frame_is_a_big_endian_length_then_compact_sorted_json() -> None:
    assert wire.encode({"op": "fork", "id": 3}) == b'\x00\x00\x00\x14{"id":3,"op":"fork"}'


def test_messages_and_file_descriptors_cross_a_socket() -> None:
    left, right = socket.socketpair()
    read_end, write_end = os.pipe()
    try:
        wire.send(left, {"event": "handle", "info": "x"}, [read_end])
        wire.send(left, {"event": "second"})
        got = wire.recv(right)
        assert got is not None
        message, fds = got
        assert message == {"event": "handle", "info": "x", "fds": 1}
        assert len(fds) == 1
        os.write(write_end, b"through the passed fd")
        assert os.read(fds[0], 64) == b"through the passed fd"
        os.close(fds[0])
        assert wire.recv(right) == ({"event": "second"}, [])
        left.close()
        assert wire.recv(right) is None  # a clean end between frames
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        right.close()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (struct.pack("!I", wire.MAX_FRAME + 1), "larger than"),
        (struct.pack("!I", 4) + b"\xff\xfe{}", "bad frame payload"),
        (struct.pack("!I", 2) + b"[]", "expected a JSON object"),
        (struct.pack("!I", 5) + b"{nope", "bad frame payload"),
        (struct.pack("!I", 10) + b"{}", "inside a frame"),
        (b"\x00\x00", "inside a frame"),
    ],
)
def test_hostile_frames_are_wire_errors(raw: bytes, needle: str) -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(raw)
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(wire.WireError, match=needle):
            wire.recv(right)

    async def read() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        await wire.read_frame(reader)

    with pytest.raises(wire.WireError, match=needle):
        asyncio.run(read())


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(), st.none(),
                                                      st.booleans()), max_size=6))
def test_any_message_round_trips_through_the_async_reader(message: dict) -> None:
    async def roundtrip() -> object:
        reader = asyncio.StreamReader()
        reader.feed_data(wire.encode(message))
        reader.feed_eof()
        first = await wire.read_frame(reader)
        assert await wire.read_frame(reader) is None
        return first

    assert asyncio.run(roundtrip()) == message


def test_peer_credentials_name_this_process() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert wire.peer_uid(right) == os.getuid()
        assert wire.peer_pid(right) == os.getpid()
