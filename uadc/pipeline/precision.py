"""``compile.precision: auto``: per fused group INT8 or FP32, the fastest assignment on the target
runtime whose label-free fidelity stays within the recipe's ``compile.auto`` budget.

1. Speed: ONNX Runtime's profiler times every node of the FP32 model and of the model with every
   candidate group quantized (batch 1, the compile's threads, the two run in turn, each node's
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
   set), groups ordered by their unit's cost, and a bisection for the fewest reverted to
   FP32 that meets the budget; then islands that no longer pay are reverted too, and the final
   assignment is measured again. Every measurement is cached; decisions are recorded per group.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from uadc.backends.ort_profile import NodeTime, cached_node_times, node_times, source_name
from uadc.config.settings import AUTO_PRECISION_TARGETS as SUPPORTED
from uadc.config.settings import PtqSettings, auto_applies, resolve_ptq
from uadc.config.targets import Target
from uadc.core.constants import INPUT_NAME, PARTITIONS, QDQ_OPS
from uadc.core.errors import UadcError
from uadc.core.progress import progress
from uadc.export.partitions import GraphIndex
from uadc.passes.groups import Boundaries, Group, fused_groups
from uadc.passes.pipeline import PassContext, run_passes
from uadc.passes.qdq import weight_quant_params
from uadc.pipeline.baseline import Baseline
from uadc.pipeline.deploy import bank_runner, outputs_on, target_predictor, val_images
from uadc.quant.calibrate import calibrate_ranges
from uadc.verify.fidelity import figures, reference_thresholds, spearman

log = logging.getLogger(__name__)
MIN_SAVING_US = 2.0
BUDGET = {"spearman": "spearman_min", "decision_agreement": "decision_agreement_min",
          "top1_overlap": "top1_overlap_min"}
RANDOM = "random-normal"
SENSITIVITY_UNITS = 40  # models built and scored to rank the INT8 groups (keeps 128 px within ~2 min)


@dataclass
class AutoPrecision:
    nodes: list[str]            # nodes to quantize (empty: nothing pays or fits the budget)
    partitions: list[str]       # partitions holding them
    ranges: dict                # calibrated ranges of every candidate partition
    ptq: PtqSettings
    record: dict                # report.json "precision_search"


def check_supported(target: Target) -> None:
    if target.name not in SUPPORTED:
        raise UadcError(f"precision auto is not supported for target {target.name} (supported: "
                        f"{', '.join(SUPPORTED)}); use --precision target")


def auto_candidates(baseline: Baseline, target: Target, opts) -> PtqSettings | None:
    """PTQ settings over the candidate partitions (``--quantize``, else all) when ``opts``
    (CompileOptions) or the recipe ask for precision auto and it applies (``auto_applies``); None for
    ``target``. Checked before any work."""
    mode = opts.precision or baseline.recipe.compile.precision
    if not auto_applies(mode, target, opts.precision is not None, opts.qat_model is not None):
        return None
    check_supported(target)
    if opts.qat_model is not None:
        raise UadcError("precision auto picks what to quantize itself; it does not combine with --from-qat")
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


def _fit_qdq(qdq: list[NodeTime]) -> tuple[float, float]:
    """(µs per Q/DQ node, µs per element) by least squares over the profiled Q/DQ nodes: small
    ones cost mostly their fixed overhead, large ones their elements."""
    if not qdq:
        return 0.0, 0.0
    x = np.array([t.out_bytes // (4 if t.op == "DequantizeLinear" else 1) for t in qdq], float)
    y = np.array([t.us for t in qdq])
    if len(qdq) < 2 or np.ptp(x) == 0:
        return float(y.mean()), 0.0
    a, b = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)[0]
    if b < 0:
        return float(y.mean()), 0.0
    if a < 0:
        return 0.0, float((x @ y) / (x @ x))
    return float(a), float(b)


class CostModel:
    """Predicted model time (µs) of an assignment: group times plus priced crossings. A crossing
    costs a fitted Q/DQ node; what else the all-INT8 model spends outside the groups (layout
    transposes at the ends of INT8 chains) scales the crossings' price."""

    def __init__(self, t32: np.ndarray, t8: np.ndarray, rest32: float, rest8: float, bounds: Boundaries,
                 min_saving: float, qdq: list[NodeTime]):
        self.t32, self.t8, self.rest32, self.bounds = t32, t8, rest32, bounds
        self.all = frozenset(range(len(t32)))
        self.per_node, self.per_element = _fit_qdq(qdq)
        fitted = self._crossing(self.all, 1.0)
        self.scale = max(1.0, (rest8 - rest32) / fitted) if fitted > 0 else 1.0
        self.margin = np.maximum(MIN_SAVING_US, min_saving * t32)

    def _crossing(self, int8: frozenset[int], scale: float) -> float:
        n, e = self.bounds.crossings(set(int8))
        return scale * (self.per_node * n + self.per_element * e)

    def cost(self, int8: frozenset[int]) -> float:
        sel = np.zeros(len(self.t32), bool)
        sel[list(int8)] = True
        return float(self.rest32 + self.t8[sel].sum() + self.t32[~sel].sum() + self._crossing(int8, self.scale))

    def faster(self) -> frozenset[int]:
        return frozenset(int(i) for i in np.flatnonzero(self.t32 - self.t8 >= self.margin))

    def settle(self, start: frozenset[int], allow_int8: bool = True, rounds: int = 10) -> frozenset[int]:
        """Flip single groups (graph order) while a flip saves at least the group's margin."""
        cur, cur_cost = start, self.cost(start)
        for _ in range(rounds):
            changed = False
            for gi in range(len(self.t32)):
                if gi not in cur and not allow_int8:
                    continue
                alt = cur - {gi} if gi in cur else cur | {gi}
                alt_cost = self.cost(alt)
                if alt_cost <= cur_cost - self.margin[gi]:
                    cur, cur_cost, changed = alt, alt_cost, True
            if not changed:
                break
        return cur

    def fastest(self, partitions: list[str]) -> frozenset[int]:
        """The cheapest settled assignment from several starts: INT8 where faster alone, all
        FP32, and all INT8 in each set of partitions (long INT8 chains pay even where a single
        layer is slower, and single flips cannot find them from a mixed start)."""
        starts = [self.faster(), frozenset()]
        for k in range(1, len(set(partitions)) + 1):
            for parts in itertools.combinations(sorted(set(partitions)), k):
                starts.append(frozenset(gi for gi, p in enumerate(partitions) if p in parts))
        ends = {self.settle(s) for s in starts}
        return min(ends, key=lambda a: (round(self.cost(a), 1), -len(a), sorted(a)))


