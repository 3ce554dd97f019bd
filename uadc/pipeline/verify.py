"""``uadc verify`` / ``uadc diff``: run artifacts on their own runtime (ONNX Runtime; OpenVINO for
an OpenVINO target's artifact when ``openvino`` imports; TensorRT when the folder has
``model.engine`` and ``tensorrt`` imports) through Polygraphy,
compare with the golden outputs (or with artifact A), and judge the anomaly-detection figures
against the budgets (uadc.verify.gate).

The golden set ``uadc compile`` stores (``write_golden_files``): the validation normals of every
category (a seeded sample of train/good when the recipe has no validation split), a few N(0,1)
inputs, and a seeded sample of labelled test images, with the FP32 reference's outputs.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from uadc.backends import openvino as ov
from uadc.backends.tensorrt.plan import trt_available
from uadc.config.recipe import VerifyConfig
from uadc.config.targets import inference_hint_of
from uadc.core.constants import (ENGINE_FILE, GOLDEN_META, GOLDEN_REFERENCE, GOLDEN_RUNNER, MANIFEST_FILE, MODEL_FILE,
                                 OUTPUT_NAMES, REPORT_FILE)
from uadc.core.errors import NonFiniteOutputs, RuntimeFault, UadcError, raise_interrupt_behind
from uadc.core.io import parse_json
from uadc.core.manifest import Manifest, read_manifest, verify_files
from uadc.core.ort_session import make_session
from uadc.core.scoped import quiet_third_party
from uadc.pipeline.deploy import fp32_val_outputs
from uadc.verify import fidelity
from uadc.verify.gate import (DiffResult, GateResult, NonFiniteCandidate, VerifyResult, budgets as make_budgets,
                              judge_all)
from uadc.verify.golden import GoldenSet, batches, read_golden, write_golden
from uadc.verify.images import load_image_dirs, metadata_image_size

log = logging.getLogger(__name__)
BATCH = 8


def feed_batch(size: int) -> int:
    """Images per golden or judged batch: 8 up to 256 px, fewer above, as many pixels a batch (8 images of
    1024 px through the FP32 model took 12 GB)."""
    return max(1, min(BATCH, BATCH * 256 * 256 // (size * size)))
FIGURE_KINDS = ("normal", "test", "user")  # random inputs feed the tensor check only
_GOLDEN_CACHE: "weakref.WeakKeyDictionary[Any, GoldenSet]" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------- golden set

def _pick(n_have: int, n_want: int, rng: np.random.Generator) -> list[int]:
    if n_have <= n_want:
        return list(range(n_have))
    return sorted(int(i) for i in rng.choice(n_have, n_want, replace=False))


def build_golden(baseline: Any, cfg: VerifyConfig | None = None) -> GoldenSet:
    """The golden set of a ``Baseline``: images chosen by seed, outputs of its FP32 ONNX."""
    if cfg is None and baseline in _GOLDEN_CACHE:
        return _GOLDEN_CACHE[baseline]
    cfg = cfg or baseline.recipe.verify
    rng = np.random.default_rng([baseline.recipe.seed, 10])
    data = baseline.data
    images, records, masks = [], [], []
    val = getattr(data, "val", None) or {}
    for cat in data.categories:
        ds = val.get(cat)
        source = "validation"
        idx_all = list(range(len(ds))) if ds is not None and len(ds) else []
        if not idx_all:  # no validation split: a seeded sample of the category's training normals
            ds, source = data.train, "train"
            idx_all = [i for i, s in enumerate(ds.samples) if s.category == cat]
        for j in _pick(len(idx_all), cfg.golden_normals, rng):
            i = idx_all[j]
            images.append(ds[i]["image"].numpy())
            records.append({"kind": "normal", "category": cat, "label": None,
                            "source": f"{source}:{ds.samples[i].path.name}"})
    size = baseline.size
    for k in range(cfg.golden_random):
        images.append(rng.standard_normal((3, size, size), dtype=np.float32))
        records.append({"kind": "random", "category": None, "label": None, "source": f"N(0,1)#{k}"})
    for cat, ds in data.tests.items():
        labels = np.array([s.label for s in ds.samples])
        for lab, want in ((0, cfg.golden_test // 2), (1, cfg.golden_test - cfg.golden_test // 2)):
            where = np.flatnonzero(labels == lab)
            for j in _pick(len(where), want, rng):
                item = ds[int(where[j])]
                images.append(item["image"].numpy())
                masks.append(item["mask"][0].numpy() > 0.5)
                s = ds.samples[int(where[j])]
                records.append({"kind": "test", "category": cat, "label": int(lab),
                                "source": f"test:{s.defect}/{s.path.name}"})
    feeds = batches(np.stack(images), feed_batch(baseline.size))
    sess = make_session(baseline.fp32, baseline.threads)
    outputs = [OrderedDict(zip(OUTPUT_NAMES, sess.run(list(OUTPUT_NAMES), dict(f)))) for f in feeds]
    g = GoldenSet(feeds, outputs, records, np.stack(masks) if masks else None)
    kinds = g.kinds()
    normal = kinds == "normal"
    g.meta = {"recipe": baseline.recipe.name, "recipe_hash": baseline.recipe.hash,
              "checkpoint_sha256": baseline.checkpoint_sha256,
              "verify": baseline.recipe.verify.model_dump(),
              "thresholds": _golden_thresholds(g, normal, baseline),
              "threshold_rule": "uadc.evaluation.thresholds on the FP32 reference's outputs on every validation "
                                "normal, per category and global, as compile sets an artifact's; a category "
                                "without validation normals takes the global ones, as compile does (with none at "
                                "all: fitted on the golden set's training normals instead)"}
    _GOLDEN_CACHE[baseline] = g
    return g


def _golden_thresholds(g: GoldenSet, normal: np.ndarray, baseline: Any) -> dict[str, dict]:
    """The reference's thresholds as compile sets the artifact's: on every validation normal (fitted on
    the golden set's few, at most ``verify.golden_normals`` a category, an FP32 artifact failed its own
    gate on identical outputs; fitted on the training normals drawn for a category without any, they
    differed from the artifact's global ones)."""
    deploy, val = baseline.recipe.deploy, fp32_val_outputs(baseline, baseline.threads)
    if val:
        cats = np.concatenate([[c] * len(val[c][1]) for c in sorted(val)])
        scores, maps = (np.concatenate([val[c][i] for c in sorted(val)]) for i in (1, 0))
    else:   # no validation normals anywhere: the golden set's training normals
        cats, scores, maps = g.categories()[normal], g.output("score")[normal], g.output("anomaly_map")[normal, 0]
    thr = fidelity.reference_thresholds(scores, maps, cats, deploy.false_alarm_rate, deploy.threshold_margin)
    for cat in sorted(set(g.categories()[normal].tolist()) - set(thr)):
        thr[cat] = {**thr["global"], "n": 0,   # none of its own: the global spread is not this category's
                    "source": "reference outputs, global (no validation normals of its own)"}
    return thr


def write_golden_files(folder: Path, baseline: Any, compiled: onnx.ModelProto) -> None:
    """Store the golden set in an artifact folder being written (``uadc compile``), and the FP32
    reference model too when the artifact's own model is a different one (so ``uadc verify
    --images`` has a reference to run)."""
    g = build_golden(baseline)
    same = _graph_bytes(compiled) == _graph_bytes(baseline.fp32)  # metadata may differ
    if not same:
        onnx.save(baseline.fp32, str(Path(folder) / GOLDEN_REFERENCE))
    g.meta["reference_model"] = MODEL_FILE if same else GOLDEN_REFERENCE
    write_golden(folder, g)


def _graph_bytes(model: onnx.ModelProto) -> bytes:
    """The graph without ``value_info``: shape annotations a pass recorded compute nothing, and an FP32
    artifact that differs from its export by them alone carried a second copy of its model."""
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    graph.ClearField("value_info")
    return graph.SerializeToString()


# ------------------------------------------------------------------------------- runners

def _model_path(artifact: Path) -> Path:
    artifact = Path(artifact)
    if artifact.is_dir() and (artifact / MANIFEST_FILE).is_file():   # its model gone or changed: said as predict says it
        manifest = read_manifest(artifact, verify=False)            # (`diff` read it first: "not an ONNX model")
        verify_files(artifact, manifest, only=[manifest.model_file])
    path = artifact / MODEL_FILE if artifact.is_dir() else artifact
    if not path.is_file() or path.suffix != ".onnx":
        raise UadcError(f"not a uadc artifact folder (no {MODEL_FILE}) or ONNX file: {artifact}")
    return path


def _input_spec(model: Path) -> tuple[int, np.ndarray] | None:
    """(image size, mean and std) from the model's uadc metadata; None without it (or the file)."""
    from uadc.export.onnx_export import check_whole_model, get_metadata, load_onnx
    if not Path(model).is_file():
        return None
    check_whole_model(onnx_model := load_onnx(model), model)   # a --split partition: a traceback later
    meta = get_metadata(onnx_model)
    try:
        norm = meta["normalization"]
        return metadata_image_size(meta, model), np.asarray([*norm["mean"], *norm["std"]], np.float64)
    except (KeyError, TypeError, ValueError):
        return None


def _graph_size(model: Path) -> int | None:
    """The model's fixed input width from its graph (a model without uadc's metadata)."""
    from uadc.export.onnx_export import load_onnx
    if not Path(model).is_file():
        return None
    dims = load_onnx(model).graph.input[0].type.tensor_type.shape.dim
    return dims[-1].dim_value or None if dims else None


def check_same_input(ref: Path, cand: Path, size: int | None = None) -> None:
    """Both models are fed the same tensors: refuse, before any work, two that take another input
    size or normalisation (Polygraphy's shape error, or figures of wrongly fed models, otherwise).
    ``size``: the reference's input size when ``ref`` has no metadata (the golden feeds')."""
    a, b = _input_spec(ref), _input_spec(cand)
    size_a, size_b = a[0] if a else size, b[0] if b else _graph_size(cand)
    if size_b and size_a is not None and size_a != size_b:   # Polygraphy's traceback (exit 1) before
        raise UadcError(f"{ref} takes {size_a} px inputs and {cand} {size_b} px: the figures compare both on the same "
                        f"input tensors (compare each with its own golden set: uadc verify)")
    if a and b and not np.allclose(a[1], b[1], atol=1e-6):
        raise UadcError(f"{ref} and {cand} normalise inputs differently (mean/std {a[1].round(4).tolist()} vs "
                        f"{b[1].round(4).tolist()}): the figures compare both on the same input tensors")


def _report(artifact: Path) -> dict:
    return _json_or_empty(Path(artifact) / REPORT_FILE)


def artifact_runner(artifact: Path, name: str, threads: int | None = None) -> tuple[Any, str]:
    """A Polygraphy runner for the artifact on its own runtime, and a label for it."""
    model = _model_path(artifact)
    folder = Path(artifact) if Path(artifact).is_dir() else None   # a bare ONNX file runs on ORT
    manifest = read_manifest(folder) if folder is not None and (folder / MANIFEST_FILE).is_file() else None
    if manifest is not None:
        manifest.check_model_file()   # a file (or the manifest) changed after compile: one line
    engine = folder / ENGINE_FILE if folder else None
    usable, why = trt_available() if engine is not None and engine.is_file() else (False, "")
    if usable:   # an empty tensorrt/ folder on the path imports, then had no Runtime (a traceback)
        try:
            from polygraphy.backend.common import BytesFromPath
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
            unrecorded = manifest.check_engine(engine) if manifest is not None else None
            if unrecorded:
                log.warning("%s", unrecorded)
            return TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name=name), f"tensorrt ({ENGINE_FILE})"
        except ImportError as exc:
            why = str(exc)
    if why:   # an engine here that TensorRT cannot run
        log.info("%s has model.engine but TensorRT cannot run it here (%s): running model.onnx with ONNX Runtime",
                 model.parent, why)
    from polygraphy.backend.onnxrt import OnnxrtRunner
    rep = _report(folder) if folder else {}
    if rep.get("runtime") == "openvino" and ov.import_error() is None:
        hint = inference_hint_of(rep.get("target"))
        return ov.ov_runner(model, name, threads, hint), f"{ov.RUNTIME_LABEL} ({hint})"
    label = "onnxruntime CPU"
    if rep.get("runtime") == "openvino":   # ORT runs the ONNX graph in FP32: bf16 inference is not what is judged
        bf16 = "bf16" in str(inference_hint_of(rep.get("target")))
        log.warning("%s: openvino does not import here; judged as its ONNX graph on ONNX Runtime%s", model.parent,
                    ", so its bf16 inference is not exercised (the verdict says nothing of it)" if bf16 else "")
        label += f" (openvino not importable: the ONNX graph{', bf16 not exercised' if bf16 else ''})"
    elif rep.get("runtime") not in (None, "onnxruntime"):
        label += f" (emulating {rep['runtime']} {rep.get('device', '')} {rep.get('precision', '')})".replace("  ", " ")
    return OnnxrtRunner(lambda: make_session(model, threads), name=name), label


