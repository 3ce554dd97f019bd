"""``python -m bench.pred_label_check ARTIFACT [--recipe R]``: in-graph decisions vs the runtime's.

For an artifact compiled with ``--postprocess``: every test image of the recipe's categories is
preprocessed by ``uadc.runtime`` and run through ``polygraphy run model.onnx --onnxrt`` (which
feeds only ``image``, so the ``category`` input takes its default: the global thresholds); its
``pred_label`` must equal ``Detector.predict``'s global label. Then ONNX Runtime with the
``category`` input set per category must equal ``Detector.predict(..., category=c)``. Prints the
counts; exit 1 on any difference.

    uadc compile recipes/stfpm_effnet_lite0.yaml --target ort-cpu-int8 --postprocess --out /tmp/pp
    python -m bench.pred_label_check /tmp/pp
"""

from __future__ import annotations

from bench import as_script, summary

import argparse
import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def _polygraphy_labels(model: Path, images: np.ndarray) -> np.ndarray:
    with contextlib.redirect_stdout(sys.stderr):   # Polygraphy's log lines: stdout is the result's
        from polygraphy.comparator import RunResults
        from polygraphy.json import save_json
    with tempfile.TemporaryDirectory(prefix="uadc-pg-") as tmp:
        save_json([{"image": images}], f"{tmp}/in.json")
        p = subprocess.run([str(Path(sys.executable).parent / "polygraphy"), "run", str(model), "--onnxrt",
                            "--load-inputs", f"{tmp}/in.json", "--save-outputs", f"{tmp}/out.json"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"polygraphy run failed: {p.stderr.strip().splitlines()[-1:]}")
        with contextlib.redirect_stdout(sys.stderr):
            results = RunResults.load(f"{tmp}/out.json")
        return np.asarray(results[0][1][0]["pred_label"], bool)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=summary(__doc__))
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--recipe", default=None, help="the recipe whose test images are judged (default: the "
                    "artifact's own, by the name it records: a built-in recipe's name or recipes/<name>.yaml)")
    a = ap.parse_args(argv)
    from uadc.config.packaged import packaged_recipes
    from uadc.config.recipe import load_recipe
    from uadc.core.ort_session import make_session
    from uadc.data.mvtec import list_test_samples
    from uadc.data.sources import resolve_sources
    from uadc.runtime import Detector
    det = Detector.load(a.artifact)   # first: a missing artifact was named as a missing default recipe
    defaulted = a.recipe is None
    if defaulted:
        own = Path("recipes") / f"{det.manifest.recipe}.yaml"
        a.recipe = str(own) if own.is_file() else det.manifest.recipe   # else a built-in recipe of that name
        if not own.is_file() and a.recipe not in {r.name for r in packaged_recipes()}:
            print(f"error: {a.artifact} was compiled from recipe {a.recipe!r}, found neither as {own} nor built in: "
                  f"give it with --recipe", file=sys.stderr)
            return 2
    recipe = load_recipe(a.recipe)
    if defaulted and recipe.hash != det.manifest.recipe_hash:   # a same-named recipe of other settings or data
        print(f"error: {a.recipe} is not the recipe {a.artifact} was compiled from (recipe hash {recipe.hash}, the "
              f"artifact's {det.manifest.recipe_hash}): give its own with --recipe", file=sys.stderr)
        return 2
    if not det.manifest.postprocess:
        print(f"error: {a.artifact} has no in-graph post-processing (compile with --postprocess)", file=sys.stderr)
        return 2
    missing = sorted({c for _, c in resolve_sources([s.model_dump() for s in recipe.data.sources])}
                     - set(det.manifest.postprocess["category_index"]))
    if missing:   # a KeyError after the first polygraphy run
        print(f"error: {a.artifact} has no category {missing[0]!r} of recipe {a.recipe}: give its own with --recipe",
              file=sys.stderr)
        return 2
    sess = make_session(a.artifact / "model.onnx")
    same = same_cat = total = 0
    for root, cat in resolve_sources([s.model_dump() for s in recipe.data.sources]):
        files = [s.path for s in list_test_samples(root, cat)]
        images = np.stack([det.preprocess(f) for f in files])
        same += int(np.sum(_polygraphy_labels(a.artifact / "model.onnx", images)
                           == np.array([bool(q.label) for q in det.predict(files)])))
        idx = det.manifest.postprocess["category_index"][cat]
        label, = sess.run(["pred_label"], {"image": images, "category": np.full(len(images), idx, np.int64)})
        own = np.array([bool(q.label) for q in det.predict(files, category=cat)])
        same_cat += int(np.sum(np.asarray(label, bool) == own))
        total += len(files)
        print(f"{cat}: {len(files)} images", file=sys.stderr, flush=True)
    print(f"polygraphy pred_label == runtime global label: {same}/{total}; "
          f"per category (ORT, category input): {same_cat}/{total}")
    return 0 if same == same_cat == total else 1


if __name__ == "__main__":
    as_script(main)
