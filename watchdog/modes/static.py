"""mode=static: serve the files under ``static_path``.

of-watchdog hands the folder to Go's ``http.FileServer``. Kept from it: ``/``
and any folder serve their ``index.html``; a folder asked without its trailing
slash is redirected (301) to it; ``.../index.html`` is redirected to ``./``; a
file asked with a trailing slash is redirected to the file; HEAD, ranges and
conditional requests work; Content-Type comes from the extension, with Go's
``charset=utf-8`` on text, and is sniffed from the first bytes when the
extension says nothing. ``fprocess`` is not used.

Deliberate differences:
- *fix* ``start`` fails (the watchdog exits 1) when ``static_path`` is not a
  folder; of-watchdog starts and answers 404 to everything.
- *fix* a folder without ``index.html`` is 404, not a listing: a listing shows
  files nobody linked to (backups, drafts) to anyone who asks.
- *fix* a path with a ``..`` segment (also percent-encoded) is 404, and so is a
  symlink that resolves outside ``static_path`` (Go follows it and serves, e.g.,
  ``/etc/passwd``). Symlinks that stay inside are served.
- *fix* only GET and HEAD are served; other methods get 405 with ``Allow``
  (Go serves the file to any method, a POST included).
- *ours* a file with a precompressed sibling (``x.js.gz``, ``x.js.br``) is sent
  compressed to clients that accept it (aiohttp's file sender does this).

Invariant: no response ever carries the bytes of a path whose real location is
outside the real ``static_path``, and nothing but regular files is opened
(a FIFO would block the reader).
"""

from __future__ import annotations

import logging
import mimetypes
import os
import stat
from urllib.parse import quote

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from fwatchdog.modes.base import ModeContext, ModeHandler, StartError
from fwatchdog.process import error_response, log_event

INDEX = "index.html"

# Go's built-in table (mime/type.go) where it differs from Python's, so a
# response's type does not depend on the host's /etc/mime.types.
_GO_TYPES: dict[str, str] = {
    ".avif": "image/avif",
    ".css": "text/css; charset=utf-8",
    ".gif": "image/gif",
    ".htm": "text/html; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".jpeg": "image/jpeg",
    ".jpg": "image/jpeg",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".mjs": "text/javascript; charset=utf-8",
    ".pdf": "application/pdf",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".wasm": "application/wasm",
    ".webp": "image/webp",
    ".xml": "text/xml; charset=utf-8",
}

# Bytes that make Go's sniffer call content binary (net/http/sniff.go).
_BINARY = frozenset([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x1B), *range(0x1C, 0x20)])
_HTML_SIGNS = (b"<!doctype html", b"<html", b"<head", b"<script", b"<body", b"<iframe",
               b"<h1", b"<div", b"<font", b"<table", b"<a", b"<style", b"<title", b"<b",
               b"<br", b"<p", b"<!--")
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"), (b"%PDF-", "application/pdf"))


def sniff(head: bytes) -> str:
    """A small part of Go's ``http.DetectContentType``: html, images, pdf, text, else binary."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    low = head.lstrip(b"\t\n\x0c\r ").lower()
    for sign in _HTML_SIGNS:
        if low.startswith(sign) and low[len(sign):len(sign) + 1] in (b" ", b">"):
            return "text/html; charset=utf-8"
    if any(b in _BINARY for b in head):
        return "application/octet-stream"
    return "text/plain; charset=utf-8"


class StaticMode(ModeHandler):
    def __init__(self, ctx: ModeContext) -> None:
        super().__init__(ctx)
        self._root = ""
        # Python's built-in table only: the host's mime.types must not change answers.
        self._types = mimetypes.MimeTypes(filenames=())

    async def start(self) -> None:
        configured = self.ctx.config.static_path
        if not os.path.isdir(configured):
            raise StartError(
                f"static_path={configured!r} is not a folder: mode=static serves the files "
                f"in it (set static_path to the folder holding index.html)"
            )
        self._root = os.path.realpath(configured)
        log_event(self.ctx.log, logging.INFO, "static_serving", root=self._root)

    def content_type(self, path: str) -> str:
        ext = os.path.splitext(path)[1].lower()
        if ext in _GO_TYPES:
            return _GO_TYPES[ext]
        guessed, _ = self._types.guess_type("x" + ext) if ext else (None, None)
        if guessed:
            return guessed + "; charset=utf-8" if guessed.startswith("text/") else guessed
        try:
            with open(path, "rb") as f:
                return sniff(f.read(512))
        except OSError:
            return "application/octet-stream"

    def resolve(self, url_path: str) -> str | None:
        """The real filesystem path for a decoded URL path, or None when it must not be served."""
        if "\x00" in url_path:
            return None
        segments = url_path.split("/")
        if ".." in segments:
            return None
        parts = [s for s in segments if s not in ("", ".")]
        real = os.path.realpath(os.path.join(self._root, *parts))
        return real if self._inside(real) else None

    def _inside(self, real: str) -> bool:
        return real == self._root or os.path.commonpath([self._root, real]) == self._root

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="Method Not Allowed\n",
                                headers={"Allow": "GET, HEAD"})
        url_path = request.path
        real = self.resolve(url_path)
        if real is None:
            return error_response(404, "404 page not found")
        try:
            info = os.stat(real)
        except PermissionError:
            return error_response(403, "403 Forbidden")
        except (OSError, ValueError):
            return error_response(404, "404 page not found")

        query = request.rel_url.raw_query_string
        if stat.S_ISDIR(info.st_mode):
            if not url_path.endswith("/"):
                name = url_path.rstrip("/").rsplit("/", 1)[-1]
                return _redirect(quote(name) + "/", query)
            index = os.path.realpath(os.path.join(real, INDEX))
            if not self._inside(index) or not os.path.isfile(index):
                return error_response(404, "404 page not found")  # no listings
            return self._file(index)

        if not stat.S_ISREG(info.st_mode):
            return error_response(404, "404 page not found")
        if url_path.endswith("/" + INDEX):
            return _redirect("./", query)
        if url_path.endswith("/"):
            name = url_path.rstrip("/").rsplit("/", 1)[-1]
            return _redirect("../" + quote(name), query)
        return self._file(real)

    def _file(self, real: str) -> web.FileResponse:
        return _SentOnce(real, headers={"Content-Type": self.content_type(real)})


class _SentOnce(web.FileResponse):
    """A file response that may be prepared twice, as every other response may.

    The server core prepares and finishes a response itself (so its duration and
    byte count include the body), then returns it, and aiohttp prepares it once
    more. ``web.FileResponse.prepare`` would open and send the file again and
    trip over its own finished writer; the traceback then closed the keep-alive
    connection.
    """

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        return await super().prepare(request)


def _redirect(location: str, raw_query: str) -> web.Response:
    if raw_query:
        location += "?" + raw_query
    return web.Response(status=301, headers={"Location": location})
