"""``python -m bench.sweep_speedup``: wall time of a sweep on Ray vs the same grid run in one process.

One trained checkpoint (``--checkpoint``, copied in; nothing is ever trained) and one sweep file
(``--sweep``, default ``sweeps/default_grid.yaml``). Three runs, each in a fresh artifacts/out root
under ``--out``, each a timed subprocess:

* ``a``: ``uadc sweep SWEEP --num-cpus N`` (a local Ray with N workers; shared stages run once);
* ``b``: ``uadc sweep SWEEP --sequential`` (one process, shared stages run once);
* ``c``: the pre-sweep way: one Python process that calls the public ``uadc.compile(recipe, target,
  calibrator=..., calibration=..., ...)`` once per cell of the sweep's own plan
  (``uadc.pipeline.sweep.plan.make_plan``), each call building its own FP32 baseline (export, FP32
  metrics), with the sweep's ``run:`` threads / latency runs.

Writes ``speedup.md`` and ``speedup.json`` (rewritten after every run): wall seconds, the ratios
b/a and c/a, the mean 1-minute load average sampled during each run, and whether every cell's
image / pixel AUROC is identical across the runs (mismatches are listed, never hidden).
"""

from __future__ import annotations

from bench import as_script

import datetime as _dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import click

from uadc.core.errors import UadcError

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "sweeps" / "default_grid.yaml"
RESULT_JSON, RESULT_MD, CELLS_JSON = "speedup.json", "speedup.md", "cells.json"
RUNS = {"a": "uadc sweep --num-cpus N (Ray)", "b": "uadc sweep --sequential (one process, shared stages)",
        "c": "one uadc.compile per cell (one process, no shared baseline)"}
METRICS = ("image_auroc", "pixel_auroc")
TARGET_RATIO = 1.6   # issue 14: Ray with 2 workers vs the grid run sequentially in one process
LOAD_EVERY_S = 2.0


def _log(msg: str) -> None:
    print(f"[sweep_speedup] {msg}", file=sys.stderr, flush=True)


def plan_of(sweep: Path):
    from uadc.pipeline.sweep.plan import make_plan
    from uadc.pipeline.sweep.spec import load_sweep
    spec, base, name = load_sweep(sweep)
    plan = make_plan(spec, base, name)
    if len(plan.models) != 1:
        raise UadcError(f"{sweep}: plans {len(plan.models)} models; this bench copies one checkpoint and never "
                        f"trains, so give a sweep over one model (no image_size / seed / one_class axes)")
    return plan


def commands(sweep: Path, root: Path, num_cpus: int) -> dict[str, list[str]]:
    """The subprocess of each run; ``root`` is the run's fresh folder (artifacts/ and out/ inside)."""
    exe = Path(sys.executable).parent / "uadc"
    uadc = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from uadc.cli import run; run()"]
    common = ["--artifacts", str(root / "artifacts"), "--out", str(root / "out")]
    return {"a": [*uadc, "sweep", str(sweep), "--num-cpus", str(num_cpus), *common],
            "b": [*uadc, "sweep", str(sweep), "--sequential", *common],
            "c": [sys.executable, "-m", "bench.sweep_speedup", "--sweep", str(sweep), "--presweep-worker", str(root)]}


def presweep(sweep: Path, root: Path, log: Callable[[str], None] = _log) -> list[dict]:
    """Run ``c``: every cell of the plan as its own ``uadc.compile`` (own baseline); writes cells.json."""
    import uadc
    from uadc.core.io import atomic_write_json
    from uadc.pipeline.sweep.cells import one_line
    plan = plan_of(sweep)
    artifacts, run = root / "artifacts", plan.run
    rows = []
    for i, cell in enumerate(plan.cells, 1):
        o, model = cell.options, plan.models[cell.model]
        t0 = time.time()
        row: dict = {"cell": cell.id}
        try:
            res = uadc.compile(model.recipe(), o["target"], calibration=o["calib_data"], calibrator=o["calibrator"],
                               calib_samples=o["calib_samples"], quantize=o["quantize"], precision=o.get("precision"),
                               out=root / "out" / cell.folder, force=True, evaluate=run.evaluate,
                               latency_runs=run.latency_runs, threads=run.threads, artifacts=artifacts)
            row["status"] = "ok"
            if res.metrics is not None:
                row.update({k: res.metrics.compiled["mean"][k] for k in METRICS})
        except Exception as exc:  # recorded like a sweep's failed cell; the other cells still run
            row.update(status="failed", error=one_line(exc))
        row["seconds"] = round(time.time() - t0, 2)
        rows.append(row)
        log(f"[{i}/{len(plan.cells)}] {cell.id}: {row['status']} ({row['seconds']} s)")
    atomic_write_json(root / CELLS_JSON, {"rows": rows})
    return rows