def run_feeds(runners: Sequence[Any], feeds: list[dict[str, np.ndarray]]):
    """Polygraphy ``RunResults`` of every runner on the same feeds."""
    from polygraphy.comparator import Comparator
    try:
        with quiet_third_party():
            return Comparator.run(list(runners), data_loader=[OrderedDict(f) for f in feeds])
    except UadcError:
        raise
    except Exception as exc:   # a model that fails as it runs (a bare ONNX's huge buffer): one line, not a traceback
        raise_interrupt_behind(exc)
        raise RuntimeFault(f"a model could not run on the verification images: {type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:300]}") from None


def _outputs(iterations: list, side: str) -> tuple[np.ndarray, np.ndarray]:
    maps = np.concatenate([np.asarray(it[OUTPUT_NAMES[0]]) for it in iterations]).astype(np.float32)
    scores = np.concatenate([np.asarray(it[OUTPUT_NAMES[1]]).reshape(-1) for it in iterations]).astype(np.float32)
    if not (np.isfinite(maps).all() and np.isfinite(scores).all()):
        said = f"the {side} produced non-finite outputs (NaN/Inf) on the verification images"
        # `except uadc.NonFiniteOutputs` catches either side (the reference's was a plain UadcError); exit 2 for it
        raise NonFiniteCandidate(f"REGRESSION: {said}") if side.startswith("candidate") else NonFiniteOutputs(said)
    return maps.reshape(len(maps), *maps.shape[-2:]), scores


