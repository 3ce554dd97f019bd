"""Compile one target from a ``Baseline``: target passes (calibrate, Q/DQ, ...) -> Polygraphy
verification -> latency -> AD metrics -> artifact folder written atomically -> ``CompileResult``."""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

from uadc import __version__
from uadc.backends import openvino as ov
from uadc.backends.ort import latency_ms, make_session, paired_latency_ms
from uadc.backends.parallel import ParallelSession, cap_threads
from uadc.backends.ort_profile import TIMING_CACHE_DIR
from uadc.config.recipe import Recipe
from uadc.config.validation import short
from uadc.config.settings import PtqSettings, resolve_ptq
from uadc.evaluation.run import evaluate
from uadc.config.targets import Target, get_target
from uadc.core.constants import INPUT_NAME, MODEL_FILE, PARTITIONS, QDQ_OPS, REPORT_FILE, REPORT_MD
from uadc.core.errors import UadcError
from uadc.core.io import atomic_dir, atomic_write_json, atomic_write_text, check_replaceable, check_writable
from uadc.core.manifest import check_outside_artifacts, write_manifest
from uadc.core.progress import progress
from uadc.data.sources import check_outside_data
from uadc.models import model_config
from uadc.export.onnx_export import partition_bytes, split_partitions
from uadc.export.partitions import partition_counts, partition_of
from uadc.passes.pipeline import PassContext, check_dump_dir, check_finite, run_passes
from uadc.passes.qdq import qdq_options, weight_bits
from uadc.passes.simulate import simulate_fp16, type_fp16
from uadc.pipeline.baseline import Baseline
from uadc.pipeline.deploy import bank_runner, deploy_evaluation, finalize_model, target_predictor
from uadc.pipeline.precision import AutoPrecision, auto_candidates, search_precision
from uadc.pipeline.precision_trt import fp32_layers
from uadc.quant.calibrate import calibrate_ranges
from uadc.quant.qat.run import check_qat_model, qat_record
from uadc.report.markdown import render_markdown
from uadc.report.results import CompileResult, Latency, Metrics
from uadc.verify.polygraphy_compare import compare_stats, ort_runner

log = logging.getLogger(__name__)


@dataclass
class CompileOptions:
    target: str
    calibrator: str | None = None
    calib_data: str | None = None
    calib_samples: int | None = None
    calibration: Iterable[np.ndarray] | None = None   # bring-your-own calibration images
    quantize: list[str] | None = None
    per_channel: bool | None = None
    out: Path | None = None
    force: bool = False                 # replace an existing uadc artifact at an explicit ``out``
    dump_passes: Path | None = None
    split: bool = False
    build_engine: bool = False
    evaluate: bool = True
    threads: int | None = None          # ORT/torch threads for latency and metrics (default: baseline's)
    latency_runs: int = 30
    qat_model: onnx.ModelProto | None = None  # --from-qat: Q/DQ already in place, no calibration
    artifacts: Path | None = None
    passes: list[str] | None = field(default=None)  # override the recipe's/target's pass list
    postprocess: bool | None = None     # in-graph pred_score/pred_label/pred_mask (default: recipe deploy.postprocess)
    precision: str | None = None        # "target" | "auto" (default: the recipe's compile.precision)


def default_out(recipe: Recipe, target: Target, qat: bool, artifacts: Path | None) -> Path:
    return recipe.artifact_dir(artifacts) / f"{target.name}{'-qat' if qat else ''}"


def _timing_cache(baseline: Baseline, opts: CompileOptions, out: Path) -> Path:
    """Precision auto's profiles: the recipe's own cache where one exists (``--out`` elsewhere profiled
    again and shipped another assignment of the same checkpoint), else beside the artifact folder."""
    own = baseline.recipe.artifact_dir(opts.artifacts) / TIMING_CACHE_DIR
    return own.absolute() if own.is_dir() else out.absolute().parent / TIMING_CACHE_DIR