class LoadSampler:
    """The 1-minute load average, sampled every few seconds in a thread while a run is going."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(LOAD_EVERY_S):
                return

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cell_metrics(run: str, root: Path) -> dict[str, dict]:
    """``{cell id: {status, image_auroc, pixel_auroc[, error]}}`` of a finished run (empty if none)."""
    path = root / ("out/sweep.json" if run in ("a", "b") else CELLS_JSON)
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    rows = doc["cells"] if run in ("a", "b") else doc["rows"]   # sweep.json lists its rows as "cells"
    return {r["cell"]: {k: r.get(k) for k in ("status", *METRICS, "error") if r.get(k) is not None} for r in rows}


def compare_cells(cells: list[str], per_run: dict[str, dict[str, dict]]) -> list[dict]:
    """Every (cell, figure) whose value differs between runs (or is missing in one): the mismatches."""
    out = []
    for cell in cells:
        for k in ("status", *METRICS):
            vals = {run: per_run[run].get(cell, {}).get(k) for run in per_run}
            if len(set(map(repr, vals.values()))) > 1:
                out.append({"cell": cell, "figure": k, "values": vals})
    return out


def _prepare(out: Path, runs: list[str]) -> None:
    """``--out`` must be new, empty or an earlier output of this bench; the runs' folders start fresh."""
    from uadc.core.io import check_writable, ensure_dir
    if out.exists() and not out.is_dir():
        raise UadcError(f"--out {out}: a file is in the way")
    if out.is_dir() and any(out.iterdir()) and not (out / RESULT_JSON).is_file():
        raise UadcError(f"--out {out}: not empty and not an earlier sweep_speedup output ({RESULT_JSON} missing)")
    ensure_dir(out)
    check_writable(out)
    for r in runs:
        if (out / r).exists():
            shutil.rmtree(out / r)   # only this bench's own run folders


def run_bench(sweep: Path, checkpoint: Path, out: Path, order: list[str], num_cpus: int,
              log: Callable[[str], None] = _log, command: str = "") -> dict:
    from uadc.core.hashing import sha256_file
    from uadc.core.io import atomic_write_json, atomic_write_text, ensure_dir
    from uadc.training.checkpoint import load_checkpoint
    sweep, checkpoint, out = sweep.resolve(), checkpoint.resolve(), out.resolve()
    plan = plan_of(sweep)
    model = next(iter(plan.models.values()))
    load_checkpoint(checkpoint, model.recipe())   # refuses a checkpoint of other settings, before any run
    _prepare(out, order)
    cells = [c.id for c in plan.cells]
    result = {"command": command, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "sweep": str(sweep), "checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint),
              "model": model.name, "cells": cells, "num_cpus": num_cpus, "cpu_count": os.cpu_count(),
              "run_settings": {"threads": plan.run.threads, "latency_runs": plan.run.latency_runs,
                               "evaluate": plan.run.evaluate},
              "env": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0)},
              "order": order, "runs": {}, "ratios": {}, "target_ratio": TARGET_RATIO,
              "identical": None, "mismatches": []}
    for run in order:
        root = out / run
        ensure_dir(root / "artifacts")
        dest = model.checkpoint(root / "artifacts")
        ensure_dir(dest.parent)
        shutil.copy2(checkpoint, dest)
        if sha256_file(dest) != result["checkpoint_sha256"]:
            raise UadcError(f"--checkpoint {checkpoint} changed during the bench (run {run} would use another model)")
        cmd = commands(sweep, root, num_cpus)[run]
        log(f"run {run} ({RUNS[run]}): {shlex.join(cmd)}")
        load_before = os.getloadavg()[0]
        with open(root / "stdout.txt", "wb") as so, open(root / "stderr.txt", "wb") as se, LoadSampler() as ls:
            t0 = time.perf_counter()
            rc = subprocess.call(cmd, cwd=ROOT, stdout=so, stderr=se)
            wall = time.perf_counter() - t0
        per_cell = cell_metrics(run, root)
        result["runs"][run] = {"what": RUNS[run], "command": shlex.join(cmd), "rc": rc, "wall_seconds": round(wall, 1),
                               "load_before": round(load_before, 2),
                               "load_mean": round(sum(ls.samples) / len(ls.samples), 2),
                               "load_max": round(max(ls.samples), 2), "load_samples": len(ls.samples),
                               "cells_ok": sum(1 for v in per_cell.values() if v.get("status") == "ok"),
                               "cells": per_cell}
        log(f"run {run}: rc {rc}, {wall:.1f} s, mean load {result['runs'][run]['load_mean']}")
        _summarize(result, cells)
        atomic_write_json(out / RESULT_JSON, result)
        atomic_write_text(out / RESULT_MD, render_markdown(result))
    log(f"written: {out / RESULT_MD}, {out / RESULT_JSON}")
    return result


def _summarize(result: dict, cells: list[str]) -> None:
    runs = result["runs"]
    # only runs that finished every cell: a run that stopped early is no wall time of the grid
    wall = {r: v["wall_seconds"] for r, v in runs.items() if v["rc"] == 0 and v["cells_ok"] == len(cells)}
    result["ratios"] = {f"{o}_over_a": round(wall[o] / wall["a"], 3) for o in ("b", "c") if "a" in wall and o in wall}
    result["failed_runs"] = sorted(r for r in runs if r not in wall)
    if len(runs) > 1:
        mism = compare_cells(cells, {r: v["cells"] for r, v in runs.items()})
        result["mismatches"], result["identical"] = mism, not mism


