"""mode=llm against the real fwatchdog process, with a tiny Llama function on CPU.

Each scenario starts ``fwatchdog mode=llm`` on free ports with a template traced
once for the module (the tracer as the image runs it), talks plain HTTP to it, and
looks at its processes through /proc: titles, parents, liveness.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Reply, Watchdog, alive, fetch, http_status, wait_until
from tests.contract import llm_function

pytestmark = pytest.mark.timeout(240)
START = 90.0  # a zygote's imports on a busy 2-core machine


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llm-fn")
    function_dir = llm_function.make_function(root / "function")
    template = llm_function.trace(function_dir, root / "template")
    return function_dir, template


@pytest.fixture
def signals(tmp_path: Path) -> Path:
    path = tmp_path / "signals"
    path.mkdir()
    return path


@pytest.fixture
def llm(watchdog_factory: Callable[..., Watchdog], traced: tuple[Path, Path],
        signals: Path) -> Callable[..., Watchdog]:
    function_dir, template = traced

    def start(**env: str) -> Watchdog:
        full = {"mode": "llm", "function_dir": str(function_dir), "template_dir": str(template),
                "LLM_TEST_SIGNALS": str(signals), "healthcheck_interval": "0s",
                "TOKENIZERS_PARALLELISM": "false", **env}
        wd = watchdog_factory(full)
        wd.wait_ready(timeout=30)
        return wd

    return start


def wait_warm(wd: Watchdog, timeout: float = START) -> None:
    try:
        wait_until(lambda: wd.proc.poll() is not None or http_status(wd.url + "/_/ready") == 200,
                   timeout=timeout, what="a warm handler (/_/ready 200)")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{wd.text()[-4000:]}") from None
    assert wd.proc.poll() is None, wd.text()


def get_json(wd: Watchdog, path: str, **kw: object) -> dict:
    reply = fetch(wd.url + path, **kw)  # type: ignore[arg-type]
    assert reply.status == 200, (reply.status, reply.body, wd.text()[-3000:])
    data: dict = json.loads(reply.body)
    return data


def processes(root: int) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, title) for every live descendant of ``root``."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields[0] == b"Z":
            continue
        table[int(entry.name)] = (int(fields[1]), title)
    found: dict[int, tuple[int, str]] = {}
    frontier = {root}
    while frontier:
        children = {pid for pid, (ppid, _) in table.items() if ppid in frontier}
        for pid in children:
            found[pid] = table[pid]
        frontier = children
    return found


def titled(wd: Watchdog, prefix: str) -> list[int]:
    """Descendants whose title starts with ``prefix``. The holder and the zygote are
    the front's own children: a handler carries the zygote's title for the moment
    between its fork and its first title of its own."""
    direct = prefix.startswith(("fwatchdog: zygote", "fwatchdog: holder"))
    return sorted(pid for pid, (ppid, title) in processes(wd.proc.pid).items()
                  if title.startswith(prefix) and (not direct or ppid == wd.proc.pid))


def metric(wd: Watchdog, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{wd.metrics_port}/metrics",
                                  timeout=5).read().decode()
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def serving_pid(wd: Watchdog) -> int:
    return int(get_json(wd, "/pid")["pid"])


# -- processes and readiness ------------------------------------------------------


def test_ready_is_503_until_a_warm_handler_exists(llm: Callable[..., Watchdog],
                                                  signals: Path) -> None:
    wd = llm(LLM_TEST_HOLD_START="1")
    assert http_status(wd.url + "/_/health") == 200
    # The handler is held inside the function's start-up: alive, not warm.
    wait_until(lambda: titled(wd, "fwatchdog: handler restoring"), timeout=START,
               what="a handler in its start-up")
    reply = fetch(wd.url + "/_/ready")
    assert reply.status == 503
    assert b"no warm handler yet" in reply.body
    (signals / "go").write_text("")
    wait_warm(wd)
    assert get_json(wd, "/get")["x"] is None


def test_a_request_that_finds_nothing_warm_is_answered_before_the_warm_up(
        llm: Callable[..., Watchdog], signals: Path) -> None:
    """A cold start's waiting request goes to the first handler that can answer, not
    after its warm-up; the warm-up runs once the handler is idle, and only a warm
    handler makes the pool ready."""
    wd = llm(LLM_TEST_HOLD_WARMUP="1", exec_timeout=f"{START + 30:g}s")
    assert http_status(wd.url + "/_/ready") == 503
    first = get_json(wd, "/pid", timeout=START + 30)  # sent before any handler exists
    wait_until(lambda: titled(wd, "fwatchdog: handler warming"), timeout=30,
               what="the handler warming up after the request")
    assert http_status(wd.url + "/_/ready") == 503
    assert b"no warm handler yet" in fetch(wd.url + "/_/ready").body
    (signals / "warm").write_text("")
    wait_warm(wd, timeout=30)
    assert serving_pid(wd) == first["pid"]
    log = wd.text()
    assert log.index("handler_listening") < log.index("handler_ready"), log[-3000:]
    assert metric(wd, "fwatchdog_llm_phase_seconds_count", 'phase="handler_listen"') >= 1


def test_a_request_during_the_warm_up_pauses_it_and_goes_first(
        llm: Callable[..., Watchdog], signals: Path) -> None:
    """With nothing warm, a request that comes while the only handler warms up waits
    at most for the warm-up request in progress, not for the whole plan."""
    wd = llm(LLM_TEST_HOLD_WARMUP="1", exec_timeout=f"{START + 30:g}s")
    first = get_json(wd, "/pid", timeout=START + 30)
    wait_until(lambda: titled(wd, "fwatchdog: handler warming"), timeout=30,
               what="the handler warming up")
    replies: list[Reply] = []
    waiting = threading.Thread(target=lambda: replies.append(fetch(wd.url + "/pid", timeout=60)))
    waiting.start()
    try:
        wait_until(lambda: "handler_warmup_pausing" in wd.text(), timeout=30,
                   what="the front asking the warm-up to pause")
        (signals / "warm").write_text("")  # the warm-up request in progress may end
        waiting.join(60)
    finally:
        (signals / "warm").write_text("")
        waiting.join(60)
    assert replies, wd.text()[-3000:]
    assert replies[0].status == 200, (replies[0], wd.text()[-3000:])
    assert json.loads(replies[0].body)["pid"] == first["pid"]
    wait_warm(wd, timeout=30)
    log = wd.text()
    assert log.index("handler_warmup_paused") < log.index("handler_ready"), log[-3000:]
    assert "pauses=1" in log, log[-3000:]


def test_a_spare_s_warm_up_yields_to_requests_on_a_warm_handler(
        llm: Callable[..., Watchdog], signals: Path) -> None:
    """A request that starts on a warm handler pauses a warm-up beside it after its
    current step (their GPU work would slow the request); the warm-up goes on once
    the request has ended."""
    wd = llm(LLM_TEST_HOLD_WARMUP="1", exec_timeout=f"{START + 30:g}s")
    wait_until(lambda: titled(wd, "fwatchdog: handler warming"), timeout=START,
               what="the first handler warming up")
    [first] = titled(wd, "fwatchdog: handler warming")
    (signals / f"warm-{first}").write_text("")
    wait_warm(wd, timeout=60)
    wait_until(lambda: titled(wd, "fwatchdog: handler warming"), timeout=START,
               what="the spare warming up (held in its first warm-up request)")
    [spare] = titled(wd, "fwatchdog: handler warming")
    conn = http.client.HTTPConnection("127.0.0.1", wd.port, timeout=60)
    try:
        conn.request("GET", "/stream", headers={"Accept": "text/event-stream"})
        resp = conn.getresponse()
        assert b"data:" in resp.read1(65536)
        wait_until(lambda: 'reason="a request runs on a warm handler"' in wd.text(),
                   timeout=10, what="the spare asked to pause its warm-up")
        (signals / f"warm-{spare}").write_text("")  # its warm-up request in progress ends
        wait_until(lambda: f"event=handler_warmup_paused id=2 pid={spare}" in wd.text(),
                   timeout=30, what="the spare's warm-up paused after its step")
        assert b"data:" in resp.read1(65536)  # the stream runs on the warm handler
    finally:
        conn.close()
    wait_until(lambda: f"event=handler_ready id=2 pid={spare}" in wd.text(), timeout=60,
               what="the spare's warm-up to go on and finish")
    log = wd.text()
    assert log.index("handler_warmup_paused id=2") < log.index("handler_ready id=2"), log[-3000:]


def test_processes_have_titles_and_handlers_are_forked_from_the_zygote(
        llm: Callable[..., Watchdog]) -> None:
    wd = llm()
    wait_warm(wd)
    wait_until(lambda: len(titled(wd, "fwatchdog: handler ready")) == 2, timeout=START,
               what="a serving handler and a spare")
    tree = processes(wd.proc.pid)
    [holder] = titled(wd, "fwatchdog: holder")
    [zygote] = titled(wd, "fwatchdog: zygote")
    assert tree[holder][0] == wd.proc.pid and tree[zygote][0] == wd.proc.pid
    for pid in titled(wd, "fwatchdog: handler"):
        assert tree[pid][0] == zygote
    log = wd.text()
    assert "cuda_initialized=False" in log
    # Spawned by the entry point before the front's imports, then adopted.
    for name, pid in (("zygote", zygote), ("holder", holder)):
        assert f"event={name}_spawned pid={pid} early=True" in log, log[:3000]
        assert log.index(f"event={name}_spawned") < log.index("event=listening"), log[:3000]


def test_a_front_that_cannot_listen_ends_the_processes_it_spawned_early(
        watchdog_factory: Callable[..., Watchdog], traced: tuple[Path, Path],
        tmp_path: Path) -> None:
    """The zygote and the holder start before the front binds its port; a port in use
    still ends in exit 1 with nothing left running and the runtime's folder gone."""
    function_dir, template = traced
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        wd = watchdog_factory({"mode": "llm", "function_dir": str(function_dir),
                               "template_dir": str(template), "port": str(port),
                               "healthcheck_interval": "0s"})
        assert wd.proc.wait(60) == 1, wd.text()
    log = wd.text()
    assert "event=listen_failed" in log, log
    spawned = [int(m) for m in re.findall(r"event=(?:zygote|holder)_spawned pid=(\d+) early=True",
                                          log)]
    assert len(spawned) == 2, log
    wait_until(lambda: not any(alive(pid) for pid in spawned), timeout=15,
               what="the early zygote and holder to end")
    assert not list((wd.tmpdir).glob("fwatchdog-llm-*")), log