def _check_apart(out: Path, dump: Path | None, recipe: Recipe) -> None:
    """The pass dumps are written while the artifact is built in a temp folder that replaces
    ``out``: one inside the other would be replaced, or become part of the artifact."""
    if (out / "qat.json").is_file() and not (out / "artifact.json").is_file():   # replaced with --force before
        raise UadcError(f"--out {out}: the folder of a QAT model (`uadc qat` wrote it); choose another")
    if dump is None:
        return
    a, b = out.absolute().resolve(), Path(dump).absolute().resolve()
    if a == b or a in b.parents or b in a.parents:
        raise UadcError(f"--dump-passes {dump} and the artifact folder {out} overlap: give the dumps their own folder")
    check_dump_dir(dump, recipe)


def compile_target(baseline: Baseline, opts: CompileOptions) -> CompileResult:
    target = get_target(opts.target)
    ptq = resolve_ptq(baseline.recipe, target, opts.calibrator, opts.calib_data, opts.calib_samples,
                      opts.quantize, opts.per_channel)
    _check_options(target, ptq, opts)
    _pass_names(baseline, target, opts, warn=True)   # a pass list that cannot make the target: before the export
    _check_qat_size(opts.qat_model, baseline.size)
    auto = auto_candidates(baseline, target, opts)  # None unless precision auto; unsupported targets fail here
    if target.runtime == "openvino":
        ov.require()   # the options first, then the runtime: before the export, calibration and search
        ov.require_precision(target.inference_hint, target.name)
    out = Path(opts.out) if opts.out else default_out(baseline.recipe, target, opts.qat_model is not None, opts.artifacts)
    check_outside_artifacts(out, below=True)   # a later compile of that artifact deleted it, without --force
    check_outside_data(out, baseline.recipe)
    check_replaceable(out.absolute(), replace=opts.force or opts.out is None)  # before any work
    check_writable(out.absolute().parent)
    _check_apart(out, opts.dump_passes, baseline.recipe)
    if opts.calibration is not None:   # checked before the export (8-14 s), and read once: a generator fed two stages
        opts = replace(opts, calibration=baseline.calibration_images(ptq.calib_data, ptq.calib_samples, opts.calibration))
    cache = _timing_cache(baseline, opts, out)
    if auto is not None and baseline.recipe.compile.auto.timing_cache and cache.exists() and not cache.is_dir():
        raise UadcError(f"{cache}: not a folder; precision auto keeps its ONNX Runtime profiles there, beside --out "
                        f"(remove the file, or set compile.auto.timing_cache: false)")   # "not a folder: ..." before
    threads = cap_threads(opts.threads or baseline.threads)   # every figure at the thread count it states
    if opts.evaluate and not baseline.test_arrays:
        log.warning("no category has a test folder: AUROC and test-set decisions are not measured")
        opts = replace(opts, evaluate=False)
    stages = progress(total=5, desc=f"{target.name}: export (1/5)", bar_format="{desc}")
    fp32, records = baseline.fp32_simplified
    _stage(stages, target, "precision search" if auto is not None else "passes")
    if auto is not None:
        cache = cache if baseline.recipe.compile.auto.timing_cache else None
        auto = search_precision(baseline, target, fp32, auto, _pass_names(baseline, target, opts), threads,
                                opts.calibration, cache)
        ptq = auto.ptq
    compiled, pass_records, calib = _run_target_passes(baseline, target, fp32, ptq, opts, auto)
    if auto is not None:  # the search is compile time too
        pass_records.insert(0, {"name": "precision_auto", "seconds": auto.record["seconds"],
                                "nodes_before": len(fp32.graph.node), "nodes_after": len(fp32.graph.node)})
    check_finite(compiled, baseline.sample_feeds(1)[0], f"compile {target.name}")
    t0 = time.time()
    _stage(stages, target, "verify")
    verification = _verify(baseline, compiled, target, threads)
    verification["seconds"] = round(time.time() - t0, 3)
    passes = records + pass_records
    # export + every pass (calibration included) + Polygraphy checks; AD metrics and latency excluded
    compile_seconds = round(sum(p["seconds"] for p in passes) + time.time() - t0, 2)
    shipped = _shipped(target, auto)
    result = CompileResult(
        target=target.name, precision=shipped.precision, runtime=target.runtime, device=target.device,
        calibrator=ptq.calibrator if calib and calib["calibrator"] != "qat" else ("qat" if calib else None),
        calib_data=calib.get("calib_data", ptq.calib_data) if calib and calib["calibrator"] != "qat" else None,
        quantized_partitions=(_qat_partitions(opts.qat_model) if opts.qat_model is not None else list(ptq.quantize))
        if shipped.quantized else [],
        recipe=baseline.recipe.name, recipe_hash=baseline.recipe.hash,
        checkpoint=os.path.realpath(baseline.checkpoint) if baseline.checkpoint else None,   # not the cwd's
        nodes=partition_counts(compiled), qdq_nodes=_qdq_counts(compiled), bytes=partition_bytes(compiled),
        model_bytes=compiled.ByteSize(), passes=[{**p, "seconds": round(p["seconds"], 4)} for p in passes],
        verification=verification, compile_seconds=compile_seconds,
        latency=_latency(baseline, compiled, shipped, threads, opts.latency_runs),   # labelled as shipped
        environment=environment(threads))
    result.extra["model"] = _model_record(baseline)
    if auto is not None:
        result.extra["precision_search"] = auto.record
    if opts.qat_model is not None:   # --from-qat: what the model was fine-tuned with (recorded nowhere before)
        result.extra["qat"] = qat_record(opts.qat_model)
    fp16 = auto.fp16_nodes - set(auto.nodes) if auto is not None and auto.fp16_nodes else frozenset()
    judged = simulate_fp16(compiled, fp16) if fp16 else compiled  # TensorRT: as its FP16 layers round
    if fp16:  # ship those layers FP16-typed (strongly typed TensorRT runs exactly them), checked against `judged`
        compiled, result.verification["fp16_typed_vs_simulated"] = _typed(baseline, compiled, judged, fp16, threads)
        result.nodes, result.bytes = partition_counts(compiled), partition_bytes(compiled)
        result.model_bytes = compiled.ByteSize()
    _stage(stages, target, "metrics and thresholds")
    if opts.evaluate:
        result.metrics = _metrics(baseline, judged, shipped, bool(fp16))
    dep = deploy_evaluation(baseline, judged, threads, decisions=opts.evaluate,
                            predictor=target_predictor(target, threads))
    result.deploy = dep.section
    postprocess = baseline.recipe.deploy.postprocess if opts.postprocess is None else opts.postprocess
    compiled, manifest = finalize_model(baseline, compiled, shipped, dep.thresholds, postprocess)
    # the model as shipped: in-graph post-processing adds head nodes and outputs
    result.nodes, result.bytes, result.model_bytes = partition_counts(compiled), partition_bytes(compiled), \
        compiled.ByteSize()
    layers = fp32_layers(compiled, auto.nodes, auto.fp16_nodes) if auto is not None and auto.fp16_nodes is not None \
        else None
    _stage(stages, target, "write and gate")
    # re-checked under the lock: a compile that finished into the same new --out meanwhile is not replaced
    with atomic_dir(out, replace=opts.force or opts.out is None) as tmp:
        _write_artifacts(tmp, baseline, compiled, result, calib, target, opts, layers)
        write_manifest(tmp, manifest)   # last: hashes every file above
        if target.runtime != "tensorrt":   # the artifact judged as `uadc verify` will judge it (its thresholds too)
            result.verification["gate"] = _own_gate(tmp, threads)
            _write_reports(tmp, result)
            write_manifest(tmp, manifest)
    stages.close()
    result.path = out
    gate = result.verification.get("gate")
    if gate and not gate["passed"]:
        log.warning("%s fails its own regression gate: %d figure(s) out of budget (%s%s); `uadc verify %s` "
                    "lists them", out, len(gate["failures"]), gate["failures"][0],
                    ", ..." if len(gate["failures"]) > 1 else "", out)
    log.debug("artifact written: %s", out)   # the CLI prints its own result line
    return result


