"""Build the golden template and the hostile templates from fixed inputs.

Run `python tests/template_cache_data/make_files.py` to regenerate the committed files
after a deliberate format change; tests/unit/test_tc_format.py checks that the
committed bytes equal what this script writes, and that verify rejects every hostile
template with the message listed in HOSTILE.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path

from fwatchdog.template_cache.format import FileBase, dumps_manifest
from fwatchdog.template_cache.writer import TemplateWriter

HERE = Path(__file__).resolve().parent
FINGERPRINT = {
    "handler_sha256": "0" * 64,
    "python": "3.11.7",
    "torch": "2.13.0",
    "transformers": "5.24.0",
    "safetensors": "0.8.0",
    "libraries": {"accelerate": "1.14.0", "gguf": "0.19.0", "flash-attn": None, "kernels": None,
                  "bitsandbytes": None, "numpy": "2.4.4"},
    "machine": "x86_64",
    "accelerator": {"kind": "cpu", "cuda": None, "gpus": []},
}
# Fixed tensors: (name, dtype, shape, raw little-endian bytes).
TENSORS = [
    ("0/embed.weight", "F32", (2, 3), struct.pack("<6f", 1, 2, 3, 4, 5, 6)),
    ("0/norm.weight", "BF16", (5,), struct.pack("<5H", 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0)),
    ("0/step", "I64", (), struct.pack("<q", 7)),
]
SOURCE = b"SOURCEFILE" + struct.pack("<4f", 0.5, 1.5, 2.5, 3.5)


def build_golden(out_dir: Path) -> Path:
    """A template with three packed tensors and one tensor referenced in a source file."""
    function_dir = out_dir.parent / (out_dir.name + "-function")
    function_dir.mkdir(parents=True, exist_ok=True)
    (function_dir / "weights.raw").write_bytes(SOURCE)
    writer = TemplateWriter(out_dir, created_by="golden")
    for name, dtype, shape, data in TENSORS:
        writer.add_packed(name, data, dtype, shape, mutated=name.endswith("step"))
    source_id = writer.add_source_file(
        "weights.raw", FileBase.FUNCTION, len(SOURCE), hashlib.sha256(SOURCE).hexdigest(),
        local=function_dir / "weights.raw",
    )
    writer.add_source_tensor(
        "0/bias", source_id, 10, "F32", (4,), hashlib.sha256(SOURCE[10:]).hexdigest(), False
    )
    loads = [
        {
            "loader": "load_file",
            "key": "load_file|path='weights.safetensors'|device='cpu'",
            "device": "cpu",
            "final_device": "cpu",
            "tensors": {"embed.weight": "0/embed.weight", "norm.weight": "0/norm.weight",
                        "step": "0/step", "bias": "0/bias"},
            "access_order": ["0/embed.weight", "0/norm.weight"],
        }
    ]
    body = {"function": {"traced_dir": "."}, "loads": loads, "skipped_loads": [], "trace": {}}
    return writer.finish(FINGERPRINT, body)


def _edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(template: Path) -> None:
        path = template / "manifest.json"
        manifest = json.loads(path.read_bytes())
        edit(manifest)
        path.write_bytes(dumps_manifest(manifest))

    return apply


def _flip_byte(offset: int) -> Callable[[Path], None]:
    def apply(template: Path) -> None:
        path = template / "weights.bin"
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))

    return apply


def _truncate(template: Path) -> None:
    path = template / "weights.bin"
    path.write_bytes(path.read_bytes()[:-4])


def _tensor(name: str, field: str, value: object) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:
        for t in manifest["tensors"]:
            if t["name"] == name:
                t[field] = value

    return edit


def _file(file_id: str, field: str, value: object) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:
        for f in manifest["files"]:
            if f["id"] == file_id:
                f[field] = value

    return edit


def _drop_tensor(name: str) -> Callable[[dict], None]:
    def edit(manifest: dict) -> None:
        manifest["tensors"] = [t for t in manifest["tensors"] if t["name"] != name]
        for load in manifest["loads"]:
            load["tensors"] = {k: v for k, v in load["tensors"].items() if v != name}
            load["access_order"] = [v for v in load["access_order"] if v != name]

    return edit


def _set(field: str, value: object) -> Callable[[dict], None]:
    return lambda manifest: manifest.__setitem__(field, value)


def _write_raw(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda template: (template / name).write_bytes(data)


def _remove(name: str) -> Callable[[Path], None]:
    return lambda template: (template / name).unlink()


# name -> (damage, a phrase verify's message must contain)
HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated_packed": (_truncate, "truncated"),
    "flipped_byte": (_flip_byte(70), "tensor 0/norm.weight: sha256 does not match"),
    "bad_tensor_checksum": (_edit_manifest(_tensor("0/step", "sha256", "f" * 64)),
                            "tensor 0/step: sha256 does not match"),
    "bad_tensor_xxh3": (_edit_manifest(_tensor("0/embed.weight", "xxh3", "0" * 32)),
                        "tensor 0/embed.weight: xxh3 does not match"),
    "bad_rest_xxh3": (_edit_manifest(_file("src0", "rest_xxh3", "1" * 32)),
                      "file src0 (weights.raw): rest_xxh3 does not match"),
    "bad_file_checksum": (_edit_manifest(_file("packed", "sha256", "e" * 64)),
                          "file packed (weights.bin): sha256 does not match"),
    "unknown_version": (_edit_manifest(_set("format_version", 99)),
                        "unsupported format_version 99"),
    "wrong_format_name": (_edit_manifest(_set("format", "safetensors")), "format is"),
    "offset_out_of_range": (_edit_manifest(_tensor("0/bias", "offset", 4096)), "out of range"),
    "escaping_path": (_edit_manifest(_file("packed", "path", "../../etc/passwd")),
                      "escapes the template folder"),
    "absolute_packed_path": (_edit_manifest(_file("packed", "base", "absolute")),
                             "must be a template-relative path"),
    "escaping_function_path": (_edit_manifest(_file("src0", "path", "../outside.raw")),
                               "escapes the function folder"),
    "missing_packed_file": (_remove("weights.bin"), "file packed missing"),
    "missing_manifest": (_remove("manifest.json"), "missing manifest.json"),
    "overlapping_ranges": (_edit_manifest(_tensor("0/norm.weight", "offset", 0)), "overlap"),
    "unaligned_offset": (_edit_manifest(_tensor("0/norm.weight", "offset", 24)),
                         "not aligned to 64"),
    "hole_in_packed": (_edit_manifest(_drop_tensor("0/norm.weight")),
                       "hole or misplaced tensor before 0/step (offset 128, expected 64)"),
    "bad_json": (_write_raw("manifest.json", b'{"format": "fwatchdog-template", '),
                 "not valid JSON"),
    "not_an_object": (_write_raw("manifest.json", b"[1, 2]\n"), "must hold a JSON object"),
    "shape_mismatch": (_edit_manifest(_tensor("0/embed.weight", "shape", [3, 3])),
                       "does not match F32[3, 3]"),
    "unknown_dtype": (_edit_manifest(_tensor("0/embed.weight", "dtype", "F128")),
                      "manifest field tensors/0/dtype"),
    "unknown_file_id": (_edit_manifest(_tensor("0/embed.weight", "file", "nope")),
                        "unknown file id 'nope'"),
    "negative_offset": (_edit_manifest(_tensor("0/embed.weight", "offset", -8)),
                        "manifest field tensors/0/offset"),
    "missing_field": (_edit_manifest(lambda m: m.pop("fingerprint")),
                      "'fingerprint' is a required"),
    "duplicate_tensor": (_edit_manifest(lambda m: m["tensors"].append(dict(m["tensors"][0]))),
                         "appears twice"),
    "dangling_load_name": (_edit_manifest(
        lambda m: m["loads"][0]["tensors"].__setitem__("ghost", "0/ghost")),
        "names unknown tensor 0/ghost"),
    "trailing_bytes": (lambda t: (t / "weights.bin").open("ab").write(b"\x00" * 64),
                       "is 200 bytes, manifest says 136"),
    "nonzero_padding": (_flip_byte(30), "non-zero padding"),
}


def build_hostile(golden: Path, out_root: Path) -> None:
    for name, (damage, _) in HOSTILE.items():
        target = out_root / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(golden, target)
        damage(target)


def main(root: Path = HERE) -> None:
    golden = root / "golden"
    build_golden(golden)
    build_hostile(golden, root / "hostile")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