def render_markdown(r: dict) -> str:
    lines = [f"# Sweep wall time: Ray vs one process ({r['date']})", "",
             f"`{r['command']}`" if r["command"] else "", "",
             f"Sweep `{r['sweep']}`: {len(r['cells'])} cells over one model `{r['model']}` (checkpoint "
             f"`{r['checkpoint']}`, sha256 {r['checkpoint_sha256'][:12]}); per cell {r['run_settings']['threads']} "
             f"thread(s), {r['run_settings']['latency_runs']} latency runs; {r['cpu_count']} CPUs, "
             f"OMP_NUM_THREADS={r['env']['OMP_NUM_THREADS']}, nice {r['env']['nice']}; run order "
             f"{','.join(r['order'])}. Load: the 1-minute load average sampled every {LOAD_EVERY_S:g} s during the run "
             f"(it includes the run itself and anything else on the machine).", "",
             "| run | what | wall s | exit | cells ok | load before | load mean | load max |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in r["runs"].items():
        what = v["what"].replace("N", str(r["num_cpus"]), 1) if name == "a" else v["what"]
        lines.append(f"| {name} | {what} | {v['wall_seconds']:.1f} | {v['rc']} | {v['cells_ok']}/{len(r['cells'])} | "
                     f"{v['load_before']:.2f} | {v['load_mean']:.2f} | {v['load_max']:.2f} |")
    lines.append("")
    if r.get("failed_runs"):
        lines.append(f"- **run {', '.join(r['failed_runs'])} failed** (exit or cells above): no ratio against it")
    for k, ratio in r["ratios"].items():
        other = k.split("_")[0]
        lines.append(f"- wall({other}) / wall(a) = **{ratio:.2f}×** (target ≥ {r['target_ratio']}×: "
                     f"{'met' if ratio >= r['target_ratio'] else 'not met'})")
    if r["identical"] is None:
        lines.append("- AUROC identity: needs at least two finished runs")
    elif r["identical"]:
        lines.append(f"- image and pixel AUROC (and status) of every cell identical across runs "
                     f"{', '.join(r['runs'])}")
    else:
        lines += [f"- **{len(r['mismatches'])} mismatch(es)** across runs:", "",
                  "| cell | figure | " + " | ".join(r["runs"]) + " |", "|---|---|" + "---|" * len(r["runs"])]
        lines += [f"| {m['cell']} | {m['figure']} | " + " | ".join(str(m["values"].get(x)) for x in r["runs"]) + " |"
                  for m in r["mismatches"]]
    return "\n".join(lines) + "\n"


def _order(text: str) -> list[str]:
    runs = [x.strip() for x in text.split(",") if x.strip()]
    if not runs or any(x not in RUNS for x in runs) or len(set(runs)) != len(runs):
        raise click.BadParameter(f"a comma-separated order of distinct runs out of a,b,c; got {text!r}")
    return runs


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--sweep", type=click.Path(path_type=Path), default=SWEEP, show_default=True)
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="trained checkpoint of the sweep's recipe (copied into each run's artifacts root)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("artifacts") / "bench_sweep_speedup",
              show_default=True)
@click.option("--order", default="a,b,c", show_default=True,
              help="runs in this order (e.g. c,a,b); a subset is allowed")
@click.option("--num-cpus", type=click.IntRange(min=1, max=4096), default=2, show_default=True,
              help="CPUs (workers) of run a's local Ray")
@click.option("--dry-run", is_flag=True, help="list the cells and the three commands; run nothing")
@click.option("--presweep-worker", type=click.Path(path_type=Path), default=None, hidden=True)
def main(sweep: Path, checkpoint: Path | None, out: Path, order: str, num_cpus: int, dry_run: bool,
         presweep_worker: Path | None) -> None:
    """Wall time of `uadc sweep` on Ray vs the same grid in one process (shared stages, and one compile per cell)."""
    try:
        if presweep_worker is not None:
            presweep(sweep.resolve(), presweep_worker.resolve())
            return
        runs = _order(order)
        if dry_run:
            plan = plan_of(sweep)
            click.echo(f"{len(plan.cells)} cells over model {next(iter(plan.models.values())).name}:")
            for c in plan.cells:
                click.echo(f"  {c.id}")
            for r, cmd in commands(sweep.resolve(), out.resolve() / "<run>", num_cpus).items():
                if r in runs:
                    click.echo(f"{r}: {shlex.join(cmd)}")
            return
        if checkpoint is None:
            raise UadcError("--checkpoint: give the trained checkpoint of the sweep's recipe")
        result = run_bench(sweep, checkpoint, out, runs, num_cpus, command="python -m bench.sweep_speedup " +
                           shlex.join(sys.argv[1:]))
        if result["failed_runs"]:
            click.echo(f"error: run {', '.join(result['failed_runs'])} failed; see {out / RESULT_MD}", err=True)
            sys.exit(1)
    except UadcError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    as_script(main)