def _stage(bar, target: Target, name: str) -> None:
    """The next compile stage on the bar (a terminal only): minutes could pass without a line."""
    bar.update(1)
    bar.set_description_str(f"{target.name}: {name} ({bar.n + 1}/{bar.total})")


def _own_gate(folder: Path, threads: int) -> dict:
    """``uadc verify`` of the artifact against its golden set, with the budgets stored there."""
    from uadc.pipeline.verify import verify
    res = verify(folder, threads=threads)
    return {"passed": res.passed, "failures": list(res.failures), "seconds": round(res.seconds, 3)}


def check_compile_settings(recipe: Recipe) -> None:
    """The recipe's compile settings that only `uadc compile` reads, before a training that would end
    in their error: unknown compile.passes are refused (every compile runs them); an unknown
    calibrator or auto.gpu is a warning (used by some targets only, --calibrator overrides it, a
    plug-in may be installed where compiling happens)."""
    from uadc.backends.tensorrt.cost import GPUS
    from uadc.calibrators import available_calibrators
    from uadc.passes.pipeline import PASSES
    c = recipe.compile
    unknown = [p for p in c.passes or [] if p not in PASSES]
    if unknown:
        raise UadcError(f"compile.passes: unknown pass(es) {', '.join(map(short, unknown))}; available: {', '.join(PASSES)}")
    if c.passes is not None:   # [qdq, qdq]: refused by every compile, after the training
        _check_twice(list(c.passes))
        try:   # [] for an INT8 compile.target: another --target may take it
            _check_pass_list(list(c.passes), get_target(c.target))
        except UadcError as exc:
            log.warning("%s: `uadc compile` without --target (compile.target) will refuse it", exc)
    try:   # calib_data mixed of 1 sample: --calib-samples may give more
        resolve_ptq(recipe, get_target(c.target))
    except UadcError as exc:
        log.warning("compile.%s; `uadc compile` to an INT8 target refuses it unless --calib-samples gives more", exc)
    if c.calibrator is not None and c.calibrator not in available_calibrators():
        log.warning("compile.calibrator: unknown calibrator %s here (known: %s); `uadc compile` to an INT8 target will "
                    "refuse it unless --calibrator overrides it", short(c.calibrator), ", ".join(available_calibrators()))
    if c.auto.gpu is not None and c.auto.gpu not in GPUS:
        log.warning("compile.auto.gpu: %s is not one of %s; `uadc compile --precision auto` on TensorRT will refuse "
                    "it", short(c.auto.gpu), ", ".join(GPUS))


