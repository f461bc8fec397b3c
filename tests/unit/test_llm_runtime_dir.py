"""The runtime's socket folder: owner-only, and short enough for Unix socket paths."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fwatchdog.llm.runtime import runtime_dir
from fwatchdog.llm.spawn import MAX_SOCKET_PATH


def test_it_is_made_under_tmpdir_owner_only(tmp_path: Path) -> None:
    path = runtime_dir(str(tmp_path))
    assert Path(path).parent == tmp_path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert len(path + "/h123456789.sock") <= MAX_SOCKET_PATH


def test_a_tmpdir_too_long_for_socket_paths_falls_back_to_tmp(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = runtime_dir(str(deep))
    try:
        assert Path(path).parent == Path("/tmp")
        assert len(path + "/h123456789.sock") <= MAX_SOCKET_PATH
    finally:
        os.rmdir(path)
