"""``uadc qat`` end to end: PTQ initialisation -> fake-quant fine-tuning -> Q/DQ export, and the
loader ``uadc compile --from-qat`` uses. Design notes: :mod:`uadc.quant.qat`."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from uadc.config.recipe import Recipe
from uadc.config.settings import PtqSettings, resolve_ptq
from uadc.config.targets import QAT_TARGETS, Target, get_target
from uadc.core.constants import QAT_FILE, QAT_JSON
from uadc.core.errors import UadcError
from uadc.core.hashing import sha256_file
from uadc.core.io import atomic_dir, atomic_write_json, check_replaceable, check_writable, read_json
from uadc.core.numbers import whole_number
from uadc.core.scoped import seeded
from uadc.passes.pipeline import PassContext, run_passes
from uadc.passes.qdq import qdq_options, weight_bits
from uadc.quant.calibrate import calibrate_ranges
from uadc.quant.qat.export import EXPORT_TOLERANCE, export_check, learned_params, with_weights
from uadc.quant.qat.finetune import fine_tune, mean_loss, prepare_qat_data
from uadc.quant.qat.net import LossOrder, QatNet, loss_order
from uadc.quant.qat.placement import Placement, clip_bounds, read_placement, scale_to_range, tie_activation_inputs
from uadc.training.checkpoint import model_hash

log = logging.getLogger(__name__)

QAT_METADATA = "uadc.qat"   # metadata_props key of a loaded QAT model: its settings and qat.json
PROBE_IMAGES = 4


@dataclass
class QatOptions:
    target: str
    epochs: int | None = None        # default: recipe qat.epochs
    lr: float | None = None          # default: recipe qat.lr
    batch_size: int | None = None    # default: recipe qat.batch_size
    calibrator: str | None = None    # PTQ initialisation, defaults as for `uadc compile`
    calib_data: str | None = None
    calib_samples: int | None = None
    quantize: list[str] | None = None
    per_channel: bool | None = None  # as CompileOptions.per_channel (None: the target's)
    learn_scales: bool = True
    out: Path | None = None          # default: <artifacts>/<recipe>/qat_<target>


@dataclass
class QatResult:
    model: onnx.ModelProto
    path: Path
    ptq_model: onnx.ModelProto
    net: QatNet
    placement: Placement
    order: LossOrder
    summary: dict
    quantize: list[str]


def qat_dir(recipe: Recipe, target: str, artifacts: Path | None = None) -> Path:
    return recipe.artifact_dir(artifacts) / f"qat_{target}"


def ptq_init(fp32: onnx.ModelProto, images: np.ndarray, target: Target, ptq: PtqSettings
             ) -> tuple[onnx.ModelProto, dict, PassContext]:
    """Calibrate and Q/DQ the FP32 model exactly as ``uadc compile`` does for PTQ."""
    ranges = calibrate_ranges(fp32, images, ptq, target)
    ctx = PassContext(target=target, ranges=ranges, quantize_partitions=list(ptq.quantize),
                      per_channel=ptq.per_channel, reduce_range=ptq.reduce_range)
    ptq_model, _ = run_passes(fp32, ["qdq", "partition_check"], ctx)
    return ptq_model, ranges, ctx


def build_qat_net(fp32: onnx.ModelProto, ptq: onnx.ModelProto, quantize: list[str],
                  learn_scales: bool = True) -> tuple[QatNet, Placement]:
    placement = read_placement(ptq, fp32)
    tie_activation_inputs(placement, fp32, quantize)
    clip_bounds(placement, fp32, ptq)
    return QatNet(fp32, placement, quantize, learn_scales), placement


def check_target(name: str) -> Target:
    target = get_target(name)
    if not target.quantized or target.scheme is None:
        raise UadcError(f"QAT needs an int8 target ({', '.join(QAT_TARGETS)}); {name} is {target.precision}")
    return target


def qat_settings(recipe: Recipe, opts: QatOptions, target: Target) -> tuple[dict, PtqSettings]:
    """Options over recipe defaults; the PTQ initialisation resolved by ``uadc compile``'s own rule."""
    q = recipe.qat
    ptq = resolve_ptq(recipe, target, opts.calibrator, opts.calib_data, opts.calib_samples, opts.quantize,
                      opts.per_channel)
    st = {"epochs": q.epochs if opts.epochs is None else whole_number(opts.epochs, "epochs"), "lr": q.lr if opts.lr is None else opts.lr,
          "batch_size": opts.batch_size or q.batch_size, "seed": recipe.seed,
          "quantize": list(ptq.quantize), "per_channel": ptq.per_channel, "learn_scales": opts.learn_scales,
          "init": {"calibrator": ptq.calibrator, "calib_data": ptq.calib_data, "samples": ptq.calib_samples}}
    return st, ptq


