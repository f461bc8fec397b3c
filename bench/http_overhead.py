"""What fwatchdog mode=http adds on top of its upstream, measured with wrk.

One aiohttp + uvloop upstream runs on loopback as fwatchdog's child. In the
same run, wrk loads it directly and through ``fwatchdog mode=http``, at 1 and at
32 connections, and the script prints requests/s, p50 and p99 for each, plus the
ratios the issue sets targets for. Results go to ``bench/results/http_overhead.json``.

Usage: ``python bench/http_overhead.py [--duration 10] [--out FILE]``
(needs ``wrk`` on PATH: ``apt-get install wrk``). ``--duration 1 --smoke``
checks that the script still runs, with no claim about the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

UPSTREAM = r'''
import os, sys
from aiohttp import web
try:
    import uvloop
except ImportError:
    uvloop = None

async def hello(request):
    return web.Response(text="Hello, world\n")

app = web.Application()
app.router.add_route("*", "/{tail:.*}", hello)
port = int(sys.argv[1])
web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
            loop=uvloop.new_event_loop() if uvloop else None)
'''

_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: all sockets stay bound until every port is known."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not answer 200 within {timeout}s")


def to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNIT[match.group(2)]


def run_wrk(url: str, connections: int, duration: int) -> dict[str, float]:
    threads = min(connections, 2)
    done = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--latency", url],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"wrk failed on {url}: {done.stdout}{done.stderr}")
    out = done.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = to_ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = to_ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99,
            "non_2xx": int(errors.group(1)) if errors else 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "http_overhead.json")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script runs; no result file")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    fwatchdog = shutil.which("fwatchdog") or str(Path(sys.executable).parent / "fwatchdog")

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "upstream.py"
        script.write_text(UPSTREAM)
        up_port, wd_port, metrics_port = free_ports(3)
        env = {
            **os.environ,
            "mode": "http",
            "fprocess": f"{sys.executable} {script} {up_port}",
            "upstream_url": f"http://127.0.0.1:{up_port}",
            "port": str(wd_port),
            "metrics_port": str(metrics_port),
            "TMPDIR": tmp,
            "exec_timeout": "10s",
            "healthcheck_interval": "0",  # no drain wait at the end of the run
        }
        log = open(Path(tmp) / "fwatchdog.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([fwatchdog], env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://127.0.0.1:{wd_port}/_/health", 30)
            targets = {"direct": f"http://127.0.0.1:{up_port}/",
                       "fwatchdog": f"http://127.0.0.1:{wd_port}/"}
            results: dict[str, dict[str, dict[str, float]]] = {}
            for connections in (1, 32):
                for name, url in targets.items():
                    run_wrk(url, connections, 1)  # warm connections and caches
                    results.setdefault(f"c{connections}", {})[name] = run_wrk(
                        url, connections, args.duration)
        except BaseException:
            print((Path(tmp) / "fwatchdog.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()

    c1, c32 = results["c1"], results["c32"]
    summary = {
        "c32_throughput_ratio": c32["fwatchdog"]["rps"] / c32["direct"]["rps"],
        "c32_p99_ratio": c32["fwatchdog"]["p99_ms"] / c32["direct"]["p99_ms"],
        "c1_added_p50_ms": c1["fwatchdog"]["p50_ms"] - c1["direct"]["p50_ms"],
    }
    record = {
        "benchmark": "http_overhead",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "duration_s": args.duration,
        "results": results,
        "summary": summary,
    }
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")

    print(f"{'conns':>5} {'target':>10} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for key, per in results.items():
        for name, r in per.items():
            print(f"{key[1:]:>5} {name:>10} {r['rps']:>10.0f} "
                  f"{r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f}")
    print(f"c32 throughput ratio {summary['c32_throughput_ratio']:.2f} (target >= 0.50); "
          f"c32 p99 ratio {summary['c32_p99_ratio']:.2f} (target <= 3); "
          f"c1 added p50 {summary['c1_added_p50_ms']:.3f} ms (target <= 0.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
