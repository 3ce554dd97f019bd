"""A sweep over one loaded recipe whose cells compile into named folders: the grids of
``uadc calibrators compare`` and ``bench/paper_tables.py`` (Tables 5-7).

The recipe's checkpoint is used as it is (never trained here); the grid runs in this process by
default (a caller's ``Baseline`` of that checkpoint is then reused) or on Ray (``ray``/``address``;
one thread per cell, so cells run side by side). Records go to ``<out>/records`` as in any sweep,
so a rerun with the same inputs reuses finished cells (``reuse=False``: every cell is compiled
again, for figures that must be measured by this run); a record of other inputs that names one
of our folders is dropped, since that folder is about to hold another result.
"""

from __future__ import annotations

import importlib.util
import json
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from uadc.config.recipe import Recipe
from uadc.core.constants import REPORT_FILE
from uadc.core.errors import UadcError
from uadc.core.hashing import sha256_file
from uadc.core.io import parse_json
from uadc.pipeline.sweep.plan import Cell, Plan, cell_key, plan_recipes
from uadc.pipeline.sweep.spec import Axes, RunConfig
from uadc.pipeline.sweep.store import RECORDS

RAY_HINT = "--ray runs the grid on Ray, which is not installed: pip install 'uadc[sweep]' (or leave out --ray)"


def run_fixed_grid(recipe: Recipe, axes: Axes, out: Path, artifacts: Path, folder: Callable[[Cell], str], *,
                   latency_runs: int, what: str, baseline: Any = None, ray: bool = False, address: str | None = None,
                   reuse: bool = True, keep_failed: bool = False) -> list[tuple[Cell, dict]]:
    """(cell, its report.json) in plan order; a failed cell is ``what``'s one-line UadcError, or
    (``keep_failed``, unless every cell failed) ``(cell, {"error": ...})``."""
    local = not (ray or address)
    if not local and importlib.util.find_spec("ray") is None:
        raise UadcError(RAY_HINT)
    out, artifacts = Path(out).absolute(), Path(artifacts).absolute()
    threads = (getattr(baseline, "threads", None) or recipe.train.threads or _torch_threads()) if local else 1
    run = RunConfig(evaluate=True, latency_runs=latency_runs, threads=threads, train=False)
    plan = plan_recipes([(recipe, recipe)], axes, run, what)
    plan = replace(plan, cells=[replace(c, artifact=folder(c)) for c in plan.cells])
    model = next(iter(plan.models.values()))
    ckpt = model.checkpoint(artifacts)
    if not ckpt.is_file():   # never trains (a sweep would): the error a compile gives
        raise UadcError(f"no checkpoint for recipe {recipe.name!r} at {ckpt}: run `uadc train` first")
    given = getattr(baseline, "checkpoint", None)
    if given is not None and Path(given).resolve() != ckpt.resolve():
        raise UadcError(f"{what}: the baseline's checkpoint {given} is not the recipe's {ckpt}")
    if baseline is None:   # a checkpoint of other settings failed every cell, after the work, into a half-made out
        from uadc.training.checkpoint import load_checkpoint
        load_checkpoint(ckpt, recipe)
    sha = sha256_file(ckpt) if reuse else None
    from uadc.pipeline.sweep import cells as C
    from uadc.pipeline.sweep.run import run_plan
    seeded = (C.given_baseline(C.ensure_model(model, artifacts, False), run, baseline)
              if baseline is not None and local else nullcontext())
    with seeded:
        # under the folder's lock: records another run into it wrote meanwhile named folders this run then
        # filled, and a later rerun reused them, another run's figures under this one's settings
        res = run_plan(plan, artifacts, out, address=address, sequential=local, table=False,
                       locked=lambda: _drop_records(plan, out, sha))
    failed = {r["cell"]: r["error"] for r in res.rows if r["status"] != "ok"}
    if failed and (not keep_failed or len(failed) == len(plan.cells)):
        cell, error = next(iter(failed.items()))
        raise UadcError(f"{what}: {cell}: {error}")
    return [(c, {"error": failed[c.id]} if c.id in failed else json.loads((out / c.artifact / REPORT_FILE).read_text(encoding="utf-8")))
            for c in plan.cells]


def _torch_threads() -> int:
    """What a ``Baseline`` of the recipe uses when train.threads is unset (torch honours OMP_NUM_THREADS)."""
    import torch
    return torch.get_num_threads()


def _drop_records(plan: Plan, out: Path, sha: str | None) -> None:
    """Records naming our folders, except (``sha`` given) those of exactly this plan's cells."""
    keys = {cell_key(c, plan.models[c.model], sha, plan.run) for c in plan.cells} if sha else set()
    ours = {c.artifact for c in plan.cells}
    for path in sorted((out / RECORDS).glob("*.json")):
        try:
            rec = parse_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("artifact") in ours and rec.get("key") not in keys:
            path.unlink()
