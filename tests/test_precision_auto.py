"""``compile.precision: auto``: per fused group INT8 or FP32 from ORT profiles and label-free
fidelity, within the recipe's ``compile.auto`` budget; every decision recorded in the report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import uadc
from conftest import fake_profile
from uadc.backends.ort_profile import NodeTime, node_times
from uadc.config.targets import get_target
from uadc.core.constants import INPUT_NAME, QDQ_OPS
from uadc.core.errors import UadcError
from uadc.passes.groups import fused_groups
from uadc.pipeline import precision as P
from uadc.pipeline import precision_search as S
from uadc.pipeline.compile import CompileOptions

LOOSE = {"spearman_min": -1.0, "decision_agreement_min": 0.0, "top1_overlap_min": 0.0}
STRICT = {"spearman_min": 1.0, "decision_agreement_min": 1.0, "top1_overlap_min": 1.0}
SMALL = {"val_images": 4, "random_images": 4, "profile_runs": 3}


@pytest.fixture(scope="module")
def make_base(tmp_path_factory, tiny_data):
    """Baselines of one model (pretrained teacher, untrained student) under budget overrides."""
    from conftest import write_recipe
    from uadc.config.recipe import load_recipe
    from uadc.models import build_model
    d = tmp_path_factory.mktemp("auto")
    recipe = load_recipe(write_recipe(d / "tiny.yaml", tiny_data, train={"threads": 1},
                                      data={"val_fraction": 0.25}))
    torch.manual_seed(0)   # the untrained student's weights: the same whatever ran before
    model = build_model(recipe.cfg["model"], recipe.data.image_size)
    cache = {}

    def make(**auto):  # one baseline (one export) per budget
        key = tuple(sorted(auto.items()))
        if key not in cache:
            cache[key] = uadc.baseline(model, recipe.with_overrides(compile={"auto": {**SMALL, **auto}}), threads=1)
        return cache[key]
    return make


def _search(base, timing_cache=None):
    target = get_target("ort-cpu-int8")
    ptq = P.auto_candidates(base, target, CompileOptions(target=target.name, precision="auto"))
    return P.search_precision(base, target, base.fp32, ptq, ["qdq", "partition_check", "cleanup"], 1,
                              timing_cache=timing_cache)


def test_timing_cache_makes_a_rerun_reuse_the_profile(make_base, monkeypatch, tmp_path):
    """A rerun must not re-decide speed from a new, noisy profile: the first profile is kept (keyed
    by the models and settings) and reused; other models are profiled anew."""
    calls = []

    def noisy(models, feeds, threads, runs=20, warmup=5):  # a profile that differs on every call
        calls.append(1)
        return [[NodeTime(t.name, t.op, t.us * (1 + 0.5 * len(calls)), t.out_bytes) for t in ts]
                for ts in fake_profile(models, feeds, threads, runs, warmup)]
    monkeypatch.setattr(P, "node_times", noisy)
    base = make_base(spearman_min=0.999, top1_overlap_min=0.95)
    a, b = _search(base, tmp_path / "tc"), _search(base, tmp_path / "tc")
    assert len(calls) == 1 and a.nodes == b.nodes
    assert a.record["profile"]["timing_cache"]["hit"] is False and b.record["profile"]["timing_cache"]["hit"] is True
    assert [g["fp32_us"] for g in a.record["groups"]] == [g["fp32_us"] for g in b.record["groups"]]
    cache_file = tmp_path / "tc" / a.record["profile"]["timing_cache"]["file"]
    cache_file.write_text("{not json")            # a damaged entry is measured again, not an error
    _search(base, tmp_path / "tc")
    assert len(calls) == 2
    key = json.loads(cache_file.read_text())["key"]
    for times in ([], [[]], "x", [[{"name": "n", "op": "Conv", "us": "fast"}]]):   # cut short or edited: decided on
        cache_file.write_text(json.dumps({"key": key, "times": times}))             # no profile, taken as a hit
        assert _search(base, tmp_path / "tc").record["profile"]["timing_cache"]["hit"] is False
    assert len(calls) == 6
    assert _search(base).record["profile"]["timing_cache"] is None and len(calls) == 7
    # another fidelity budget is another recipe hash in the models' metadata, not another graph: the same profile
    # (each edit of compile.auto profiled anew, and its decisions could not be told from timing noise)
    other = make_base(spearman_min=0.99, top1_overlap_min=0.95)
    assert other.fp32.metadata_props != base.fp32.metadata_props
    assert _search(other, tmp_path / "tc").record["profile"]["timing_cache"]["hit"] is True and len(calls) == 7


def test_profile_runs_at_the_recipes_profile_batch(make_base, monkeypatch, tmp_path):
    """A line that runs batch 8 is timed at batch 8 (``compile.auto.profile_batch``): the profiler gets that
    many images (test images repeated where there are fewer), the record says so, and the timing cache does
    not serve a batch-1 profile for it."""
    batches = []

    def spy(models, feeds, threads, runs=20, warmup=5):
        batches.append(len(feeds[INPUT_NAME]))
        return fake_profile(models, feeds, threads, runs, warmup)
    monkeypatch.setattr(P, "node_times", spy)
    one = _search(make_base(), tmp_path / "tc")
    base = make_base(profile_batch=40)
    assert len(base.sample_feeds(1, 40)[0][INPUT_NAME]) < 40
    two = _search(base, tmp_path / "tc")
    assert batches == [1, 40]
    assert one.record["profile"]["batch"] == 1 and two.record["profile"]["batch"] == 40
    assert two.record["profile"]["timing_cache"]["hit"] is False


def test_recipe_validates_the_auto_fields(tmp_path, tiny_data):
    from conftest import write_recipe
    from uadc.config.recipe import load_recipe
    r = load_recipe(write_recipe(tmp_path / "a.yaml", tiny_data, compile={"precision": "auto",
                                                                            "auto": {"spearman_min": 0.95}}))
    assert r.compile.precision == "auto" and r.compile.auto.spearman_min == 0.95
    assert load_recipe(write_recipe(tmp_path / "b.yaml", tiny_data)).compile.precision == "target"  # default
    for bad, msg in [({"precision": "fast"}, r"compile\.precision: 'fast' is not one of target, auto"),
                     ({"auto": {"top1_overlap_min": 1.5}}, r"compile\.auto\.top1_overlap_min: 1\.5 is above"),
                     ({"auto": {"profile_runs": 1}}, r"compile\.auto\.profile_runs: 1 is below"),
                     ({"auto": {"profile_batch": 0}}, r"compile\.auto\.profile_batch: 0 is below"),
                     ({"auto": {"budget": 1}}, r"compile\.auto\.budget: unknown key")]:
        with pytest.raises(UadcError, match=msg):
            load_recipe(write_recipe(tmp_path / "bad.yaml", tiny_data, compile=bad))


@pytest.mark.parametrize("target", ["ort-cpu-fp32", "openvino-cpu-bf16", "trt-fp16"])
def test_unsupported_target_is_a_one_line_error(make_base, tmp_path, target):
    with pytest.raises(UadcError, match=f"precision auto is not supported for target {target}") as e:
        uadc.compile(make_base(), target, precision="auto", out=tmp_path / "x", evaluate=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()  # refused before any work


def test_recipe_auto_is_a_default_that_other_targets_and_qat_skip(make_base):
    """The recipe's ``precision: auto`` searches only where it can; the other targets and a QAT
    model compile at the target's precision (one recipe serves every target), while
    ``--precision auto`` on them is refused (above). Sweep cells resolve it the same way."""
    from uadc.config.settings import auto_applies
    from uadc.pipeline.sweep.plan import _cells, Model
    from uadc.pipeline.sweep.spec import Axes
    for name, explicit, qat, want in [("ort-cpu-int8", False, False, True), ("ort-cpu-int8", False, True, False),
                                      ("jetson-int8", False, False, False), ("ort-cpu-fp32", False, False, False),
                                      ("jetson-int8", True, False, True), ("ort-cpu-int8", True, True, True),
                                      ("openvino-cpu-int8", False, False, True),
                                      ("openvino-cpu-int8-bf16", False, False, True),
                                      ("openvino-cpu-bf16", False, False, False)]:
        assert auto_applies("auto", get_target(name), explicit, qat) is want, (name, explicit, qat)
    assert not auto_applies("target", get_target("ort-cpu-int8"), True)
    base = make_base()
    auto_recipe = base.recipe.with_overrides(compile={"precision": "auto"})
    opts = CompileOptions(target="jetson-int8")
    assert P.auto_candidates(base, get_target("jetson-int8"), opts) is None  # recipe says target
    model = Model("k", auto_recipe.name, auto_recipe.cfg, None)
    cells = {c.options["target"]: c.options for c in _cells(Axes(target=["ort-cpu-int8", "jetson-int8",
                                                                         "ort-cpu-fp32"]), model, {})}
    assert cells["ort-cpu-int8"]["precision"] == "auto" and cells["ort-cpu-int8"]["quantize"] is None
    assert cells["jetson-int8"]["precision"] == "target" and cells["jetson-int8"]["quantize"] == ["student"]
    assert cells["ort-cpu-fp32"]["precision"] == "target"
    pinned = _cells(Axes(target=["ort-cpu-int8"], precision=["target"]), model, {})[0].options
    assert pinned["precision"] == "target" and pinned["quantize"] == ["student"]


def test_real_profile_maps_time_to_groups(make_base):
    base = make_base()
    fp32 = base.fp32
    groups = fused_groups(fp32, ["teacher", "student", "head"])
    assert any(g.op.endswith("dw + Clip") for g in groups) and any(g.op == "Conv 1x1 + Clip" for g in groups)
    s = P._Search(base, get_target("ort-cpu-int8"), fp32, P.auto_candidates(
        base, get_target("ort-cpu-int8"), CompileOptions("ort-cpu-int8", precision="auto")),
        ["qdq", "partition_check", "cleanup"], 1, groups, _ranges(base))
    feeds = base.sample_feeds(1, 1)[0]
    p32, p8 = node_times([fp32, s.model(frozenset(range(len(groups))))], feeds, 1, runs=3, warmup=1)
    t32, _, _ = P._group_times(p32, fp32, groups)
    t8, _, qdq = P._group_times(p8, fp32, groups)
    convs = [i for i, g in enumerate(groups) if g.op.startswith("Conv") and g.partition != "head"]
    assert (t32[convs] > 0).mean() > 0.9 and (t8[convs] > 0).mean() > 0.9  # ORT's renamed nodes map back
    assert qdq and all(t.op in QDQ_OPS for t in qdq)


def _ranges(base):
    from uadc.quant.calibrate import calibrate_ranges
    target = get_target("ort-cpu-int8")
    ptq = P.auto_candidates(base, target, CompileOptions(target.name, precision="auto"))
    return calibrate_ranges(base.fp32, base.calibration_images(ptq.calib_data, ptq.calib_samples), ptq, target)


def test_search_is_deterministic_and_records_every_group(make_base, monkeypatch):
    monkeypatch.setattr(P, "node_times", fake_profile)
    base = make_base(spearman_min=0.999, top1_overlap_min=0.95)
    a, b = _search(base), _search(base)
    assert a.nodes == b.nodes and a.partitions == b.partitions
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert strip(a.record) == strip(b.record)
    groups = fused_groups(base.fp32, ["teacher", "student", "head"])
    rec = a.record
    assert [g["name"] for g in rec["groups"]] == [g.name for g in groups]
    for g in rec["groups"]:
        assert g["precision"] in ("int8", "fp32") and g["reason"] and g["fp32_us"] >= 0 and g["int8_us"] >= 0
    chosen = {n for g, grp in zip(rec["groups"], groups) if g["precision"] == "int8" for n in grp.nodes}
    assert chosen == set(a.nodes)
    assert rec["final"]["within_budget"] and rec["steps"][0]["step"] == "fastest"
    assert S.Fidelity(base, base.fp32, base.recipe.compile.auto, 1).passes(rec["final"]["fidelity"])


def test_stricter_budget_keeps_more_groups_fp32(make_base, monkeypatch):
    monkeypatch.setattr(P, "node_times", fake_profile)
    loose, strict = _search(make_base(**LOOSE)), _search(make_base(**STRICT))
    n_loose, n_strict = loose.record["final"]["int8_groups"], strict.record["final"]["int8_groups"]
    assert n_loose > 0 and len(loose.record["steps"]) == 1  # the fastest assignment fits a loose budget
    assert n_strict < n_loose
    assert any(g["reason"] == "fidelity budget" for g in strict.record["groups"])
    assert all(g["fidelity_cost"] is not None for g, h in zip(strict.record["groups"], loose.record["groups"])
               if h["precision"] == "int8")  # every INT8 group of the fastest assignment was measured


def test_compile_auto_quantizes_exactly_the_chosen_groups(make_base, tmp_path):
    base = make_base(**LOOSE)
    res = uadc.compile(base, "ort-cpu-int8", precision="auto", out=tmp_path / "auto", evaluate=False,
                       latency_runs=2, threads=1)
    rep = json.loads((tmp_path / "auto" / "report.json").read_text())
    ps = rep["precision_search"]
    assert ps == json.loads(json.dumps(res.extra["precision_search"]))
    md = (tmp_path / "auto" / "report.md").read_text()
    assert "## Precision search" in md and "and over every category pooled" in md
    assert ps["rank_sets"] == [] and ps["rank_min_images"] == 16  # 4 normals + 4 pasted per set: pooled only
    assert "precision_auto" in [p["name"] for p in rep["passes"]]  # the search counts as compile time
    model = onnx.load(str(tmp_path / "auto" / "model.onnx"))
    made_by = {o: n for n in model.graph.node for o in n.output}
    names = {n.name: n for n in model.graph.node}
    for g in ps["groups"]:
        node = names[g["name"]]
        if not node.op_type == "Conv":
            continue
        w = made_by.get(node.input[1])  # INT8 weights reach the Conv through a DequantizeLinear
        assert (w is not None and w.op_type == "DequantizeLinear") == (g["precision"] == "int8"), g
    assert ps["final"]["int8_groups"] == sum(g["precision"] == "int8" for g in ps["groups"])
    assert rep["quantized_partitions"] == sorted({g["partition"] for g in ps["groups"] if g["precision"] == "int8"},
                                                 key=["teacher", "student", "head"].index)
    assert np.isfinite(rep["latency_ms"]["compiled"]["p50"])


def test_calibration_images_from_a_generator_serve_the_search_and_the_compile(make_base, tmp_path, monkeypatch):
    """The search read the generator, and the compile after it found it empty: 'calibration: no images given'."""
    monkeypatch.setattr(P, "node_times", fake_profile)   # INT8 pays: the compile calibrates
    base = make_base(**LOOSE)
    rng = np.random.default_rng(0)
    images = (rng.standard_normal((3, base.size, base.size)).astype(np.float32) for _ in range(4))
    res = uadc.compile(base, "ort-cpu-int8", precision="auto", calibration=images, out=tmp_path / "gen",
                       evaluate=False, latency_runs=1, threads=1)
    cal = json.loads((res.path / "calibration.json").read_text())
    assert cal["calib_data"] == "user" and cal["samples"] == 4 == cal["distinct_samples"]


def test_cli_precision_option(make_base, tmp_path):
    from click.testing import CliRunner
    from uadc.cli import main
    from uadc.training.checkpoint import save_checkpoint
    base = make_base()
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", base.model, base.recipe, [], ["stripes", "gray"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(base.recipe.cfg))  # JSON is YAML
    res = CliRunner().invoke(main, ["compile", str(recipe), "--checkpoint", str(ckpt), "--target", "jetson-fp16",
                                    "--precision", "auto", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "error: precision auto is not supported for target jetson-fp16" in res.output
    res = CliRunner().invoke(main, ["compile", str(recipe), "--precision", "fastest"])
    assert res.exit_code == 2 and "'fastest' is not one of 'target', 'auto'" in res.output
    res = CliRunner().invoke(main, ["compile", str(recipe), "--checkpoint", str(ckpt), "--target", "ort-cpu-int8",
                                    "--precision", "auto", "--from-qat", "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and res.output.endswith(   # it said "no QAT model ...: run `uadc qat` first", then refused it
        "error: precision auto picks what to quantize itself; it does not combine with --from-qat\n"), res.output
    with pytest.raises(UadcError, match=r"^precision \(--precision\): '' is not one of target, auto$"):
        uadc.compile(base, "ort-cpu-int8", precision="", out=tmp_path / "z", evaluate=False)   # the recipe's ran


def test_needs_validation_normals(make_base):
    base = make_base()
    base = uadc.baseline(base.model, base.recipe.with_overrides(data={"val_fraction": 0.0}), threads=1)
    with pytest.raises(UadcError, match=r"this recipe has none: give data.val"):
        _search(base)


def test_sensitivity_units_are_runs_of_one_partition():
    """Groups are ranked in units: consecutive groups of one partition, at most ~``most`` units,
    so a 133-group model costs ~40 probe models, not 133."""
    from uadc.passes.groups import Group
    parts = ["teacher"] * 5 + ["student"] * 5 + ["head"]
    groups = [Group(f"g{i}", p, "Conv", (f"n{i}",), (i,)) for i, p in enumerate(parts)]
    units = S.units(groups, frozenset({0, 1, 2, 3, 4, 5, 6, 8, 9, 10}), most=4)
    assert units == [[0, 1, 2], [3, 4], [5, 6], [8, 9], [10]]   # size 3; partition and gaps cut a run
    assert all(len({groups[g].partition for g in u}) == 1 for u in units)
    assert S.units(groups, frozenset(range(11)), most=40) == [[i] for i in range(11)]
    assert sorted(g for u in S.units(groups, frozenset(range(11)), most=2) for g in u) == list(range(11))


def test_small_sets_rank_only_in_the_pool(make_base, monkeypatch):
    """One swap among a few images must not decide the search: a set under rank_min_images counts
    for the rank correlation only in the pool of every category (standardised per category)."""
    fids = {name: S.Fidelity(b, b.fp32, b.recipe.compile.auto, 1)
            for name, b in (("alone", make_base(rank_min_images=3)), ("pooled", make_base(rank_min_images=4096)))}
    cat = next(iter(fids["alone"].normals))
    assert fids["alone"].rank_sets() == list(fids["alone"].normals) and fids["pooled"].rank_sets() == []

    def swapped(ref):  # the reference's outputs with one category's two closest distinct scores swapped
        def run(model, images, *args, **kwargs):
            out = {c: (m.copy(), s.copy()) for c, (m, s) in ref.items() if c in images}
            s = out[cat][1]
            order = np.argsort(s)
            gaps = np.diff(s[order])
            gaps[gaps == 0] = np.inf     # tied scores (an image and its copy) would swap to the same ranks
            k = int(np.argmin(gaps))
            i, j = order[k], order[k + 1]
            s[[i, j]] = s[[j, i]]
            return out
        return run
    figs = {}
    for name, fid in fids.items():
        monkeypatch.setattr(S, "outputs_on", swapped(fid.ref))
        figs[name] = fid.measure(fid.baseline.fp32)
    assert figs["alone"]["spearman"] < figs["pooled"]["spearman"] < 1.0
    assert figs["alone"]["decision_agreement"] == figs["pooled"]["decision_agreement"]


def test_probe_index_takes_normals_with_their_pasted_copies():
    assert S._probe_index(10, 5, 2).tolist() == [0, 1, 5, 6]
    assert S._probe_index(4, None, 8).tolist() == [0, 1, 2, 3]   # N(0,1) inputs: no copies
    assert S._probe_index(6, 3, 8).tolist() == [0, 1, 2, 3, 4, 5]


def test_openvino_bf16_auto_judges_fidelity_on_openvino(make_base, tmp_path, monkeypatch):
    """On an OpenVINO target the search scores candidates on OpenVINO at the target's float
    precision: bf16 float layers spend budget too, and a budget they alone break is refused
    before any work. The artifact runs on OpenVINO in ``Detector`` (bf16, as compiled)."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (optional extra uadc[openvino])")
    from uadc.backends import openvino as ov
    from uadc.runtime import Detector
    monkeypatch.setattr(P, "node_times", fake_profile)
    base = make_base(**LOOSE)
    if ov.precision_here("bf16") != "bf16":
        pytest.skip("this CPU does not run bf16: a bf16 target is refused at compile")
    bf16_here = ov.inference_precision(ov.compile_model(base.fp32, 1, "bf16")) == "bf16"
    res = uadc.compile(base, "openvino-cpu-int8-bf16", precision="auto", out=tmp_path / "ov", evaluate=False,
                       latency_runs=2, threads=1)
    assert res.latency.runtime == ("openvino CPU (bf16)" if bf16_here
                                   else "openvino CPU (f32: this CPU does not run bf16)")
    ps = res.extra["precision_search"]
    assert ps["final"]["int8_groups"] > 0 and ps["final"]["within_budget"]
    # its float groups run in bf16 and say so (every one read fp32, and "N FP32" in the summary)
    assert {g["precision"] for g in ps["groups"]} <= {"int8", "bf16"}
    line = next(x for x in res.summary_lines() if x.startswith("precision auto:"))
    from uadc.report.markdown import float_counts
    assert f"groups INT8, {float_counts(ps)};" in line and "FP32" not in line
    if bf16_here:  # the float-only model is measured, not assumed equal to the FP32 reference
        s = P._Search(base, get_target("openvino-cpu-int8-bf16"), base.fp32, P.auto_candidates(
            base, get_target("openvino-cpu-int8-bf16"), CompileOptions("openvino-cpu-int8-bf16", precision="auto")),
            ["qdq", "partition_check", "cleanup"], 1, fused_groups(base.fp32, ["student"]), {})
        assert s.fidelity(frozenset())["spearman"] < 1.0
        s.model = lambda groups: base.fp32   # the fake profile times any model; no ranges to quantize with here
        assert P._ort_cost_model(s, base, base.fp32, 1, None)[2] == [{"float": "bf16"}] * len(s.groups)
        with pytest.raises(UadcError, match="with no layer quantized already breaks the fidelity budget") as e:
            uadc.compile(make_base(**STRICT), "openvino-cpu-int8-bf16", precision="auto", out=tmp_path / "x",
                         evaluate=False)
        assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
    det = Detector.load(tmp_path / "ov")
    assert det.backend_name == "openvino"
    assert Detector.load(tmp_path / "ov", backend="onnxruntime").backend_name == "onnxruntime"
    x = base.sample_feeds(1, 2)[0]["image"]
    maps, scores, _ = det.run(x)
    assert maps.shape == (2, base.size, base.size) and np.isfinite(scores).all()
    v = uadc.verify(tmp_path / "ov")  # on its own runtime too (the loose search's artifact need not pass)
    assert v.runtime["candidate"] == "openvino CPU (bf16)" and v.figures
    from bench import ab_latency
    with pytest.raises(UadcError, match="has no ort-cpu-fp32 artifact"):   # as a script: exit 2
        ab_latency.systems(tmp_path)
    uadc.compile(base, "ort-cpu-fp32", out=tmp_path / "ort-cpu-fp32", evaluate=False, latency_runs=2, threads=1)
    t = ab_latency.measure(tmp_path, batch=1, threads=1, cycles=2, runs=2, peers=True)
    assert list(t) == ["ort-cpu-fp32", "ov", ab_latency.OV_DEFAULTS] and t["ort-cpu-fp32"]["ratio"] == 1.0
    assert t["ov"]["runtime"] == "openvino" and t["ov"]["p50_ms"] > 0
    t = ab_latency.measure(tmp_path, batch=2, threads=2, cycles=1, runs=2, scheduled=True)  # + ORT as uadc runs it
    assert list(t) == ["ort-cpu-fp32", "ov", "ort-cpu-fp32" + ab_latency.SCHEDULED]


