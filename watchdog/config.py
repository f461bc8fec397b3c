"""The watchdog's configuration: one pure function of an environment mapping.

:func:`from_env` is the only reader of the environment in the whole front. It
takes a mapping (``os.environ`` in production, a plain dict in tests), checks
every variable, and returns a frozen :class:`Config`, or raises
:class:`ConfigError` listing *every* bad variable at once, so a user fixes a
deployment in one round trip.

Names, aliases and defaults follow of-watchdog 0.11 (see the compatibility
table in README.md). Where two names exist, the second of each pair wins when
both are set, as in of-watchdog: ``function_process`` over ``fprocess``,
``http_upstream_url`` over ``upstream_url``, ``log_call_id`` over ``log_callid``.
``buffer_http`` and ``http_buffer_req_body`` are or-ed, as in of-watchdog.

``read_timeout=0`` means no limit, as in of-watchdog (it becomes Go's
``http.Server.ReadTimeout``, where 0 is none): no deadline for a request body
and no idle timeout, so a keep-alive connection stays open until the client
closes it; dead peers are still found by TCP keep-alive, which both fronts
turn on. aiohttp's keep-alive timer cannot be switched off (0 closes a
connection right after each response), so there it is :data:`NO_IDLE_LIMIT`
instead. Code reads :attr:`Config.read_limit` and
:attr:`Config.keepalive_timeout`, never ``read_timeout`` itself as a limit.
"""

from __future__ import annotations

import enum
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from fwatchdog.durations import parse_duration

DEFAULT_PORT = 8080
DEFAULT_METRICS_PORT = 8081
DEFAULT_TIMEOUT = 30.0
DEFAULT_LOG_BUFFER_SIZE = 64 * 1024
DEFAULT_CONTENT_TYPE = "application/octet-stream"
DEFAULT_STATIC_PATH = "/home/app/public"
# How long a mode may take to become able to serve (http: the upstream accepts
# connections). Generous because http-mode functions that load a model at import
# take tens of seconds; a child that exits early fails at once, whatever this is.
DEFAULT_START_TIMEOUT = 300.0
# aiohttp's keep-alive timeout when read_timeout=0 asks for none: a year.
NO_IDLE_LIMIT = 365 * 24 * 3600.0


class Mode(enum.Enum):
    STREAMING = "streaming"
    SERIALIZING = "serializing"
    HTTP = "http"
    STATIC = "static"
    LLM = "llm"


class Warmup(enum.Enum):
    """What a mode=llm handler runs before it reports ready."""

    AUTO = "auto"  # full on a GPU (kernels load lazily per shape), samples on CPU
    FULL = "full"  # the traced samples, then each prompt-length bucket and sampling
    SAMPLES = "samples"  # the traced samples once
    OFF = "off"


DEFAULT_FUNCTION_DIR = "/home/app/function"
DEFAULT_TEMPLATE_DIR = "/home/app/.fwatchdog/template"


class ConfigError(Exception):
    """One or more bad variables; ``problems`` holds one message per variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Config:
    mode: Mode
    fprocess: tuple[str, ...]
    upstream_url: str | None
    port: int
    metrics_port: int
    read_timeout: float  # 0 means no limit (see read_limit, keepalive_timeout)
    write_timeout: float
    exec_timeout: float  # 0 means no limit
    healthcheck_interval: float
    max_inflight: int  # 0 means no limit
    max_body_size: int  # bytes; 0 means no limit
    prefix_logs: bool
    log_buffer_size: int
    log_callid: bool
    buffer_http: bool
    content_type: str
    suppress_lock: bool
    static_path: str
    ready_path: str
    tmpdir: str
    knative: bool  # K_SERVICE is set: queue-proxy drains before SIGTERM
    # Deadline for the mode's start (http: the upstream accepting connections;
    # llm: how long a request waits for a warm handler).
    start_timeout: float = DEFAULT_START_TIMEOUT
    # mode=llm (see fwatchdog.llm)
    function_dir: str = DEFAULT_FUNCTION_DIR
    template_dir: str = DEFAULT_TEMPLATE_DIR
    llm_handlers: int = 1  # handlers serving at once
    llm_spares: int = 1  # warm handlers kept ahead of need
    llm_max_requests: int = 0  # per handler before it is recycled; 0: never
    llm_max_requests_jitter: int = 0  # up to this many more, random per handler
    llm_gpu_idle_timeout: float = 0.0  # release the GPU after this long idle; 0: never
    llm_warmup: Warmup = Warmup.AUTO
    llm_device: str = "auto"  # the holder's device: auto, cpu, cuda, cuda:N
    llm_template_verify: str = "full"  # the holder's check of the bytes: full or quick

    @property
    def read_limit(self) -> float | None:
        """Seconds allowed for reading a request and for idling between requests; None: no limit."""
        return self.read_timeout or None

    @property
    def keepalive_timeout(self) -> float:
        """aiohttp's idle timeout: ``read_timeout`` (Go uses it as the idle timeout too)."""
        return self.read_timeout or NO_IDLE_LIMIT

    @property
    def lock_path(self) -> str:
        return self.tmpdir.rstrip("/") + "/.lock" if self.tmpdir != "/" else "/.lock"