# --------------------------------------------------------------------------------- fidelity

class Fidelity:
    """Label-free fidelity of candidates vs FP32. Per category: its validation normals plus the
    same images with a seeded square of N(0,1) noise pasted in (a synthetic defect: normals
    alone score alike, so their order and maps are mostly noise); plus N(0,1) inputs, judged on
    decision agreement only (their order and maps carry no structure)."""

    def __init__(self, baseline: Baseline, fp32: onnx.ModelProto, budget, threads: int, predictor=None):
        self.baseline, self.budget, self.threads = baseline, budget, threads
        self.predictor = predictor  # candidates run on the target runtime; the reference is ORT FP32
        rng = np.random.default_rng(baseline.recipe.seed)
        self.images, self.normals = {}, {}
        for cat, x in val_images(baseline).items():
            idx = np.unique(np.linspace(0, len(x) - 1, min(len(x), budget.val_images)).round().astype(int))
            self.normals[cat] = len(idx)
            self.images[cat] = np.concatenate([x[idx], _paste_noise(x[idx], rng)])
        if not self.images:
            raise UadcError("precision auto measures fidelity on validation normals and this recipe has none "
                            "(set data.val_fraction > 0 or data.val)")
        if budget.random_images:
            size = baseline.size
            self.images[RANDOM] = rng.standard_normal((budget.random_images, 3, size, size), dtype=np.float32)
        self.probe = {c: _probe_index(len(x), self.normals.get(c), budget.sensitivity_images)
                      for c, x in self.images.items()}
        self.ref = outputs_on(fp32, self.images, threads, 8, "auto fp32")
        src = self.normals
        # per category: the FP32 normals' score mean and spread, to pool categories for ranking
        self.standard = {c: (float(self.ref[c][1][:n].mean()), max(float(self.ref[c][1][:n].std()), 1e-12))
                         for c, n in src.items()}
        cats = np.concatenate([[c] * n for c, n in src.items()])  # thresholds from normals, label-free
        self.thresholds = reference_thresholds(np.concatenate([self.ref[c][1][:n] for c, n in src.items()]),
                                               np.concatenate([self.ref[c][0][:n] for c, n in src.items()]), cats,
                                               baseline.recipe.deploy.false_alarm_rate,
                                               baseline.recipe.deploy.threshold_margin)

    def measure(self, model: onnx.ModelProto, probe: bool = False) -> dict[str, float]:
        """Each budget figure's minimum over the sets that judge it; ``probe``: on the probe
        subset only (ranking units of groups by cost: up to ``SENSITIVITY_UNITS`` models scored)."""
        pick = (lambda c, a: a[self.probe[c]]) if probe else (lambda c, a: a)  # noqa: E731
        out = outputs_on(model, {c: pick(c, x) for c, x in self.images.items()}, self.threads, 8, "auto candidate",
                         self.predictor)
        ref = {c: tuple(pick(c, a) for a in r) for c, r in self.ref.items()}
        cats = np.concatenate([[c] * len(ref[c][1]) for c in self.images])
        cat = lambda d, k: np.concatenate([d[c][k] for c in self.images])  # noqa: E731
        fig = figures(cat(ref, 1), cat(ref, 0), cat(out, 1), cat(out, 0), cats, self.thresholds)["categories"]
        judged = {k: [fig[c][k] for c in self.images if c != RANDOM or k == "decision_agreement"] for k in BUDGET}
        judged["spearman"] = [fig[c]["spearman"] for c in self.rank_sets(ref)] + [self._pooled_spearman(ref, out)]
        return {k: round(min(v), 6) for k, v in judged.items()}

    def rank_sets(self, ref: dict | None = None) -> list[str]:
        """Categories with enough images to rank on their own (the rest count in the pool only)."""
        ref = ref or self.ref
        return [c for c in self.normals if len(ref[c][1]) >= self.budget.rank_min_images]

    def _pooled_spearman(self, ref: dict, out: dict) -> float:
        """Rank correlation over every category's images, each category's scores (both sides)
        standardised by its FP32 normals, so a category ranks against all the others."""
        z = lambda d: np.concatenate([(d[c][1] - m) / s for c, (m, s) in self.standard.items()])  # noqa: E731
        return spearman(z(ref), z(out))

    def passes(self, fig: dict[str, float]) -> bool:
        return all(fig[k] >= getattr(self.budget, attr) for k, attr in BUDGET.items())


