"""``compile.precision: auto``: per fused group INT8 or FP32, the fastest assignment on the target
runtime whose label-free fidelity stays within the recipe's ``compile.auto`` budget.

1. Speed: ONNX Runtime's profiler times every node of the FP32 model and of the model with every
   candidate group quantized (batch ``profile_batch``, the compile's threads, the two run in turn, each node's
   fastest of N runs). Each group gets its FP32 and INT8 time; the profiled Q/DQ nodes price an
   FP32<->INT8 crossing (per node + per element, least squares), so a mixed assignment pays for
   its Q/DQ islands (a linear cost model). The profiles go to a timing cache (``timing_cache``)
   so that a rerun on a noisy machine makes the same speed decisions.
2. Fastest assignment: from several starts (INT8 where a group alone saves at least
   ``min_saving`` of its FP32 time and 2 µs; all FP32; all INT8 per set of partitions), single
   flips in graph order while the model says a flip saves that much (an FP32 group between INT8
   neighbours may be cheaper quantized than fenced by Q/DQ, and vice versa); the cheapest wins.
3. Fidelity, without labels (uadc.verify.fidelity): FP32 vs candidate image-score Spearman,
   decision agreement at the FP32 operating thresholds and top-1 % map overlap, per category on
   validation normals plus the same normals with a pasted noise square, and decision agreement
   on N(0,1) inputs; the budget holds for the minimum over these sets (``Fidelity``). A category
   with fewer than ``rank_min_images`` images counts for the rank correlation only in a pool of
   every category (scores standardised per category by the FP32 normals): among 6 images one
   swap gives 0.94, and such a set would decide the search on noise. Candidates
   run on the target runtime (OpenVINO targets: OpenVINO at the target's float precision, so bf16
   float layers spend budget too; a target whose float layers alone break it is refused); the
   reference is always ONNX Runtime FP32. OpenVINO targets take ORT's profile as their speed model.
4. If the fastest assignment breaks the budget: the fidelity cost of each unit of consecutive
   INT8 groups alone (only it quantized, scored on a probe subset: ``sensitivity_images`` per
   set, with the image kNN's bank described only where those images find their nearest entries),
   groups ordered by their unit's cost, and a bisection for the fewest reverted to
   FP32 that meets the budget; then islands that no longer pay are reverted too, and the final
   assignment is measured again. Every measurement is cached; decisions are recorded per group.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx

from uadc.backends.ort_profile import NodeTime, cached_node_times, node_times, source_name
from uadc.config.settings import AUTO_PRECISION_TARGETS, EXPLICIT_AUTO_TARGETS
from uadc.config.settings import PtqSettings, auto_applies, check_auto_without_qat, resolve_ptq
from uadc.config.targets import Target
from uadc.core.constants import INPUT_NAME, PARTITIONS, QDQ_OPS
from uadc.core.errors import RuntimeFault, UadcError
from uadc.export.partitions import GraphIndex
from uadc.passes.groups import Boundaries, Group, fused_groups
from uadc.passes.knn import bank_neighbours
from uadc.passes.pipeline import PassContext, run_passes
from uadc.passes.qdq import weight_quant_params
from uadc.passes.simulate import simulate_fp16
from uadc.pipeline.baseline import Baseline
from uadc.pipeline.deploy import bank_runner, target_predictor
from uadc.pipeline.precision_search import (BUDGET, RANDOM, Candidates, CostModel, Fidelity, bisect, figures_text,
                                            revert_order, step)
from uadc.pipeline.precision_trt import fp16_stage, gpu_spec, trt_cost_model, trt_int8_groups
from uadc.quant.calibrate import calibrate_ranges

log = logging.getLogger(__name__)


@dataclass
class AutoPrecision:
    nodes: list[str]            # nodes to quantize (empty: nothing pays or fits the budget)
    partitions: list[str]       # partitions holding them
    ranges: dict                # calibrated ranges of every candidate partition
    ptq: PtqSettings
    record: dict                # report.json "precision_search"
    fp16_nodes: frozenset[str] | None = None  # TensorRT: float nodes run FP16 (the rest of the float ones FP32)


SUPPORTED = AUTO_PRECISION_TARGETS + EXPLICIT_AUTO_TARGETS


def check_supported(target: Target) -> None:
    if target.name not in SUPPORTED:
        raise UadcError(f"precision auto is not supported for target {target.name} (supported: "
                        f"{', '.join(SUPPORTED)}); use --precision target")


def auto_candidates(baseline: Baseline, target: Target, opts) -> PtqSettings | None:
    """PTQ settings over the candidate partitions (``--quantize``, else all) when ``opts``
    (CompileOptions) or the recipe ask for precision auto and it applies (``auto_applies``); None for
    ``target``. Checked before any work."""
    mode = opts.precision if opts.precision is not None else baseline.recipe.compile.precision   # "": refused
    if not auto_applies(mode, target, opts.precision is not None, opts.qat_model is not None):
        return None
    check_supported(target)
    check_auto_without_qat(mode, opts.qat_model is not None)
    if target.runtime == "tensorrt":
        gpu_spec(baseline.recipe.compile.auto.gpu, target.device)  # an unknown compile.auto.gpu fails here
    return resolve_ptq(baseline.recipe, target, opts.calibrator, opts.calib_data, opts.calib_samples,
                       opts.quantize or list(PARTITIONS), opts.per_channel)


# ------------------------------------------------------------------------------------ speed

def _group_times(times: list[NodeTime], model: onnx.ModelProto,
                 groups: list[Group]) -> tuple[np.ndarray, float, list[NodeTime]]:
    """Per-group microseconds, the rest, and the rest's Q/DQ nodes: a profiled node maps to a
    group through its own name or the tensor it is named after (ORT names NCHWc convolutions
    after their output)."""
    g = GraphIndex(model)
    of_node = {name: gi for gi, grp in enumerate(groups) for name in grp.nodes}
    of_tensor = {t: of_node[n.name] for n in g.nodes if n.name in of_node for t in n.output}
    per = np.zeros(len(groups))
    rest, qdq = 0.0, []
    for t in times:
        src = source_name(t.name)
        gi = of_node.get(src, of_tensor.get(src))
        if gi is None:
            rest += t.us
            if t.op in QDQ_OPS:
                qdq.append(t)
        else:
            per[gi] += t.us
    return per, rest, qdq


# ----------------------------------------------------------------------------------- search

# Target passes the candidates skip: they leave ONNX Runtime's outputs as they are (``opset`` rewrites
# operator encodings for TensorRT 8.5 and checks its own numerics; ``cleanup`` drops unread nodes and
# initializers, sorts and runs the checker), and the compiled model runs them.
SEARCH_SKIPS = ("opset", "cleanup")
# A probe (the sensitivity of one unit, scored on a few images) describes only the image kNN's bank
# entries among the FP32 nearest of its images: each image's nearest under the candidate's teacher is
# among them (describing every training image is most of a probe's time).
PROBE_NEIGHBOURS = 8


class _Search(Candidates):
    """INT8 assignments of ``groups``, built by the target's passes; on TensorRT targets the
    float stage's FP16 nodes (``fp16_nodes``) are simulated in every candidate."""

    def __init__(self, baseline: Baseline, target: Target, fp32: onnx.ModelProto, ptq: PtqSettings,
                 passes: list[str], threads: int, groups: list[Group], ranges: dict):
        self.fp32, self.groups = fp32, groups
        self.passes = [p for p in passes if p not in SEARCH_SKIPS]
        self.ctx = PassContext(target=target, ranges=ranges, per_channel=ptq.per_channel, reduce_range=ptq.reduce_range,
                               bank_images=baseline.bank_images, bank_runner=bank_runner(target, threads),
                               weight_memo={})
        self.budget = baseline.recipe.compile.auto
        predictor = target_predictor(target, threads)
        self.fidelity_runtime = f"openvino CPU ({target.inference_hint})" if predictor else "onnxruntime CPU"
        self.fid = Fidelity(baseline, fp32, self.budget, threads, predictor)
        self.models: dict[frozenset[int], onnx.ModelProto] = {}
        self.fp16_nodes: frozenset[str] = frozenset()
        # ONNX Runtime runs the FP32 model as the reference; another runtime (OpenVINO, bf16) is measured
        self.figs: dict[frozenset[int], dict] = {} if predictor else {frozenset(): {k: 1.0 for k in BUDGET}}

    def simulate_fp16(self, nodes: frozenset[str]) -> None:
        """Candidates from now on run ``nodes`` (those not quantized) as FP16 (TensorRT)."""
        self.fp16_nodes, self.figs = nodes, {}
        self.fidelity_runtime = "onnxruntime CPU (FP16 layers simulated)"

    @cached_property
    def probe_bank(self) -> np.ndarray | None:
        """The image kNN's bank entries the probes describe (None: no image kNN, or no ``knn_bank`` pass)."""
        if "knn_bank" not in self.passes:
            return None
        images = np.concatenate([x[self.fid.probe[c]] for c, x in self.fid.images.items()])
        return bank_neighbours(self.fp32, images, PROBE_NEIGHBOURS)

    def probe_model(self, int8: frozenset[int]) -> onnx.ModelProto:
        if self.probe_bank is None or int8 in self.models:
            return self.model(int8)
        full, self.ctx = self.ctx, replace(self.ctx, bank_subset=self.probe_bank)
        try:
            return self.model(int8)
        finally:  # the probe's model is not kept for full measurements; the weight scales it read are
            self.ctx = replace(full, weight_params=self.ctx.weight_params)
            self.models.pop(int8, None)

    def model(self, int8: frozenset[int]) -> onnx.ModelProto:
        if not int8:  # bf16 float layers: the image kNN's bank is described at that precision too
            base = self.fp32 if self.ctx.target.float_precision == "fp32" else \
                run_passes(self.fp32, ["knn_bank"], self.ctx)[0]
        else:
            if int8 not in self.models:
                parts = sorted({self.groups[gi].partition for gi in int8})
                ctx = replace(self.ctx, quantize_partitions=parts, quantize_nodes=self.nodes(int8))
                self.models[int8] = run_passes(self.fp32, self.passes, ctx)[0]
                # later candidates take these weights' scales as ORT computed them here (the same numbers)
                known = self.ctx.weight_params or {}
                self.ctx = replace(self.ctx, weight_params=known | weight_quant_params(self.models[int8]))
            base = self.models[int8]
        return simulate_fp16(base, self.fp16_nodes - set(self.nodes(int8))) if self.fp16_nodes else base