# --------------------------------------------------------------------------------- gate

def _manifest(artifact: Path) -> Manifest | None:
    try:
        return read_manifest(Path(artifact), verify=False) if Path(artifact).is_dir() else None
    except UadcError:
        return None


def _json_or_empty(path: Path) -> dict:
    try:
        doc = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _golden_of_another_recipe(folder: Path, g: GoldenSet) -> list[str]:
    """A note when the golden set is another recipe's (recipe files differ in any section, or in name,
    for one model too, so not an error): every figure out of budget then may only mean another model."""
    m = _manifest(folder)
    theirs, ours = g.meta.get("recipe_hash"), m.recipe_hash if m is not None else None
    own = _json_or_empty(folder / GOLDEN_META).get("checkpoint_sha256")   # the artifact's own golden set's
    if theirs == ours and own and g.meta.get("checkpoint_sha256") not in (None, own):   # retrained, same recipe
        return [f"the golden set is of another checkpoint of recipe {m.recipe} than the artifact's (trained again?): "
                f"the figures measure that difference too"]
    if not (theirs and ours and theirs != ours):
        return []
    return [f"the golden set is recipe {g.meta.get('recipe')}'s (hash {theirs}), the artifact recipe {m.recipe}'s "
            f"(hash {ours}): if they are different models, the figures measure that difference (`uadc diff A B` "
            f"compares two models)"]