def run_qat(recipe: Recipe, opts: QatOptions, fp32: onnx.ModelProto, model, train_images: torch.Tensor,
            calib_images: np.ndarray, checkpoint: Path | None = None, artifacts: Path | None = None,
            checkpoint_sha256: str | None = None) -> QatResult:
    """PTQ init -> fake-quant fine-tuning -> Q/DQ export; writes ``qat_model.onnx`` + ``qat.json``
    atomically into ``opts.out`` (default ``<artifacts>/<recipe>/qat_<target>``).

    ``fp32``: the simplified FP32 export; ``model``: the trained torch model; ``train_images``:
    the normalised training images; ``calib_images``: PTQ calibration images."""
    target = check_target(opts.target)
    t_start = time.time()
    st, ptq = qat_settings(recipe, opts, target)
    out = opts.out or qat_dir(recipe, target.name, artifacts)
    check_replaceable(Path(out).absolute())   # before the epochs: a read-only or foreign folder stopped it after them
    check_writable(Path(out).absolute().parent)
    ptq_model, calibrated, ctx = ptq_init(fp32, calib_images, target, ptq)
    net, placement = build_qat_net(fp32, ptq_model, st["quantize"], opts.learn_scales)
    with seeded(recipe.seed):  # the caller's random streams come back afterwards
        model = model.eval()
        order = loss_order(net, model, train_images[:PROBE_IMAGES])
        data = prepare_qat_data(net, train_images, recipe.train.cache_teacher)
        losses = {"ptq_loss": mean_loss(net, model, order, data, st["batch_size"])}
        log.info("qat: %d activation quantizers, %d quantized weights; PTQ loss %.4f",
                 len(placement.acts), len(placement.weight_edges), losses["ptq_loss"])
        history = fine_tune(net, model, order, data, st["epochs"], st["lr"], st["batch_size"], recipe.seed)
        losses["final_loss"] = mean_loss(net, model, order, data, st["batch_size"])
    if not losses["final_loss"] <= losses["ptq_loss"]:   # lr 100 collapsed the student (NaN too): exit 0 before
        log.warning("qat: fine-tuning raised the distillation loss (%.4f after PTQ -> %.4f): the QAT model is worse "
                    "than its PTQ start; lower qat.lr or qat.epochs, or compile without --from-qat",
                    losses["ptq_loss"], losses["final_loss"])
    ctx.quant_params = learned_params(net)
    qat_model, _ = run_passes(with_weights(fp32, net.net.weights()), ["qdq", "partition_check"], ctx)
    st["weights"] = _weights(ctx)   # checked against the recipe at compile: 8-bit shipped under a 7-bit recipe
    summary = _summary(recipe, checkpoint, checkpoint_sha256, target, st, losses, history, order, net, calibrated)
    summary["export_check"] = check = export_check(net, qat_model, order, train_images[:PROBE_IMAGES])
    if check["head_inputs_differing_fraction"] > EXPORT_TOLERANCE:   # its losses describe another model
        log.warning("qat: the exported model differs from the fine-tuned one on %.1f%% of the head's inputs "
                    "(qat.json export_check); its losses do not describe what it ships",
                    100 * check["head_inputs_differing_fraction"])
    summary["seconds"] = round(time.time() - t_start, 2)
    _write(out, qat_model, summary)
    # the epoch lines average losses taken before each step (one step: the PTQ loss again): say what it ended at
    log.info("qat: distillation loss %.4f after PTQ -> %.4f after fine-tuning", losses["ptq_loss"],
             losses["final_loss"])
    return QatResult(qat_model, out / QAT_FILE, ptq_model, net, placement, order, summary, st["quantize"])


