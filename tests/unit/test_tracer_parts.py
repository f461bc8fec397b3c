"""Pure parts of the tracer: samples, answer draining, call keys, import parsing, buckets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fwatchdog.template_cache.intercept import Loader, call_key, normalise_path
from fwatchdog.tracer import function, observe
from fwatchdog.tracer.build import dynamic_reason
from fwatchdog.tracer.recorder import Captured, LoadRecord


def test_default_samples_are_openai_chat_plain_and_streamed(tmp_path: Path) -> None:
    samples = function.load_samples(tmp_path)
    assert [(s.method, s.path) for s in samples] == [("POST", "/v1/chat/completions")] * 2
    bodies = [json.loads(s.body) for s in samples]
    assert bodies[0]["messages"][0]["role"] == "user"
    assert "stream" not in bodies[0] and bodies[1]["stream"] is True


def test_samples_folder_is_read_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "b.json").write_text(json.dumps({"path": "/b", "body": "raw"}))
    (tmp_path / "samples" / "a.json").write_text(
        json.dumps({"method": "get", "path": "/a", "body": {"x": 1}, "query": {"q": "1"}}))
    samples = function.load_samples(tmp_path)
    assert [s.name for s in samples] == ["a.json", "b.json"]
    event = samples[0].event()
    assert (event.method, event.path, event.body, event.query) == ("GET", "/a", b'{"x": 1}',
                                                                   {"q": "1"})
    assert samples[1].body == b"raw" and samples[1].method == "POST"


def test_bad_sample_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected a JSON object"):
        function.parse_sample("x.json", [1, 2])  # type: ignore[arg-type]


def test_consume_drains_streams() -> None:
    drained = []

    def stream():
        for chunk in (b"ab", "cd", {"e": 1}):
            drained.append(chunk)
            yield chunk

    assert function.consume(stream()) == 2 + 2 + len('{"e": 1}')
    assert len(drained) == 3
    assert function.consume({"statusCode": 200, "body": iter([b"xyz"])}) == 3


def test_call_key_names_every_argument_but_the_device(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    key, _ = call_key(Loader.LOAD_FILE, None, (str(tmp_path / "model" / "w.safetensors"),),
                      {"device": "cpu"}, tmp_path)
    assert key == ("load_file|path='function:model/w.safetensors'"
                   "|default_dtype='torch.float32'")
    other, _ = call_key(Loader.LOAD_FILE, None, (str(tmp_path / "model" / "w.safetensors"),),
                        {"device": "cuda"}, tmp_path)
    assert other == key  # the bytes read do not depend on the device
    dtype_key, _ = call_key(Loader.TORCH_LOAD, None, ("/x.pt",),
                            {"map_location": torch.device("cpu"), "mmap": True}, tmp_path)
    assert dtype_key == "torch_load|path='/x.pt'|mmap=True|default_dtype='torch.float32'"


def test_call_key_refuses_opaque_arguments(tmp_path: Path) -> None:
    key, reason = call_key(Loader.TORCH_LOAD, None, ("/x.pt",), {"pickle_module": object()},
                           tmp_path)
    assert key is None and "pickle_module" in reason
    key, reason = call_key(Loader.LOAD_FILE, None, (), {}, tmp_path)
    assert key is None and reason == "no path argument"


def test_paths_outside_the_function_folder_stay_absolute(tmp_path: Path) -> None:
    assert normalise_path("/models/llama", tmp_path) == "/models/llama"
    assert normalise_path(tmp_path / "m", tmp_path) == "function:m"


def _load(sums: dict[str, str]) -> LoadRecord:
    tensors = [Captured(name=n, tensor=torch.zeros(1), dtype="F32", shape=(1,), device="cpu",
                        sha256=s, requires_grad=False, source=None, snapshot=b"\0" * 4)
               for n, s in sums.items()]
    return LoadRecord(loader=Loader.LOAD_FILE, key="k", files=[], names={}, tensors=tensors)


def test_dynamic_reason_compares_two_start_ups() -> None:
    load = _load({"0/a": "1", "0/b": "2"})
    assert dynamic_reason(load, None) is None
    assert dynamic_reason(load, {"k": {"0/a": "1", "0/b": "2"}}) is None
    assert "0/b" in (dynamic_reason(load, {"k": {"0/a": "1", "0/b": "3"}}) or "")
    assert dynamic_reason(load, {}) == "load not seen in the second traced start-up"


def test_parse_importtime_keeps_top_level_non_stdlib() -> None:
    lines = [
        "import time: self [us] | cumulative | imported package",
        "import time:       120 |        120 |   torch._C",
        "import time:      1000 |       5000 | torch",
        "import time:        50 |         50 | json",
        "import time:        70 |         70 | transformers",
        "some other stderr line",
    ]
    parsed = observe.parse_importtime(lines, {"torch", "torch._C", "json"})
    assert parsed == [{"module": "torch", "self_us": 1000, "cumulative_us": 5000}]


@pytest.mark.parametrize(("limit", "buckets"), [
    (1, [1]), (5, [1, 2, 4, 5]), (8, [1, 2, 4, 8]), (100000, [2 ** i for i in range(14)]),
])
def test_shape_buckets(limit: int, buckets: list[int]) -> None:
    assert observe.shape_buckets(limit) == buckets


def test_op_watch_records_first_use_and_shapes() -> None:
    weight = torch.ones(3, 3)
    bias = torch.ones(3)
    watch = observe.OpWatch({weight.data_ptr(): "w", bias.data_ptr(): "b"})
    with watch:
        torch.nn.functional.linear(torch.ones(2, 3), weight, bias)
        torch.nn.functional.linear(torch.ones(2, 3), weight)
    assert watch.first_use == ["w", "b"] or watch.first_use == ["b", "w"]
    assert any(op["shapes"] and [2, 3] in op["shapes"] for op in watch.op_list())
