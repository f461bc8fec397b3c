"""The short reasons in the bodies of the error responses the watchdog writes itself.

of-watchdog answers a timeout or an unreachable function with an empty body; a
client then shows only a status code (the official ``openai`` client: "Error
code: 504"). Every error response the watchdog writes (not the function's own
errors, which are relayed unchanged) carries a one-line ``text/plain`` reason
ending in a newline, so the client shows what happened.

Invariant: :func:`reason` and :func:`timeout_reason` always return a non-empty
line ending in ``\\n``, for any status.
"""

from __future__ import annotations

from http import HTTPStatus

from fwatchdog.durations import format_duration

_REASONS: dict[int, str] = {
    405: "Method Not Allowed",
    429: "Too many requests in flight (max_inflight)",
    500: "The function failed before it answered",
    502: "The function failed before its answer was complete",
    503: "The function is not ready",
    504: "The function did not answer within the time limit",
}


def reason(status: int) -> str:
    """The body the watchdog writes for its own ``status`` response."""
    text = _REASONS.get(status)
    if text is None:
        try:
            text = HTTPStatus(status).phrase
        except ValueError:
            text = f"Error {status}"
    return text + "\n"


def timeout_reason(seconds: float) -> str:
    """The body of a 504: which limit ran out (exec_timeout, or a shorter X-Timeout)."""
    if seconds <= 0:
        return reason(504)
    return (f"The function did not answer within {format_duration(seconds)} "
            f"(exec_timeout, or the request's shorter X-Timeout)\n")
