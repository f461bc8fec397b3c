"""Process titles (``ps``/``top``): ``fwatchdog: holder``, ``fwatchdog: zygote``,
``fwatchdog: handler <state>``.

``setproctitle`` is in the ``llm`` extra; without it titles are left alone, since a
title is a debugging aid, never something the runtime depends on.
"""

from __future__ import annotations


def set_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - the llm extra installs it
        return
    setproctitle.setproctitle(title)
