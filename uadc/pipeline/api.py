"""The public Python API (re-exported as ``uadc.train``, ``uadc.compile``, ...).

Every call returns a typed result, never prints, never trains unless asked to, and leaves
process-wide state (torch threads, stdout) as it found it."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence, Union, overload

import numpy as np

from uadc.config.recipe import Recipe, default_artifacts_root, load_recipe
from uadc.config.targets import TARGETS
from uadc.config.validation import name_list
from uadc.core.constants import CALIBRATION_KINDS, DEPLOY_METADATA, MANIFEST_FILE
from uadc.core.errors import UadcError
from uadc.core.manifest import model_metadata, read_manifest
from uadc.core.hashing import sha256_file
from uadc.core.io import JsonResult, PathArg, as_path, check_replaceable
from uadc.core.numbers import flags, whole_number
from uadc.core.scoped import check_threads, torch_threads, training_state
from uadc.evaluation.run import EvalResult, OneClassResult, evaluate as _evaluate, evaluate_checkpoint, \
    evaluate_one_class, learning_curve
from uadc.models import KDModel
from uadc.pipeline.baseline import Baseline, names_checkpoint, on_cpu, resolve_source
from uadc.pipeline.compare import CompareResult
from uadc.pipeline.compile import CompileOptions, check_compile_settings, compile_target, default_out
from uadc.pipeline.deploy import target_predictor
from uadc.pipeline.sweep.run import SweepResult
from uadc.report.results import CompileResult
from uadc.training.checkpoint import as_recipe_model, checkpoint_path, missing_checkpoint
from uadc.training.run import TrainResult, train_recipe
from uadc.verify.gate import DiffResult, VerifyResult

log = logging.getLogger(__name__)
RecipeLike = Union[str, os.PathLike, dict, Recipe]   # a real alias: typing.get_type_hints resolves it


def train(recipe: RecipeLike, *, one_class: bool = False, epochs: int | None = None, eval_every: int | None = None,
          artifacts: PathArg | None = None) -> TrainResult:
    """Train the recipe's model (unified, or one per category) and write its checkpoint(s)."""
    flags(one_class=one_class)
    r = load_recipe(recipe)
    check_compile_settings(r)
    if epochs is not None:
        r = r.with_overrides(train={"epochs": whole_number(epochs, "epochs")})
    if eval_every is not None:
        whole_number(eval_every, "eval_every")
    with training_state():   # under a caller's torch.no_grad() or float64 default: torch's raw errors
        return train_recipe(r, _artifacts_root(artifacts), one_class=one_class,
                            on_epoch=learning_curve(r, eval_every) if eval_every else None)


def ensure_checkpoint(recipe: Recipe, artifacts: Path | None, given: Any, train_if_missing: bool = False) -> None:
    """`uadc compile`'s checkpoint of ``recipe``: there, or trained first (``train_if_missing``), or the
    error that says how to get it (``given``: the recipe as the user named it)."""
    if checkpoint_path(recipe, artifacts).is_file():
        return
    if not train_if_missing:
        raise missing_checkpoint(recipe, artifacts, given)
    log.info("no checkpoint: training the recipe first (--train-if-missing)")
    log.info("checkpoint written: %s", train(recipe, artifacts=artifacts).checkpoints[0])


@overload
def evaluate(model_or_artifact: Any, recipe: RecipeLike | None = None, *, one_class: Literal[False] = False,
             artifacts: PathArg | None = None, write: bool = True) -> EvalResult: ...


@overload
def evaluate(model_or_artifact: Any, recipe: RecipeLike | None = None, *, one_class: Literal[True],
             artifacts: PathArg | None = None, write: bool = True) -> OneClassResult: ...


@overload
def evaluate(model_or_artifact: Any, recipe: RecipeLike | None = None, *, one_class: bool = False,
             artifacts: PathArg | None = None, write: bool = True) -> EvalResult | OneClassResult: ...


