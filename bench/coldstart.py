"""Cold start, wake and sporadic load: fwatchdog mode=llm against the naive python3-http
way (mode=http in front of the python3-llm template's index.py), with floors.

On the GPU machine, one command per group of scenarios (see docs/benchmarks.md):

    python3 bench/coldstart.py --shape 8b --device cuda --work /tmp/fwbench \
        --scenarios container_cold_warm_cache,container_cold_cold_cache,... --out FILE

On CPU, every scenario with a tiny random Llama (CI runs this):

    .venv/bin/python bench/coldstart.py --smoke --out /tmp/smoke.json

Steps: compile bytecode for everything the processes import into a
``PYTHONPYCACHEPREFIX`` and drop ``PYTHONDONTWRITEBYTECODE`` (an image has bytecode;
the records say it was done); build the function (random bf16 Llama, word-level
tokenizer, the python3-llm template; ``--work`` keeps it for a later command); trace
its template on CPU, as an image build does (``CUDA_VISIBLE_DEVICES=``); measure the
floors; run the scenarios; write the records after every scenario (a run cut short
keeps what it measured) and print a table last.

Output: a JSON list. The first element (``"scenario": "run"``) holds the conditions:
environment, bytecode, floors, template, trace parameters, wall time per scenario.
Every other element is one record: gpu, model, system (baseline|llm), scenario,
ttft_s {median, min, max; p50, p95, p99 for the trace}, floor_s and its parts,
steady_s where it applies, runs, commit, and extra fields (GPU memory, GPU-seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import coldstart_floors as floors_mod
import coldstart_model as model
import coldstart_scenarios as sc
import coldstart_trace as trace
import template_common as common
from coldstart_observe import Nvml
from coldstart_systems import SYSTEMS, Instance, Layout

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("container_cold_warm_cache", "container_cold_cold_cache", "first_request",
             "concurrency", "gpu_wake", "new_handler", "gpu_memory", "trace")
LENGTHS = (7, 57, 300, 1000, 2048)
PROJECT_DIRS = ("watchdog", "tracer", "template_cache", "templates", "bench")
STAMP_VERSION = 2  # of what --work keeps; a different one is built again


class Floors:
    """The floors, measured once per run on first use (see coldstart_floors)."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.data: dict[str, Any] = {}

    def measure(self) -> None:
        env, b = self.bench.env, self.bench
        full = [floors_mod.import_floor(env)["import_s"] for _ in range(b.repeats)]
        slim = [floors_mod.import_floor(env, floors_mod.SLIM)["import_s"]
                for _ in range(b.repeats)]
        paused = [floors_mod.import_floor(env, gc_paused=True)["import_s"]
                  for _ in range(b.repeats)]
        device = floors_mod.device_floor(env, b.layout.model_dir, b.device,
                                         sorted({*b.lengths, sc.COLD_PROMPT}))
        bandwidth = device.get("h2d_pinned_bytes_per_s")
        self.data.update(
            import_s=statistics.median(full), import_runs_s=full,
            import_slim_s=statistics.median(slim), import_slim_runs_s=slim,
            slim_share_s=statistics.median(full) - statistics.median(slim),
            import_gc_paused_s=statistics.median(paused), import_gc_paused_runs_s=paused,
            slim_packages=list(floors_mod.SLIM), weight_bytes=b.weight_bytes,
            weights_s=b.weight_bytes / bandwidth if bandwidth else 0.0, **device)
        # A decode step reads every weight once: its floor, whatever the batch's width.
        memory = self.data.get("memory_bytes_per_s")
        self.data["decode_step_s"] = b.weight_bytes / memory if memory else None

    def measure_cold(self) -> None:
        env, files = self.bench.env, sorted(self.bench.layout.model_dir.glob("*.safetensors"))
        self.bench.drop_caches()
        self.data["import_cold_s"] = floors_mod.import_floor(env)["import_s"]
        self.bench.drop_caches()
        self.data["disk_read_cold_s"] = floors_mod.read_bytes_s(files)

    def prefill(self, tokens: int) -> float:
        return float(self.data["prefill_s"][str(tokens)])

    def cold_start(self, cold: bool) -> dict[str, float]:
        if cold and "import_cold_s" not in self.data:
            self.measure_cold()
        d = self.data
        return {"imports": d["import_cold_s" if cold else "import_s"],
                "cuda_context": d["cuda_context_s"],
                "weights": max(d["weights_s"], d["disk_read_cold_s"]) if cold else d["weights_s"],
                "prefill": self.prefill(sc.COLD_PROMPT)}

    def wake(self) -> dict[str, float]:
        return {"weights": self.data["weights_s"], "prefill": self.prefill(sc.COLD_PROMPT)}

    def new_handler(self, spare: bool) -> dict[str, float]:
        parts = {"prefill": self.prefill(sc.COLD_PROMPT)}
        if not spare:
            parts["cuda_context"] = self.data["cuda_context_s"]
        return parts


