"""The search machinery of ``compile.precision: auto``, shared by every runtime's speed model
(``uadc.pipeline.precision``: ONNX Runtime's profile; ``uadc.pipeline.precision_trt``: TensorRT's
cost model): the linear cost model of an assignment, the label-free fidelity of a candidate, and
the sensitivity ordering and bisection that bring the fastest assignment within the budget."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import onnx

from uadc.backends.ort_profile import NodeTime
from uadc.core.errors import NonFiniteOutputs, RuntimeFault, UadcError
from uadc.core.manifest import NO_VALIDATION_ADVICE
from uadc.core.progress import progress
from uadc.passes.groups import Boundaries, Group
from uadc.pipeline.baseline import Baseline
from uadc.pipeline.deploy import outputs_on, val_images
from uadc.verify.fidelity import figures, reference_thresholds, spearman

log = logging.getLogger(__name__)
MIN_SAVING_US = 2.0
BUDGET = {"spearman": "spearman_min", "decision_agreement": "decision_agreement_min",
          "top1_overlap": "top1_overlap_min"}
RANDOM = "random-normal"
WORST = {"spearman": -1.0, "decision_agreement": 0.0, "top1_overlap": 0.0}  # a candidate with NaN/Inf outputs
SENSITIVITY_UNITS = 40  # models built and scored to rank the INT8 groups (keeps 128 px within ~2 min)

def fit_qdq(qdq: list[NodeTime]) -> tuple[float, float]:
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
    """Predicted model time (µs) of an assignment: group times plus priced crossings. ``t32``: each
    group's time in the higher precision, ``t8`` in the lower (FP16 vs FP32 in TensorRT's float
    stage). Profiled (ORT): a crossing costs a fitted Q/DQ node, and what else the all-INT8 model
    spends outside the groups (layout transposes at the ends of INT8 chains) scales its price.
    Modelled (TensorRT): ``prices`` (µs per crossing, per element) as given, and ``floor_us`` as
    the smallest saving that counts (no timing noise to guard against)."""

    def __init__(self, t32: np.ndarray, t8: np.ndarray, rest32: float, rest8: float, bounds: Boundaries,
                 min_saving: float, qdq: list[NodeTime] = (), prices: tuple[float, float] | None = None,
                 floor_us: float = MIN_SAVING_US):
        self.t32, self.t8, self.rest32, self.bounds = t32, t8, rest32, bounds
        self.all = frozenset(range(len(t32)))
        self.per_node, self.per_element = prices if prices is not None else fit_qdq(list(qdq))
        fitted = self._crossing(self.all, 1.0)
        self.scale = max(1.0, (rest8 - rest32) / fitted) if fitted > 0 and prices is None else 1.0
        self.floor = floor_us
        self.margin = np.maximum(floor_us, min_saving * t32)

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

def _standards(normal_scores: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per category: its FP32 normals' score mean and spread, to pool categories for ranking. A
    category whose normals have no spread (one normal) takes the others' pooled spread: 1e-12 made its
    noise copies' z about 1e11, so any score change moved it and the pooled rank correlation failed
    every candidate (precision auto quantized nothing, blaming the fidelity budget)."""
    means = {c: float(v.mean()) for c, v in normal_scores.items()}
    tiny = 1e-6 * (1.0 + max(abs(m) for m in means.values()))   # float32 rounding of equal scores, not a spread
    own = {c: float(v.std()) if float(v.std()) > tiny else None for c, v in normal_scores.items()}
    spreads = [sd for sd in own.values() if sd is not None]
    between = float(np.std(list(means.values())))   # no category has a spread: the categories' own differences
    pooled = float(np.sqrt(np.mean(np.square(spreads)))) if spreads else between if between > tiny else 1.0
    return {c: (means[c], own[c] or pooled) for c in normal_scores}