def evaluate(model_or_artifact: Any, recipe: RecipeLike | None = None, *, one_class: bool = False,
             artifacts: PathArg | None = None, write: bool = True) -> EvalResult | OneClassResult:
    """AD metrics on the recipe's test sets for: a recipe (its checkpoint), a checkpoint path,
    a ``KDModel``, a ``Baseline``, or a compiled artifact folder (run on its target's CPU runtime: ONNX Runtime or
    OpenVINO; a TensorRT artifact's model by ONNX Runtime, as its compile emulates it) / ONNX file
    (ONNX Runtime)."""
    _check_source(model_or_artifact, "evaluate")
    flags(one_class=one_class, write=write)
    artifacts = _artifacts_root(artifacts)
    if one_class and (isinstance(model_or_artifact, (KDModel, Baseline)) or _is_onnx(model_or_artifact) or
                      _is_checkpoint(model_or_artifact)):   # the model was ignored
        raise UadcError("evaluate: one_class judges the recipe's per-category checkpoints; give the recipe")
    if one_class and recipe is not None:   # the first argument was ignored
        raise UadcError("evaluate: one_class takes the recipe alone: evaluate(recipe, one_class=True)")
    if isinstance(model_or_artifact, Baseline):   # its own model (the recipe's checkpoint was scored instead)
        b = model_or_artifact
        r = _baseline_recipe(b, recipe, "evaluate")
        if b.checkpoint is None:
            return evaluate(b.model, r, artifacts=artifacts, write=write)
        if Path(b.checkpoint).is_file() and sha256_file(b.checkpoint) != b.checkpoint_sha256:   # it scored the new file
            raise UadcError(f"evaluate: the Baseline's checkpoint {b.checkpoint} was trained again since the Baseline "
                            f"read it; build a new one (uadc.baseline) or evaluate the checkpoint itself")
        return evaluate_checkpoint(r, Path(b.checkpoint), artifacts, write=write)
    if recipe is None:
        if isinstance(model_or_artifact, KDModel) or _is_onnx(model_or_artifact):
            raise UadcError("evaluate: give the recipe whose test sets to use")
        recipe = _checkpoint_recipe(model_or_artifact)
    r = load_recipe(recipe)
    if one_class:
        return evaluate_one_class(r, artifacts, write=write)
    if isinstance(model_or_artifact, KDModel):
        from uadc.evaluation.run import defect_types, test_arrays, torch_predictor
        from uadc.data.prepare import prepare_data
        model = as_recipe_model(on_cpu(model_or_artifact), r)   # the recipe's head, as a checkpoint's
        with torch_threads(r.train.threads):
            data = prepare_data(r)
            res = _evaluate(torch_predictor(model), test_arrays(data), r.eval.batch_size, defects=defect_types(data))
        res.extra = {"recipe_hash": r.hash,   # as a checkpoint's or an artifact's figures say it
                     **({"not_evaluated": data.not_evaluated} if data.not_evaluated else {})}
        return res
    if _is_onnx(model_or_artifact):
        from uadc.backends.ort import make_session, ort_predictor
        from uadc.data.prepare import prepare_data
        from uadc.evaluation.run import defect_types, test_arrays
        from uadc.export.onnx_export import check_whole_model, load_onnx
        model = _onnx_for(Path(model_or_artifact), r)
        check_whole_model(load_onnx(model), model)   # a --split partition: ONNX Runtime's traceback, exit 1
        session = make_session(model, r.train.threads)
        size = session.get_inputs()[0].shape[2:]
        if any(isinstance(d, int) and d != r.data.image_size for d in size):
            raise UadcError(f"evaluate: {model_or_artifact} takes {'x'.join(map(str, size))} px images; recipe "
                            f"{r.name} makes {r.data.image_size} px ones (give the recipe it was compiled from)")
        own = _own_runtime(Path(model_or_artifact), r.train.threads)
        predictor = own(str(model)) if own else ort_predictor(session)
        data = prepare_data(r)   # per defect type, and which model was judged (the document said neither)
        _check_compiled_for(model, model_or_artifact, data.tests, r)
        res = _evaluate(predictor, test_arrays(data), r.eval.batch_size, defects=defect_types(data))
        res.extra = {"model": str(Path(model).absolute()), "model_sha256": sha256_file(model),
                     "runtime": "openvino" if own else "onnxruntime", "recipe_hash": r.hash,
                     **({"not_evaluated": data.not_evaluated} if data.not_evaluated else {})}
        return res
    ckpt = Path(model_or_artifact) if isinstance(model_or_artifact, (str, os.PathLike)) and \
        names_checkpoint(model_or_artifact, r) else None      # "--checkpoint nope" fell back to the recipe's
    return evaluate_checkpoint(r, ckpt, artifacts, write=write)