def _probe_index(n: int, normals: int | None, k: int) -> np.ndarray:
    """The first ``k`` normals and their pasted copies (images are [normals, pasted]), or the
    first ``k`` of a set without copies (N(0,1) inputs)."""
    if normals is None:
        return np.arange(min(k, n))
    first = np.arange(min(k, normals))
    return np.concatenate([first, first + normals])


def _paste_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Copies of ``x`` with one N(0,1) square (1/8 to 1/4 of the side) at a seeded place."""
    out = x.copy()
    size = x.shape[-1]
    for im in out:
        k = int(rng.integers(max(1, size // 8), max(2, size // 4 + 1)))
        i, j = rng.integers(0, size - k + 1, 2)
        im[:, i:i + k, j:j + k] = rng.standard_normal((im.shape[0], k, k))
    return out


def _figures_text(fig: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in fig.items())


def _loss(fig: dict[str, float]) -> float:
    """Budget-independent fidelity cost (0: identical to FP32): the summed shortfalls from 1."""
    return round(sum(max(0.0, 1.0 - fig[k]) for k in BUDGET), 6)


# ----------------------------------------------------------------------------------- search

class _Search:
    def __init__(self, baseline: Baseline, target: Target, fp32: onnx.ModelProto, ptq: PtqSettings,
                 passes: list[str], threads: int, groups: list[Group], ranges: dict):
        self.fp32, self.passes, self.groups = fp32, passes, groups
        self.ctx = PassContext(target=target, ranges=ranges, per_channel=ptq.per_channel,
                               bank_images=baseline.bank_images, bank_runner=bank_runner(target, threads))
        self.budget = baseline.recipe.compile.auto
        predictor = target_predictor(target, threads)
        self.fidelity_runtime = f"openvino CPU ({target.inference_hint})" if predictor else "onnxruntime CPU"
        self.fid = Fidelity(baseline, fp32, self.budget, threads, predictor)
        self.models: dict[frozenset[int], onnx.ModelProto] = {}
        # ONNX Runtime runs the FP32 model as the reference; another runtime (OpenVINO, bf16) is measured
        self.figs: dict[frozenset[int], dict] = {} if predictor else {frozenset(): {k: 1.0 for k in BUDGET}}

    def nodes(self, int8: frozenset[int]) -> list[str]:
        return [n for gi in sorted(int8) for n in self.groups[gi].nodes]

    def model(self, int8: frozenset[int]) -> onnx.ModelProto:
        if not int8:  # bf16 float layers: the image kNN's bank is described at that precision too
            return self.fp32 if self.ctx.target.float_precision == "fp32" else \
                run_passes(self.fp32, ["knn_bank"], self.ctx)[0]
        if int8 not in self.models:
            parts = sorted({self.groups[gi].partition for gi in int8})
            ctx = replace(self.ctx, quantize_partitions=parts, quantize_nodes=self.nodes(int8))
            self.models[int8] = run_passes(self.fp32, self.passes, ctx)[0]
            # later candidates take these weights' scales as ORT computed them here (the same numbers)
            known = self.ctx.weight_params or {}
            self.ctx = replace(self.ctx, weight_params=known | weight_quant_params(self.models[int8]))
        return self.models[int8]

    def fidelity(self, int8: frozenset[int]) -> dict:
        if int8 not in self.figs:
            self.figs[int8] = self.fid.measure(self.model(int8))
            self.models.pop(int8, None)  # only the figures are needed again
        return self.figs[int8]

    def probe(self, int8: frozenset[int]) -> dict:
        """Fidelity on the probe subset (never cached with, or taken for, the full figures)."""
        fig = self.fid.measure(self.model(int8), probe=True)
        self.models.pop(int8, None)
        return fig


def search_precision(baseline: Baseline, target: Target, fp32: onnx.ModelProto, ptq: PtqSettings,
                     passes: list[str], threads: int, calibration=None, timing_cache: Path | None = None
                     ) -> AutoPrecision:
    """The assignment (see the module docstring); ``ptq.quantize``: the candidate partitions;
    ``timing_cache``: a folder that keeps the profiles for reruns (``cached_node_times``)."""
    check_supported(target)
    t0 = time.time()
    images = baseline.calibration_images(ptq.calib_data, ptq.calib_samples, calibration)
    ranges = calibrate_ranges(fp32, images, ptq, target)
    groups = fused_groups(fp32, list(ptq.quantize))
    if not groups:
        raise UadcError(f"precision auto: no quantizable nodes in {', '.join(ptq.quantize)}")
    s = _Search(baseline, target, fp32, ptq, passes, threads, groups, ranges)
    if not s.fid.passes(s.fidelity(frozenset())):
        raise UadcError(f"precision auto: {target.name} with no layer quantized already breaks the fidelity "
                        f"budget ({_figures_text(s.figs[frozenset()])}; float layers in {target.float_precision}); "
                        f"compile a target with fp32 float layers instead")
    everything = frozenset(range(len(groups)))
    feeds = {INPUT_NAME: baseline.sample_feeds(1, 1)[0][INPUT_NAME]}
    runs = s.budget.profile_runs
    models = [fp32, s.model(everything)]
    if timing_cache is not None:  # a rerun reuses the profiles: the same speed decisions
        (prof32, prof8), cache = cached_node_times(timing_cache, models, feeds, threads, runs, measure=node_times)
    else:
        (prof32, prof8), cache = node_times(models, feeds, threads, runs), None
    t32, rest32, _ = _group_times(prof32, fp32, groups)
    t8, rest8, qdq = _group_times(prof8, fp32, groups)
    cm = CostModel(t32, t8, rest32, rest8, Boundaries(fp32, groups), s.budget.min_saving, qdq)
    faster = cm.faster()
    fastest = cm.fastest([grp.partition for grp in groups])
    steps = [_step("fastest", fastest, cm, s.fidelity(fastest))]
    final, sens, over_budget = fastest, {}, frozenset()
    if not s.fid.passes(s.figs[fastest]):
        order, sens = _revert_order(s, fastest)
        final = _bisect(s, cm, fastest, order, steps)
        over_budget = fastest - final
        settled = cm.settle(final, allow_int8=False)
        if settled != final:
            steps.append(_step("islands reverted", settled, cm, s.fidelity(settled)))
            if s.fid.passes(s.figs[settled]):
                final = settled
    if final and cm.cost(final) > cm.cost(frozenset()) - MIN_SAVING_US:  # nothing that fits the budget pays
        final = frozenset()
        steps.append(_step("all fp32 (faster than what fits the budget)", final, cm, s.fidelity(final)))
    reasons = [_reason(gi, faster, fastest, over_budget, final) for gi in range(len(groups))]
    record = _record(s, cm, final, sens, steps, reasons)
    record["profile"]["timing_cache"] = cache
    record["seconds"] = round(time.time() - t0, 2)
    log.info("precision auto: %d of %d groups INT8 (%.1f s)", len(final), len(groups), record["seconds"])
    parts = sorted({groups[gi].partition for gi in final}, key=PARTITIONS.index)
    return AutoPrecision(s.nodes(final), parts, ranges, replace(ptq, quantize=tuple(parts)), record)


def _units(groups: list[Group], int8: frozenset[int], most: int = SENSITIVITY_UNITS) -> list[list[int]]:
    """``int8`` in graph order as runs of consecutive groups of one partition, cut into at most
    about ``most`` units of equal size (one EfficientNet block is ~3 groups)."""
    order = sorted(int8)
    size = max(1, -(-len(order) // most))
    units: list[list[int]] = []
    for gi in order:
        last = units[-1] if units else None
        if last and len(last) < size and last[-1] == gi - 1 and groups[last[-1]].partition == groups[gi].partition:
            last.append(gi)
        else:
            units.append([gi])
    return units


def _revert_order(s: _Search, fastest: frozenset[int]) -> tuple[list[int], dict[int, float]]:
    """INT8 groups by the fidelity cost of their unit (only it quantized, on the probe subset),
    highest first (graph order breaks ties). Units, not single groups, keep the number of models
    built and scored small. Only fidelity, which reruns reproduce exactly, orders them: dividing
    by the µs each saves would let timing noise reorder close groups and change the assignment."""
    sens: dict[int, float] = {}
    for unit in progress(_units(s.groups, fastest), desc="precision auto: sensitivity", unit="unit"):
        cost = _loss(s.probe(frozenset(unit)))
        sens.update({gi: cost for gi in unit})
    return sorted(fastest, key=lambda gi: (-sens[gi], gi)), sens


def _bisect(s: _Search, cm: CostModel, fastest: frozenset[int], order: list[int], steps: list[dict]) -> frozenset[int]:
    """The fewest groups of ``order`` (a prefix) reverted to FP32 that meet the budget; all
    reverted (FP32) always does."""
    lo, hi = 0, len(order)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cand = fastest - set(order[:mid])
        fig = s.fidelity(cand)
        steps.append(_step(f"revert {mid}", cand, cm, fig))
        if s.fid.passes(fig):
            hi = mid
        else:
            lo = mid
    return fastest - set(order[:hi])


def _step(name: str, int8: frozenset[int], cm: CostModel, fig: dict) -> dict:
    return {"step": name, "int8_groups": len(int8), "predicted_us": round(cm.cost(int8), 1), "fidelity": fig}


def _reason(gi: int, faster: frozenset[int], fastest: frozenset[int], over_budget: frozenset[int],
            final: frozenset[int]) -> str:
    if gi in final:
        return "faster" if gi in faster else "avoids Q/DQ around it"
    if gi in over_budget:
        return "fidelity budget"
    if gi in fastest:
        return "Q/DQ cost more once neighbours went FP32"
    return "not faster" if gi not in faster else "Q/DQ would cost more"


def _record(s: _Search, cm: CostModel, final: frozenset[int], sens: dict, steps: list[dict],
            reasons: list[str]) -> dict:
    b = s.budget
    fig = s.fidelity(final)
    return {
        "budget": {k: getattr(b, a) for k, a in BUDGET.items()},
        "candidates": sorted({g.partition for g in s.groups}, key=PARTITIONS.index),
        "images": {c: {"normals": n, "pasted": n} for c, n in s.fid.normals.items()}
        | ({RANDOM: int(len(s.fid.images[RANDOM]))} if RANDOM in s.fid.images else {}),
        "sensitivity_images": {c: int(len(i)) for c, i in s.fid.probe.items()},
        "rank_sets": s.fid.rank_sets(),  # ranked on their own; every category also counts in the pooled rank
        "rank_min_images": b.rank_min_images,
        "fidelity_runtime": s.fidelity_runtime,  # candidates run there; speed is ORT's profile either way
        "profile": {"batch": 1, "runs": b.profile_runs, "min_saving": b.min_saving,
                    "qdq_us_per_node": round(cm.per_node, 2), "qdq_ns_per_element": round(1000 * cm.per_element, 4),
                    "crossing_scale": round(cm.scale, 3), "other_fp32_us": round(cm.rest32, 1),
                    "fp32_us": round(cm.cost(frozenset()), 1), "all_int8_us": round(cm.cost(cm.all), 1)},
        "groups": [{"name": grp.name, "partition": grp.partition, "op": grp.op, "nodes": len(grp.nodes),
                    "precision": "int8" if gi in final else "fp32", "fp32_us": round(float(cm.t32[gi]), 1),
                    "int8_us": round(float(cm.t8[gi]), 1), "fidelity_cost": sens.get(gi),
                    "reason": reasons[gi]} for gi, grp in enumerate(s.groups)],
        "steps": steps,
        "final": {"int8_groups": len(final), "fp32_groups": len(s.groups) - len(final),
                  "predicted_us": round(cm.cost(final), 1), "qdq_us": round(cm._crossing(final, cm.scale), 1),
                  "fidelity": fig, "within_budget": s.fid.passes(fig)},
    }