def _check_options(target: Target, ptq: PtqSettings, opts: CompileOptions) -> None:
    from uadc.calibrators import available_calibrators
    if target.quantized and opts.qat_model is None and ptq.calibrator not in available_calibrators():
        raise UadcError(f"unknown calibrator {short(ptq.calibrator)}; expected one of {', '.join(available_calibrators())}")
    # named as the API and the command line name them: `--per-tensor` was said "per_channel"
    given = {"--calibrator / calibrator": opts.calibrator, "--calib-data / calibration": opts.calib_data,
             "--calib-samples / calib_samples": opts.calib_samples, "calibration (images)": opts.calibration,
             "--quantize / quantize": opts.quantize, "--per-channel, --per-tensor / per_channel": opts.per_channel}
    if not target.quantized and any(v is not None for v in given.values()):
        named = "; ".join(k for k, v in given.items() if v is not None)
        raise UadcError(f"target {target.name} is {target.precision}, so quantization options do not apply: {named}")
    if opts.build_engine and target.runtime != "tensorrt":
        raise UadcError(f"--build-engine builds a TensorRT engine; target {target.name} runs on {target.runtime}")
    if opts.qat_model is not None:
        _check_qat_options(target, opts, given, ptq)
    if not 1 <= opts.latency_runs <= 10_000:
        raise UadcError(f"latency runs must be within 1..10000, got {opts.latency_runs}")


