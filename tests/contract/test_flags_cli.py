"""Command-line flags and configuration errors (docs/contract.md, Configuration)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import FWATCHDOG


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd)}
    base.update(env)
    return subprocess.run([FWATCHDOG, *args], env=base, cwd=str(cwd), capture_output=True,
                          text=True, timeout=30, check=False)


def test_version_prints_version_and_sha(tmp_path):
    out = _run(["-version"], {}, tmp_path)  # no fprocess needed
    assert out.returncode == 0
    assert out.stdout.startswith("Version: 0.1.0\tSHA: ")
    assert len(out.stdout.strip().split("SHA: ")[1]) > 0
    assert _run(["--version"], {}, tmp_path).returncode == 0


def test_run_healthcheck_follows_the_lock_file(tmp_path):
    env = {"TMPDIR": str(tmp_path)}
    started = time.monotonic()
    missing = _run(["-run-healthcheck"], env, tmp_path)
    assert missing.returncode == 1
    assert "lock file" in missing.stderr
    (tmp_path / ".lock").touch()
    assert _run(["-run-healthcheck"], env, tmp_path).returncode == 0
    assert time.monotonic() - started < 10


def test_run_healthcheck_imports_nothing_heavy(tmp_path):
    code = ("import sys; from fwatchdog.main import main; rc = main(['-run-healthcheck']); "
            "heavy = [m for m in ('aiohttp', 'uvloop', 'prometheus_client', 'torch', "
            "'fwatchdog.config') if m in sys.modules]; print(heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], env={"TMPDIR": str(tmp_path)},
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=30,
                         check=False)
    assert out.returncode == 1
    assert out.stdout.strip() == "[]"


def test_config_errors_name_every_bad_variable_and_exit_1(tmp_path):
    out = _run([], {"mode": "http", "port": "abc", "read_timeout": "soon",
                    "max_inflight": "-3", "jwt_auth": "true"}, tmp_path)
    assert out.returncode == 1
    for name in ("fprocess", "upstream_url", "port", "read_timeout", "max_inflight",
                 "jwt_auth"):
        assert name in out.stderr, name


def test_unknown_mode_is_a_config_error(tmp_path):
    out = _run([], {"mode": "afterburn", "fprocess": "cat"}, tmp_path)
    assert out.returncode == 1 and "mode" in out.stderr


def test_unknown_flag_is_rejected(tmp_path):
    out = _run(["-bogus"], {}, tmp_path)
    assert out.returncode == 2 and "bogus" in out.stderr
