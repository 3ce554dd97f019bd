"""``python -m bench.search_time RECIPE [--artifacts A] [--cache DIR]``: ``compile.precision: auto``'s search alone.

Runs the search exactly as ``uadc compile RECIPE --target T`` does (same calibration, candidates,
passes and threads) on the recipe's trained checkpoint, with nothing after it (no final compile,
metrics or latency), and prints one JSON line: seconds, INT8 groups, nodes, timing-cache hit.
To compare two versions of uadc on the same checkpoint, alternate runs with ``PYTHONPATH`` set to
the other checkout (``git worktree add /tmp/old COMMIT``), sharing one ``--cache`` so that both
reuse a profile where their graphs agree. ``--profile-batch 8 --record DIR`` profiles at batch 8 and
writes the search's record to ``DIR/report.json`` for ``python -m bench.precision_breakdown DIR``:

    python -m bench.search_time recipes/stfpm_effnet_lite0.yaml --artifacts A --cache A/timing_cache
    PYTHONPATH=/tmp/old python -m bench.search_time recipes/stfpm_effnet_lite0.yaml --artifacts A --cache A/timing_cache
"""

from __future__ import annotations

from bench import as_script, positive, summary

import argparse
import json
import time
from pathlib import Path

from uadc.core.io import atomic_write_json


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.search_time", description=summary(__doc__))
    ap.add_argument("recipe")
    ap.add_argument("--artifacts", type=Path, default=None, help="artifacts root (default ./artifacts)")
    ap.add_argument("--target", default="ort-cpu-int8")
    ap.add_argument("--threads", type=positive, default=None, help="default: the compile's")
    ap.add_argument("--cache", type=Path, default=None, help="timing-cache folder (default: none, a fresh profile)")
    ap.add_argument("--profile-batch", type=positive, default=None, help="override compile.auto.profile_batch")
    ap.add_argument("--record", type=Path, default=None,
                    help="write the search's record here as report.json (read by bench.precision_breakdown)")
    args = ap.parse_args(argv)
    if args.record is not None and (args.record.exists() and not args.record.is_dir() or
                                    (args.record / "artifact.json").exists()):   # before the search, not after it
        ap.error(f"--record {args.record}: " + ("not a folder" if not args.record.is_dir() else
                                                "an artifact folder (its report.json would be replaced)"))

    import uadc
    from uadc.config.recipe import load_recipe
    from uadc.config.targets import get_target
    from uadc.pipeline.api import baseline
    from uadc.pipeline.compile import CompileOptions, _pass_names
    from uadc.pipeline.precision import auto_candidates, search_precision

    recipe = load_recipe(args.recipe)
    if args.profile_batch is not None:
        auto = {**(recipe.cfg["compile"].get("auto") or {}), "profile_batch": args.profile_batch}
        recipe = recipe.with_overrides(compile={"auto": auto})
    b = baseline(recipe, artifacts=args.artifacts, threads=args.threads)
    target = get_target(args.target)
    opts = CompileOptions(target=args.target, precision="auto")
    ptq = auto_candidates(b, target, opts)
    fp32, _ = b.fp32_simplified
    t0 = time.time()
    auto = search_precision(b, target, fp32, ptq, _pass_names(b, target, opts), args.threads or b.threads,
                            None, args.cache)
    if args.record is not None:
        args.record.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.record / "report.json", {"precision_search": auto.record})
    cache = auto.record["profile"].get("timing_cache")  # TensorRT: a latency model, no profile
    print(json.dumps({"uadc": str(Path(uadc.__file__).parent), "seconds": round(time.time() - t0, 1),
                      "int8_groups": auto.record["final"]["int8_groups"], "groups": len(auto.record["groups"]),
                      "int8_nodes": len(auto.nodes), "timing_cache_hit": bool(cache and cache["hit"]),
                      "fp16_groups": auto.record.get("float_stage", {}).get("fp16_groups")}))


if __name__ == "__main__":
    as_script(main)