def _check_qat_size(model: onnx.ModelProto | None, size: int) -> None:   # ONNX Runtime's raw InvalidArgument before
    dims = model.graph.input[0].type.tensor_type.shape.dim if model is not None and model.graph.input else []
    if len(dims) == 4 and dims[-1].dim_value and dims[-1].dim_value != size:
        raise UadcError(f"qat_model: it takes {dims[-1].dim_value} px inputs, the model being compiled {size} px")


def _check_qat_options(target: Target, opts: CompileOptions, given: dict, ptq: PtqSettings) -> None:
    """A QAT model carries its own scales and quantized partitions: calibration options would be
    ignored, and another ``quantize`` would only be written into the report (the recipe's: warned)."""
    if not isinstance(opts.qat_model, onnx.ModelProto):
        raise UadcError(f"qat_model: expected the onnx.ModelProto uadc.qat wrote, got {type(opts.qat_model).__name__}")
    if not target.quantized:
        raise UadcError(f"--from-qat needs an int8 target; {target.name} is {target.precision}")
    if not any(n.op_type in QDQ_OPS for n in opts.qat_model.graph.node):   # reported as an int8 QAT artifact before
        raise UadcError("qat_model: it has no Q/DQ nodes (not a QAT model); give the model uadc.qat wrote")
    ignored = [k for k, v in given.items() if v is not None and not k.startswith("--quantize")]
    if ignored:
        raise UadcError(f"--from-qat: the QAT model carries its own scales, so these do not apply: {'; '.join(ignored)}")
    check_qat_model(opts.qat_model, target, ptq.per_channel, ptq.reduce_range)
    if opts.quantize is not None and sorted(opts.quantize) != _qat_partitions(opts.qat_model):
        raise UadcError(f"--from-qat: the QAT model quantizes {', '.join(_qat_partitions(opts.qat_model)) or 'nothing'}, "
                        f"not {', '.join(opts.quantize)}")
    if opts.quantize is None and sorted(ptq.quantize) != _qat_partitions(opts.qat_model):   # changed since, unsaid
        log.warning("--from-qat: the QAT model quantizes %s (as `uadc qat` was run), not the recipe's compile.quantize "
                    "%s; run `uadc qat` again to follow the recipe", ", ".join(_qat_partitions(opts.qat_model)),
                    ", ".join(ptq.quantize))


def _qat_partitions(model: onnx.ModelProto) -> list[str]:
    return sorted(p for p, n in _qdq_counts(model).items() if p in PARTITIONS and n)


# the passes that make a target what it says it is (its precision, the opset its runtime reads)
PRECISION_PASSES = ("qdq", "fp16", "opset")
SHARED_PASSES = ("shape_inference", "simplify")   # run on the FP32 export every target shares


def _pass_names(baseline: Baseline, target: Target, opts: CompileOptions, warn: bool = False) -> list[str]:
    given = opts.passes if opts.passes is not None else baseline.recipe.compile.passes
    names = list(target.passes if given is None else given)
    _check_pass_list(names, target)
    shared = [n for n in names if n in SHARED_PASSES]
    if warn and given is not None and names[:len(shared)] != list(SHARED_PASSES):   # dropped or moved, silently
        log.warning("compile.passes: %s run once on the shared FP32 export, before the other passes, whatever the "
                    "list says (it has %s)", " and ".join(SHARED_PASSES), ", ".join(shared) or "neither")
    return [n for n in names if n not in SHARED_PASSES]