def test_the_template_serves_the_weights_and_the_answer_is_unchanged(
        llm: Callable[..., Watchdog], traced: tuple[Path, Path]) -> None:
    wd = llm()
    wait_warm(wd)
    tokens = get_json(wd, "/generate")["tokens"]
    assert metric(wd, "fwatchdog_llm_template_loads_total", 'outcome="hit"') >= 1
    assert metric(wd, "fwatchdog_llm_template_loads_total", 'outcome="miss"') == 0
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(traced[0] / "model")
    with torch.no_grad():
        expected = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=6,
                                  do_sample=False)[0].tolist()
    assert tokens == expected
    assert metric(wd, "fwatchdog_llm_phase_seconds_count", 'phase="zygote_import"') == 1
    assert metric(wd, "fwatchdog_llm_phase_seconds_count", 'phase="handler_warmup"') >= 1
    assert metric(wd, "fwatchdog_llm_requests_total", 'outcome="ok"') >= 1
    assert "verify=full" in wd.text()  # every byte checked as it streams, by default


def test_quick_verification_is_opt_in_and_serves_the_same_weights(
        llm: Callable[..., Watchdog]) -> None:
    wd = llm(llm_template_verify="quick")
    wait_warm(wd)
    assert "verify=quick" in wd.text() and "template=used" in wd.text()
    assert get_json(wd, "/generate")["tokens"] == get_json(wd, "/generate")["tokens"]