class Bench:
    """Settings, the built function, floors and the records of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.smoke: bool = args.smoke
        self.shape: str = args.shape
        self.device: str = args.device
        self.repeats: int = args.repeats
        self.scenarios: list[str] = args.scenarios
        self.systems: list[str] = args.systems
        self.lengths = LENGTHS
        self.concurrency_levels = (1, 4, 16) if args.smoke else (1, 4, 16, 32)
        self.memory_handlers = (1, 2) if args.smoke else (1, 2, 4)
        self.stream_tokens = 8 if args.smoke else 64
        self.wake_idle_s = args.wake_idle
        self.trace_params = trace.TraceParams(seed=args.trace_seed)
        if args.smoke:
            # Windows stay above a CPU handler's start (1 s GPU release, 5 s keep-alive).
            self.trace_params = replace(self.trace_params, bursts=3, gap_median_s=300.0,
                                        gap_max_s=900.0, max_tokens=4)
        self.nvml = Nvml()
        self.gpu = self.nvml.name() or "cpu"
        self.work = Path(args.work or tempfile.mkdtemp(prefix="fwbench-")).resolve()
        self.layout = Layout(self.work / "context", self.work / "template")
        self.out: Path = args.out
        self.records: list[dict[str, Any]] = []
        self.run: dict[str, Any] = {"scenario": "run", "system": None, "gpu": self.gpu,
                                    "model": f"llama-{self.shape}-random-bf16",
                                    "commit": args.commit or commit(), "shape": self.shape,
                                    "device": self.device, "repeats": self.repeats,
                                    "smoke": self.smoke, "scenario_wall_s": {},
                                    "skipped": {}, "trace_params": asdict(self.trace_params)}
        self.env = self.base_env()
        self.floors = Floors(self)
        self.weight_bytes = 0
        self.vocab_size = 0

    # -- preparation

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if self.args.pycache is not None:
            env["PYTHONPYCACHEPREFIX"] = str(self.args.pycache)
        env.update(HF_HUB_OFFLINE="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1", MAX_CONCURRENT_GENERATIONS="32", http_threads="64",
                   DEFAULT_MAX_TOKENS="16")
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        env.update(self.args.function_env)  # both systems' function settings
        return env

    def compile_bytecode(self, paths: list[Path], what: str) -> None:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", str(os.cpu_count() or 1),
                        *map(str, paths)], env=self.env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        prefix = str(self.args.pycache) if self.args.pycache else "in place (__pycache__)"
        bytecode = self.run.setdefault("bytecode", {"prefix": prefix,
                                                    "PYTHONDONTWRITEBYTECODE": "unset",
                                                    "compiled": [], "seconds": 0.0})
        bytecode["compiled"].append(what)
        bytecode["seconds"] += time.perf_counter() - started

    def prepare(self) -> None:
        if not self.args.no_compile:
            paths = [REPO / d for d in PROJECT_DIRS]
            if not self.smoke:
                paths.insert(0, Path(sysconfig.get_paths()["purelib"]))
            self.compile_bytecode(paths, "project" if self.smoke else "site-packages+project")
        stamp_path = self.work / "stamp.json"
        stamp = {"shape": self.shape, "built_on": self.device, "version": STAMP_VERSION}
        old = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
        reused = {k: old.get(k) for k in stamp} == stamp and self.layout.model_dir.is_dir()
        if not reused:
            shutil.rmtree(self.layout.context, ignore_errors=True)
            shutil.rmtree(self.layout.template, ignore_errors=True)
            built = self.subprocess_json([str(Path(model.__file__)), "build",
                                          str(self.layout.context), "--shape", self.shape,
                                          "--device", self.device])
            old = {**stamp, "build": built}
            stamp_path.write_text(json.dumps(old))
        self.run["build"] = {**old["build"], "reused": reused}
        self.weight_bytes = old["build"]["weight_bytes"]
        self.vocab_size = old["build"]["vocab_size"]
        if not self.args.no_compile:
            self.compile_bytecode([self.layout.context], "function")
        if "llm" in self.systems:
            settings = dict(self.args.function_env)
            if "template" not in old or not (self.layout.template / "manifest.json").is_file() \
                    or old["template"].get("function_env", {}) != settings:
                # Traced on CPU, as an image build does, with the model the systems load.
                env = {**self.env, "CUDA_VISIBLE_DEVICES": "",
                       "MODEL_PATH": str(self.layout.model_dir)}
                old["template"] = common.run_tracer(self.layout.function_dir,
                                                    self.layout.template, "--runs", "1", env=env)
                old["template"]["traced_on"] = "cpu"
                old["template"]["function_env"] = settings  # what the trace ran with
                stamp_path.write_text(json.dumps(old))
            self.run["template"] = old["template"]

    def subprocess_json(self, argv: list[str]) -> dict[str, Any]:
        done = subprocess.run([sys.executable, *argv], env=self.env, capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed:\n{done.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    # -- used by the scenarios

    def words(self, tokens: int, seed: int) -> str:
        return model.prompt_words(tokens, self.vocab_size, seed)

    def instance(self, system: str, **settings: str) -> Instance:
        return Instance(system, self.layout, self.env, self.work / "logs", settings)

    def drop_caches(self) -> bool:
        """Drops the page cache; the smoke run only pretends (it would slow the host)."""
        if self.args.no_drop_caches:
            self.run["caches_dropped"] = False
            return True
        self.run["caches_dropped"] = True
        return sc.drop_caches()

    def over_budget(self) -> bool:
        return bool(self.args.budget_s) and time.monotonic() - self.started > self.args.budget_s

    def skip(self, scenario: str, reason: str) -> None:
        self.run["skipped"][scenario] = reason

    def record(self, system: str, scenario: str, ttfts: list[float],
               floor: dict[str, float] | None = None, ttft_stats: dict[str, float] | None = None,
               **extra: Any) -> None:
        stats = ttft_stats or (
            {"median": statistics.median(ttfts), "min": min(ttfts), "max": max(ttfts)}
            if ttfts else None)
        rec: dict[str, Any] = {k: self.run[k] for k in ("gpu", "model", "commit")}
        if self.args.function_env:
            rec["function_env"] = dict(self.args.function_env)
        rec.update(system=system, scenario=scenario, ttft_s=stats, runs=extra.pop("runs",
                   len(ttfts)), ttft_runs_s=ttfts)
        if floor is not None:
            rec["floor_s"] = sum(floor.values())
            rec["floor_parts_s"] = floor
        if extra.get("floor_s") is not None:
            rec["floor_s"] = extra.pop("floor_s")
        if stats and rec.get("floor_s"):
            rec["ratio_to_floor"] = stats["median"] / rec["floor_s"]
        rec.update(extra)
        self.records.append(rec)

    def write(self) -> None:
        self.run["floors"] = self.floors.data
        self.run["wall_s"] = time.monotonic() - self.started
        self.out.parent.mkdir(parents=True, exist_ok=True)
        partial = self.out.with_suffix(".partial")
        partial.write_text(json.dumps([self.run, *self.records], indent=1, default=str) + "\n")
        partial.replace(self.out)


async def run_scenarios(bench: Bench) -> None:
    steps = {
        "container_cold_warm_cache": lambda: sc.container_cold(bench, "warm"),
        "container_cold_cold_cache": lambda: sc.container_cold(bench, "cold"),
        "first_request": lambda: sc.first_request(bench),
        "gpu_wake": lambda: sc.gpu_wake(bench),
        "new_handler": lambda: sc.new_handler(bench),
        "gpu_memory": lambda: sc.gpu_memory(bench),
        "trace": lambda: sc.sporadic_trace(bench),
    }
    if "first_request" not in bench.scenarios:  # otherwise it runs on that instance
        steps["concurrency"] = lambda: sc.concurrency(bench)
    for name in SCENARIOS:
        if name not in bench.scenarios or name not in steps:
            continue
        if bench.over_budget():
            bench.skip(name, f"over --budget-s {bench.args.budget_s}")
            continue
        started = time.monotonic()
        await steps[name]()
        bench.run["scenario_wall_s"][name] = time.monotonic() - started
        bench.write()


def commit() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() or os.environ.get("FWATCHDOG_COMMIT", "unknown")


def llm_available() -> bool:
    try:
        return importlib.util.find_spec("fwatchdog.modes.llm") is not None
    except ModuleNotFoundError:
        return False


def table(records: list[dict[str, Any]]) -> str:
    lines = [f"{'scenario':28} {'system':9} {'ttft median':>11} {'min':>8} {'max':>8} "
             f"{'p95':>8} {'floor':>8} {'x floor':>7} {'steady':>8}"]

    def num(v: Any) -> str:
        return f"{v:8.3f}" if isinstance(v, (int, float)) else f"{'-':>8}"

    for r in records:
        t = r.get("ttft_s") or {}
        ratio = r.get("ratio_to_floor")
        lines.append(f"{r['scenario']:28} {r['system']:9} {num(t.get('median')):>11} "
                     f"{num(t.get('min'))} {num(t.get('max'))} {num(t.get('p95'))} "
                     f"{num(r.get('floor_s'))} {f'{ratio:7.2f}' if ratio else '      -'} "
                     f"{num(r.get('steady_s'))}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated, from: {', '.join(SCENARIOS)}")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--shape", choices=sorted(common.SHAPES), default="8b")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--work", type=Path, default=None,
                   help="keeps the model and template for a later command (reused if built)")
    p.add_argument("--pycache", type=Path, default=None,
                   help="PYTHONPYCACHEPREFIX for every process (default /tmp/fwatchdog-pyc; "
                        "the smoke run compiles in place, beside the sources)")
    p.add_argument("--no-compile", action="store_true", help="skip compileall (not realistic)")
    p.add_argument("--no-drop-caches", action="store_true",
                   help="run container_cold_cold_cache without dropping the page cache")
    p.add_argument("--wake-idle", type=float, default=3.0, help="gpu_wake's idle timeout, s")
    p.add_argument("--trace-seed", type=int, default=11)
    p.add_argument("--budget-s", type=float, default=0,
                   help="start no new scenario or repeat after this many seconds (0: none)")
    p.add_argument("--commit", default=None, help="the project commit (default: git describe)")
    p.add_argument("--function-env", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for both systems' function (CUDA_GRAPHS=off, BATCHING=off); "
                        "repeatable, recorded in every record; the template is traced again "
                        "when it was traced with other settings; what a scenario sets itself "
                        "(MODEL_PATH, the mode, the ports) is the harness's")
    p.add_argument("--smoke", action="store_true",
                   help="every scenario on CPU with the tiny shape, once (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.device, args.repeats, args.wake_idle = "tiny", "cpu", 1, 1.0
        args.no_drop_caches = True
    elif args.pycache is None:
        args.pycache = Path("/tmp/fwatchdog-pyc")
    args.device = args.device or ("cuda" if Nvml().available else "cpu")
    settings = {}
    for item in args.function_env:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            p.error(f"--function-env {item!r}: expected KEY=VALUE")
        settings[key.strip()] = value
    args.function_env = settings
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(args.scenarios) - set(SCENARIOS)) + sorted(
        set(args.systems) - set(SYSTEMS))
    if unknown:
        p.error(f"unknown scenario or system: {', '.join(unknown)}")
    if args.out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", (Nvml().name() or "cpu").lower()).strip("-")
        day = datetime.date.today().isoformat()
        args.out = REPO / "bench" / "results" / f"{slug}-{args.shape}-{day}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    if "llm" in bench.systems and not llm_available():
        if not args.smoke:
            sys.exit("mode=llm is not in this fwatchdog (fwatchdog.modes.llm is missing)")
        bench.systems.remove("llm")
        bench.skip("llm", "mode=llm is not in this fwatchdog yet")
    try:
        bench.prepare()
        bench.floors.measure()
        bench.write()
        asyncio.run(run_scenarios(bench))
    finally:
        bench.write()
        if args.work is None:
            shutil.rmtree(bench.work, ignore_errors=True)
    print(f"{bench.run['model']} on {bench.gpu} ({args.device}), bytecode compiled: "
          f"{'bytecode' in bench.run}; floors: imports {bench.floors.data['import_s']:.2f} s "
          f"(sklearn+pandas {bench.floors.data['slim_share_s']:+.2f} s; collector paused "
          f"{bench.floors.data['import_gc_paused_s']:.2f} s), CUDA context "
          f"{bench.floors.data['cuda_context_s']:.2f} s, weights "
          f"{bench.floors.data['weights_s']:.2f} s")
    if bench.run["skipped"]:
        print("skipped: " + "; ".join(f"{k}: {v}" for k, v in bench.run["skipped"].items()))
    print(table(bench.records))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