def _check_compiled_for(model: Path, given: Any, tests: dict, r: Recipe) -> None:
    """Categories a compiled model was not trained on were scored under its name, exit 0."""
    try:
        doc = json.loads(model_metadata(model).get(DEPLOY_METADATA) or "null")
    except (ValueError, RecursionError):
        return
    own = doc.get("categories") if isinstance(doc, dict) else None
    if not isinstance(own, list) or not all(isinstance(c, str) for c in own):   # unreadable: judged as before
        return
    outside = sorted(set(tests) - set(own)) if own else []
    if outside:
        raise UadcError(f"evaluate: {given} was compiled for {', '.join(own)}; recipe {r.name}'s test data holds "
                        f"{', '.join(outside)}, which it was not trained on (give the recipe it was compiled from)")


def _onnx_for(path: Path, r: Recipe) -> Path:
    """The model an artifact folder names, the folder checked against its artifact.json and its
    normalisation against the recipe's (another one scores silently wrong); or the ONNX file."""
    if not path.exists():   # ONNX Runtime's "[ONNXRuntimeError] : 3 : NO_SUCHFILE ..." before
        raise UadcError(f"evaluate: model not found: {path}")
    folder = path if path.is_dir() else path.parent   # an artifact's model file is checked as its folder is
    if not (folder / MANIFEST_FILE).is_file():
        return path / "model.onnx" if path.is_dir() else path
    m = read_manifest(folder)
    if not path.is_dir() and path.resolve() != (folder / m.model_file).resolve():
        return path   # another ONNX beside an artifact: its manifest does not describe it
    mean, std = r.normalization()
    if not np.allclose(np.r_[m.preprocessing.mean, m.preprocessing.std], np.r_[mean, std], atol=1e-6):
        raise UadcError(f"evaluate: {path} normalises inputs with mean {list(m.preprocessing.mean)} / std "
                        f"{list(m.preprocessing.std)}; recipe {r.name} with {list(mean)} / {list(std)} "
                        f"(give the recipe it was compiled from)")
    return folder / m.model_file


def _own_runtime(path: Path, threads: int | None) -> Any:
    """``model -> predictor`` on an artifact's own CPU runtime when that is not ONNX Runtime: an
    OpenVINO artifact is scored by OpenVINO at its target's float precision, as its compile scored
    it (ONNX Runtime gave FP32 figures for a bf16 artifact); None: ONNX Runtime."""
    folder = path if path.is_dir() else path.parent   # its model file too (it was scored on ONNX Runtime)
    if not (folder / MANIFEST_FILE).is_file():
        return None
    m = read_manifest(folder, verify=False)
    if not path.is_dir() and path.resolve() != (folder / m.model_file).resolve():
        return None   # another ONNX beside an artifact: not the one its target names
    target = TARGETS.get(m.target)
    return target_predictor(target, threads) if target is not None else None


def _is_onnx(x: Any) -> bool:
    if not isinstance(x, (str, os.PathLike)):
        return False
    p = Path(x)
    # an artifact folder whose model.onnx is gone too: judged as one ("give its checkpoint file" before)
    return p.suffix == ".onnx" or (p.is_dir() and ((p / "model.onnx").is_file() or (p / MANIFEST_FILE).is_file()))