def search_precision(baseline: Baseline, target: Target, fp32: onnx.ModelProto, ptq: PtqSettings,
                     passes: list[str], threads: int, calibration=None, timing_cache: Path | None = None
                     ) -> AutoPrecision:
    """The assignment (see the module docstring); ``ptq.quantize``: the candidate partitions;
    ``timing_cache``: a folder that keeps the profiles for reruns (``cached_node_times``)."""
    check_supported(target)
    t0 = time.time()
    images = baseline.calibration_images(ptq.calib_data, ptq.calib_samples, calibration)
    ranges = calibrate_ranges(fp32, images, ptq, target)
    trt = target.runtime == "tensorrt"
    groups = fused_groups(fp32, list(ptq.quantize))
    groups = trt_int8_groups(groups) if trt else groups
    if not groups:
        raise UadcError(f"precision auto: no quantizable nodes in {', '.join(ptq.quantize)}")
    s = _Search(baseline, target, fp32, ptq, passes, threads, groups, ranges)
    stage = None
    if trt:  # which float layers run FP16, then INT8 on top of them
        spec = gpu_spec(s.budget.gpu, target.device)
        stage = fp16_stage(fp32, s.fid, spec, s.budget.min_saving)
        s.simulate_fp16(stage.nodes)
    if not s.fid.passes(s.fidelity(frozenset())):
        if s.faults:
            raise RuntimeFault(f"precision auto: {target.name} with no layer quantized fails on its runtime "
                               f"({s.faults[0].split(': ', 1)[1]})")
        advice = ("compile a target with fp32 float layers instead" if target.float_precision != "fp32" else
                  f"its runtime ({target.runtime}, fp32) scores these images differently from the ONNX Runtime FP32 "
                  f"reference already (near-tied scores); loosen compile.auto or compile with --precision target")
        raise UadcError(f"precision auto: {target.name} with no layer quantized already breaks the fidelity "
                        f"budget ({figures_text(s.figs[frozenset()])}; float layers in {target.float_precision}); "
                        f"{advice}")
    if trt:
        cm, profile, extra = trt_cost_model(fp32, groups, spec, stage, s.budget.min_saving)
    else:
        cm, profile, extra = _ort_cost_model(s, baseline, fp32, threads, timing_cache)
    final, sens, steps, reasons = _assign(s, cm)
    record = _record(s, cm, final, sens, steps, reasons, profile, extra)
    if stage is not None:
        record["float_stage"] = stage.record
    record["seconds"] = round(time.time() - t0, 2)
    log.info("precision auto: %d of %d groups INT8 (%.1f s)", len(final), len(groups), record["seconds"])
    parts = sorted({groups[gi].partition for gi in final}, key=PARTITIONS.index)
    return AutoPrecision(s.nodes(final), parts, ranges, replace(ptq, quantize=tuple(parts)), record,
                         stage.nodes if stage is not None else None)


