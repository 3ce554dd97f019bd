"""``uadc sweep``: plan the grid, run it on Ray (or in this process), write the table."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable

from uadc.config.recipe import default_artifacts_root
from uadc.core.constants import CHECKPOINT_FILE
from uadc.core.errors import UadcError
from uadc.core.images import shown
from uadc.core.hashing import sha256_file
from uadc.core.io import JsonResult, check_writable, ensure_dir, file_lock
from uadc.core.manifest import check_outside_artifacts
from uadc.core.numbers import whole_number
from uadc.data.sources import check_outside_data
from uadc.pipeline.sweep.plan import Plan, cell_key, make_plan
from uadc.pipeline.sweep.spec import load_sweep
from uadc.pipeline.sweep.store import RECORDS, load_record
from uadc.pipeline.sweep.table import write_table

INSTALL_HINT = "`uadc sweep` runs on Ray, which is not installed: pip install 'uadc[sweep]' (or pass --sequential)"

log = logging.getLogger(__name__)


@dataclass
class SweepResult(JsonResult):
    name: str
    out: Path
    rows: list[dict]                 # one per cell, in plan order (the table)
    best: dict[str, str | None]      # objective -> cell id
    pareto: list[str]                # cell ids on the AUROC-vs-latency front
    files: dict[str, Path]
    executed: int                    # cells computed by this run
    reused: int                      # cells read from their records
    failed: int
    trained: int                     # models trained by this run
    wall_seconds: float
    markdown: str = field(repr=False, default="")
    latency: dict | None = None      # how latency_ms was timed (batch, threads, runs, warmup), as in sweep.json

    @property
    def ok(self) -> bool:
        return self.failed == 0

    @property
    def exit_code(self) -> int:
        """What ``uadc sweep`` exits with: 1 if a cell failed."""
        return 0 if self.ok else 1

    def summary_line(self) -> str:
        return (f"{len(self.rows)} cells: {self.executed} run, {self.reused} reused, {self.failed} failed; "
                f"{self.trained} models trained; {self.wall_seconds:.1f} s; written: {self.out}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "latency": self.latency, "out": str(self.out), "cells": self.rows, "best": self.best,
                "pareto": self.pareto,
                "files": {k: str(v) for k, v in self.files.items()}, "executed": self.executed,
                "reused": self.reused, "trained": self.trained,
                "failed": [r["cell"] for r in self.rows if r.get("status") != "ok"],   # as sweep.json (a count before)
                "wall_seconds": self.wall_seconds}


def run_sweep(source: Any, *, artifacts: Path | None = None, out: Path | None = None, address: str | None = None,
              num_cpus: int | None = None, sequential: bool = False,
              on_record: Callable[[dict], None] | None = None) -> SweepResult:
    t0 = time.time()
    if not sequential and importlib.util.find_spec("ray") is None:
        raise UadcError(INSTALL_HINT)   # before any work
    spec, base, name = load_sweep(source)
    try:
        plan = make_plan(spec, base, name)
    except UadcError as exc:   # "sweep exp1: ..." named its `name:`, not the file that holds the mistake
        if isinstance(source, (str, PathLike)):
            raise UadcError(f"{shown(Path(source))}: {exc}") from None
        raise
    artifacts = Path(artifacts or default_artifacts_root()).absolute()   # workers may run elsewhere
    out = Path(out).absolute() if out else artifacts / "sweeps" / name
    check_grid_out(out)
    return run_plan(plan, artifacts, out, address=address, num_cpus=num_cpus, sequential=sequential,
                    on_record=on_record, t0=t0)


def check_grid_out(out: Path) -> None:
    """A grid writes into its folder as it runs, and a rerun resumes there: an existing folder must be
    empty or one a grid wrote (``records/``, ``sweep.json``, ``compare.json``). A user's folder, or a
    recipe's own artifact folder, had files overwritten and cells written beside its checkpoint."""
    if out.is_symlink():
        raise UadcError(f"--out {out}: a symlink; give the folder it points to")
    check_outside_artifacts(out)   # every cell failed after the FP32 baseline, its records left in the artifact
    found = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if CHECKPOINT_FILE in found:
        raise UadcError(f"--out {out}: a recipe's artifact folder (it holds {CHECKPOINT_FILE}); choose another")
    if found and not {RECORDS, "sweep.json", "compare.json"} & set(found):
        raise UadcError(f"--out {out}: a folder that no uadc grid wrote (it holds {found[0]}); choose an empty or "
                        f"new folder (nothing was changed)")


