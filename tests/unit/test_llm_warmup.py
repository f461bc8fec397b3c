"""The warm-up plan a mode=llm handler runs before it reports ready."""

from __future__ import annotations

import json

from fwatchdog.config import Warmup
from fwatchdog.llm import warmup

CHAT = {"name": "chat", "method": "POST", "path": "/v1/chat/completions",
        "headers": {"Content-Type": "application/json"},
        "body": json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                            "stop": ["\n"]})}
PLAIN = {"name": "plain", "method": "GET", "path": "/"}
PLAN = {"samples": [PLAIN, CHAT], "prompt_lengths": [1, 2, 4, 8]}


def test_auto_runs_the_samples_only_on_cpu() -> None:
    assert warmup.plan_requests(PLAN, Warmup.AUTO, cuda=False) == [PLAIN, CHAT]


def test_off_runs_nothing() -> None:
    assert warmup.plan_requests(PLAN, Warmup.OFF, cuda=True) == []


def test_full_adds_each_prompt_length_greedy_then_sampled_on_a_gpu() -> None:
    requests = warmup.plan_requests(PLAN, Warmup.AUTO, cuda=True)
    assert requests[:2] == [PLAIN, CHAT]
    extra = requests[2:]
    assert [r["name"] for r in extra] == [
        "chat-1", "chat-1-sampled", "chat-2", "chat-2-sampled", "chat-4", "chat-4-sampled",
        "chat-8", "chat-8-sampled"]
    body = json.loads(extra[6]["body"])
    assert body["messages"] == [{"role": "user", "content": " ".join(["hello"] * 8)}]
    assert body["max_tokens"] == 2 and body["temperature"] == 0 and "stop" not in body
    sampled = json.loads(extra[7]["body"])
    assert sampled["temperature"] > 0 and 0 < sampled["top_p"] < 1


def test_the_longest_bucket_leaves_room_for_the_template_and_the_answer() -> None:
    plan = {**PLAN, "prompt_lengths": [1024, 4096, 8192], "max_context": 8192}
    requests = warmup.plan_requests(plan, Warmup.FULL, cuda=True)
    assert [r["name"] for r in requests[2::2]] == ["chat-1024", "chat-4096", "chat-7936"]
    body = json.loads(requests[-1]["body"])
    assert body["messages"][0]["content"].count("hello") == 7936


def test_a_sample_that_is_not_openai_shaped_is_not_expanded() -> None:
    assert warmup.plan_requests({"samples": [PLAIN], "prompt_lengths": [1, 2]},
                                Warmup.FULL, cuda=False) == [PLAIN]


def test_without_a_plan_the_tracer_default_samples_run() -> None:
    from fwatchdog.tracer.function import DEFAULT_SAMPLES

    assert warmup.plan_requests(None, Warmup.SAMPLES, cuda=False) == [dict(s) for s in
                                                                       DEFAULT_SAMPLES]


def test_steps_count_answers_and_failures_without_raising() -> None:
    seen = []

    def handle(event, context):
        seen.append(event.path)
        if event.path == "/boom":
            raise ValueError("boom")
        if event.path == "/refuse":
            return {"statusCode": 400, "body": "no"}
        return iter([b"a", b"b"])

    plan = {"samples": [{"path": "/ok"}, {"path": "/boom"}, {"path": "/refuse"}]}
    progress = warmup.Progress(plan, Warmup.SAMPLES, cuda=False)
    while not progress.done:
        progress.step(handle)
    result = progress.report()
    assert seen == ["/ok", "/boom", "/refuse"]
    assert (result["requests"], result["ok"], result["failed"]) == (3, 1, 2)


def test_progress_runs_one_request_per_step_and_can_stop_between_them() -> None:
    seen = []

    def handle(event, context):
        seen.append(event.path)
        return {"statusCode": 500 if event.path == "/b" else 200, "body": ""}

    plan = {"samples": [{"path": "/a"}, {"path": "/b"}, {"path": "/c"}]}
    progress = warmup.Progress(plan, Warmup.SAMPLES, cuda=False)
    assert not progress.done
    progress.step(handle)
    assert seen == ["/a"] and progress.next == 1 and not progress.done
    progress.pauses += 1  # a handler stopped here to serve a request, then goes on
    progress.step(handle)
    progress.step(handle)
    assert seen == ["/a", "/b", "/c"] and progress.done
    report = progress.report()
    assert (report["requests"], report["ok"], report["failed"], report["pauses"]) == (3, 2, 1, 1)


def test_an_empty_plan_is_done_at_once() -> None:
    progress = warmup.Progress({"samples": [{"path": "/a"}]}, Warmup.OFF, cuda=True)
    assert progress.done and progress.report()["requests"] == 0