def test_handlers_never_initialise_cuda_on_a_cpu_machine(llm: Callable[..., Watchdog]) -> None:
    wd = llm()
    wait_warm(wd)
    assert get_json(wd, "/cuda")["initialized"] is False
    # The zygote pauses the collector for its imports and freezes its heap before it
    # forks: a handler runs with the collector on and the zygote's objects frozen.
    state = get_json(wd, "/gc")
    assert state["enabled"] is True, state
    assert state["frozen"] > 10_000, state


# -- isolation and recycling -------------------------------------------------------


def test_max_requests_1_gives_every_request_a_fresh_process(
        llm: Callable[..., Watchdog]) -> None:
    wd = llm(llm_max_requests="1")
    wait_warm(wd)
    first = get_json(wd, "/set", method="POST", body=b"secret")
    wait_warm(wd)
    second = get_json(wd, "/get")
    assert second["x"] is None
    assert first["pid"] != second["pid"]
    wait_until(lambda: not alive(first["pid"]), timeout=30, what="the used handler to exit")

    # A request takes the spare; the spare's replacement waits for the request in
    # flight (its CUDA context would slow the request on a GPU), at most 5 s.
    wait_until(lambda: len(titled(wd, "fwatchdog: handler ready")) == 2, timeout=START,
               what="a serving handler and a spare")
    conn = http.client.HTTPConnection("127.0.0.1", wd.port, timeout=60)
    try:
        conn.request("GET", "/stream", headers={"Accept": "text/event-stream"})
        resp = conn.getresponse()
        assert b"data:" in resp.read1(65536)
        wait_until(lambda: "event=spare_deferred" in wd.text(), timeout=10,
                   what="the spare's fork deferred while the stream runs")
        log = wd.text()
        assert "event=handler_forking" not in log[log.index("event=spare_deferred"):], log[-3000:]
        # Still streaming: the bound lets the spare be forked anyway.
        wait_until(lambda: "event=handler_forking" in wd.text()[
            wd.text().index("event=spare_deferred"):], timeout=30,
            what="the deferred spare forked within its bound while the stream runs")
        assert b"data:" in resp.read1(65536)
    finally:
        conn.close()