def _artifacts_root(artifacts: Any) -> Path | None:
    """``artifacts=`` as a path; a file there said "checkpoint not found: FILE/<recipe>/checkpoint.pt"."""
    root = as_path(artifacts, "artifacts", optional=True)
    if root is not None and root.exists() and not root.is_dir():
        raise UadcError(f"artifacts: not a folder: {root}")
    return root


def _is_checkpoint(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike)) and Path(x).suffix in (".pt", ".pth")


def _checkpoint_recipe(source: Any) -> Any:
    """The recipe a checkpoint path holds (it was read as a recipe file: "not a text file"); else ``source``."""
    if _is_checkpoint(source):
        from uadc.training.checkpoint import read_checkpoint
        return read_checkpoint(Path(source))["recipe"]
    return source


def _baseline_recipe(b: Baseline, recipe: RecipeLike | None, what: str, sections: tuple[str, ...] = ()) -> Recipe:
    """A Baseline's own recipe; a ``recipe`` of other settings (in ``sections``, default all) was ignored without
    a word (its compile settings too: the Baseline's calibrator ran): refused."""
    other = load_recipe(recipe).cfg if recipe is not None else b.recipe.cfg
    differ = [k for k in sections or b.recipe.cfg if k != "name" and other.get(k) != b.recipe.cfg[k]]
    if differ:
        raise UadcError(f"{what}: the Baseline was built from recipe {b.recipe.name!r} and recipe= gives other "
                        f"{' and '.join(differ)} settings; drop recipe= or build a Baseline from that recipe")
    return b.recipe


def _check_source(source: Any, what: str) -> None:
    """What a model argument may be; anything else fell back to the recipe's checkpoint silently. An
    artifact or ONNX model is judged by evaluate, never compiled again (it read "recipe not found")."""
    outputs = " or an artifact / ONNX path" if what == "evaluate" else ""
    if not isinstance(source, (KDModel, Baseline, Recipe, dict, str, os.PathLike)) or source in ("", {}):
        raise UadcError(f"{what}: expected a recipe, a checkpoint, a KDModel{',' if outputs else ' or'} a Baseline"
                        f"{outputs}, got {type(source).__name__} {source!r:.60}")
    if not outputs and _is_onnx(source):
        raise UadcError(f"{what}: {source} is a compiled model; compile starts from its recipe or checkpoint "
                        f"(`uadc.evaluate` judges an artifact)")


def baseline(source: Any, recipe: RecipeLike | None = None, *, artifacts: PathArg | None = None,
             threads: int | None = None) -> Baseline:
    """The FP32 baseline (export, FP32 metrics, latency) that several compiles can share.

    ``source``: a recipe (its checkpoint), a checkpoint path (its own recipe, or ``recipe``) or a
    ``KDModel`` (with ``recipe``). Never trains: a missing checkpoint is an error naming ``uadc train``.
    The checkpoint is loaded (and refused, e.g. a one-class model's) here; the export, FP32 metrics and
    latency are computed at their first read or compile."""
    if isinstance(source, Baseline):
        _baseline_recipe(source, recipe, "compile")
        return source
    _check_source(source, "compile")
    if recipe is None:
        if isinstance(source, KDModel):
            raise UadcError("compile: a KDModel needs the recipe it was trained with (recipe=...)")
        recipe = _checkpoint_recipe(source)
    r = load_recipe(recipe)
    root = _artifacts_root(artifacts)
    root = root.absolute() if root is not None else default_artifacts_root()   # a later os.chdir moved its compiles
    return Baseline(r, resolve_source(source, r, root), check_threads(threads), root)