def _ort_cost_model(s: _Search, baseline: Baseline, fp32: onnx.ModelProto, threads: int,
                    timing_cache: Path | None) -> tuple[CostModel, dict, list[dict]]:
    """ONNX Runtime's profile of the FP32 and the all-INT8 model as the cost model."""
    b = s.budget
    x = baseline.sample_feeds(1, b.profile_batch)[0][INPUT_NAME]
    feeds = {INPUT_NAME: np.resize(x, (b.profile_batch, *x.shape[1:]))}  # fewer test images: repeated
    models = [fp32, s.model(frozenset(range(len(s.groups))))]
    if timing_cache is not None:  # a rerun reuses the profiles: the same speed decisions
        (prof32, prof8), cache = cached_node_times(timing_cache, models, feeds, threads, b.profile_runs,
                                                   measure=node_times)
    else:
        (prof32, prof8), cache = node_times(models, feeds, threads, b.profile_runs), None
    t32, rest32, _ = _group_times(prof32, fp32, s.groups)
    t8, rest8, qdq = _group_times(prof8, fp32, s.groups)
    _check_mapped(t32, t8, s.groups)
    cm = CostModel(t32, t8, rest32, rest8, Boundaries(fp32, s.groups, forked=True), b.min_saving, qdq)
    profile = {"batch": int(len(feeds[INPUT_NAME])), "runs": b.profile_runs, "min_saving": b.min_saving,
               "qdq_us_per_node": round(cm.per_node, 2), "qdq_ns_per_element": round(1000 * cm.per_element, 4),
               "crossing_scale": round(cm.scale, 3), "other_fp32_us": round(cm.rest32, 1),
               "fp32_us": round(cm.cost(frozenset()), 1), "all_int8_us": round(cm.cost(cm.all), 1),
               "timing_cache": cache}
    return cm, profile, [{"float": s.ctx.target.float_precision} for _ in s.groups]   # bf16 on OpenVINO's bf16 targets