GLOBAL_FALLBACK = "artifact.json global (no thresholds of its own for this category)"


def _manifest_thresholds(artifact: Path, base: dict, global_for: Sequence[str] = ()) -> dict | None:
    """The artifact's own operating thresholds (artifact.json) in the gate's format, or None.
    ``global_for``: categories decided at the global ones whatever the artifact knows (images in folders the
    reference has no category for: B at its own category's against A at global agreed on 0.43)."""
    m = _manifest(artifact)
    t = m.thresholds if m is not None else None
    if t is None:
        return None
    out = {}
    for cat, spread in base.items():
        mine = cat in t.categories and cat not in global_for
        own = cat == "global" or (mine and t.validation.get(cat, 1) > 0)   # 0: a copy of global
        ct = t.get(cat if mine else None)
        # "n" stays the spread's: the normals its score_std came from (the artifact's count judged a spread of 2);
        # the keys in the reference's order
        out[cat] = {**spread, "image": ct.image.value, "pixel": ct.pixel.value,
                    "quantile": ct.image.quantile, "source": "artifact.json" if own else GLOBAL_FALLBACK}
    return out


def _given_thresholds(given: dict | None, base: dict) -> dict | None:
    """``given`` (a golden set's per-category thresholds) for each category of ``base``; an unknown
    category takes the ``global`` ones, as the runtime does. The score spread stays ``base``'s, as
    for an artifact's own thresholds (`verify --images` measured score_shift in the golden normals'
    spread, `diff --images` in the images', and the two disagreed 10x on one pair)."""
    if not given:
        return None
    return {cat: {**given.get(cat, given["global"]), "n": base[cat]["n"], "score_std": base[cat]["score_std"],
                  "source": "golden set"} for cat in base}


