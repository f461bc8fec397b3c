"""The one wire format for everything that crosses a process boundary in mode=llm.

Every channel (front <-> zygote, front <-> holder, handler -> front, handler <->
holder) is a Unix stream socket carrying frames::

    0               4                                  4 + length
    +---------------+----------------------------------+
    | length (u32,  | payload: one JSON object, UTF-8,  |
    | big endian)   | compact, keys sorted              |
    +---------------+----------------------------------+
      ^ file descriptors (SCM_RIGHTS) ride on the first byte of a frame that
        carries them; the payload then says how many: {"fds": N, ...}

A message is a JSON object with either ``"op"`` (a request: ``fork``, ``attach``,
``release``, ``reload``) or ``"event"`` (a report: ``imported``, ``forked``,
``exited``, ``loaded``, ``handle``, ``hello``, ``phase``, ``ready``, ``failed``, ...).
No pickle ever crosses a boundary: a CUDA IPC handle travels as base64 text.

Invariants:
- A frame is at most :data:`MAX_FRAME` bytes of payload; a larger length, bad UTF-8,
  bad JSON, or a payload that is not an object is a :class:`WireError`, never a
  crash of the reader's process.
- The sync functions (:func:`send`, :func:`recv`) are for the runtime's own
  processes (zygote, holder, handler), which run no event loop of their own when
  they use them; the async ones (:func:`read_frame`, :func:`write_frame`) are the
  front's, which never passes file descriptors.
- A clean end of stream between frames is ``None``; an end inside a frame is a
  :class:`WireError` (the peer died mid-message).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 24  # 16 MiB of JSON: a manifest-sized message fits, a flood does not
MAX_FDS = 16

Message = dict[str, Any]


class WireError(Exception):
    """A malformed frame, or a peer that closed inside one."""


def encode(message: Message) -> bytes:
    """The frame for ``message`` (header and payload), as exact bytes."""
    payload = json.dumps(message, separators=(",", ":"), sort_keys=True).encode()
    if len(payload) > MAX_FRAME:
        raise WireError(f"message of {len(payload)} bytes is larger than {MAX_FRAME}")
    return HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> Message:
    try:
        message = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"bad frame payload: {exc}") from None
    if not isinstance(message, dict):
        raise WireError(f"bad frame payload: expected a JSON object, got {type(message).__name__}")
    return message


def _length(header: bytes) -> int:
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise WireError(f"frame of {length} bytes is larger than {MAX_FRAME}")
    return int(length)


# -- sync: the runtime's processes ---------------------------------------------


def send(sock: socket.socket, message: Message, fds: Sequence[int] = ()) -> None:
    """Send one frame; ``fds`` travel with its first byte."""
    if fds:
        message = {**message, "fds": len(fds)}
    data = encode(message)
    if fds:
        sent = sock.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", fds).tobytes())])
        data = data[sent:]
    sock.sendall(data)


def _recv_exactly(sock: socket.socket, size: int, *, started: bool) -> bytes | None:
    chunks = []
    remaining = size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            if not started and remaining == size:
                return None
            raise WireError("peer closed the connection inside a frame")
        chunks.append(chunk)
        remaining -= len(chunk)
        started = True
    return b"".join(chunks)


def recv(sock: socket.socket) -> tuple[Message, list[int]] | None:
    """One frame and the file descriptors that came with it; None at a clean end."""
    fds: list[int] = []
    first, ancillary, _flags, _addr = sock.recvmsg(
        1, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(data[: len(data) - len(data) % got.itemsize])
            fds.extend(got)
    if not first:
        for fd in fds:  # pragma: no cover - a peer that sends fds and no byte
            _close(fd)
        return None
    try:
        rest = _recv_exactly(sock, HEADER.size - 1, started=True)
        assert rest is not None
        body = _recv_exactly(sock, _length(first + rest), started=True)
        assert body is not None
        message = decode_payload(body)
    except BaseException:
        for fd in fds:
            _close(fd)
        raise
    return message, fds


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end (``SO_PEERCRED``), Linux only."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


# -- async: the front ------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader) -> Message | None:
    """One message; None at a clean end of stream."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise WireError("peer closed the connection inside a frame") from None
    try:
        payload = await reader.readexactly(_length(header))
    except asyncio.IncompleteReadError:
        raise WireError("peer closed the connection inside a frame") from None
    return decode_payload(payload)


async def next_message(reader: asyncio.StreamReader) -> Message | None:
    """:func:`read_frame` for a reader that only needs to know the channel ended:
    None at its end, also when the peer died mid-frame or the socket broke."""
    try:
        return await read_frame(reader)
    except (WireError, OSError):
        return None


def write_frame(writer: asyncio.StreamWriter, message: Message) -> None:
    writer.write(encode(message))