def _check_mapped(t32: np.ndarray, t8: np.ndarray, groups: list[Group]) -> None:
    """Every group is quantized in the profiled INT8 model, so a convolution with no INT8 time is one
    whose fused kernel ORT did not name after the model's node (ONNX Runtime 1.19 names them
    ``QLinearConv_token_N``): with most of them unnamed the profile cannot price the groups."""
    convs = [gi for gi, g in enumerate(groups) if g.op.startswith("Conv") and t32[gi] > 0]
    untimed = sum(1 for gi in convs if t8[gi] <= 0)
    if convs and untimed > len(convs) / 2:
        import onnxruntime as ort
        raise UadcError(f"precision auto: ONNX Runtime {ort.__version__}'s profile names its fused INT8 kernels "
                        f"without the model's node names ({untimed} of {len(convs)} quantized convolutions "
                        f"untimed), so it cannot time the groups; upgrade onnxruntime or use --precision target")


def _assign(s: _Search, cm: CostModel) -> tuple[frozenset[int], dict, list[dict], list[str]]:
    """The fastest assignment, brought within the budget: (INT8 groups, sensitivities, steps, reasons)."""
    faster = cm.faster()
    fastest = cm.fastest([grp.partition for grp in s.groups])
    steps = [step("fastest", fastest, cm, s.fidelity(fastest))]
    final, sens, over_budget = fastest, {}, frozenset()
    if not s.fid.passes(s.figs[fastest]):
        order, sens = revert_order(s, fastest)
        final = bisect(s, cm, fastest, order, steps)
        over_budget = fastest - final
        settled = cm.settle(final, allow_int8=False)
        if settled != final:
            steps.append(step("islands reverted", settled, cm, s.fidelity(settled)))
            if s.fid.passes(s.figs[settled]):
                final = settled
    fits = final
    if final and cm.cost(final) > cm.cost(frozenset()) - cm.floor:  # nothing that fits the budget pays
        final = frozenset()
        steps.append(step("all float (faster than what fits the budget)", final, cm, s.fidelity(final)))
    return final, sens, steps, [_reason(gi, faster, fastest, over_budget, final, fits)
                                for gi in range(len(s.groups))]