_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})
# Go's strconv.ParseBool spellings (any case), plus yes/no and on/off.
_TRUE = frozenset({"true", "t", "1", "yes", "on"})
_FALSE = frozenset({"false", "f", "0", "no", "off", ""})


class _Reader:
    """Collects problems while reading, so all are reported together."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def first(self, *names: str) -> tuple[str, str] | None:
        """The last of ``names`` that is set wins (of-watchdog's alias order)."""
        found = None
        for name in names:
            if name in self.env:
                found = (name, self.env[name])
        return found

    def string(self, *names: str, default: str) -> str:
        got = self.first(*names)
        return default if got is None or got[1] == "" else got[1]

    def boolean(self, *names: str, default: bool = False) -> bool:
        got = self.first(*names)
        if got is None:
            return default
        name, value = got
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        self.problems.append(f"{name}={value!r}: expected true or false")
        return default

    def duration(self, name: str, default: float) -> float:
        value = self.env.get(name)
        if value is None or value == "":
            return default
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.problems.append(f"{name}={value!r}: {exc}")
            return default

    def integer(
        self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return default
        try:
            number = int(value.strip(), 10)
        except ValueError:
            self.problems.append(f"{name}={value!r}: expected a whole number")
            return default
        if number < minimum or (maximum is not None and number > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            self.problems.append(f"{name}={value!r}: must be {bound}")
            return default
        return number

    def port(self, *names: str, default: int) -> int:
        got = self.first(*names)
        if got is None:
            return default
        return self.integer(got[0], default, minimum=1, maximum=65535)


def from_env(env: Mapping[str, str]) -> Config:
    """Build the configuration from ``env``, or raise :class:`ConfigError`."""
    r = _Reader(env)

    mode_text = r.string("mode", default=Mode.STREAMING.value)
    try:
        mode = Mode(mode_text)
    except ValueError:
        choices = ", ".join(m.value for m in Mode)
        r.problems.append(f"mode={mode_text!r}: unknown mode, expected one of {choices}")
        mode = Mode.STREAMING

    fprocess: tuple[str, ...] = ()
    got = r.first("fprocess", "function_process")
    if got is not None and got[1].strip():
        try:
            fprocess = tuple(shlex.split(got[1]))
        except ValueError as exc:
            r.problems.append(f"{got[0]}={got[1]!r}: cannot split into a command: {exc}")
    elif mode not in (Mode.STATIC, Mode.LLM):
        r.problems.append(f"fprocess: required in mode={mode.value} (the function's command)")

    upstream_url: str | None = None
    got = r.first("upstream_url", "http_upstream_url")
    if got is not None and got[1]:
        parts = urlsplit(got[1])
        try:
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            r.problems.append(f"{got[0]}={got[1]!r}: {exc}")
        else:
            if parts.scheme not in ("http", "https") or not parts.hostname:
                r.problems.append(f"{got[0]}={got[1]!r}: expected an http:// URL with a host")
            else:
                upstream_url = got[1].rstrip("/")
    elif mode is Mode.HTTP:
        r.problems.append("upstream_url: required in mode=http (e.g. http://127.0.0.1:5000)")

    # Knative sets PORT; `port` (of-watchdog's name) wins when both are set.
    port = r.port("PORT", "port", default=DEFAULT_PORT)
    metrics_port = r.port("metrics_port", default=DEFAULT_METRICS_PORT)
    if port == metrics_port:
        r.problems.append(f"metrics_port={metrics_port}: must differ from the serving port")

    if upstream_url is not None:
        target = urlsplit(upstream_url)
        target_port = target.port or (443 if target.scheme == "https" else 80)
        if target.hostname in _LOOPBACK and target_port == port:
            r.problems.append(
                f"upstream_url={upstream_url!r}: points at the watchdog's own port {port} "
                "(it would proxy to itself)"
            )

    read_timeout = r.duration("read_timeout", DEFAULT_TIMEOUT)
    write_timeout = r.duration("write_timeout", DEFAULT_TIMEOUT)
    if "write_timeout" in env and env["write_timeout"] != "" and write_timeout == 0:
        r.problems.append("write_timeout=0: must be greater than zero")
        write_timeout = DEFAULT_TIMEOUT
    exec_timeout = r.duration("exec_timeout", DEFAULT_TIMEOUT)
    start_timeout = r.duration("start_timeout", DEFAULT_START_TIMEOUT)
    if start_timeout == 0:
        r.problems.append("start_timeout=0: must be greater than zero (a start must never hang)")
        start_timeout = DEFAULT_START_TIMEOUT
    healthcheck_interval = r.duration("healthcheck_interval", write_timeout)

    warmup_text = r.string("llm_warmup", default=Warmup.AUTO.value)
    try:
        warmup = Warmup(warmup_text)
    except ValueError:
        r.problems.append(f"llm_warmup={warmup_text!r}: expected one of "
                          + ", ".join(w.value for w in Warmup))
        warmup = Warmup.AUTO
    device = r.string("llm_device", default="auto")
    if not _DEVICE.fullmatch(device):
        r.problems.append(f"llm_device={device!r}: expected auto, cpu, cuda or cuda:N")
        device = "auto"
    template_verify = r.string("llm_template_verify", default="full")
    if template_verify not in ("full", "quick"):
        r.problems.append(f"llm_template_verify={template_verify!r}: expected full or quick")
        template_verify = "full"
    function_dir = r.string("function_dir", default=DEFAULT_FUNCTION_DIR)
    template_dir = r.string("template_dir", default=DEFAULT_TEMPLATE_DIR)
    if mode is Mode.LLM:
        for name, value in (("function_dir", function_dir), ("template_dir", template_dir)):
            if not value.startswith("/"):
                r.problems.append(f"{name}={value!r}: must be an absolute path")

    if r.boolean("jwt_auth"):
        r.problems.append("jwt_auth=true: OpenFaaS Enterprise authentication is not supported")

    config = Config(
        mode=mode,
        fprocess=fprocess,
        upstream_url=upstream_url,
        port=port,
        metrics_port=metrics_port,
        read_timeout=read_timeout,
        write_timeout=write_timeout,
        exec_timeout=exec_timeout,
        start_timeout=start_timeout,
        healthcheck_interval=healthcheck_interval,
        max_inflight=r.integer("max_inflight", 0),
        max_body_size=r.integer("max_body_size", 0),
        prefix_logs=r.boolean("prefix_logs", default=True),
        log_buffer_size=r.integer("log_buffer_size", DEFAULT_LOG_BUFFER_SIZE, minimum=1),
        log_callid=r.boolean("log_callid", "log_call_id"),
        buffer_http=r.boolean("buffer_http") | r.boolean("http_buffer_req_body"),
        content_type=r.string("content_type", default=DEFAULT_CONTENT_TYPE),
        suppress_lock=r.boolean("suppress_lock"),
        static_path=r.string("static_path", default=DEFAULT_STATIC_PATH),
        ready_path=r.string("ready_path", default=""),
        tmpdir=r.string("TMPDIR", default="/tmp"),
        knative=bool(env.get("K_SERVICE")),
        function_dir=function_dir,
        template_dir=template_dir,
        llm_handlers=r.integer("llm_handlers", 1, minimum=1, maximum=64),
        llm_spares=r.integer("llm_spares", 1, minimum=0, maximum=64),
        llm_max_requests=r.integer("llm_max_requests", 0),
        llm_max_requests_jitter=r.integer("llm_max_requests_jitter", 0),
        llm_gpu_idle_timeout=r.duration("llm_gpu_idle_timeout", 0.0),
        llm_warmup=warmup,
        llm_device=device,
        llm_template_verify=template_verify,
    )
    if config.ready_path and not config.ready_path.startswith("/"):
        r.problems.append(f"ready_path={config.ready_path!r}: must start with /")
    if r.problems:
        raise ConfigError(r.problems)
    return config