def test_without_recycling_one_handler_keeps_its_state(llm: Callable[..., Watchdog]) -> None:
    wd = llm()
    wait_warm(wd)
    first = get_json(wd, "/set", method="POST", body=b"kept")
    second = get_json(wd, "/get")
    assert second == {"x": "kept", "pid": first["pid"]}


# -- failures --------------------------------------------------------------------


def test_after_kill_9_of_the_serving_handler_the_pool_is_ready_within_4_s(
        llm: Callable[..., Watchdog]) -> None:
    wd = llm()
    wait_warm(wd)
    wait_until(lambda: len(titled(wd, "fwatchdog: handler ready")) == 2, timeout=START,
               what="a serving handler and a warm spare")
    victim = serving_pid(wd)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: not alive(victim), timeout=5, what="the handler to die")

    def answered_by_another() -> bool:
        # A request racing the kill may still be a 502 (it was on its way to the dying
        # process); what must hold is a warm pool again within 4 s.
        reply = fetch(wd.url + "/pid")
        return (reply.status == 200 and json.loads(reply.body)["pid"] != victim
                and http_status(wd.url + "/_/ready") == 200)

    wait_until(answered_by_another, timeout=4.0 - (time.monotonic() - killed),
               what="a warm handler again")


def test_a_handler_that_crashes_mid_request_gives_502_and_is_replaced(
        llm: Callable[..., Watchdog]) -> None:
    wd = llm()
    wait_warm(wd)
    before = serving_pid(wd)
    reply = fetch(wd.url + "/crash")
    assert reply.status == 502, reply
    wait_warm(wd)
    assert serving_pid(wd) != before
    assert metric(wd, "fwatchdog_llm_requests_total", 'outcome="crashed"') == 1
    wait_until(lambda: len(titled(wd, "fwatchdog: handler ready")) == 2, timeout=START,
               what="the pool to be whole again")


def test_a_stream_cut_by_a_crash_ends_with_an_sse_error_event(
        llm: Callable[..., Watchdog]) -> None:
    wd = llm()
    wait_warm(wd)
    conn = http.client.HTTPConnection("127.0.0.1", wd.port, timeout=30)
    conn.request("GET", "/stream-crash", headers={"Accept": "text/event-stream"})
    resp = conn.getresponse()
    assert resp.status == 200
    body = b""
    with pytest.raises(http.client.IncompleteRead) as cut:
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            body += chunk
    body += cut.value.partial
    assert b'data: {"n": 0}' in body
    assert b"event: error" in body and b"handler_failed" in body
    conn.close()


def test_a_hung_handler_is_killed_at_exec_timeout(llm: Callable[..., Watchdog]) -> None:
    wd = llm(exec_timeout="2s")
    wait_warm(wd)
    victim = serving_pid(wd)
    started = time.monotonic()
    reply = fetch(wd.url + "/hang")
    assert reply.status == 504
    assert time.monotonic() - started < 10
    wait_until(lambda: not alive(victim), timeout=10, what="the hung handler to be killed")
    wait_warm(wd)
    assert serving_pid(wd) != victim
    assert metric(wd, "fwatchdog_llm_requests_total", 'outcome="timeout"') == 1


def test_x_timeout_shortens_the_wait_for_a_handler(llm: Callable[..., Watchdog]) -> None:
    wd = llm(LLM_TEST_HOLD_START="1")
    started = time.monotonic()
    reply = fetch(wd.url + "/pid", headers={"X-Timeout": "1s"})
    assert reply.status == 503
    assert b"no warm handler became ready in time" in reply.body
    assert time.monotonic() - started < 10