def _tied_alike(ref: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``out`` with the images the reference scores exactly alike given their mean: their order
    carries no information, and a candidate cannot be faithful to it (one-normal categories' normals
    all sit at z = 0, and any change of score broke that tie: 0.949 for every candidate)."""
    values, inverse, counts = np.unique(ref, return_inverse=True, return_counts=True)
    if counts.max(initial=1) < 2:
        return ref, out
    means = np.bincount(inverse, weights=out) / counts
    tied = counts[inverse] > 1
    return ref, np.where(tied, means[inverse], out)


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
            raise UadcError(f"precision auto measures fidelity on validation normals and this recipe has none: "
                            f"{NO_VALIDATION_ADVICE}")
        if budget.random_images:
            size = baseline.size
            self.images[RANDOM] = rng.standard_normal((budget.random_images, 3, size, size), dtype=np.float32)
        self.probe = {c: _probe_index(len(x), self.normals.get(c), budget.sensitivity_images)
                      for c, x in self.images.items()}
        self.ref = outputs_on(fp32, self.images, threads, 8, "auto fp32")
        src = self.normals
        self.standard = _standards({c: self.ref[c][1][:n] for c, n in src.items()})
        cats = np.concatenate([[c] * n for c, n in src.items()])  # thresholds from normals, label-free
        self.thresholds = reference_thresholds(np.concatenate([self.ref[c][1][:n] for c, n in src.items()]),
                                               np.concatenate([self.ref[c][0][:n] for c, n in src.items()]), cats,
                                               baseline.recipe.deploy.false_alarm_rate,
                                               baseline.recipe.deploy.threshold_margin)

    def measure(self, model: onnx.ModelProto, probe: bool = False) -> dict[str, float]:
        """Each budget figure's minimum over the sets that judge it; ``probe``: on the probe
        subset only (ranking units of groups by cost: up to ``SENSITIVITY_UNITS`` models scored)."""
        pick = (lambda c, a: a[self.probe[c]]) if probe else (lambda c, a: a)  # noqa: E731
        try:
            out = outputs_on(model, {c: pick(c, x) for c, x in self.images.items()}, self.threads, 8,
                             "auto candidate", self.predictor)
        except NonFiniteOutputs:  # a runtime's INT8 kernel overflowed: as unfaithful as a candidate can be
            return dict(WORST)
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
        return spearman(*_tied_alike(z(ref), z(out)))

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


def figures_text(fig: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in fig.items())


def loss(fig: dict[str, float]) -> float:
    """Budget-independent fidelity cost (0: identical to FP32): the summed shortfalls from 1."""
    return round(sum(max(0.0, 1.0 - fig[k]) for k in BUDGET), 6)


class Candidates:
    """Assignments of ``groups`` (a set of group indices in the lower precision) built as models
    and measured by ``fid``; subclasses say how a model is built (``model``)."""

    groups: list[Group]
    fid: Fidelity
    models: dict[frozenset[int], onnx.ModelProto]
    figs: dict[frozenset[int], dict]
    low_key = "int8_groups"  # what the lower precision's count is called in the recorded steps

    def nodes(self, low: frozenset[int]) -> list[str]:
        return [n for gi in sorted(low) for n in self.groups[gi].nodes]

    def model(self, low: frozenset[int]) -> onnx.ModelProto:
        raise NotImplementedError

    def fidelity(self, low: frozenset[int]) -> dict:
        if low not in self.figs:
            self.figs[low] = self._measured(low, False)
            self.models.pop(low, None)  # only the figures are needed again
        return self.figs[low]

    def probe_model(self, low: frozenset[int]) -> onnx.ModelProto:
        """The model a probe scores (by default the candidate's own)."""
        return self.model(low)

    def probe(self, low: frozenset[int]) -> dict:
        """Fidelity on the probe subset (never cached with, or taken for, the full figures)."""
        fig = self._measured(low, True)
        self.models.pop(low, None)
        return fig

    @property
    def faults(self) -> list[str]:
        """What the target runtime said of the candidates it could not build or run."""
        return self.__dict__.setdefault("_faults", [])

    def _measured(self, low: frozenset[int], probe: bool) -> dict:
        """A candidate the target runtime cannot build or run (``RuntimeFault``) is as unfaithful as a
        candidate can be; what the runtime said is kept for the report (``faults``)."""
        try:
            return self.fid.measure(self.probe_model(low) if probe else self.model(low), probe=probe)
        except RuntimeFault as exc:
            self.faults.append(f"{len(low)} {self.low_key}: {exc}")
            log.warning("precision auto: a candidate with %d groups low failed on the target runtime (%s)", len(low), exc)
            return dict(WORST)


def units(groups: list[Group], int8: frozenset[int], most: int = SENSITIVITY_UNITS) -> list[list[int]]:
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


def revert_order(s: Candidates, fastest: frozenset[int]) -> tuple[list[int], dict[int, float]]:
    """INT8 groups by the fidelity cost of their unit (only it quantized, on the probe subset),
    highest first (graph order breaks ties). Units, not single groups, keep the number of models
    built and scored small. Only fidelity, which reruns reproduce exactly, orders them: dividing
    by the µs each saves would let timing noise reorder close groups and change the assignment."""
    sens: dict[int, float] = {}
    for unit in progress(units(s.groups, fastest), desc="precision auto: sensitivity", unit="unit"):
        cost = loss(s.probe(frozenset(unit)))
        sens.update({gi: cost for gi in unit})
    return sorted(fastest, key=lambda gi: (-sens[gi], gi)), sens


def bisect(s: Candidates, cm: CostModel, fastest: frozenset[int], order: list[int], steps: list[dict]) -> frozenset[int]:
    """The fewest groups of ``order`` (a prefix) reverted to FP32 that meet the budget; all
    reverted (FP32) always does."""
    lo, hi = 0, len(order)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cand = fastest - set(order[:mid])
        fig = s.fidelity(cand)
        steps.append(step(f"revert {mid}", cand, cm, fig, s.low_key))
        if s.fid.passes(fig):
            hi = mid
        else:
            lo = mid
    final = fastest - set(order[:hi])
    if hi == len(order):   # none fewer fits: the table ended at a step over budget, the final one unrecorded
        steps.append(step(f"revert {hi} (every INT8 group: none fewer fits the budget)", final, cm, s.fidelity(final),
                          s.low_key))
    return final


def step(name: str, int8: frozenset[int], cm: CostModel, fig: dict, key: str = "int8_groups") -> dict:
    return {"step": name, key: len(int8), "predicted_us": round(cm.cost(int8), 1), "fidelity": fig}