def test_ab_latency_times_nncf_int8_beside_the_reference(make_base, tmp_path):
    """``bench.ab_latency --nncf``: OpenVINO + NNCF INT8 of the reference ONNX, timed in the same cycles."""
    pytest.importorskip("nncf", reason="NNCF is a bench extra (pip install 'uadc[bench]')")
    from bench import ab_latency
    uadc.compile(make_base(), "ort-cpu-fp32", out=tmp_path / "ort-cpu-fp32", evaluate=False, latency_runs=2,
                 threads=1)
    t = ab_latency.measure(tmp_path, batch=1, threads=1, cycles=2, runs=2, nncf=True)
    assert list(t) == ["ort-cpu-fp32", ab_latency.NNCF]
    assert t[ab_latency.NNCF]["runtime"] == "openvino" and t[ab_latency.NNCF]["p50_ms"] > 0


def test_candidate_with_non_finite_outputs_is_judged_the_worst(make_base):
    """A candidate whose runtime returns NaN/Inf (an INT8 kernel overflowing; seen on ONNX Runtime
    1.19's quantized head) fails the budget by the widest margin instead of aborting the search."""
    base = make_base()
    fid = S.Fidelity(base, base.fp32, base.recipe.compile.auto, 1)
    bad = onnx.ModelProto()
    bad.CopyFrom(base.fp32)
    score = bad.graph.output[1].name
    producer = next(n for n in bad.graph.node if score in n.output)
    producer.output[list(producer.output).index(score)] = score + "_finite"
    bad.graph.initializer.append(onnx.numpy_helper.from_array(np.array(np.nan, np.float32), "nan_factor"))
    bad.graph.node.append(onnx.helper.make_node("Mul", [score + "_finite", "nan_factor"], [score], name="head/nan"))
    fig = fid.measure(bad)
    assert fig == S.WORST and not fid.passes(fig) and S.loss(fig) == 4.0  # spearman -1 counts 2
    assert fid.passes(fid.measure(base.fp32))


