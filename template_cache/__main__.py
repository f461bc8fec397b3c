"""`python -m fwatchdog.template_cache verify TEMPLATE_DIR [--function-dir DIR]`.

Exit status: 0 sound, 1 damaged (each problem on its own line on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fwatchdog.template_cache.verify import verify_template


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fwatchdog.template_cache")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check a template folder, bytes included")
    check.add_argument("template_dir", type=Path)
    check.add_argument(
        "--function-dir",
        type=Path,
        default=None,
        help="where function-relative weight files live (default: the traced folder)",
    )
    check.add_argument("--quick", action="store_true", help="structure only, no hashing")
    args = parser.parse_args(argv)
    report = verify_template(args.template_dir, args.function_dir, content=not args.quick)
    if report.ok:
        count = len(report.manifest.tensors) if report.manifest else 0
        print(f"ok: {args.template_dir} ({count} tensors)")
        return 0
    for problem in report.problems:
        print(f"template {args.template_dir}: {problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
