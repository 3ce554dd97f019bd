"""``uadc compile``: checkpoint -> export -> passes (simplify, calibrate, Q/DQ, ...) -> artifact
folder with Polygraphy verification, AD metrics (FP32 vs compiled) and latency.

The expensive target-independent stages (export, FP32 metrics, FP32 latency, test arrays) are
cached on a ``Compiler`` so ``uadc calibrators compare`` pays for them once."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
import torch

from uadc import __version__
from uadc.backends.onnxruntime import latency_ms, make_session, ort_predictor
from uadc.errors import UadcError
from uadc.evaluate import evaluate, load_test_arrays, write_json_atomic
from uadc.export import export_model, get_metadata, partition_bytes, split_partitions
from uadc.partitions import partition_counts
from uadc.recipe import Recipe
from uadc.targets import Target, get_target
from uadc.train import checkpoint_path, input_normalization, load_checkpoint, prepare_data, train_recipe
from uadc.verify import TorchCpuRunner, compare, ort_runner

REPORT_SCHEMA = 1
EXPORT_ATOL = 1e-4  # torch vs ORT FP32: same math, only float reassociation may differ


@dataclass
class CompileOptions:
    target: str
    calibrator: str | None = None
    calib_data: str | None = None
    calib_samples: int | None = None
    quantize: list[str] | None = None
    per_channel: bool | None = None
    out: Path | None = None
    dump_passes: Path | None = None
    split: bool = False
    build_engine: bool = False
    evaluate: bool = True
    threads: int | None = None
    latency_runs: int = 30
    qat_model: onnx.ModelProto | None = None  # --from-qat: Q/DQ already in place, no calibration
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PtqSettings:
    calibrator: str
    calib_data: str
    calib_samples: int
    quantize: list[str]
    per_channel: bool | None  # None: the target's scheme decides


def ptq_settings(recipe: Recipe, target: Target, calibrator: str | None = None, calib_data: str | None = None,
                 calib_samples: int | None = None, quantize: list[str] | None = None,
                 per_channel: bool | None = None) -> PtqSettings:
    """Explicit options over the recipe's ``compile`` section over the target's defaults
    (shared by PTQ compiles and QAT's PTQ initialisation, so both calibrate alike)."""
    cfg = recipe["compile"]
    return PtqSettings(calibrator=calibrator or cfg["calibrator"] or target.default_calibrator,
                       calib_data=calib_data or cfg["calib_data"],
                       calib_samples=calib_samples or cfg["calib_samples"],
                       quantize=quantize or cfg["quantize"],
                       per_channel=cfg["per_channel"] if per_channel is None else per_channel)


class Compiler:
    """Holds one recipe's trained model and the stages every target shares."""

    def __init__(self, recipe: Recipe, artifacts: Path | None = None, checkpoint: Path | None = None,
                 log=print):
        self.recipe, self.artifacts, self.log = recipe, artifacts, log
        ckpt = checkpoint or checkpoint_path(recipe, artifacts)
        if not ckpt.is_file() and checkpoint is None:
            log(f"no checkpoint at {ckpt}: training the recipe first")
            train_recipe(recipe, artifacts)  # validates all data before it trains
        self.model, self.ckpt = load_checkpoint(ckpt, recipe)
        self.ckpt_path = ckpt
        self.size = recipe["data"]["image_size"]
        self.threads = recipe["train"]["threads"] or torch.get_num_threads()
        self.latency_runs = 30

    # -- shared stages ---------------------------------------------------------------------
    @cached_property
    def exported(self) -> tuple[onnx.ModelProto, float]:
        t0 = time.time()
        r = self.recipe
        mean, std = input_normalization(r)
        meta = {"method": r["model"]["method"], "backbone": r["model"]["backbone"], "image_size": self.size,
                "normalization": {"mean": list(mean), "std": list(std)}, "categories": self.ckpt["categories"],
                "recipe_hash": r.hash, "recipe_name": r.name}
        model = export_model(self.model, self.size, meta)
        return model, time.time() - t0

    @cached_property
    def data(self) -> tuple:
        """(pairs, train set, test sets), validated once (masks are read in the check)."""
        return prepare_data(self.recipe)

    @cached_property
    def test_arrays(self) -> dict[str, tuple]:
        return {c: load_test_arrays(ds) for c, ds in self.data[2].items()}

    @cached_property
    def train_set(self):
        return self.data[1]

    def sample_feeds(self, batches: int = 2, batch: int = 2) -> list[dict[str, np.ndarray]]:
        """Real test images (defective ones included) for numeric checks."""
        images = np.concatenate([a[0][::max(1, len(a[0]) // (batches * batch))] for a in self.test_arrays.values()])
        return [{"image": images[i * batch:(i + 1) * batch]} for i in range(batches)]

    def metrics(self, session_model: onnx.ModelProto, desc: str) -> dict:
        sess = make_session(session_model, self.threads)
        return evaluate(ort_predictor(sess), self.test_arrays, self.recipe["eval"]["batch_size"], desc)

    @cached_property
    def fp32_simplified(self) -> tuple[onnx.ModelProto, list[dict]]:
        from uadc.passes import PassContext, run_passes
        model, seconds = self.exported
        ctx = PassContext(target=get_target("ort-cpu-fp32"), sample_feeds=self.sample_feeds(1)[0])
        simplified, records = run_passes(model, ["shape_inference", "simplify", "partition_check"], ctx)
        return simplified, [{"name": "export", "seconds": round(seconds, 3),
                             "nodes_before": 0, "nodes_after": len(model.graph.node)}] + records

    @cached_property
    def fp32_metrics(self) -> dict:
        return self.metrics(self.fp32_simplified[0], "fp32")

    @cached_property
    def fp32_latency(self) -> dict:
        x = self.sample_feeds(1, 1)[0]["image"]
        torch.set_num_threads(self.threads)
        with torch.no_grad():
            t_lat = latency_ms(lambda: self.model(torch.from_numpy(x)), self.latency_runs)
        sess = make_session(self.fp32_simplified[0], self.threads)
        o_lat = latency_ms(lambda: sess.run(None, {"image": x}), self.latency_runs)
        return {"torch_fp32": t_lat, "ort_fp32": o_lat}

    @cached_property
    def torch_vs_ort(self) -> dict:
        feeds = self.sample_feeds()
        shape = feeds[0]["image"].shape
        return compare([TorchCpuRunner(self.model, shape), ort_runner(self.fp32_simplified[0], "ort-fp32")],
                       feeds, EXPORT_ATOL, 1e-3)

    # -- one target ------------------------------------------------------------------------
    def calibration_images(self, kind: str, n: int) -> np.ndarray:
        from uadc.calibrate import calibration_images
        ds = self.train_set
        load = lambda idx: np.stack([ds[i]["image"].numpy() for i in idx])  # noqa: E731
        return calibration_images(kind, n, self.recipe["seed"], load, len(ds), self.size)

    def compile(self, opts: CompileOptions) -> Path:
        target = get_target(opts.target)
        ptq = ptq_settings(self.recipe, target, opts.calibrator, opts.calib_data, opts.calib_samples,
                           opts.quantize, opts.per_channel)
        calibrator, calib_data, n_calib, quantize = ptq.calibrator, ptq.calib_data, ptq.calib_samples, ptq.quantize
        _check_options(target, calibrator, quantize, opts)
        suffix = "-qat" if opts.qat_model is not None else ""  # never overwrite the PTQ artifact
        out = opts.out or self.recipe.artifact_dir(self.artifacts) / f"{target.name}{suffix}"
        fp32, records = self.fp32_simplified
        compiled, pass_records, calib = self._run_target_passes(target, fp32, ptq, opts)
        report = self._base_report(target, calibrator if calib else None, calib_data if calib else None,
                                   quantize if target.quantized else [], compiled)
        report["passes"] = records + pass_records
        t0 = time.time()
        report["verification"] = self._verify(compiled, target)
        report["verification"]["seconds"] = round(time.time() - t0, 3)
        # export + every pass (calibration included) + Polygraphy checks; AD metrics and latency excluded
        report["compile_seconds"] = round(sum(p["seconds"] for p in report["passes"]) + time.time() - t0, 2)
        self._add_latency(report, compiled, opts)
        if opts.evaluate:
            self._add_metrics(report, compiled, target)
        with _atomic_dir(out) as tmp:
            self._write_artifacts(tmp, compiled, report, calib, target, opts)
        self.log(f"artifact written: {out}")
        return out

    def _run_target_passes(self, target: Target, fp32: onnx.ModelProto, ptq: PtqSettings, opts: CompileOptions):
        from uadc.passes import PassContext, run_passes
        names = list(self.recipe["compile"]["passes"] or target.passes)
        # Shared pre-passes already ran on the FP32 model; skip them here.
        names = [n for n in names if n not in ("shape_inference", "simplify")]
        ctx = PassContext(target=target, quantize_partitions=ptq.quantize, sample_feeds=self.sample_feeds(1)[0],
                          dump_dir=opts.dump_passes, per_channel=ptq.per_channel)
        calib = None
        model = fp32
        if opts.qat_model is not None:
            model = opts.qat_model
            names = [n for n in names if n != "qdq"]
            calib = {"calibrator": "qat", "calib_data": "qat", "ranges": {}}
        elif "qdq" in names:
            t0 = time.time()
            ranges, tensors = self._calibrate(fp32, ptq.calibrator, ptq.calib_data, ptq.calib_samples, ptq.quantize,
                                              target)
            ctx.ranges = ranges
            calib = {"calibrator": ptq.calibrator, "calib_data": ptq.calib_data, "samples": ptq.calib_samples,
                     "seed": self.recipe["seed"], "ranges": ranges, "seconds": round(time.time() - t0, 3)}
        model, records = run_passes(model, names, ctx)
        if calib is not None and "seconds" in calib:
            records.insert(0, {"name": "calibrate", "seconds": calib["seconds"],
                               "nodes_before": len(fp32.graph.node), "nodes_after": len(fp32.graph.node)})
        return model, records, calib

    def _calibrate(self, fp32, calibrator, calib_data, n, quantize, target):
        from uadc.calibrate import collect_ranges, tensors_to_calibrate
        images = self.calibration_images(calib_data, n)
        tensors = tensors_to_calibrate(fp32, quantize)
        sym = bool(target.scheme and target.scheme.activation_symmetric)
        try:
            ranges = collect_ranges(fp32, images, tensors, calibrator, None, 8, activation_symmetric=sym)
        except ValueError as exc:
            raise UadcError(f"calibrator {calibrator!r}: {exc}") from None
        return ranges, tensors

    def _verify(self, compiled: onnx.ModelProto, target: Target) -> dict:
        feeds = self.sample_feeds()
        tvo = self.torch_vs_ort
        fvc = compare([ort_runner(self.fp32_simplified[0], "ort-fp32"), ort_runner(compiled, target.name)],
                      feeds, atol=1e9, rtol=1e9)  # statistics only: INT8 is expected to differ
        return {"torch_vs_ort_fp32": {k: tvo[k] for k in ("passed", "max_abs", "mean_abs", "atol", "outputs")},
                "fp32_vs_compiled": {k: fvc[k] for k in ("max_abs", "mean_abs", "outputs")}}

    def _add_latency(self, report: dict, compiled: onnx.ModelProto, opts: CompileOptions) -> None:
        self.latency_runs = opts.latency_runs
        lat = dict(self.fp32_latency)
        x = self.sample_feeds(1, 1)[0]["image"]
        sess = make_session(compiled, self.threads)
        lat["compiled"] = latency_ms(lambda: sess.run(None, {"image": x}), opts.latency_runs)
        lat.update(batch=1, threads=self.threads, runtime="onnxruntime CPU")
        report["latency_ms"] = lat

    def _add_metrics(self, report: dict, compiled: onnx.ModelProto, target: Target) -> None:
        fp32 = self.fp32_metrics
        comp = self.metrics(compiled, target.name)
        key = "emulated_int8" if target.runtime == "tensorrt" and target.quantized else "compiled"
        report["metrics"] = {"fp32": fp32, "compiled": comp, "drop": _drops(fp32, comp)}
        if key != "compiled":
            report["metrics"][key] = comp
            report["metrics"]["compiled_note"] = (
                "TensorRT is not run here: 'compiled' is the symmetric Q/DQ ONNX evaluated with ONNX Runtime "
                "(emulated INT8). On the device TensorRT fuses layers and may pick FP16 tactics for "
                "un-quantized layers, so figures can differ slightly.")

    def _base_report(self, target, calibrator, calib_data, quantized, compiled) -> dict:
        return {"schema": REPORT_SCHEMA, "target": target.name, "precision": target.precision,
                "runtime": target.runtime, "calibrator": calibrator, "calib_data": calib_data,
                "quantized_partitions": quantized, "recipe": self.recipe.name, "recipe_hash": self.recipe.hash,
                "checkpoint": str(self.ckpt_path), "nodes": partition_counts(compiled),
                "qdq_nodes": _qdq_counts(compiled), "bytes": partition_bytes(compiled),
                "model_bytes": compiled.ByteSize(), "environment": environment(self.threads)}

    def _write_artifacts(self, tmp: Path, compiled, report, calib, target: Target, opts: CompileOptions) -> None:
        from uadc.report import render_markdown
        onnx.save(compiled, tmp / "model.onnx")
        if calib is not None:
            write_json_atomic(tmp / "calibration.json", calib)
        if opts.split:
            (tmp / "partitions").mkdir()
            split_partitions(compiled, tmp / "partitions")
        if target.runtime == "tensorrt":
            from uadc.deploy import write_trt_files
            run_metrics = (lambda predict: evaluate(predict, self.test_arrays, 8, "tensorrt")) if opts.evaluate \
                else None
            report["engine"] = write_trt_files(tmp, compiled, self.fp32_simplified[0], target, calib, self.size,
                                               opts.build_engine, run_metrics, self.sample_feeds())
        write_json_atomic(tmp / "report.json", report)
        (tmp / "report.md").write_text(render_markdown(report))


def _check_options(target: Target, calibrator: str, quantize: list[str], opts: CompileOptions) -> None:
    from calibrators import available_calibrators
    if target.quantized and calibrator not in available_calibrators():
        raise UadcError(f"unknown calibrator {calibrator!r}; expected one of {', '.join(available_calibrators())}")
    bad = [p for p in quantize if p not in ("teacher", "student", "head")]
    if bad:
        raise UadcError(f"--quantize: {bad[0]!r} is not a partition (teacher, student, head)")
    if not target.quantized and (opts.calibrator or opts.calib_data):
        raise UadcError(f"target {target.name} is {target.precision}: calibration options do not apply")


def _drops(fp32: dict, comp: dict) -> dict:
    """fp32 - compiled, in AUROC points x100 would hide sign: keep raw fractions."""
    return {"mean": {k: round(fp32["mean"][k] - comp["mean"][k], 6) for k in fp32["mean"]},
            "categories": {c: {k: round(v[k] - comp["categories"][c][k], 6) for k in v}
                           for c, v in fp32["categories"].items()}}


def _qdq_counts(model: onnx.ModelProto) -> dict[str, int]:
    from uadc.partitions import partition_of
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            p = partition_of(n) or "?"
            counts[p] = counts.get(p, 0) + 1
    return counts


def environment(threads: int) -> dict:
    import onnxruntime
    import polygraphy
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "polygraphy": polygraphy.__version__, "uadc": __version__, "platform": platform.platform()}


class _atomic_dir:
    """Write into a temp folder beside ``final``; rename into place only on success."""

    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def load_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


__all__ = ["Compiler", "CompileOptions", "environment", "get_metadata"]
