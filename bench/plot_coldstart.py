"""Plots of bench/coldstart.py's records (matplotlib; run where it is installed):

    python bench/plot_coldstart.py bench/results/A.json [B.json ...] --out-dir docs

- ``coldstart-breakdown-<model>.png``: the container cold start (warm page cache) as
  stacked bars, one per system, cut into the parts each record's ``breakdown_s``
  holds, beside the floor's parts (the sklearn/pandas share of the imports shown on
  its own);
- ``trace-ttft-cdf-<model>.png``: the CDF of TTFT on the sporadic trace, per system (every
  trace run of a system, one per seed, pooled into one curve), on a log time axis.

Several files are read as one list (two commands of one GPU session, say); a model
without the records a plot needs gets no such plot. Prints the paths written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLORS = {"front": "#bbbbbb", "function_start": "#d62728", "zygote_import": "#17becf",
          "zygote_prepare": "#9edae5",
          "handler_start": "#2ca02c", "handler_listen": "#2ca02c", "first_token": "#e377c2",
          "imports": "#1f77b4",
          "imports (sklearn+pandas)": "#aec7e8", "cuda_context": "#ff7f0e",
          "weights": "#8c564b", "prefill": "#9467bd"}


def load(paths: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    runs: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    for path in paths:
        for item in json.loads(path.read_text()):
            (runs if item.get("scenario") == "run" else records).append(item)
    return runs, records


def floor_parts(run: dict[str, Any]) -> dict[str, float]:
    f = run.get("floors") or {}
    share = max(0.0, f.get("slim_share_s", 0.0))
    return {"imports": f.get("import_s", 0.0) - share, "imports (sklearn+pandas)": share,
            "cuda_context": f.get("cuda_context_s", 0.0), "weights": f.get("weights_s", 0.0),
            "prefill": (f.get("prefill_s") or {}).get("57", 0.0)}


def breakdown_plot(plt: Any, model: str, run: dict[str, Any] | None,
                   records: list[dict[str, Any]], out: Path) -> Path | None:
    bars = [(r["system"], r["breakdown_s"]) for r in records
            if r["model"] == model and r["scenario"] == "container_cold_warm_cache"
            and r.get("breakdown_s")]
    if not bars:
        return None
    if run is not None:
        bars.insert(0, ("floor", floor_parts(run)))
    fig, ax = plt.subplots(figsize=(7.5, 4))
    seen: set[str] = set()
    for y, (_, parts) in enumerate(bars):
        left = 0.0
        for name, seconds in parts.items():
            ax.barh(y, seconds, left=left, color=COLORS.get(name, "#7f7f7f"),
                    label=None if name in seen else name.replace("_", " "))
            seen.add(name)
            left += seconds
        ax.text(left, y, f" {left:.2f} s", va="center")
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("seconds from process start to first token (warm page cache)")
    ax.set_title(f"Container cold start, {model}")
    ax.set_xlim(0, ax.get_xlim()[1] * 1.12)  # room for the totals
    fig.legend(fontsize=7, loc="lower center", ncol=5, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path = out / f"coldstart-breakdown-{model}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cdf_plot(plt: Any, model: str, records: list[dict[str, Any]], out: Path) -> Path | None:
    # Every trace run of a system (one per seed) pooled into one curve.
    pooled: dict[str, list[float]] = {}
    runs: dict[str, int] = {}
    for r in records:
        if r["model"] == model and r["scenario"] == "trace" and r.get("ttft_runs_s"):
            pooled.setdefault(r["system"], []).extend(r["ttft_runs_s"])
            runs[r["system"]] = runs.get(r["system"], 0) + 1
    if not pooled:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for system, values in sorted(pooled.items()):
        values = sorted(values)
        n = len(values)
        ax.step(values, [(i + 1) / n for i in range(n)], where="post",
                label=f"{system} ({n} requests, {runs[system]} runs)")
    ax.set_xscale("log")
    ax.set_xlabel("time to first token, s (log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"Sporadic trace, {model}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / f"trace-ttft-cdf-{model}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="plots of bench/coldstart.py results")
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out-dir", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, records = load(args.results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for model in sorted({r["model"] for r in records}):
        run = next((r for r in runs if r.get("model") == model and r.get("floors")), None)
        for path in (breakdown_plot(plt, model, run, records, args.out_dir),
                     cdf_plot(plt, model, records, args.out_dir)):
            if path is not None:
                print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