def run_plan(plan: Plan, artifacts: Path, out: Path, *, address: str | None = None, num_cpus: int | None = None,
             sequential: bool = False, on_record: Callable[[dict], None] | None = None, table: bool = True,
             t0: float | None = None, locked: Callable[[], None] | None = None) -> SweepResult:
    """Run a plan into ``out`` (absolute paths); ``table=False``: only the cell records, no sweep.* files
    (``uadc calibrators compare`` writes its own matrix); ``locked`` runs first under the folder's lock."""
    t0 = time.time() if t0 is None else t0
    if num_cpus is not None:
        whole_number(num_cpus, "num_cpus")
    if address is not None and not (isinstance(address, str) and address):   # before the folder is made
        raise UadcError(f"address: expected a Ray address such as auto or 10.0.0.5:6379, got {address!r:.60}")
    if sequential and (address is not None or num_cpus is not None):   # they were silently ignored
        raise UadcError(f"{'address (--address)' if address is not None else 'num_cpus (--num-cpus)'} sets up Ray; "
                        f"a sequential run uses none: give one or the other")
    if num_cpus is not None and address not in (None, "local"):   # it was silently ignored
        raise UadcError(f"num_cpus (--num-cpus) sizes a Ray instance of this run's own; the cluster at {address} "
                        f"has its own CPUs: give one or the other")
    check_writable(out)
    check_writable(artifacts)   # a file there failed every cell (exit 1) and wrote a table of failures
    for model in plan.models.values():   # the cells checked theirs only after the baseline, their records written
        try:
            check_outside_data(out, model.recipe())
        except UadcError as exc:   # which recipe: with several, a missing data root named none
            raise UadcError(f"sweep {plan.name}: recipe {model.name}: {exc}") from None
    made = not out.exists()
    ensure_dir(out)
    try:
        with file_lock(out):   # a second run into the folder waits, then reuses (both compiled every cell before)
            # the grid's mark before its first cell: one stopped in it left cells/ alone, which its rerun refused
            ensure_dir(out / RECORDS)
            if locked is not None:
                locked()
            return _run_plan(plan, artifacts, out, address, num_cpus, sequential, on_record, table, t0)
    except BaseException:
        if made and [p.name for p in out.iterdir()] in ([], [RECORDS]):   # a new --out that nothing was written
            with contextlib.suppress(OSError):   # into (Ray could not start, a cell did not fit)
                (out / RECORDS).rmdir()
                out.rmdir()
        raise


def _run_plan(plan: Plan, artifacts: Path, out: Path, address: str | None, num_cpus: int | None, sequential: bool,
              on_record: Callable[[dict], None] | None, table: bool, t0: float) -> SweepResult:
    seen: list[dict] = []

    def note(rec: dict) -> None:
        seen.append(rec)
        status = "reused" if rec.get("reused") else rec["status"]
        log.info("[%d/%d] %s: %s%s", len(seen), len(plan.cells), rec["cell"], status,
                 f" ({rec['error']})" if rec["status"] == "failed" else "")
        if rec.get("gate_passed") is False and not rec.get("reused") and not sequential:   # the worker's warning is not shown
            log.warning("%s fails its own regression gate; `uadc verify %s` lists the figures", rec["cell"],
                        out / rec["artifact"])
        if on_record:
            on_record(rec)

    done = finished_records(plan, out, artifacts)
    if len(done) == len(plan.cells):   # a finished sweep: read back, nothing started (no Ray, no torch)
        records = [done[i] for i in range(len(plan.cells))]
        for rec in records:
            note(rec)
    elif sequential:
        records = run_sequential(plan, out, artifacts, done, note)
    else:
        from uadc.pipeline.sweep.ray_exec import run_on_ray
        records = run_on_ray(plan, out, artifacts, address, num_cpus, done, note)
    reused = sum(1 for r in records if r.get("reused"))
    if table:
        t = write_table(plan, records, out)
    else:
        t = {"rows": records, "best": {}, "pareto": [], "files": {}, "markdown": ""}
    failed = sum(1 for r in records if r["status"] != "ok")
    trained = len({r["model"] for r in records if r.get("trained") and not r.get("reused")})
    return SweepResult(plan.name, out, t["rows"], t["best"], t["pareto"], t["files"],
                       len(records) - reused, reused, failed, trained, round(time.time() - t0, 2), t["markdown"],
                       t.get("latency"))


def finished_records(plan: Plan, out: Path, artifacts: Path) -> dict[int, dict]:
    """Cells whose record is on disk (same checkpoint, same key), by plan index."""
    shas: dict[str, str | None] = {}
    done = {}
    for i, cell in enumerate(plan.cells):
        model = plan.models[cell.model]
        if model.key not in shas:
            ckpt = model.checkpoint(artifacts)
            shas[model.key] = sha256_file(ckpt) if ckpt.is_file() else None
        rec = load_record(out, cell_key(cell, model, shas[model.key], plan.run)) if shas[model.key] else None
        if rec is not None:
            done[i] = {**rec, "reused": True}
    return done


def run_sequential(plan: Plan, out: Path, artifacts: Path, done: dict[int, dict],
                   on_record: Callable[[dict], None]) -> list[dict]:
    """The same plan in this process, one cell after another (no Ray; for comparisons and tests)."""
    from uadc.pipeline.sweep import cells as C
    infos: dict[str, C.ModelInfo | str] = {}
    states: dict[str, C.BaselineState] = {}
    records = []
    for i, cell in enumerate(plan.cells):
        if i in done:
            records.append(done[i])
            on_record(done[i])
            continue
        model = plan.models[cell.model]
        if model.key not in infos:
            try:
                infos[model.key] = C.ensure_model(model, artifacts, plan.run.train)
            except UadcError as exc:
                infos[model.key] = C.one_line(exc)
        info = infos[model.key]
        if isinstance(info, str):
            rec = C.failed_record(cell, None, None, info)
        else:
            rec = load_record(out, cell_key(cell, model, info.sha256, plan.run))
            if rec is not None:
                rec = {**rec, "reused": True}
            else:
                if model.key not in states:
                    states[model.key] = C.build_baseline(model, info, plan.run)
                rec = C.run_cell(cell, model, info, states[model.key], out, artifacts, plan.run)
        records.append(rec)
        on_record(rec)
    return records