def test_a_boot_error_is_reported_and_retried_with_backoff(
        llm: Callable[..., Watchdog]) -> None:
    wd = llm(LLM_TEST_BOOT_FAIL="1")
    wd.wait_output("event=handler_boot_failed", timeout=START)
    assert "RuntimeError: the model cannot be loaded" in wd.text()  # the traceback
    reply = fetch(wd.url + "/_/ready")
    assert reply.status == 503 and b"the function failed to start" in reply.body
    reply = fetch(wd.url + "/pid")
    assert reply.status == 503 and b"LLM_TEST_BOOT_FAIL" in reply.body
    first = time.monotonic()
    wd.wait_output("retry_in=2s", timeout=30)
    # Backing off: 1 s, then 2 s, then 4 s between tries, never a tight loop.
    window = time.monotonic() - first
    tries = wd.text().count("event=handler_forking")
    assert tries <= 3 + window, wd.text()[-2000:]
    assert wd.proc.poll() is None


def test_a_warm_up_that_hangs_is_a_failed_start_up(llm: Callable[..., Watchdog],
                                                   signals: Path) -> None:
    """A warm-up request past exec_timeout: the handler says why and leaves, the pool
    stays not-ready with the reason, and the next fork backs off."""
    wd = llm(LLM_TEST_HOLD_WARMUP="1", exec_timeout="2s")
    wd.wait_output("event=handler_boot_failed", timeout=START)
    assert "ran past 2s (exec_timeout)" in wd.text(), wd.text()[-3000:]
    reply = fetch(wd.url + "/_/ready")
    assert reply.status == 503 and b"the function failed to start" in reply.body
    (signals / "warm").write_text("")  # the function stops hanging: the next one warms up
    wait_warm(wd)
    assert wd.proc.poll() is None


def test_a_dead_zygote_is_replaced_and_ready_is_503_meanwhile(
        llm: Callable[..., Watchdog]) -> None:
    wd = llm()
    wait_warm(wd)
    [zygote] = titled(wd, "fwatchdog: zygote")
    os.kill(zygote, signal.SIGKILL)
    wait_until(lambda: http_status(wd.url + "/_/ready") == 503, timeout=10,
               what="not ready while the zygote is replaced")
    wd.wait_output("event=zygote_died", timeout=10)
    wait_warm(wd)
    [again] = titled(wd, "fwatchdog: zygote")
    assert again != zygote
    assert get_json(wd, "/pid")["pid"]


def test_a_dead_holder_is_replaced_and_its_handlers_retired(
        llm: Callable[..., Watchdog]) -> None:
    wd = llm()
    wait_warm(wd)
    before = serving_pid(wd)
    [holder] = titled(wd, "fwatchdog: holder")
    os.kill(holder, signal.SIGKILL)
    wait_until(lambda: http_status(wd.url + "/_/ready") == 503, timeout=10,
               what="not ready while the holder is replaced")
    wait_warm(wd)
    [again] = titled(wd, "fwatchdog: holder")
    assert again != holder
    assert serving_pid(wd) != before
    wait_until(lambda: not alive(before), timeout=10, what="the old handler to be retired")


