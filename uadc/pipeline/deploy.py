"""Deployment glue of a compile: each artifact's own operating thresholds (from its outputs on
the validation normals), the decisions FP32 and the artifact make on the test sets, and the
``artifact.json`` manifest."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from uadc import __version__
from uadc.backends import openvino as ov
from uadc.backends.ort import make_session, ort_predictor
from uadc.config.recipe import Recipe
from uadc.config.targets import Target
from uadc.core.constants import INPUT_NAME, OUTPUT_NAMES, PRED_OUTPUTS
from uadc.core.manifest import NO_VALIDATION_ADVICE, Manifest, Preprocessing, Thresholds
from uadc.evaluation.run import Predictor, load_test_arrays, predict
from uadc.evaluation.thresholds import Decisions, compute_thresholds, decision_report
from uadc.pipeline.baseline import Baseline

log = logging.getLogger(__name__)
Outputs = dict[str, tuple[np.ndarray, np.ndarray]]      # category -> (maps (N,H,W), scores (N,))
_FP32_CACHE: "weakref.WeakKeyDictionary[Baseline, tuple]" = weakref.WeakKeyDictionary()
_VAL_CACHE: "weakref.WeakKeyDictionary[Baseline, dict]" = weakref.WeakKeyDictionary()
_FP32_VAL_CACHE: "weakref.WeakKeyDictionary[Baseline, dict]" = weakref.WeakKeyDictionary()


@dataclass
class DeployResult:
    thresholds: Thresholds | None          # the artifact's own
    fp32_thresholds: Thresholds | None
    section: dict                          # report.json "deploy"


def val_images(baseline: Baseline) -> dict[str, np.ndarray]:
    """category -> validation normals (N,3,H,W), loaded once per baseline."""
    if baseline not in _VAL_CACHE:
        _VAL_CACHE[baseline] = {c: load_test_arrays(ds)[0] for c, ds in baseline.data.val.items() if len(ds)}
    return _VAL_CACHE[baseline]


def target_predictor(target: Target, threads: int) -> Callable[[onnx.ModelProto], Predictor] | None:
    """``model -> Predictor`` on the target's CPU runtime when it is not ONNX Runtime (OpenVINO at
    the target's float precision); None: ONNX Runtime."""
    if target.runtime != "openvino":
        return None
    return lambda m: ov.ov_predictor(ov.compile_model(m, threads, target.inference_hint))


def bank_runner(target: Target, threads: int) -> Callable[[onnx.ModelProto, dict], np.ndarray] | None:
    """``(sub-graph, feeds) -> output`` on the target's runtime at its float precision, for the
    ``knn_bank`` pass (OpenVINO); None: ONNX Runtime, the pass's own."""
    if target.runtime != "openvino":
        return None
    return lambda sub, feeds: ov.run_first_output(ov.compile_model(sub, threads, target.inference_hint), feeds)


def outputs_on(model: onnx.ModelProto, images: dict[str, np.ndarray], threads: int, batch: int, desc: str,
               predictor: Callable[[onnx.ModelProto], Predictor] | None = None) -> Outputs:
    run = predictor(model) if predictor else ort_predictor(make_session(model, threads))
    return {c: predict(run, x, batch, f"{desc} {c}") for c, x in images.items()}


def _thresholds(outputs: Outputs, baseline: Baseline) -> Thresholds | None:
    d = baseline.recipe.deploy
    return compute_thresholds(outputs, d.false_alarm_rate, d.threshold_margin, baseline.categories) if outputs else None


def fp32_val_outputs(baseline: Baseline, threads: int | None) -> Outputs:
    """The FP32 model's outputs on every validation normal, computed once per baseline (the FP32
    thresholds, and the golden set's reference thresholds, rest on them)."""
    if baseline not in _FP32_VAL_CACHE:
        _FP32_VAL_CACHE[baseline] = outputs_on(baseline.fp32, val_images(baseline), threads,
                                               baseline.recipe.eval.batch_size, "fp32 val")
    return _FP32_VAL_CACHE[baseline]


def _fp32(baseline: Baseline, threads: int) -> tuple[Thresholds | None, Outputs]:
    """FP32 thresholds and test outputs, computed once per baseline (shared by every target)."""
    if baseline not in _FP32_CACHE:
        bs = baseline.recipe.eval.batch_size
        thr = _thresholds(fp32_val_outputs(baseline, threads), baseline)
        tests = outputs_on(baseline.fp32, {c: a[0] for c, a in baseline.test_arrays.items()}, threads, bs,
                           "fp32 decisions")
        _FP32_CACHE[baseline] = (thr, tests)
    return _FP32_CACHE[baseline]


