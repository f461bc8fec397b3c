"""The CPU holder: a sealed memfd filled by reader threads, verified inline, released and
reloaded; its failure modes (too little memory, a changed byte) and the handle's wire
format. The CUDA side is in tests/gpu/test_tc_gpu.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fwatchdog.template_cache import fingerprint
from fwatchdog.template_cache.format import TemplateError
from fwatchdog.template_cache.holder import (
    HandleInfo,
    _MemfdBuffer,
    attach,
    hold,
    memory_available,
)
from fwatchdog.template_cache.intercept import intercept_loaders
from fwatchdog.template_cache.restore import repoint, restore
from fwatchdog.tracer import build
from fwatchdog.tracer.recorder import Recorder


def _function(tmp_path: Path, rows: int = 4) -> Path:
    function_dir = tmp_path / "function"
    function_dir.mkdir()
    torch.manual_seed(0)
    # A tensor larger than one checksum piece (8 MiB), so it is read in several pieces
    # by several threads.
    safetensors.torch.save_file(
        {"big": torch.randn(rows, 1 << 20), "small": torch.arange(6, dtype=torch.int64)},
        function_dir / "weights.safetensors")
    (function_dir / "handler.py").write_text("def handle(event, context):\n    return {}\n")
    return function_dir


def _load(function_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(function_dir / "weights.safetensors")


def _trace(function_dir: Path, out: Path) -> Path:
    recorder = Recorder(function_dir)
    with intercept_loaders(recorder):
        _load(function_dir)
    return build.write_template(recorder, out, function_dir, fingerprint.current(function_dir),
                                None, [], {})


def _flip(path: Path, offset_from_end: int) -> None:
    """Change one byte of a tensor in place, keeping the file's size and mtime."""
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(stat.st_size - offset_from_end)
        byte = handle.read(1)
        handle.seek(stat.st_size - offset_from_end)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_hold_streams_and_serves_pieces_of_a_large_tensor(tmp_path: Path) -> None:
    function_dir = _function(tmp_path, rows=5)  # 20 MiB: three pieces
    template = _trace(function_dir, tmp_path / "t")
    expected = _load(function_dir)
    with hold(template, function_dir, readers=3) as holder:
        assert holder.stats is not None
        assert holder.stats.hashed_bytes >= expected["big"].nbytes
        with restore(template, function_dir,
                     source=attach(holder.info, holder.fds())) as stats:
            served = _load(function_dir)
    assert stats.hits == 1
    assert torch.equal(served["big"], expected["big"])
    assert torch.equal(served["small"], expected["small"])


def test_inline_verification_refuses_a_flipped_byte(tmp_path: Path) -> None:
    function_dir = _function(tmp_path)
    template = _trace(function_dir, tmp_path / "t")
    # The last bytes of the file belong to the last tensor in the data section.
    _flip(function_dir / "weights.safetensors", 3)
    before = _open_fds()
    with pytest.raises(TemplateError, match=r"tensor 0/\w+: .*do not match"):
        hold(template, function_dir)
    assert _open_fds() == before  # the half-filled memfd was discarded
    # The same check guards a restore from the files: the start is ordinary.
    with restore(template, function_dir) as stats:
        served = _load(function_dir)
    assert not stats.used and "do not match" in (stats.rejected or "")
    assert torch.equal(served["big"], _load(function_dir)["big"])


def test_quick_mode_trusts_size_and_mtime_but_checks_the_header(tmp_path: Path) -> None:
    function_dir = _function(tmp_path)
    template = _trace(function_dir, tmp_path / "t")
    weights = function_dir / "weights.safetensors"
    _flip(weights, 3)
    with hold(template, function_dir, verify="quick") as holder:  # documented trade-off
        assert holder.info.verified == "quick"
    # A new mtime makes quick mode hash that file's tensors after all.
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(TemplateError, match="do not match"):
        hold(template, function_dir, verify="quick")
    # The safetensors header is checked in every mode.
    data = bytearray(weights.read_bytes())
    data[10] ^= 0x01  # inside the JSON header
    weights.write_bytes(bytes(data))
    manifest = json.loads((template / "manifest.json").read_text())
    os.utime(weights, ns=(0, manifest["files"][1]["mtime_ns"]))
    with pytest.raises(TemplateError, match="outside its tensors"):
        hold(template, function_dir, verify="quick")


def test_release_and_reload(tmp_path: Path) -> None:
    function_dir = _function(tmp_path)
    template = _trace(function_dir, tmp_path / "t")
    expected = _load(function_dir)
    holder = hold(template, function_dir)
    first = holder.info
    source = attach(first, holder.fds())
    with restore(template, function_dir, source=source) as stats:
        served = _load(function_dir)
    old_fd = holder.fds()[0]
    holder.release()
    assert not holder.loaded and holder.fds() == []
    with pytest.raises(TemplateError, match="released"):
        _ = holder.info
    with pytest.raises(OSError):
        os.fstat(old_fd)
    # A handler that still maps the released buffer keeps reading its pages.
    assert torch.equal(served["big"], expected["big"])
    second = holder.reload()
    assert second.generation == first.generation + 1 and len(holder.fds()) == 1
    # The runtime points the served objects at the new buffer.
    big = served["big"]
    assert repoint(stats.shared_tensors, attach(second, holder.fds())) == 2
    assert served["big"] is big and torch.equal(big, expected["big"])
    holder.close()
    with pytest.raises(TemplateError, match="closed"):
        holder.reload()