def compile(source: Any, target: str | None = None, *, recipe: RecipeLike | None = None,
            calibration: "str | Iterable[np.ndarray] | None" = None, calib_samples: int | None = None,
            calibrator: str | None = None, quantize: Sequence[str] | None = None, per_channel: bool | None = None,
            out: PathArg | None = None, force: bool = False, evaluate: bool = True, latency_runs: int = 30,
            threads: int | None = None, artifacts: PathArg | None = None, split: bool = False,
            build_engine: bool = False, dump_passes: PathArg | None = None, qat_model: Any = None,
            postprocess: bool | None = None, precision: str | None = None) -> CompileResult:
    """Compile ``source`` for ``target`` and write the artifact folder; returns its report.

    ``source``: a recipe (with its checkpoint), a checkpoint path, a ``KDModel`` (with
    ``recipe``) or a ``Baseline`` (to compile several targets from one export).
    ``calibration``: a named source (``train``, ``random-normal``, ``mixed``) or any iterable of
    images already normalised like the model's input ((3,H,W) or (N,3,H,W) float arrays).
    ``postprocess``: add in-graph ``pred_score``/``pred_label``/``pred_mask`` (default: the
    recipe's ``deploy.postprocess``). ``precision``: ``target`` or ``auto`` (per fused group INT8 or FP32
    within the recipe's ``compile.auto`` budget; default: the recipe's ``compile.precision``)."""
    if target is not None and not (isinstance(target, str) and target):
        raise UadcError(f"target: expected a target's name (uadc compile --help lists them), got {target!r:.60}")
    if calibrator is not None and not (isinstance(calibrator, str) and calibrator):   # ['mse'] was "unknown"
        raise UadcError(f"calibrator: expected a calibrator's name (entropy, mse, ...), got {calibrator!r:.60}")
    flags(("per_channel", "postprocess"), force=force, evaluate=evaluate, split=split, build_engine=build_engine,
          per_channel=per_channel, postprocess=postprocess)
    out, dump_passes = as_path(out, "out", optional=True), as_path(dump_passes, "dump_passes", optional=True)
    if calib_samples is not None:
        whole_number(calib_samples, "calib_samples")
    whole_number(latency_runs, "latency_runs")
    threads = check_threads(threads)   # a Baseline source skips baseline()'s check
    if isinstance(calibration, str) and calibration not in CALIBRATION_KINDS:
        raise UadcError(f"calibration: {calibration!r} is not one of {', '.join(CALIBRATION_KINDS)} (or give images)")
    if calibration is not None and not isinstance(calibration, str) and not hasattr(calibration, "__iter__"):
        raise UadcError(f"calibration: expected train, random-normal, mixed or an iterable of image arrays, "
                        f"got {type(calibration).__name__}")
    if calibration is not None and not isinstance(calibration, str) and calib_samples is not None:
        raise UadcError("calib_samples: given with calibration images, which are all used (it counts the images "
                        "drawn from train, random-normal or mixed); leave it out or pass fewer images")
    b = baseline(source, recipe, artifacts=_artifacts_root(artifacts), threads=threads)
    artifacts = artifacts if artifacts is not None else b.artifacts
    target = b.recipe.compile.target if target is None else target
    named = calibration if isinstance(calibration, str) else None
    own = None if calibration is None or isinstance(calibration, str) else calibration
    opts = CompileOptions(target=target, calibrator=calibrator, calib_data=named, calib_samples=calib_samples,
                          calibration=own, quantize=name_list(quantize, "quantize"),
                          per_channel=per_channel, out=out, force=force,
                          dump_passes=dump_passes, split=split, build_engine=build_engine, evaluate=evaluate,
                          threads=threads, latency_runs=latency_runs, qat_model=qat_model, artifacts=artifacts,
                          postprocess=postprocess, precision=precision)
    with torch_threads(None):  # whatever a stage sets inside, the caller's count comes back
        return compile_target(b, opts)