def _check_covers(candidate: Path, records: list[dict], categories: list[str]) -> None:
    """A candidate trained on fewer of the reference's ``categories`` than the images hold (a
    one-category model against a unified one) failed as a REGRESSION on products it never saw:
    refused, naming them. Images in folders that are no category are decided globally, as before."""
    own = _categories(candidate)
    outside = sorted({r.get("category") for r in records} & set(categories) - set(own)) if own else []
    if outside:
        raise UadcError(f"{candidate} covers {', '.join(own)} only; the images include {', '.join(outside)}, which "
                        f"it was not trained on: pass --images with images of the categories it covers")


def _categories(*artifacts: Path) -> list[str]:
    m = next((m for m in map(_manifest, artifacts) if m is not None), None)
    return list(m.categories) if m is not None else []


def _judge(kind: str, reference: str, candidate: str, runtime: dict, records: list[dict], masks: np.ndarray | None,
           ref: tuple[np.ndarray, np.ndarray], cand: tuple[np.ndarray, np.ndarray], thresholds: tuple[dict, dict],
           budgets: dict[str, float], per_category: bool, normal_only: bool, tensors: dict, t0: float,
           notes: list[str] | None = None, no_category: Sequence[str] = ()) -> GateResult:
    kinds = np.array([r["kind"] for r in records])
    cats = np.array([r.get("category") or "" for r in records])
    use = np.isin(kinds, ("normal", "user") if normal_only else FIGURE_KINDS)   # --images are taken as normals
    if not use.any():
        raise UadcError("no images to judge (normal_only and the golden set has no normal images)")
    fid = fidelity.figures(ref[1][use], ref[0][use], cand[1][use], cand[0][use], cats[use], *thresholds)
    lab = None
    test = kinds == "test"
    if not normal_only and test.any() and masks is not None:
        labels = np.array([r["label"] for r in records])[test].astype(int)
        lab = fidelity.labelled(ref[1][test], ref[0][test], cand[1][test], cand[0][test], labels, masks, cats[test])
    few = fidelity.too_few_normals(thresholds[0], fid["categories"])
    figures = judge_all(fid, lab, budgets, per_category,
                        {"all" if c == "global" else c: {"score_shift"} for c in few})
    counts = {k: int(((kinds == k) & use).sum()) for k in FIGURE_KINDS if ((kinds == k) & use).any()}
    cls = VerifyResult if kind == "verify" else DiffResult
    notes = list(notes or []) + ([] if lab is not None else [
        "--normal-only: the labelled test images are left out, so AUROC/AUPRO drops are not computed"
        if normal_only and test.any() else "no labelled images: AUROC/AUPRO drops not computed"])
    notes += [f"the {side} has no thresholds of its own for {', '.join(fell)}: decided at its global thresholds"
              for side, thr in zip(("reference", "candidate"), thresholds)
              if (fell := [c for c, t in thr.items() if t.get("source") == GLOBAL_FALLBACK and c not in no_category])]
    unmeasured = [f"{n}[{c}]" for c, figs in (("all", fid["all"]), *fid["categories"].items()) for n, v in figs.items()
                  if v is None and (c == "all" or per_category and len(fid["categories"]) > 1)
                  and not (n == "score_shift" and (c if c != "all" else "global") in few)]   # said below, why
    notes += [f"not judged, too few images to measure: {', '.join(unmeasured)} (spearman needs "
              f"{fidelity.MIN_RANK_IMAGES} images; score_shift a spread of the reference normals)"] if unmeasured else []
    notes += [f"score_shift[{c}] not judged: {n} reference normals (fewer than {fidelity.MIN_SPREAD_NORMALS}) "
              f"cannot estimate the score spread it is measured in" for c, n in sorted(few.items())
              if c != "global" and per_category and len(fid["categories"]) > 1]
    notes += [f"score_shift not judged: {few['global']} reference normals in all (fewer than "
              f"{fidelity.MIN_SPREAD_NORMALS}) cannot estimate the score spread it is measured in"] if "global" in few else []
    return cls(kind, reference, candidate, runtime, counts, figures, fid["categories"], lab, tensors,
               {"reference": thresholds[0], "candidate": thresholds[1]}, budgets, per_category, time.time() - t0, notes)