def test_a_profile_that_cannot_be_mapped_to_groups_is_a_one_line_error(make_base, monkeypatch):
    """ONNX Runtime 1.19 names its fused INT8 convolutions ``QLinearConv_token_N``: nothing maps them back
    to the model's groups, and a search on such a profile would think INT8 free. It stops instead."""
    def unnamed(models, feeds, threads, runs=20, warmup=5):
        fp32, int8 = fake_profile(models, feeds, threads, runs, warmup)
        return [fp32, [NodeTime(f"{t.op}_token_{k}" if t.op != "QuantizeLinear" else t.name, t.op, t.us, t.out_bytes)
                       for k, t in enumerate(int8)]]
    monkeypatch.setattr(P, "node_times", unnamed)
    with pytest.raises(UadcError, match=r"precision auto: ONNX Runtime .* names its fused INT8 kernels without the "
                                        r"model's node names \(\d+ of \d+ quantized convolutions untimed\)"):
        _search(make_base(**LOOSE))


def test_a_candidate_the_runtime_cannot_run_is_judged_worst():
    """OpenVINO 2026.4 at bf16 fails to build some mixed INT8 graphs: such a candidate must lose the
    search (and be reported), not stop the compile with a traceback."""
    from uadc.core.errors import RuntimeFault
    from uadc.pipeline.precision_search import WORST, Candidates

    class Broken(Candidates):
        low_key = "int8_groups"

        def __init__(self):
            self.groups, self.models, self.figs = [], {}, {}
            self.fid = type("Fid", (), {"measure": lambda self, model, probe=False: {}})()

        def model(self, low):
            raise RuntimeFault("OpenVINO failed to run the model: object is not initialized")

    c = Broken()
    assert c.fidelity(frozenset({1, 2})) == WORST and c.probe(frozenset({3})) == WORST
    assert c.faults == ["2 int8_groups: OpenVINO failed to run the model: object is not initialized",
                        "1 int8_groups: OpenVINO failed to run the model: object is not initialized"]