def _check_pass_list(names: list[str], target: Target) -> None:
    need = [p for p in PRECISION_PASSES if p in target.passes and p not in names]
    extra = [p for p in PRECISION_PASSES if p in names and p not in target.passes]
    if need or extra:   # without qdq an INT8 target shipped the FP32 model as int8, exit 0; [] was ignored
        raise UadcError(f"compile.passes {names}: target {target.name} "
                        + (f"needs {', '.join(need)}" if need else f"does not take {', '.join(extra)}")
                        + f" (its own list: {', '.join(target.passes)})")
    _check_twice(names)


def _check_twice(names: list[str]) -> None:
    twice = next((p for p in PRECISION_PASSES if names.count(p) > 1), None)   # qdq twice: an endless Q/DQ walk
    if twice:
        raise UadcError(f"compile.passes {names}: {twice} is listed {names.count(twice)} times; it runs once")


def _model_record(baseline: Baseline) -> dict:
    """Which detector the artifact is (the reports named the recipe alone): the model settings, and
    whether its checkpoint trained with DCAM (a training option; null: no checkpoint to say)."""
    trained = (baseline.blob or {}).get("recipe") or {}
    dcam = (trained.get("train") or {}).get("dcam") if trained else None
    model = model_config(baseline.recipe.cfg["model"])   # the taps used: a recipe without taps showed none
    # the recipe the checkpoint trained with (report.json's recipe_hash is the compiling recipe's), as eval.json
    return {**model, "dcam": bool(dcam.get("enabled")) if isinstance(dcam, dict) else None,
            "trained_recipe_hash": (baseline.blob or {}).get("recipe_hash")}


def _shipped(target: Target, auto: AutoPrecision | None) -> Target:
    """An INT8 target whose precision search kept every group float ships a float model (the report
    and artifact.json said int8 over a graph without one Q/DQ node): its float precision, for
    TensorRT fp16 where the float stage runs layers FP16. The engine build itself follows ``target``."""
    if auto is None or auto.nodes or not target.quantized:
        return target
    if target.runtime == "tensorrt":
        return replace(target, precision="fp16" if auto.fp16_nodes else "fp32")
    return replace(target, precision=target.float_precision)


def _run_target_passes(baseline: Baseline, target: Target, fp32: onnx.ModelProto, ptq: PtqSettings,
                       opts: CompileOptions, auto: AutoPrecision | None = None):
    names = _pass_names(baseline, target, opts)
    if auto is not None and not auto.nodes:  # precision auto kept every group FP32
        names = [n for n in names if n != "qdq"]
    ctx = PassContext(target=target, quantize_partitions=list(ptq.quantize), sample_feeds=baseline.sample_feeds(1)[0],
                      dump_dir=opts.dump_passes, per_channel=ptq.per_channel, reduce_range=ptq.reduce_range,
                      quantize_nodes=auto.nodes if auto is not None else None, bank_images=baseline.bank_images,
                      bank_runner=bank_runner(target, opts.threads or baseline.threads))
    calib = None
    model = fp32
    if opts.qat_model is not None:
        model = opts.qat_model
        names = [n for n in names if n != "qdq"]
        calib = {"calibrator": "qat", "calib_data": "qat", "ranges": {}}
    elif "qdq" in names:
        t0 = time.time()
        images = baseline.calibration_images(ptq.calib_data, ptq.calib_samples, opts.calibration)
        ctx.ranges = auto.ranges if auto is not None else calibrate_ranges(fp32, images, ptq, target)
        calib = {"calibrator": ptq.calibrator,
                 "calib_data": "user" if opts.calibration is not None else ptq.calib_data,
                 "samples": int(len(images)), "distinct_samples": len({im.tobytes() for im in images}),
                 "seed": baseline.recipe.seed, "weight_bits": weight_bits(ctx),
                 "per_channel": qdq_options(ctx)[0],   # the weight scales as written (the target's or asked)
                 "ranges": ctx.ranges,
                 "seconds": round(time.time() - t0, 3)}
    model, records = run_passes(model, names, ctx)
    if calib is not None and "seconds" in calib:
        records.insert(0, {"name": "calibrate", "seconds": calib["seconds"],
                           "nodes_before": len(fp32.graph.node), "nodes_after": len(fp32.graph.node)})
    return model, records, calib


