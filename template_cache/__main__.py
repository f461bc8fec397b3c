"""`python -m fwatchdog.template_cache verify TEMPLATE_DIR [--function-dir DIR]`
and `python -m fwatchdog.template_cache check TEMPLATE_DIR --function-dir DIR`.

`verify` checks that a template is sound (structure and bytes); it needs no torch.
`check` says whether a start-up here would use it: sound, and its fingerprint
matches this environment and function (what `make run` asks before it traces
again).

Exit status: 0 sound (verify) / usable here (check), 1 damaged or not usable (each
problem on its own line on stderr), 2 usage.
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
    usable = sub.add_parser("check", help="would a start-up here use this template?")
    usable.add_argument("template_dir", type=Path)
    usable.add_argument("--function-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args.template_dir, args.function_dir)
    report = verify_template(args.template_dir, args.function_dir, content=not args.quick)
    if report.ok:
        count = len(report.manifest.tensors) if report.manifest else 0
        print(f"ok: {args.template_dir} ({count} tensors)")
        return 0
    for problem in report.problems:
        print(f"template {args.template_dir}: {problem}", file=sys.stderr)
    return 1


def _check(template_dir: Path, function_dir: Path) -> int:
    from fwatchdog.template_cache.format import TemplateError
    from fwatchdog.template_cache.restore import check_template

    try:
        check_template(template_dir, function_dir.resolve(), None, verify="quick")
    except (TemplateError, OSError, ValueError) as exc:
        print(f"template {template_dir}: not usable here: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {template_dir} is usable for {function_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