def test_a_search_that_keeps_every_group_float_ships_and_reports_a_float_model(make_base, tmp_path, monkeypatch):
    """`--precision auto` that found INT8 nowhere faster shipped the plain FP32 graph labelled `precision: int8`
    in report.json and artifact.json, with its candidate partitions named as quantized."""
    from uadc.backends.ort_profile import NodeTime
    from uadc.core.manifest import read_manifest

    def int8_slower(models, feeds, threads, runs=20, warmup=5):
        fp32, int8 = models
        return [[NodeTime(n.name, n.op_type, 10.0) for n in fp32.graph.node],
                [NodeTime(n.name, n.op_type, 100.0, 1000) for n in int8.graph.node]]
    monkeypatch.setattr(P, "node_times", int8_slower)
    res = uadc.compile(make_base(**LOOSE), "ort-cpu-int8", precision="auto", out=tmp_path / "a", evaluate=False,
                       latency_runs=1, threads=1)
    assert res.extra["precision_search"]["final"]["int8_groups"] == 0 and sum(res.qdq_nodes.values()) == 0
    assert res.precision == "fp32" and res.quantized_partitions == []
    assert read_manifest(tmp_path / "a").precision == "fp32"
    assert json.loads((tmp_path / "a" / "report.json").read_text())["precision"] == "fp32"


