"""Command-line entry point (placeholder until the server lands)."""
import sys

from fwatchdog import __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-version" in argv or "--version" in argv:
        print(f"fwatchdog version: {__version__}")
        return 0
    return 1