def _reason(gi: int, faster: frozenset[int], fastest: frozenset[int], over_budget: frozenset[int],
            final: frozenset[int], fits: frozenset[int]) -> str:
    """Why group ``gi`` ended as it did; ``fits``: the assignment within budget before the all-float check."""
    if gi in final:
        return "faster" if gi in faster else "avoids Q/DQ around it"
    if gi in over_budget:
        return "fidelity budget"
    if gi in fits:   # within budget, but that assignment was slower than all float
        return "all float was faster than what fits the budget"
    if gi in fastest:
        return "Q/DQ cost more once neighbours went float"
    return "not faster" if gi not in faster else "Q/DQ would cost more"


def _record(s: _Search, cm: CostModel, final: frozenset[int], sens: dict, steps: list[dict],
            reasons: list[str], profile: dict, extra: list[dict]) -> dict:
    """report.json's ``precision_search``; ``extra``: per group, its float precision (``float``)
    and what else the speed model knows of it."""
    b = s.budget
    fig = s.fidelity(final)
    groups = []
    for gi, grp in enumerate(s.groups):
        more = dict(extra[gi])  # a modelled fp32_us / fp16_us replaces the float time
        float_precision = more.pop("float")
        groups.append({"name": grp.name, "partition": grp.partition, "op": grp.op, "nodes": len(grp.nodes),
                       "precision": "int8" if gi in final else float_precision,
                       "fp32_us": round(float(cm.t32[gi]), 1), **more, "int8_us": round(float(cm.t8[gi]), 1),
                       "fidelity_cost": sens.get(gi), "reason": reasons[gi]})
    return {
        "budget": {k: getattr(b, a) for k, a in BUDGET.items()},
        "candidates": sorted({g.partition for g in s.groups}, key=PARTITIONS.index),
        "images": {c: {"normals": n, "pasted": n} for c, n in s.fid.normals.items()}
        | ({RANDOM: int(len(s.fid.images[RANDOM]))} if RANDOM in s.fid.images else {}),
        "sensitivity_images": {c: int(len(i)) for c, i in s.fid.probe.items()},
        "rank_sets": s.fid.rank_sets(),  # ranked on their own; every category also counts in the pooled rank
        "rank_min_images": b.rank_min_images,
        "fidelity_runtime": s.fidelity_runtime,  # candidates run there; speed is the profile or model either way
        "faults": s.faults,  # candidates the runtime could not build or run (judged worst)
        "profile": profile,
        "groups": groups,
        "steps": steps,
        "final": {"int8_groups": len(final), "float_groups": len(s.groups) - len(final),
                  "predicted_us": round(cm.cost(final), 1), "qdq_us": round(cm._crossing(final, cm.scale), 1),
                  "fidelity": fig, "within_budget": s.fid.passes(fig)},
    }