def test_report_counts_the_nodes_of_the_model_as_shipped(make_base, tmp_path):
    """With in-graph post-processing the report counted the head before the pred_* nodes were added, and the
    model's own uadc.partitions metadata still held the FP32 export's counts."""
    import onnx
    from uadc.export.onnx_export import get_metadata
    from uadc.export.partitions import partition_counts
    res = uadc.compile(make_base(**LOOSE), "ort-cpu-int8", precision="target", postprocess=True, out=tmp_path / "p",
                       evaluate=False, latency_runs=1, threads=1)
    model = onnx.load(str(tmp_path / "p" / "model.onnx"))
    assert res.nodes == partition_counts(model) and res.model_bytes == model.ByteSize()
    assert get_metadata(model)["partitions"] == partition_counts(model)


def test_a_search_where_only_all_fp32_fits_records_that_step():
    """The bisection took "every group reverted" for granted: report.json's steps ended at a row over budget
    while `final` said 0 INT8 groups, with no step that reached it."""
    from types import SimpleNamespace
    from uadc.pipeline.precision_search import bisect
    s = SimpleNamespace(low_key="int8_groups", fid=SimpleNamespace(passes=lambda fig: fig["n"] == 0),
                        fidelity=lambda cand: {"n": len(cand)})
    steps: list = []
    assert bisect(s, SimpleNamespace(cost=lambda c: float(len(c))), frozenset(range(5)), list(range(5)), steps) == \
        frozenset()
    assert steps[-1]["int8_groups"] == 0 and steps[-1]["step"].startswith("revert 5 (every INT8 group")