def _verify(baseline: Baseline, compiled: onnx.ModelProto, target: Target, threads: int) -> dict:
    tvo = baseline.torch_vs_ort
    cand = ov.ov_runner(compiled, target.name, threads, target.inference_hint) if target.runtime == "openvino" \
        else ort_runner(compiled, target.name, threads)
    fvc = compare_stats([ort_runner(baseline.fp32, "ort-fp32", threads), cand],
                        baseline.sample_feeds())  # statistics only: INT8 is expected to differ
    return {"torch_vs_ort_fp32": {k: tvo[k] for k in ("passed", "max_abs", "mean_abs", "atol", "outputs")},
            "fp32_vs_compiled": {k: fvc[k] for k in ("max_abs", "mean_abs", "outputs")}}


def _typed(baseline: Baseline, compiled: onnx.ModelProto, judged: onnx.ModelProto, fp16: frozenset[str],
           threads: int) -> tuple[onnx.ModelProto, dict]:
    """The model with the ``fp16`` nodes FP16-typed, and its outputs against the simulation's
    (ONNX Runtime may skip a rounding the simulation makes: FP16-sized differences are expected)."""
    typed = type_fp16(compiled, fp16)
    stats = compare_stats([ort_runner(judged, "fp16-simulated", threads), ort_runner(typed, "fp16-typed", threads)],
                          baseline.sample_feeds())
    return typed, {"nodes_fp16": len(fp16), **{k: stats[k] for k in ("max_abs", "mean_abs", "outputs")}}


def _runtime_label(target: Target, used: str | None = None) -> tuple[str, bool]:
    """The runtime that produced the figures; OpenVINO's float precision when it is not f32, and
    ``used`` (what OpenVINO reports it ran) when that is not what the target asked for."""
    if target.runtime == "onnxruntime":
        return "onnxruntime CPU", False
    if target.runtime == "openvino":
        hint = target.inference_hint
        if used and used != hint:
            return f"{ov.RUNTIME_LABEL} ({used}: this CPU does not run {hint})", False
        return ov.RUNTIME_LABEL + ("" if hint == "f32" else f" ({hint})"), False
    return f"onnxruntime CPU emulating {target.runtime} ({target.device}, {target.precision})", True


def _latency(baseline: Baseline, compiled: onnx.ModelProto, target: Target, threads: int, runs: int) -> Latency:
    lat = baseline.fp32_latency(runs, threads)
    x = baseline.sample_feeds(1, 1)[0][INPUT_NAME]
    used = None
    if target.runtime == "openvino":
        ov_model = ov.compile_model(compiled, threads, target.inference_hint)
        used, run = ov.inference_precision(ov_model), ov.infer_fn(ov_model)
        fn = lambda: run(x)  # noqa: E731
    else:
        sess = make_session(compiled, threads)
        fn = lambda: sess.run(None, {INPUT_NAME: x})  # noqa: E731
    runtime, emulated = _runtime_label(target, used)
    fp32 = make_session(baseline.fp32, threads)
    # ORT FP32 and the artifact timed in turns: their ratio under one machine load
    ort_fp32, comp = paired_latency_ms([lambda: fp32.run(None, {INPUT_NAME: x}), fn], runs)
    deployed = None
    if target.runtime == "onnxruntime" and threads > 1:  # TensorRT targets deploy on the device's runtime
        with ParallelSession(compiled, threads, "auto") as par:
            deployed = {**latency_ms(lambda: par.run(None, {INPUT_NAME: x}), runs), "schedule": par.plan(1)}
    return Latency(lat["torch_fp32"], ort_fp32, comp,
                   batch=1, threads=threads, runtime=runtime, emulated=emulated, deployed=deployed)