@dataclass
class QatRunResult(JsonResult):
    """What ``uadc.qat`` returns: the fine-tuned model's path, its summary (``qat.json``) and, when
    compiled after, that compile's report."""

    qat_model_path: Path
    summary: dict
    compiled: CompileResult | None

    def to_dict(self) -> dict:
        return {"qat_model_path": str(self.qat_model_path), "summary": self.summary,
                "compiled": self.compiled.to_dict() if self.compiled is not None else None}


def qat(recipe: RecipeLike, target: str | None = None, *, epochs: int | None = None, compile_after: bool = True,
        artifacts: PathArg | None = None, source: Any = None) -> QatRunResult:
    """Quantization-aware fine-tuning from the PTQ placement; then (by default) compile it into
    ``<artifacts>/<recipe>/<target>-qat``."""
    from uadc.quant.qat.run import check_target, qat_dir, with_qat_record
    flags(compile_after=compile_after)
    artifacts = _artifacts_root(artifacts)
    r = load_recipe(recipe)
    if epochs is not None:   # the recipe's bound (epochs=10**6 ran until killed)
        r.with_overrides(qat={"epochs": whole_number(epochs, "epochs")})
    target = r.compile.target if target is None else target   # "" is no target (it ran the recipe's)
    t = check_target(target)
    if t.runtime == "openvino":
        from uadc.backends.openvino import require
        require()   # before QAT's epochs, not when its compile starts
    # both folders it writes, before any work: a user's folder at the compile's was refused after the epochs
    remedy = "move that folder away (uadc qat has no --out)"
    check_replaceable(qat_dir(r, target, artifacts).absolute(), remedy=remedy)
    if compile_after:
        check_replaceable(default_out(r, t, True, artifacts).absolute(), remedy=remedy + " or pass --no-compile")
    with training_state():   # what it loads and fine-tunes: never inference tensors of a caller's inference_mode()
        res, b = _qat_run(r, target, t, epochs, source, artifacts)
    if compile_after:   # before the compile: a stop there keeps it (said "nothing written"); else the caller's result
        log.info("QAT model written: %s", res.path)
    compiled = None
    if compile_after:
        model = with_qat_record(res.model, res.summary.get("settings"), res.path, target)
        compiled = compile(b, target, quantize=res.quantize, qat_model=model, artifacts=artifacts)
    return QatRunResult(res.path, res.summary, compiled)


def _qat_run(r: Recipe, target: str, t: Any, epochs: int | None, source: Any, artifacts: Path | None) -> tuple:
    from uadc.quant.qat.run import QatOptions, qat_settings, run_qat
    from uadc.training.run import load_images
    if isinstance(source, Baseline):   # its model and data; the recipe's own QAT and PTQ settings are QAT's to use
        b = source
        _baseline_recipe(b, r, "qat", ("data", "model"))
        b = b.with_recipe(r)   # its artifact goes to r's folder with r's deploy settings (it went to the Baseline's)
    else:
        if source is not None:
            _check_source(source, "qat")   # named as qat's argument ("compile: expected a recipe ..." before)
        b = baseline(source if source is not None else r, r, artifacts=artifacts)
    opts = QatOptions(target=target, epochs=epochs)
    _, ptq = qat_settings(r, opts, t)
    with torch_threads(r.train.threads):
        images = load_images(b.data.train, "loading images")
        res = run_qat(r, opts, b.fp32, b.model, images, b.calibration_images(ptq.calib_data, ptq.calib_samples),
                      b.checkpoint, artifacts, b.checkpoint_sha256)
    return res, b