def test_a_compile_to_another_out_uses_the_recipes_timing_cache_where_it_exists(recipe_factory, tmp_path):
    """`--out DIR` profiled anew beside DIR (and shipped 3 INT8 groups where the recipe's own folder had 8)."""
    from types import SimpleNamespace
    from uadc.config.recipe import load_recipe
    from uadc.pipeline.compile import _timing_cache
    base = SimpleNamespace(recipe=load_recipe(recipe_factory("tc")))
    opts = SimpleNamespace(artifacts=tmp_path / "art")
    out = tmp_path / "deploy" / "x"
    assert _timing_cache(base, opts, out) == (tmp_path / "deploy" / "timing_cache").absolute()
    (tmp_path / "art" / "tc" / "timing_cache").mkdir(parents=True)
    assert _timing_cache(base, opts, out) == (tmp_path / "art" / "tc" / "timing_cache").absolute()


def test_a_category_with_one_validation_normal_borrows_the_pooled_spread():
    """Its spread was floored at 1e-12: its noise copies' z reached 1e11, so a 1e-6 relative change
    in the scores dropped the pooled rank correlation to 0.95 and precision auto quantized nothing."""
    from uadc.pipeline.precision_search import _standards
    from uadc.verify.fidelity import spearman
    rng = np.random.default_rng(0)
    normals = {"a": rng.normal(1.0, 0.1, 8), "b": rng.normal(3.0, 0.3, 8), "small": np.array([2.0])}
    std = _standards(normals)
    pooled = np.sqrt(np.mean([normals["a"].std() ** 2, normals["b"].std() ** 2]))
    assert std["small"] == (2.0, pytest.approx(pooled)) and std["a"][1] == pytest.approx(normals["a"].std())
    # each category's normals and their noise-pasted copies (higher scores), a tiny relative change on the candidate
    ref = {c: np.r_[v, v * 3] for c, v in normals.items()}
    out = {c: v * (1 + 1e-6 * rng.standard_normal(v.shape)) for c, v in ref.items()}
    z = lambda d: np.concatenate([(d[c] - m) / s for c, (m, s) in std.items()])  # noqa: E731
    assert spearman(z(ref), z(out)) > 0.999
    assert _standards({"x": np.array([1.0]), "y": np.array([5.0])}) == {"x": (1.0, 2.0), "y": (5.0, 2.0)}
    assert _standards({"x": np.array([1.0, 1.0])}) == {"x": (1.0, 1.0)}   # nothing to borrow: unit spread
    # every category with one normal: each normal sits at z = 0, a tie any score change broke (0.949)
    from uadc.pipeline.precision_search import _tied_alike
    std = _standards({"x": np.array([2.0]), "y": np.array([3.0])})
    ref = {"x": np.array([2.0, 6.0]), "y": np.array([3.0, 9.0])}
    out = {c: v * (1 + 1e-4 * np.array([1, -1])) for c, v in ref.items()}
    z = lambda d: np.concatenate([(d[c] - m) / s for c, (m, s) in std.items()])  # noqa: E731
    assert spearman(*_tied_alike(z(ref), z(out))) == pytest.approx(1.0)
    swapped = {"x": np.array([2.0, 1.0]), "y": np.array([3.0, 9.0])}   # a real change of order still counts
    assert spearman(*_tied_alike(z(ref), z(swapped))) < 0.9