def _bare_candidate(ref_thr: dict, notes: list[str]) -> dict:
    """A bare model decides at the reference's thresholds (it was reported as deciding at its own)."""
    notes.append("the candidate has no operating thresholds of its own (a bare model, or compiled without validation "
                 "normals): it decides at the reference's")
    return {c: {**t, "source": "the reference's (none of its own)"} for c, t in ref_thr.items()}


def _budgets(recipe: Any, stored: dict | None, overrides: dict | None) -> tuple[dict[str, float], bool]:
    """A given recipe's ``verify:`` section, else the one stored with the golden set, then overrides."""
    base = recipe.verify.model_dump() if recipe is not None else dict(stored or {})
    b = make_budgets(base, overrides)
    return b, bool(base.get("per_category", VerifyConfig().per_category))


def verify(artifact: Path, *, images: Sequence[Path] | None = None, golden: Path | None = None,
           budgets: dict | None = None, recipe: Any = None, normal_only: bool = False,
           threads: int | None = None) -> VerifyResult:
    """Judge an artifact against its golden outputs (or ``golden``: another golden set).

    With ``images``, the reference is the FP32 model behind the golden set (stored in the
    artifact), run on those images, which are taken as normal ones."""
    t0 = time.time()
    artifact = Path(artifact)
    model = _model_path(artifact)
    _check_artifact_folder(artifact, f"to judge a bare model, `uadc verify {artifact / MODEL_FILE} --golden ARTIFACT`")
    g = read_golden(golden if golden is not None else model.parent)
    notes = _golden_of_another_recipe(model.parent, g)
    check_same_input(g.path.parent / g.meta.get("reference_model", GOLDEN_REFERENCE), model,
                     int(g.feeds[0][next(iter(g.feeds[0]))].shape[-1]) if g.feeds else None)
    stored = g.meta.get("verify")
    if not (g.path.parent / MANIFEST_FILE).is_file():   # no manifest checked its files: its budgets passed anything
        stored = None
        notes.append(f"the golden set {g.path} is in no artifact folder ({MANIFEST_FILE}): nothing checks its files, "
                     f"and its stored budgets are not used (the defaults; --recipe or --budget set others)")
    b, per_cat = _budgets(recipe, stored, budgets)
    cand_runner, cand_label = artifact_runner(artifact, "candidate", threads)
    if images:
        ref_model = g.path.parent / g.meta.get("reference_model", GOLDEN_REFERENCE)
        if not ref_model.is_file():
            raise UadcError(f"--images needs the reference model behind the golden set ({ref_model} is missing); "
                            f"use `uadc diff REFERENCE {artifact} --images ...`")
        res = diff(ref_model, artifact, images=images, budgets=budgets, recipe=recipe, normal_only=normal_only,
                   threads=threads, reference_thresholds=g.meta["thresholds"], reference_budgets=stored or {})
        return VerifyResult(**{**res.__dict__, "kind": "verify", "seconds": time.time() - t0,
                               "notes": notes + list(res.notes)})
    _check_covers(artifact, g.images, sorted({r.get("category") for r in g.images} - {None, ""}))   # --golden: another's
    results = run_feeds([cand_runner], g.feeds)
    from polygraphy.comparator import IterationResult, RunResults
    golden_results = RunResults()
    golden_results.append((GOLDEN_RUNNER, [IterationResult(OrderedDict((n, o[n]) for n in OUTPUT_NAMES),
                                                           runner_name=GOLDEN_RUNNER) for o in g.outputs]))
    golden_results.extend(results)
    from uadc.verify.polygraphy_compare import tensor_check   # imports torch: when the gate runs
    tensors = tensor_check(golden_results)
    cand = _outputs(list(results.values())[0], f"candidate ({artifact})")
    ref = _outputs(g.outputs, f"golden set ({g.path})")
    ref_thr = g.meta["thresholds"]
    cand_thr = _manifest_thresholds(artifact, ref_thr) or _bare_candidate(ref_thr, notes)
    return _judge("verify", str(g.path), str(artifact), {"reference": "golden (FP32 reference outputs)",
                                                         "candidate": cand_label},
                  g.images, g.masks, ref, cand, (ref_thr, cand_thr), b, per_cat, normal_only, tensors, t0, notes)


