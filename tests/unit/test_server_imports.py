"""The front never imports torch (docs/architecture.md, "A front without torch"):
every mode's module, and the watchdog built in http and llm mode (the llm
runtime's front side included)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import asyncio, importlib, io, logging, sys
    import fwatchdog.main, fwatchdog.server
    from fwatchdog.config import from_env
    from fwatchdog.modes.base import _REGISTRY

    for target in _REGISTRY.values():
        importlib.import_module(target.partition(":")[0])

    async def build():
        for env in ({"mode": "http", "fprocess": "true", "upstream_url": "http://127.0.0.1:1"},
                    {"mode": "llm"}):
            config = from_env({**env, "TMPDIR": "."})
            wd = fwatchdog.server.Watchdog(config, log=logging.getLogger("t"),
                                           stdout=io.StringIO(), stderr=io.StringIO())
            wd.app()

    asyncio.run(build())
    heavy = sorted(m for m in sys.modules
                   if m.split(".")[0] in ("torch", "transformers", "safetensors", "numpy"))
    print(heavy)
''')


def test_front_imports_no_torch(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