def _summary(recipe: Recipe, checkpoint: Path | None, sha256: str | None, target: Target, settings: dict, losses: dict,
             history: list[dict], order: LossOrder, net: QatNet, calibrated: dict) -> dict:
    fq = net.net.act_fq
    symmetric = bool(target.scheme.activation_symmetric)
    # The float range each learned scale stands for (information only: the export uses the scales).
    ranges = {**calibrated, **{t: scale_to_range(a, s, symmetric) for a, s in zip(fq.specs, fq.current())
                               for t in a.tensors}}
    return {
        "recipe": recipe.name, "recipe_hash": recipe.hash, "model_hash": model_hash(recipe),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": sha256,   # of the model fine-tuned (the file may have been trained again since)
        "target": target.name, "settings": settings,
        **losses, "history": history, "loss_order": {"teacher": order.teacher, "student": order.student},
        "quantizers": [{"tensors": a.tensors, "zero_point": a.zero_point, "ptq_scale": a.scale, "qat_scale": s}
                       for a, s in zip(fq.specs, fq.current())],
        "ranges": {t: list(r) for t, r in ranges.items()}, "ptq_ranges": {t: list(r) for t, r in calibrated.items()},
    }


def _write(out: Path, qat_model: onnx.ModelProto, summary: dict) -> None:
    # the model itself says what it was fine-tuned for: read from disk into `uadc.compile(qat_model=)`, another
    # target's model (TensorRT's 8-bit float-weight Q/DQ as ort-cpu-int8) shipped unchecked
    _set_record(qat_model, {"target": summary["target"], "settings": summary["settings"]})
    with atomic_dir(out) as tmp:
        onnx.save(qat_model, str(tmp / QAT_FILE))
        summary["model_sha256"] = sha256_file(tmp / QAT_FILE)   # another target's model copied in compiled as this one
        atomic_write_json(tmp / QAT_JSON, summary)


def load_qat_model(recipe: Recipe, target: str, artifacts: Path | None = None,
                   checkpoint: Path | None = None) -> onnx.ModelProto:
    """The Q/DQ model ``uadc qat`` wrote for ``target``; UadcError if it is missing, or stale: made
    for other model settings, or (given the ``checkpoint`` it is compiled with) fine-tuned from
    another checkpoint file, e.g. before the recipe was trained again."""
    check_target(target)   # before "run uadc qat first": uadc qat would refuse it
    d = qat_dir(recipe, target, artifacts)
    path = d / QAT_FILE
    if not path.is_file():
        raise UadcError(f"no QAT model for target {target} at {path}: run `uadc qat --target {target}` first")
    meta = read_json(d / QAT_JSON, "QAT summary")
    again = "run `uadc qat` again"
    # a qat.json of uadc before 0.2's path-free model hash holds the hash of the data and model sections
    hashes = (model_hash(recipe), model_hash(recipe, raw=True), recipe.section_hash(("data", "model")))
    if not isinstance(meta, dict):   # `[1]` read "made for other model settings"
        raise UadcError(f"{d / QAT_JSON}: not the summary `uadc qat` writes (a JSON object): {again}")
    if meta.get("model_hash") not in hashes:
        raise UadcError(f"QAT model {path} was made for other model settings than recipe {recipe.name}'s: {again}")
    if meta.get("target") not in (None, target):   # a TensorRT artifact shipped with CPU-style quantization
        raise UadcError(f"QAT model {path} was fine-tuned for {meta['target']}, not {target}: run "
                        f"`uadc qat --target {target}`")
    differ = _weights_differ(_settings(meta, f"QAT summary {d / QAT_JSON}").get("weights"), get_target(target),
                             recipe.compile.per_channel, recipe.compile.reduce_range)
    if differ:
        raise UadcError(f"QAT model {path} {differ.replace('the recipe', f'recipe {recipe.name}')}: {again}")
    sha = meta.get("checkpoint_sha256")
    if checkpoint is not None and sha is not None and Path(checkpoint).is_file() and sha != sha256_file(checkpoint):
        raise UadcError(f"QAT model {path} was fine-tuned from another checkpoint than {checkpoint} (trained again "
                        f"since?): {again}")
    if path.stat().st_size == 0 or meta.get("model_sha256") not in (None, sha256_file(path)):   # None: written before it was recorded
        raise UadcError(f"QAT model {path} is not the one its {QAT_JSON} describes (" +
                        ("empty" if path.stat().st_size == 0 else "its sha256 differs") + f"): {again}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise UadcError(f"cannot read QAT model {path}: {exc}") from None
    return with_qat_record(model, meta.get("settings"), path, meta.get("target"))


def _weights_differ(made: dict | None, target: Target, per_channel: bool | None, reduce_range: bool | None) -> str | None:
    """How weights made at QAT differ from what the recipe asks for (a per-channel choice only where it asks)."""
    wanted = _weights(PassContext(target=target, per_channel=per_channel, reduce_range=reduce_range))
    if made is not None and made != wanted and (made["bits"] != wanted["bits"] or per_channel is not None):
        return f"has {_said(made)} weights, the recipe asks for {_said(wanted)} (compile.reduce_range / per_channel)"
    return None


def qat_record(model: onnx.ModelProto) -> dict | None:
    """What a QAT model says it was fine-tuned with and for (report.json's ``qat``), each key present; None
    where it says nothing. A record edited by hand is one UadcError line (KeyError, TypeError before)."""
    text = {p.key: p.value for p in model.metadata_props}.get(QAT_METADATA)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict) or record.get("target") == "" or \
            not all(isinstance(record.get(k), (str, type(None))) for k in ("target", "summary", "model_sha256")):
        raise UadcError(f"qat_model: its {QAT_METADATA} record is not what `uadc qat` writes; run `uadc qat` again")
    if record.get("settings") is not None:
        _settings(record, f"qat_model: its {QAT_METADATA} record")
    return {k: record.get(k) for k in ("settings", "summary", "model_sha256", "target")}