def _check_artifact_folder(path: Path, hint: str) -> None:
    """A folder without artifact.json is no artifact: a copy with its golden budgets edited passed (predict refuses it)."""
    if path.is_dir() and not (path / MANIFEST_FILE).is_file() and any(path.iterdir()):   # empty: "no model.onnx"
        raise UadcError(f"{path} has no {MANIFEST_FILE}: not a uadc artifact folder ({hint})")


def diff(a: Path, b: Path, *, images: Sequence[Path] | None = None, budgets: dict | None = None, recipe: Any = None,
         normal_only: bool = False, threads: int | None = None, reference_thresholds: dict | None = None,
         reference_budgets: dict | None = None) -> DiffResult:
    """Judge artifact ``b`` against artifact ``a`` on ``images`` (default: A's golden images).

    Each side decides at its own operating thresholds: A's ``artifact.json`` ones (or
    ``reference_thresholds``, the golden set's, when A is its bare reference model). When A has
    none, both sides decide at thresholds fitted on A's outputs on these images, never B at its
    deployment thresholds against A at fitted ones. Budgets: ``recipe``'s, else those stored with
    A's golden set (or ``reference_budgets``, the golden set's, when A is its bare reference model)."""
    t0 = time.time()
    a, b = Path(a), Path(b)
    for side, images_too in ((a, " with --images"), (b, "")):   # its golden budgets, masks and labels were read
        # unchecked (verify refused the folder)
        if (side / GOLDEN_META).is_file() or (side / MODEL_FILE).is_file():   # else: "no model.onnx", below
            _check_artifact_folder(side, f"`uadc verify CANDIDATE --golden {side}` judges against the golden set it "
                                   f"holds" if (side / GOLDEN_META).is_file() else f"give its {MODEL_FILE}{images_too}")
    ma = _model_path(a)
    check_same_input(ma, _model_path(b))  # usage errors before any work
    g = read_golden(a) if a.is_dir() and (a / GOLDEN_META).is_file() else None
    masks, notes = None, []
    stored = g.meta.get("verify") if g is not None and (a / MANIFEST_FILE).is_file() else reference_budgets
    known: list[str] = []
    unknown: list[str] = []
    if images:
        known = [c for c in (reference_thresholds or {}) if c != "global"] or _categories(a, b)
        x, records, notes = load_image_dirs(images, ma, categories=known)
        feeds = batches(x, feed_batch(x.shape[-1]))
        unknown = sorted({r["category"] for r in records} - set(known)) if known else []
    elif g is None:
        raise UadcError(f"{a} has no golden set ({GOLDEN_META}) to take images from: pass --images DIR")
    else:
        feeds, records, masks = g.feeds, g.images, g.masks
    _check_covers(b, records, known or _categories(a))
    ra, la = artifact_runner(a, "A", threads)
    rb, lb = artifact_runner(b, "B", threads)
    results = run_feeds([ra, rb], feeds)
    from uadc.verify.polygraphy_compare import tensor_check
    tensors = tensor_check(results)
    its = dict(results.items())
    ref, cand = _outputs(its["A"], f"reference (A, {a})"), _outputs(its["B"], f"candidate (B, {b})")
    kinds = np.array([r["kind"] for r in records])
    normal = np.isin(kinds, ("normal", "user"))
    cats = np.array([r.get("category") or "" for r in records])
    base = fidelity.reference_thresholds(ref[1][normal], ref[0][normal], cats[normal])
    ref_thr = _manifest_thresholds(a, base) or _given_thresholds(reference_thresholds, base)
    if ref_thr is None:
        ref_thr = cand_thr = base
        notes.append("the reference has no operating thresholds: both sides decide at thresholds fitted on its "
                     "outputs on these images")
    else:
        cand_thr = _manifest_thresholds(b, ref_thr, unknown) or _bare_candidate(ref_thr, notes)
        if unknown:
            notes.append(f"images under {', '.join(unknown)} are in no folder named after a category "
                         f"({', '.join(known)}): both sides decide them at the global thresholds")
    bud, per_cat = _budgets(recipe, stored, budgets)
    return _judge("diff", str(a), str(b), {"reference": la, "candidate": lb}, records, masks, ref, cand,
                  (ref_thr, cand_thr), bud, per_cat, normal_only, tensors, t0, notes, unknown)