def test_too_little_memory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="not enough memory to hold the template"):
        _MemfdBuffer(64 << 20, available=1 << 20)
    # The kernel refusing the reservation: a file-size limit makes posix_fallocate fail
    # (the test ignores SIGXFSZ, which the kernel sends with the error).
    function_dir = _function(tmp_path)
    template = _trace(function_dir, tmp_path / "t")
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        from fwatchdog.template_cache.format import TemplateError
        from fwatchdog.template_cache.holder import hold
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            hold(Path({str(template)!r}), Path({str(function_dir)!r}))
        except TemplateError as exc:
            print(exc)
            sys.exit(3)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 3, done.stderr
    assert "reserving" in done.stdout and "failed" in done.stdout


def test_memory_available_reads_the_cgroup(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("600000\n")
    (tmp_path / "memory.stat").write_text("anon 100000\nfile 300000\nshmem 100000\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100000 kB\nMemAvailable: 50000 kB\n")
    # 1000000 - 600000 + (300000 - 100000) reclaimable page cache
    assert memory_available(tmp_path, meminfo) == 600000
    meminfo.write_text("MemAvailable: 100 kB\n")
    assert memory_available(tmp_path, meminfo) == 102400
    (tmp_path / "memory.max").write_text("max\n")
    assert memory_available(tmp_path, tmp_path / "none") is None


def test_attach_refuses_what_is_not_a_sealed_memfd(tmp_path: Path) -> None:
    function_dir = _function(tmp_path)
    template = _trace(function_dir, tmp_path / "t")
    with hold(template, function_dir) as holder:
        info = holder.info
        unsealed = os.memfd_create("x")
        try:
            os.ftruncate(unsealed, info.size)
            with pytest.raises(TemplateError, match="not sealed"):
                attach(info, [unsealed])
        finally:
            os.close(unsealed)
        with pytest.raises(TemplateError, match="exactly one fd"):
            attach(info, [])


@pytest.mark.parametrize(("text", "phrase"), [
    ("not json", "not JSON"),
    ("[1]", "JSON object"),
    ('{"kind": "memfd"}', "lacks"),
    ('{"manifest_sha256": "x", "kind": "pickle", "device": "cpu", "size": 1, "offsets": {}}',
     "unknown holder kind"),
    ('{"manifest_sha256": "x", "kind": "memfd", "device": "cpu", "size": 8,'
     ' "offsets": {"a": 9}}', "out of range"),
    ('{"manifest_sha256": "x", "kind": "memfd", "device": "cpu", "size": "8",'
     ' "offsets": {}}', "wrong type"),
    ('{"manifest_sha256": "x", "kind": "memfd", "device": "cpu", "size": 8,'
     ' "offsets": {}, "extra": 1}', "unknown fields"),
])
def test_handle_info_rejects_malformed_json(text: str, phrase: str) -> None:
    with pytest.raises(TemplateError, match=phrase):
        HandleInfo.from_json(text)


def test_handle_info_round_trips_plain_json(tmp_path: Path) -> None:
    function_dir = _function(tmp_path)
    template = _trace(function_dir, tmp_path / "t")
    with hold(template, function_dir) as holder:
        info = holder.info
    raw = json.loads(info.to_json())
    assert raw["kind"] == "memfd" and raw["ipc_handle"] is None
    assert HandleInfo.from_json(info.to_json()) == info


HOLDER_SCRIPT = """
import json, os, sys
from pathlib import Path
from fwatchdog.template_cache.holder import hold
holder = hold(Path(sys.argv[1]), Path(sys.argv[2]))
print(json.dumps({"info": holder.info.to_json(), "fd": holder.fds()[0]}), flush=True)
sys.stdin.read()  # until the test closes stdin (or kills us)
"""

HANDLER_SCRIPT = """
import os, sys
from fwatchdog.template_cache.holder import HandleInfo, attach
from fwatchdog.template_cache.verify import read_manifest
from pathlib import Path
source = attach(HandleInfo.from_json(sys.argv[2]), [int(sys.argv[3])])
entry = read_manifest(Path(sys.argv[1])).tensors[0]
print(float(source.tensor(entry).float().sum()), flush=True)
os.kill(os.getpid(), 9)  # dies while attached
"""


def test_holder_and_handler_deaths(tmp_path: Path) -> None:
    """A handler that dies while attached leaves the holder serving; a holder that
    dies leaves attached handlers reading their mapping (the memfd lives on)."""
    function_dir = _function(tmp_path)
    template = _trace(function_dir, tmp_path / "t")
    expected = _load(function_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, str(template),
                               str(function_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        started = json.loads(holder.stdout.readline())
        fd = os.open(f"/proc/{holder.pid}/fd/{started['fd']}", os.O_RDONLY)
        info = HandleInfo.from_json(started["info"])
        handler = subprocess.run([sys.executable, "-c", HANDLER_SCRIPT, str(template),
                                  started["info"], str(fd)], pass_fds=(fd,),
                                 capture_output=True, text=True, timeout=120, check=False)
        assert handler.returncode == -9, handler.stderr
        assert holder.poll() is None  # the holder did not notice
        source = attach(info, [fd])
        os.close(fd)
        with restore(template, function_dir, source=source) as stats:
            served = _load(function_dir)
        assert stats.hits == 1
        holder.kill()
        holder.wait(30)
        assert torch.equal(served["big"], expected["big"])
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(30)
