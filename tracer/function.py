"""A faas-cli handler folder as the tracer sees it: the handler module and its samples.

Samples: every `samples/*.json` file in the function folder (sorted by name), each
one JSON object `{"method", "path", "headers", "body", "query"}` where `body` is a
string (UTF-8) or a JSON value (sent re-encoded as JSON). Without a samples folder,
the default is the python3-llm handler's OpenAI chat completion, once as one JSON
answer and once streamed.

Invariants:
- The handler is imported as `function.handler`, exactly as python3-http does, with
  the current directory set to the function folder's parent and that folder first on
  sys.path (where python3-http's index.py and a template's helpers live).
- A handler's answer is consumed fully: iterators (streams) are drained, so the
  sample's whole path runs during the trace.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

SAMPLES_DIR = "samples"
HANDLER_PACKAGE = "function"

_CHAT = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 8,
    "temperature": 0,
}
DEFAULT_SAMPLES: tuple[dict[str, Any], ...] = (
    {"method": "POST", "path": "/v1/chat/completions",
     "headers": {"Content-Type": "application/json"}, "body": _CHAT},
    {"method": "POST", "path": "/v1/chat/completions",
     "headers": {"Content-Type": "application/json"}, "body": {**_CHAT, "stream": True}},
)


@dataclass(frozen=True)
class Event:
    """python3-http's event, as much of it as handlers read."""

    body: bytes
    headers: dict[str, str]
    method: str
    query: dict[str, str]
    path: str


@dataclass(frozen=True)
class Context:
    hostname: str = field(default_factory=socket.gethostname)


@dataclass(frozen=True)
class Sample:
    name: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    query: dict[str, str]

    def event(self) -> Event:
        return Event(body=self.body, headers=dict(self.headers), method=self.method,
                     query=dict(self.query), path=self.path)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "path": self.path,
                "headers": self.headers, "query": self.query,
                "body": self.body.decode("utf-8", errors="replace")}


def parse_sample(name: str, raw: dict[str, Any]) -> Sample:
    if not isinstance(raw, dict):
        raise ValueError(f"sample {name}: expected a JSON object")
    body = raw.get("body", b"")
    if isinstance(body, str):
        data = body.encode()
    elif isinstance(body, bytes):
        data = body
    else:
        data = json.dumps(body).encode()
    return Sample(name=name, method=str(raw.get("method", "POST")).upper(),
                  path=str(raw.get("path", "/")), headers=dict(raw.get("headers", {})),
                  body=data, query=dict(raw.get("query", {})))


def uses_default_samples(function_dir: Path, explicit: list[Path] | None = None) -> bool:
    """True when the function gave no samples (no --sample, no samples/*.json)."""
    return not explicit and not any((function_dir / SAMPLES_DIR).glob("*.json"))


def load_samples(function_dir: Path, explicit: list[Path] | None = None) -> list[Sample]:
    files = list(explicit or sorted((function_dir / SAMPLES_DIR).glob("*.json")))
    if files:
        return [parse_sample(f.name, json.loads(f.read_text())) for f in files]
    return [parse_sample(f"default-{i}", s) for i, s in enumerate(DEFAULT_SAMPLES)]


def import_handler(function_dir: Path) -> ModuleType:
    """Import `<function_dir>/handler.py` as `function.handler`."""
    function_dir = function_dir.resolve()
    if not (function_dir / "handler.py").is_file():
        raise FileNotFoundError(f"{function_dir} has no handler.py")
    os.chdir(function_dir.parent)
    if str(function_dir.parent) not in sys.path:
        sys.path.insert(0, str(function_dir.parent))
    spec = importlib.util.spec_from_file_location(
        HANDLER_PACKAGE, function_dir / "__init__.py",
        submodule_search_locations=[str(function_dir)],
    )
    assert spec is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[HANDLER_PACKAGE] = package
    if (function_dir / "__init__.py").is_file():
        assert spec.loader is not None
        spec.loader.exec_module(package)
    return importlib.import_module(f"{HANDLER_PACKAGE}.handler")


def consume(result: Any) -> int:
    """Drain a handler's answer; returns how many bytes (or chunks) it produced."""
    if isinstance(result, dict) and "body" in result:
        result = result["body"]
    if isinstance(result, bytes | str):
        return len(result)
    if isinstance(result, dict | list | int | float) or result is None:
        return len(json.dumps(result, default=str))
    if isinstance(result, Iterable):
        return sum(consume(chunk) for chunk in result)
    return 0


def invoke(handler: ModuleType, sample: Sample, context: Context | None = None) -> int:
    return consume(handler.handle(sample.event(), context or Context()))