def deploy_evaluation(baseline: Baseline, compiled: onnx.ModelProto, threads: int, decisions: bool = True,
                      predictor: Callable[[onnx.ModelProto], Predictor] | None = None) -> DeployResult:
    """Thresholds of ``compiled`` from its own validation outputs; with ``decisions``, FP32 vs
    compiled verdicts on the test sets (labels only reported, never used to set a threshold).
    ``predictor(model)`` runs the artifact on its target runtime (default: ONNX Runtime CPU)."""
    bs = baseline.recipe.eval.batch_size
    val = val_images(baseline)
    thr = _thresholds(outputs_on(compiled, val, threads, bs, "validation", predictor), baseline)
    d = baseline.recipe.deploy
    section: dict = {"false_alarm_rate": d.false_alarm_rate, "threshold_margin": d.threshold_margin,
                     "validation": {c: int(len(val.get(c, ()))) for c in baseline.categories},   # 0s too
                     "thresholds": {"compiled": thr.to_dict() if thr else None}}
    if thr is None:
        why = _no_validation(baseline.recipe)
        section["note"] = f"no validation normals ({why}): no thresholds"
        log.warning("no validation normals (%s): the artifact has no operating thresholds, so `uadc predict` cannot "
                    "decide with it; %s", why, NO_VALIDATION_ADVICE)
        return DeployResult(None, None, section)
    section["estimator"] = thr.estimator
    if d.threshold_margin and not thr.image_spread and (one := [c for c, n in thr.validation.items() if n == 1]):
        log.warning("%s: one validation normal each and no spread to borrow from other categories: the image "
                    "threshold is that image's score, without margin (about half of normal images would be called "
                    "defective); give data.val more normals or raise data.val_fraction", ", ".join(map(repr, one)))
    if _trained_before_split(baseline):
        section["note"] = ("the checkpoint was trained before uadc held out validation normals (no data.val_fraction "
                           "in its recipe): it has seen them, so these thresholds are optimistic; retrain")
        log.warning(section["note"])
    fp32_thr, fp32_tests = _fp32(baseline, threads) if decisions else (None, None)
    if decisions and fp32_thr is not None:
        section["thresholds"]["fp32"] = fp32_thr.to_dict()
        comp_tests = outputs_on(compiled, {c: a[0] for c, a in baseline.test_arrays.items()}, threads, bs,
                                "decisions", predictor)
        labels = {c: a[2] for c, a in baseline.test_arrays.items()}
        f = {c: Decisions.make(fp32_thr.get(c), *fp32_tests[c]) for c in labels}
        k = {c: Decisions.make(thr.get(c), *comp_tests[c]) for c in labels}
        section["decisions"] = decision_report(f, k, labels)
    return DeployResult(thr, fp32_thr, section)


def _trained_before_split(baseline: Baseline) -> bool:
    stored = (baseline.blob or {}).get("recipe")
    return isinstance(stored, dict) and "val_fraction" not in (stored.get("data") or {})


def make_manifest(baseline: Baseline, target: Target, thresholds: Thresholds | None,
                  postprocess: dict | None = None) -> Manifest:
    r = baseline.recipe
    mean, std = r.normalization()
    pre = Preprocessing(image_size=baseline.size, mean=tuple(float(x) for x in mean), std=tuple(float(x) for x in std))
    outputs = list(OUTPUT_NAMES) + (list(PRED_OUTPUTS) if postprocess else [])
    return Manifest(uadc_version=__version__, recipe=r.name, recipe_hash=r.hash, target=target.name,
                    precision=target.precision, runtime=target.runtime, preprocessing=pre,
                    categories=list(baseline.categories), thresholds=thresholds, input_name=INPUT_NAME,
                    input_shape=["batch", 3, baseline.size, baseline.size], outputs=outputs, postprocess=postprocess)


def finalize_model(baseline: Baseline, compiled: onnx.ModelProto, target: Target, thresholds: Thresholds | None,
                   postprocess: bool) -> tuple[onnx.ModelProto, Manifest]:
    """The model file as saved (with ``pred_*`` outputs when asked) and its manifest; the
    manifest's essentials also go into the model's ``metadata_props`` (``uadc.deploy``)."""
    from uadc.export.onnx_export import set_metadata
    from uadc.export.partitions import partition_counts
    from uadc.passes.postprocess import append_postprocess
    info = None
    if postprocess:
        if thresholds is None:
            from uadc.core.errors import UadcError
            raise UadcError(f"postprocess: needs operating thresholds, and this recipe has no validation normals "
                            f"({_no_validation(baseline.recipe)}): {NO_VALIDATION_ADVICE}")
        compiled, info = append_postprocess(compiled, thresholds, list(baseline.categories))
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(compiled)
        compiled = copy
    manifest = make_manifest(baseline, target, thresholds, info)
    # the counts the export recorded describe the FP32 graph, not this one (Q/DQ, post-processing)
    set_metadata(compiled, {"deploy": manifest.essentials(), "partitions": partition_counts(compiled)})
    return compiled, manifest


def _no_validation(recipe: Recipe) -> str:
    """Why no normals were held out: with data.val_fraction > 0, every category has one training image."""
    f = recipe.data.val_fraction
    return "data.val_fraction 0 and no data.val" if f <= 0 else \
        f"data.val_fraction {f:g} holds out none of a single training image per category, and no data.val"