def check_qat_model(model: onnx.ModelProto, target: Target, per_channel: bool | None, reduce_range: bool | None) -> None:
    """A QAT model given to compile was fine-tuned for ``target``, with the weights the recipe asks for."""
    record = qat_record(model)
    if record is None:   # `uadc compile --from-qat` reads a folder of an older uadc: its qat.json says
        raise UadcError(f"qat_model: it says nothing of the target it was fine-tuned for (not written by this uadc's "
                        f"`uadc qat`); run `uadc qat --target {target.name}` again, or compile its folder with "
                        f"--from-qat")
    made_for = record["target"]
    if made_for not in (None, target.name):   # None: a qat.json written before targets were recorded
        raise UadcError(f"qat_model: fine-tuned for {made_for}, not {target.name}: run `uadc qat --target {target.name}`")
    differ = _weights_differ((record["settings"] or {}).get("weights"), target, per_channel, reduce_range)
    if differ:
        raise UadcError(f"qat_model: it {differ}: run `uadc qat --target {target.name}` again")


def _weights(ctx: PassContext) -> dict:
    per_channel, _, _ = qdq_options(ctx)
    return {"bits": weight_bits(ctx), "per_channel": per_channel}


def _settings(meta: dict, where: str) -> dict:
    """qat.json's settings as `uadc qat` writes them (an edited file gave TypeError / KeyError tracebacks)."""
    st = meta.get("settings", {})   # null: not what uadc qat writes (compiled, its weights unchecked)
    w = st.get("weights") if isinstance(st, dict) else None
    if not isinstance(st, dict) or w is not None and not (isinstance(w, dict) and type(w.get("bits")) is int and
                                                          isinstance(w.get("per_channel"), bool)):
        raise UadcError(f"{where}: its settings are not what `uadc qat` writes; run `uadc qat` again")
    return st


def _said(weights: dict) -> str:
    return f"{weights['bits']}-bit {'per-channel' if weights['per_channel'] else 'per-tensor'}"


def with_qat_record(model: onnx.ModelProto, settings: dict | None, qat_file: Path,
                    target: str | None = None) -> onnx.ModelProto:
    """``model`` (read from ``qat_file``) with what it was fine-tuned with (and for) in its metadata, for the
    compile's report and its target check; the file's sha256 ties the report to it (a later `uadc qat` replaces it)."""
    return _set_record(model, {"settings": settings, "summary": str(qat_file.parent / QAT_JSON),
                               "model_sha256": sha256_file(qat_file), "target": target})


def _set_record(model: onnx.ModelProto, record: dict) -> onnx.ModelProto:
    kept = [p for p in model.metadata_props if p.key != QAT_METADATA]   # one record: the file's own is replaced
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = QAT_METADATA, json.dumps(record)
    return model


__all__ = ["QatOptions", "QatResult", "run_qat", "load_qat_model", "with_qat_record", "check_qat_model", "qat_record"]
