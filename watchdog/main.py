"""Command-line entry point: ``fwatchdog [-version] [-run-healthcheck]``.

Flags are of-watchdog's (Go's flag package accepts one or two dashes).
``-run-healthcheck`` is a Docker ``HEALTHCHECK`` probe run every few seconds,
so it reads only ``TMPDIR`` and imports nothing beyond the standard library.
Everything else reads the configuration through :func:`fwatchdog.config.from_env`
and runs the server on uvloop.

Exit codes: 0 after a SIGTERM drain; 1 for a configuration error (every bad
variable is printed), a start failure, or the function's process dying.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging

    from fwatchdog.config import Config

USAGE = """Usage of fwatchdog:
  -run-healthcheck
        Check for the lock file, for an exec healthcheck. Exit 0 when present, 1 when not.
  -version
        Print the version and exit
"""


def lock_present(env: dict[str, str] | os._Environ[str]) -> bool:
    tmpdir = env.get("TMPDIR") or "/tmp"
    return os.path.exists(os.path.join(tmpdir, ".lock"))


def _commit() -> str:
    """The git commit the package was built from, when it can be known cheaply."""
    here = os.path.dirname(os.path.abspath(__file__))
    stamped = os.path.join(here, "GIT_COMMIT")
    try:
        with open(stamped, encoding="utf-8") as f:
            return f.read().strip() or "unknown"
    except OSError:
        pass
    import subprocess

    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    flags = {a.lstrip("-").split("=", 1)[0] for a in args if a.startswith("-")}
    unknown = (flags - {"version", "run-healthcheck", "h", "help"}) | {
        a for a in args if not a.startswith("-")}
    if unknown or flags & {"h", "help"}:
        if unknown:
            sys.stderr.write(f"flag provided but not defined: {sorted(unknown)[0]}\n")
        sys.stderr.write(USAGE)
        return 2 if unknown else 0

    if "run-healthcheck" in flags:
        if lock_present(os.environ):
            return 0
        sys.stderr.write("unable to find lock file.\n")
        return 1

    from fwatchdog import __version__

    if "version" in flags:
        sys.stdout.write(f"Version: {__version__}\tSHA: {_commit()}\n")
        return 0

    from fwatchdog.config import ConfigError, from_env

    try:
        config = from_env(os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"fwatchdog: {exc}\n")
        return 1

    import uvloop

    from fwatchdog import logs

    log = logs.setup(sys.stderr)
    log.info(logs.kv("version", version=__version__))
    code: int = uvloop.run(_serve(config, log))
    return code


async def _serve(config: Config, log: logging.Logger) -> int:
    # mode=llm: the zygote's imports are most of a cold start, so it is spawned
    # before the front's own imports (fwatchdog.llm.spawn), which then overlap it.
    from fwatchdog.config import Mode

    prespawned = None
    if config.mode is Mode.LLM:
        from fwatchdog.llm import spawn

        prespawned = await spawn.early(config, log)
    from fwatchdog.server import serve

    return await serve(config, log=log, stdout=sys.stdout, stderr=sys.stderr,
                       prespawned=prespawned)


if __name__ == "__main__":
    sys.exit(main())
