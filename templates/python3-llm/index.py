#!/usr/bin/env python
"""Entry point of the python3-llm handler process (fwatchdog's ``fprocess``).

In ``mode=http`` fwatchdog runs ``python index.py`` once and proxies requests to
``http://127.0.0.1:5000`` (``http_port``); the server is fwatchdog's own
``fwatchdog.llm.handler_server``, the one ``mode=llm``'s handler processes run.
Importing ``function.handler`` runs the function's start-up (normally: load the
model), then the server answers.

Invariants: nothing is downloaded at run time (``HF_HUB_OFFLINE=1`` unless the
function's environment says otherwise); logs are one event per line on stderr,
which fwatchdog forwards.
"""

import logging
import os
import sys
import time

from fwatchdog.llm import handler_server


def main() -> int:
    # Defaults only: an operator's explicit environment wins.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("index")
    try:
        config = handler_server.Config.from_env(os.environ)
    except ValueError as exc:
        log.error("config_invalid reason=%r", str(exc))
        return 1
    started = time.monotonic()
    from function import handler  # the function's start-up: loads the model

    log.info("function_loaded seconds=%.2f", time.monotonic() - started)
    handler_server.run(handler.handle, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
