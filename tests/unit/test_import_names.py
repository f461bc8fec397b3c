"""Our import names must not collide with PyPI packages a function may install.

PyPI's ``watchdog`` (file-system events) and ``tracer`` are installed beside this
project in the test environment (see pyproject's ``test`` extra). A fresh
interpreter, started outside the repository as a function would be, must import
both them and us, each from its own files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys
import watchdog, watchdog.observers, watchdog.events
import tracer
import fwatchdog, fwatchdog.config, fwatchdog.modes.base
import fwatchdog.tracer, fwatchdog.template_cache
print(json.dumps({
    "watchdog": watchdog.__file__,
    "observer": watchdog.observers.Observer.__module__,
    "tracer": tracer.__file__,
    "fwatchdog": fwatchdog.__file__,
    "fwatchdog.tracer": fwatchdog.tracer.__file__,
    "fwatchdog.template_cache": fwatchdog.template_cache.__file__,
}))
"""


def test_pypi_watchdog_and_tracer_import_beside_ours(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        check=True,
    ).stdout
    files = {k: Path(v) for k, v in json.loads(out).items()}
    assert "site-packages" in files["watchdog"].parts
    assert "site-packages" in files["tracer"].parts
    assert str(files["observer"]).startswith("watchdog.observers")
    # Ours come from this project, not from the PyPI packages of the same folder names.
    assert files["fwatchdog"].parent != files["watchdog"].parent
    assert files["fwatchdog.tracer"].parent != files["tracer"].parent
    assert files["fwatchdog.tracer"].parent.name == "tracer"
    assert files["fwatchdog.template_cache"].parent.name == "template_cache"