def test_groups_left_float_because_all_float_was_faster_say_so():
    """A within-budget assignment slower than all float ended all float: its groups read "Q/DQ cost more
    once neighbours went FP32" (and were FP16 on TensorRT)."""
    from uadc.pipeline.precision import _reason
    from uadc.report.markdown import float_counts
    fastest, over, fits = frozenset({0, 1, 2, 3}), frozenset({0}), frozenset({1, 2})
    why = [_reason(gi, frozenset({0, 1, 2, 3}), fastest, over, frozenset(), fits) for gi in range(5)]
    assert why == ["fidelity budget", "all float was faster than what fits the budget",
                   "all float was faster than what fits the budget", "Q/DQ cost more once neighbours went float",
                   "not faster"]
    groups = [{"precision": p} for p in ("int8", "fp16", "fp16", "fp32")]
    assert float_counts({"groups": groups}) == "2 FP16, 1 FP32" and float_counts({"groups": groups[:1]}) == "0 float"


def test_the_image_crosses_into_each_partition_that_reads_it_in_int8(make_base):
    """The qdq pass gives the image a Q/DQ pair per quantized partition (teacher and student run apart); the cost
    model counted one pair when the first layers of both ran INT8, so such an assignment looked cheaper."""
    from uadc.passes.groups import Boundaries
    fp32 = make_base().fp32
    groups = fused_groups(fp32, ["teacher", "student", "head"])
    for forked in (True, False):   # an FP16 stage's (TensorRT) cast of the image serves both readers
        b = Boundaries(fp32, groups, forked=forked)
        first = {groups[gi].partition: gi for gi in range(len(groups))
                 if any("image" in b.g.nodes[k].input for k in groups[gi].index)}
        assert set(first) == {"teacher", "student"}
        t, s = b.crossings({first["teacher"]}), b.crossings({first["student"]})
        both = b.crossings({first["teacher"], first["student"]})
        shared = 0 if forked else 1   # one image crossing fewer than the two alone
        assert both == (t[0] + s[0] - shared, t[1] + s[1] - shared * b.elements["image"]), forked