def test_a_client_that_leaves_mid_stream_stops_the_generation(
        llm: Callable[..., Watchdog], signals: Path) -> None:
    wd = llm()
    wait_warm(wd)
    pid = serving_pid(wd)
    conn = http.client.HTTPConnection("127.0.0.1", wd.port, timeout=30)
    conn.request("GET", "/stream", headers={"Accept": "text/event-stream"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert b"data:" in resp.read1(65536)
    conn.close()
    wait_until(lambda: (signals / f"stopped-{pid}").exists(), timeout=10,
               what="the function to see the client leave")
    assert get_json(wd, "/pid")["pid"] == pid  # the handler lives on


# -- without a template, release and wake, shutdown ---------------------------------


def test_without_a_template_handlers_run_the_ordinary_start_up(
        watchdog_factory: Callable[..., Watchdog], traced: tuple[Path, Path],
        tmp_path: Path) -> None:
    wd = watchdog_factory({"mode": "llm", "function_dir": str(traced[0]),
                           "template_dir": str(tmp_path / "none"),
                           "healthcheck_interval": "0s"})
    wd.wait_ready()
    wait_warm(wd)
    assert get_json(wd, "/generate")["tokens"]
    assert "event=template_unavailable" in wd.text()
    assert metric(wd, "fwatchdog_llm_template_rejected_total", 'reason="missing"') >= 1
    assert not titled(wd, "fwatchdog: holder")


def test_a_stale_template_is_rejected_and_the_start_is_ordinary(
        watchdog_factory: Callable[..., Watchdog], traced: tuple[Path, Path],
        tmp_path: Path) -> None:
    import shutil

    function_dir = tmp_path / "function"
    shutil.copytree(traced[0], function_dir)
    (function_dir / "handler.py").write_text((function_dir / "handler.py").read_text()
                                             + "\n# changed after the trace\n")
    wd = watchdog_factory({"mode": "llm", "function_dir": str(function_dir),
                           "template_dir": str(traced[1]), "healthcheck_interval": "0s"})
    wd.wait_ready()
    wait_warm(wd)
    assert get_json(wd, "/generate")["tokens"]
    assert "event=template_unavailable" in wd.text() and "fingerprint" in wd.text()
    assert metric(wd, "fwatchdog_llm_template_rejected_total", 'reason="fingerprint"') >= 1


def test_idle_release_keeps_ready_and_a_request_wakes_it(
        llm: Callable[..., Watchdog], signals: Path) -> None:
    wd = llm(llm_gpu_idle_timeout="1s")
    wait_warm(wd)
    wait_until(lambda: len(titled(wd, "fwatchdog: handler ready")) == 2, timeout=START,
               what="a serving handler and a spare")
    before = get_json(wd, "/generate")
    assert "memfd:fwatchdog-template" in Path(f"/proc/{before['pid']}/maps").read_text()
    wd.wait_output("event=gpu_released", timeout=30)
    # The handlers let go of the weights but stay, with their warm state; no view of
    # the holder's buffer is left mapped in them (one would keep all of it alive).
    kept = titled(wd, "fwatchdog: handler released")
    assert len(kept) == 2 and before["pid"] in kept
    for pid in kept:
        assert "memfd:fwatchdog-template" not in Path(f"/proc/{pid}/maps").read_text()
    assert titled(wd, "fwatchdog: holder released")
    # The function's own hook ran first in each, for what it holds besides the weights.
    assert all((signals / f"released-{pid}").exists() for pid in kept)
    assert not any(signals.glob("woken-*"))
    assert http_status(wd.url + "/_/ready") == 200  # it can answer: a request wakes it
    after = get_json(wd, "/generate")
    # A kept process answers (whichever mapped the buffer first), with the same weights.
    assert after["pid"] in kept and after["tokens"] == before["tokens"]
    assert metric(wd, "fwatchdog_llm_phase_seconds_count", 'phase="wake"') == 1
    assert "event=handler_reattached" in wd.text()
    assert (signals / f"woken-{after['pid']}").exists()


def test_idle_release_without_a_template_retires_the_handlers(
        watchdog_factory: Callable[..., Watchdog], traced: tuple[Path, Path],
        tmp_path: Path) -> None:
    wd = watchdog_factory({"mode": "llm", "function_dir": str(traced[0]),
                           "template_dir": str(tmp_path / "none"), "llm_spares": "0",
                           "llm_gpu_idle_timeout": "1s", "healthcheck_interval": "0s"})
    wd.wait_ready()
    wait_warm(wd)
    old = serving_pid(wd)
    wd.wait_output("event=gpu_released", timeout=30)
    wait_until(lambda: not alive(old), timeout=10, what="the handler to exit on release")
    assert http_status(wd.url + "/_/ready") == 200
    reply = get_json(wd, "/generate")
    assert reply["tokens"] and reply["pid"] != old


def test_sigterm_drains_the_request_in_flight_and_ends_every_process(
        llm: Callable[..., Watchdog], signals: Path) -> None:
    wd = llm()
    wait_warm(wd)
    runtime = list(processes(wd.proc.pid))
    conn = http.client.HTTPConnection("127.0.0.1", wd.port, timeout=30)
    conn.request("GET", "/stream", headers={"Accept": "text/event-stream"})
    resp = conn.getresponse()
    assert b"data:" in resp.read1(65536)
    wd.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: http_status(wd.url + "/_/health") != 200, timeout=10,
               what="unhealthy after SIGTERM")
    conn.close()  # the client ends its stream; the drain can finish
    assert wd.proc.wait(60) == 0, wd.text()[-3000:]
    wait_until(lambda: not any(alive(pid) for pid in runtime), timeout=15,
               what="every runtime process to end")


def test_the_front_never_imports_torch(llm: Callable[..., Watchdog]) -> None:
    wd = llm()
    wait_warm(wd)
    maps = Path(f"/proc/{wd.proc.pid}/maps").read_text()
    assert "libtorch" not in maps