def _metrics(baseline: Baseline, compiled: onnx.ModelProto, target: Target, fp16: bool = False) -> Metrics:
    fp32 = baseline.fp32_metrics.to_dict()
    on_target = target_predictor(target, baseline.threads)
    comp = (evaluate(on_target(compiled), baseline.test_arrays, baseline.recipe.eval.batch_size, target.name)
            if on_target else baseline.metrics(compiled, target.name)).to_dict()
    runtime, emulated = _runtime_label(target)
    note = None
    if emulated:
        note = (f"TensorRT is not run here: 'compiled' is the {target.precision} ONNX evaluated with ONNX Runtime "
                "on the CPU" + (", its FP16 layers simulated (weights and activations rounded). " if fp16 else
                ". ") + "On the device TensorRT fuses layers and may pick other tactics, so figures can differ "
                "slightly.")
    skipped = {c: why for c, why in baseline.data.not_evaluated.items() if c in baseline.categories}
    return Metrics(fp32, comp, _drops(fp32, comp), runtime, note, target.quantized,   # float TensorRT: emulated too
                   skipped)


def _write_artifacts(tmp: Path, baseline: Baseline, compiled, result: CompileResult, calib, target: Target,
                     opts: CompileOptions, fp32_layers: list[str] | None = None) -> None:
    onnx.save(compiled, str(tmp / MODEL_FILE))
    from uadc.pipeline.verify import write_golden_files
    write_golden_files(tmp, baseline, compiled)  # FP32 reference outputs for `uadc verify` / polygraphy run
    if calib is not None:
        # its time is in report.json's passes: two compiles of one model write the same calibration.json
        atomic_write_json(tmp / "calibration.json", {k: v for k, v in calib.items() if k != "seconds"})
    if opts.split:
        (tmp / "partitions").mkdir()
        split_partitions(compiled, tmp / "partitions")
    if target.runtime == "tensorrt":
        from uadc.evaluation.run import evaluate
        from uadc.pipeline.trt_bundle import write_trt_files
        run_metrics = (lambda predict: evaluate(predict, baseline.test_arrays, 8, "tensorrt")) if opts.evaluate \
            else None
        result.engine = write_trt_files(tmp, compiled, baseline.fp32, target, calib, baseline.size,
                                        opts.build_engine, run_metrics, baseline.sample_feeds(), fp32_layers)
    _write_reports(tmp, result)


def _write_reports(folder: Path, result: CompileResult) -> None:
    atomic_write_json(folder / REPORT_FILE, result.to_dict())
    atomic_write_text(folder / REPORT_MD, render_markdown(result.to_dict()))


def _drops(fp32: dict, comp: dict) -> dict:
    """fp32 - compiled (raw fractions; positive = the artifact lost accuracy)."""
    return {"mean": {k: round(fp32["mean"][k] - comp["mean"][k], 6) for k in fp32["mean"]},
            "categories": {c: {k: round(v[k] - comp["categories"][c][k], 6) for k in v}
                           for c, v in fp32["categories"].items()}}


def _qdq_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = dict.fromkeys(PARTITIONS, 0)   # every partition, as `nodes` has: a reader's ['teacher'] was a KeyError
    for n in model.graph.node:
        if n.op_type in QDQ_OPS:
            p = partition_of(n) or "?"
            counts[p] = counts.get(p, 0) + 1
    return counts


def environment(threads: int) -> dict:
    import onnxruntime
    import polygraphy
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": str(torch.__version__), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "polygraphy": polygraphy.__version__, "openvino": ov.version(), "uadc": __version__,
            "platform": platform.platform()}