def compare_calibrators(recipe: RecipeLike, target: str = "ort-cpu-int8", calibrators: Sequence[str] = ("entropy", "mse"),
                        sources: Sequence[str] = ("train", "random-normal"), *, calib_samples: int | None = None,
                        quantize: Sequence[str] | None = None, out: PathArg | None = None,
                        artifacts: PathArg | None = None, ray: bool = False, address: str | None = None
                        ) -> CompareResult:
    """The calibrator x calibration-data matrix (a sweep: in this process, or on Ray with ``ray``/``address``):
    a ``CompareResult``, also written as ``compare.json`` / ``compare.md`` under ``out``."""
    from uadc.pipeline.compare import compare_calibrators as run
    flags(ray=ray)
    if calib_samples is not None:
        whole_number(calib_samples, "calib_samples")
    names = {k: name_list(v, k) for k, v in (("calibrators", calibrators), ("sources", sources))}
    for k, v in names.items():
        if v is None:
            raise UadcError(f"{k}: give at least one name")
    return run(load_recipe(recipe), target, names["calibrators"], names["sources"], calib_samples,
               name_list(quantize, "quantize"), as_path(out, "out", optional=True),
               _artifacts_root(artifacts), ray=ray, address=address)


def verify(artifact: PathArg, *, images: PathArg | Sequence[PathArg] | None = None, golden: PathArg | None = None,
           budgets: dict | None = None, recipe: RecipeLike | None = None, normal_only: bool = False,
           threads: int | None = None) -> VerifyResult:
    """Judge an artifact against its golden FP32 outputs (``VerifyResult``; ``.exit_code`` 0/1).
    ``budgets``: ``{key: value}`` overrides of the recipe's ``verify:`` budgets."""
    from uadc.pipeline.verify import verify as run
    flags(normal_only=normal_only)
    with torch_threads(None):
        return run(as_path(artifact, "artifact"), images=_folders(images), golden=as_path(golden, "golden", True),
                   budgets=_budgets(budgets),
                   recipe=load_recipe(recipe) if recipe is not None else None, normal_only=normal_only,
                   threads=threads)


def diff(a: PathArg, b: PathArg, *, images: PathArg | Sequence[PathArg] | None = None, budgets: dict | None = None,
         recipe: RecipeLike | None = None, normal_only: bool = False, threads: int | None = None) -> DiffResult:
    """Judge artifact ``b`` against artifact ``a`` with the verify figures (``DiffResult``)."""
    from uadc.pipeline.verify import diff as run
    flags(normal_only=normal_only)
    with torch_threads(None):
        return run(as_path(a, "a"), as_path(b, "b"), images=_folders(images), budgets=_budgets(budgets),
                   recipe=load_recipe(recipe) if recipe is not None else None, normal_only=normal_only,
                   threads=threads)


def _folders(images: PathArg | Sequence[PathArg] | None) -> list[Path] | None:
    """``images=`` as one folder or several (a bare string is one folder, not its characters)."""
    if images is None or isinstance(images, (str, os.PathLike)):
        return None if images is None else [as_path(images, "images")]
    if not isinstance(images, (list, tuple)):
        raise UadcError(f"images: expected a folder or a list of folders, got {type(images).__name__}")
    return [as_path(i, "images[]") for i in images]


def _budgets(budgets: Any) -> dict | None:
    if budgets is not None and not isinstance(budgets, dict):
        raise UadcError(f"budgets: expected {{key: value}}, e.g. {{'spearman_min': 0.95}}, got {budgets!r:.60}")
    return budgets


def sweep(sweep_file: Any, *, artifacts: PathArg | None = None, out: PathArg | None = None, address: str | None = None,
          num_cpus: int | None = None, sequential: bool = False) -> SweepResult:
    """Run a sweep file's grid (recipes x axes) as Ray tasks (local Ray, or ``address``'s cluster);
    ``sequential``: in this process without Ray. Returns a ``SweepResult`` (the table)."""
    from uadc.pipeline.sweep.run import run_sweep
    if not isinstance(sweep_file, (str, os.PathLike, dict)):
        raise UadcError(f"sweep: expected a sweep file's path or its dict, got {type(sweep_file).__name__}")
    flags(sequential=sequential)
    return run_sweep(sweep_file, artifacts=as_path(artifacts, "artifacts", True), out=as_path(out, "out", True),
                     address=address, num_cpus=num_cpus, sequential=sequential)
