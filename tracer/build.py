"""Turn one traced start-up (a Recorder after the samples) into a template folder.

Static versus dynamic: a load is static when every one of its tensors had the same
sha256 at load time in this start-up and in an earlier, independent start-up of the
same function (a fresh process), and it came from files (all four loaders read
files, whose hashes the template records). Anything else is dynamic: it is listed in
`skipped_loads` and runs normally at every start. Tensors not produced by a traced
loader are never captured at all, so they are re-created by the function's own code.

Mutated: a static tensor whose sha256 after the samples differs from its load-time
sha256. Restore gives each handler a private copy of it, never a shared view.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fwatchdog.template_cache.format import FileBase
from fwatchdog.template_cache.tensors import tensor_bytes
from fwatchdog.template_cache.writer import TemplateWriter, sha256_file
from fwatchdog.tracer.recorder import LoadRecord, Recorder

Checksums = dict[str, dict[str, str]]  # load key -> tensor index name -> sha256


def load_checksums(recorder: Recorder) -> Checksums:
    return {load.key: {t.name: t.sha256 for t in load.tensors} for load in recorder.loads}


def dynamic_reason(load: LoadRecord, other: Checksums | None) -> str | None:
    """Why a load cannot be served from the template, or None."""
    if load.model is not None and load.model.get("unrestorable"):
        return "model attributes cannot be restored: " + "; ".join(load.model["unrestorable"][:5])
    if other is None:
        return None  # one start-up only (--runs 1): provenance alone decides
    theirs = other.get(load.key)
    if theirs is None:
        return "load not seen in the second traced start-up"
    mine = {t.name: t.sha256 for t in load.tensors}
    if mine != theirs:
        differing = sorted(name for name in mine if theirs.get(name) != mine[name])
        return f"bytes differ between two traced start-ups: {', '.join(differing[:5])}"
    return None


def file_ref(path: Path, function_dir: Path) -> tuple[str, FileBase]:
    resolved = path.resolve()
    try:
        return resolved.relative_to(function_dir.resolve()).as_posix(), FileBase.FUNCTION
    except ValueError:
        return str(resolved), FileBase.ABSOLUTE


def write_template(recorder: Recorder, out_dir: Path, function_dir: Path,
                   fingerprint: dict[str, Any], other: Checksums | None,
                   first_use: list[str], trace: dict[str, Any]) -> Path:
    writer = TemplateWriter(out_dir, created_by="fwatchdog.tracer", record_mtimes=True)
    hashes: dict[Path, str] = {}
    loads: list[dict[str, Any]] = []
    # Two loads reading the same bytes of one file share one index entry: ranges in a
    # file never overlap.
    by_range: dict[tuple[str, int], str] = {}
    skipped = list(recorder.skipped)
    try:
        for load in recorder.loads:
            reason = dynamic_reason(load, other)
            if reason is not None:
                skipped.append({"loader": load.loader.value, "key": load.key, "reason": reason})
                continue
            file_ids = {}
            for path in load.files:
                if path not in hashes:
                    hashes[path] = sha256_file(path)
                relative, base = file_ref(path, function_dir)
                file_ids[path] = writer.add_source_file(relative, base, path.stat().st_size,
                                                        hashes[path], local=path)
            final_devices = set()
            alias: dict[str, str] = {}
            for t in load.tensors:
                after = hashlib.sha256(tensor_bytes(t.tensor)).hexdigest()
                mutated = after != t.sha256
                final_devices.add(str(t.tensor.device))
                if t.source is not None:
                    path, offset = t.source
                    existing = by_range.get((file_ids[path], offset))
                    if existing is not None:
                        alias[t.name] = existing
                        if mutated:
                            writer.mark_mutated(existing)
                        continue
                    by_range[(file_ids[path], offset)] = t.name
                    writer.add_source_tensor(t.name, file_ids[path], offset, t.dtype, t.shape,
                                             t.sha256, mutated)
                else:
                    assert t.snapshot is not None
                    writer.add_packed(t.name, t.snapshot, t.dtype, t.shape, mutated)
            names = {t.name for t in load.tensors}
            devices = {t.device for t in load.tensors} or {"cpu"}
            entry: dict[str, Any] = {
                "loader": load.loader.value,
                "key": load.key,
                "device": sorted(devices)[0] if len(devices) == 1 else "mixed",
                "final_device": sorted(final_devices)[0] if len(final_devices) == 1 else None,
                "tensors": {local: alias.get(n, n) for local, n in load.names.items()},
                "requires_grad": [alias.get(t.name, t.name) for t in load.tensors
                                  if t.requires_grad],
                "access_order": [alias.get(n, n) for n in first_use if n in names],
                "container": load.container,
            }
            if load.model is not None:
                entry["model"] = load.model
            loads.append(entry)
        body = {
            "function": {"traced_dir": str(function_dir.resolve())},
            "loads": loads,
            "skipped_loads": skipped,
            "trace": trace,
        }
        return writer.finish(fingerprint, body)
    except BaseException:
        writer.abort()
        raise
