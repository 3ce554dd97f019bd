"""``--precision auto`` on TensorRT targets: a modelled latency per fused group in FP32, FP16 and
INT8 (``uadc.backends.tensorrt.cost``), FP16 layers simulated for fidelity (``uadc.passes.simulate``),
the shipped model with those layers FP16-typed (``type_fp16``: strongly typed TensorRT 10/11 runs
exactly them) and, on TensorRT 8.x, the FP32 layers kept by obeyed layer precisions."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import uadc
from uadc.backends.tensorrt import BuildSettings, plan_build, trtexec_command
from uadc.backends.tensorrt import build as trt_backend
from uadc.backends.tensorrt.cost import GPUS, gpu_spec, group_time_us, group_times, node_work
from uadc.core.errors import UadcError
from uadc.passes.groups import fused_groups, tensor_elements
from uadc.passes.simulate import simulate_fp16, type_fp16

LOOSE = {"spearman_min": -1.0, "decision_agreement_min": 0.0, "top1_overlap_min": 0.0}
SMALL = {"val_images": 4, "random_images": 4, "sensitivity_images": 2}


def _convs(size: int = 64, channels: int = 64) -> onnx.ModelProto:
    """image -> 1x1 conv -> Relu -> 3x3 depthwise conv -> Add (residual) -> out."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((channels, 3, 1, 1)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((channels, 1, 3, 3)).astype(np.float32) / 3, "w2")
    nodes = [helper.make_node("Conv", ["image", "w1"], ["a"], name="conv1"),
             helper.make_node("Relu", ["a"], ["b"], name="relu1"),
             helper.make_node("Conv", ["b", "w2"], ["c"], name="dw", group=channels, pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "b"], ["out"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                         [1, 3, size, size])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, channels, size, size])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x})[0]


def test_roofline_prices_each_precision():
    model = _convs(size=128, channels=256)
    spec = GPUS["orin-nano-8gb"]
    g = {n.name: n for n in model.graph.node}
    elements, inits = tensor_elements(model), {i.name: i for i in model.graph.initializer}
    conv = node_work(g["conv1"], elements, inits)
    assert conv.dense and conv.macs == 128 * 128 * 256 * 3 and conv.weights == 256 * 3
    dw = node_work(g["dw"], elements, inits)
    assert not dw.dense and dw.macs == 128 * 128 * 256 * 9
    # by hand: max(compute, memory) + one launch, at each precision's rate and bytes
    for p, nbytes in (("fp32", 4), ("fp16", 2), ("int8", 1)):
        compute = dw.macs / spec.rate(p, False)
        memory = (dw.activations + dw.weights) * nbytes / spec.bytes_per_us()
        assert group_time_us([dw], p, spec) == pytest.approx(max(compute, memory) + spec.launch_us)
    add = node_work(g["add"], elements, inits)
    assert group_time_us([add], "fp16", spec) == pytest.approx(add.activations // 2 * 2 / spec.bytes_per_us())
    times = group_times(model, fused_groups(model, ["teacher", "student", "head"]) or [], spec)
    assert all(len(v) == 0 for v in times.values())  # untagged nodes: no partition, no group


def test_tagged_groups_are_faster_in_lower_precision(make_tagged):
    model = make_tagged
    groups = fused_groups(model, ["student"])
    assert [g.op for g in groups] == ["Conv 1x1 + Relu", "Conv 3x3 dw", "Add"]
    for name in GPUS:
        t = group_times(model, groups, GPUS[name])
        assert (t["int8"] <= t["fp16"]).all() and (t["fp16"] <= t["fp32"]).all()
        assert t["fp16"][0] < t["fp32"][0]  # the dense convolution gains on tensor cores
    assert gpu_spec(None, "jetson").name == "orin-nano-8gb" and gpu_spec(None, "gpu").name == "l4"
    with pytest.raises(UadcError, match="compile.auto.gpu: 'tpu' is not one of"):
        gpu_spec("tpu", "gpu")


@pytest.fixture
def make_tagged():
    model = _convs()
    for n in model.graph.node:
        n.name = f"student/{n.name}"
        n.metadata_props.add(key="uadc.partition", value="student")
    return model


def test_fp16_simulation_rounds_only_the_chosen_nodes():
    model = _convs(size=16)
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    ref = _run(model, x)
    assert np.array_equal(_run(simulate_fp16(model, []), x), ref)
    sim = simulate_fp16(model, ["add"])
    out = _run(sim, x)
    scale = np.abs(ref).max()
    assert 0 < np.abs(out - ref).max() <= 3 * 2**-11 * scale  # three roundings of at most 2^-11 relative
    assert np.array_equal(out, out.astype(np.float16).astype(np.float32))  # the output is FP16-stored
    whole = _run(simulate_fp16(model, ["conv1", "relu1", "dw", "add"]), x)
    assert 0 < np.abs(whole - ref).max() <= 1e-2 * scale
    assert len(model.graph.node) == 4  # the input model is left alone
    onnx.checker.check_model(sim)


def test_fp16_typed_model_runs_the_chosen_nodes_in_fp16():
    model = _convs(size=16)
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    ref = _run(model, x)
    scale = np.abs(ref).max()
    for nodes in (["conv1", "relu1", "dw", "add"], ["dw"], ["add"]):
        typed = type_fp16(model, nodes)
        onnx.checker.check_model(typed, full_check=True)
        inits = {i.name: i.data_type for i in typed.graph.initializer}
        by_name = {n.name: n for n in typed.graph.node}
        for name in nodes:  # FP16 weights; every input and output FP16 (shape inference says so)
            assert all(inits[t] == TensorProto.FLOAT16 for t in by_name[name].input if t in inits)
        types = {v.name: v.type.tensor_type.elem_type
                 for v in onnx.shape_inference.infer_shapes(typed, strict_mode=True).graph.value_info}
        for name in nodes:
            assert all(types[t] == TensorProto.FLOAT16 for t in by_name[name].output)
        other = [n for n in typed.graph.node if n.name not in nodes and n.op_type != "Cast"]
        assert all(types.get(t, TensorProto.FLOAT) == TensorProto.FLOAT for n in other for t in n.output)
        casts = [n for n in typed.graph.node if n.op_type == "Cast"]
        assert typed.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
        assert typed.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
        out, sim = _run(typed, x), _run(simulate_fp16(model, nodes), x)
        assert 0 < np.abs(out - ref).max() <= 1e-2 * scale or nodes == ["add"]
        assert np.abs(out - sim).max() <= 4 * 2**-11 * scale  # rounds where the simulation rounds
        if nodes == ["dw"]:  # Relu's output read by dw (FP16) and by add (FP32): one cast each way
            assert len(casts) == 2
    whole = type_fp16(model, ["conv1", "relu1", "dw", "add"])
    assert [n.op_type for n in whole.graph.node] == ["Cast", "Conv", "Relu", "Conv", "Add", "Cast"]  # no inner casts
    assert len(model.graph.node) == 4 and type_fp16(model, []) == model  # the input model is left alone


def test_fp16_typed_model_keeps_fixed_float_inputs():
    """Resize's ``scales`` is always float32 (its schema says so): only X and the output turn FP16."""
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    node = helper.make_node("Resize", ["image", "", "scales"], ["out"], name="up", mode="linear")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])], [scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    typed = type_fp16(model, ["up"])
    onnx.checker.check_model(typed, full_check=True)
    assert [i.data_type for i in typed.graph.initializer] == [TensorProto.FLOAT]
    assert [n.op_type for n in typed.graph.node] == ["Cast", "Resize", "Cast"]
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    assert np.allclose(_run(typed, x), _run(model, x), atol=1e-2)


def test_an_auto_assignment_without_fp16_layers_builds_strongly_typed_from_tensorrt_10():
    """Precision auto kept its float layers FP32 (no FP16 chosen, so the model had no FP16 type): TensorRT
    10.x built weakly typed with --fp16 and pins on ONNX node names, which a layer TensorRT splits into
    several escapes, while both READMEs said strongly typed, exactly as chosen."""
    s = BuildSettings(precision="int8", fp32_layers=("head/node_linalg_vector_norm",), model_typed=True)
    for version in ("10.3.0", "11.0.0"):
        plan = plan_build(s, version, has_qdq=True)
        assert plan.strongly_typed and plan.builder_flags == () and plan.fp32_layers == () and not plan.notes
    eight = plan_build(s, "8.5.2", has_qdq=True)   # no strong typing there: the pins, obeyed
    assert not eight.strongly_typed and eight.fp32_layers == ("head/node_linalg_vector_norm",)
    cmd10 = trtexec_command("model.onnx", s, (3, 64, 64), trt_version="10.3")
    assert "--stronglyTyped" in cmd10 and "--layerPrecisions" not in cmd10 and "--fp16" not in cmd10


def test_layer_precisions_build_plan_and_trtexec():
    s = BuildSettings(precision="int8", fp32_layers=("student/add", "head/node_Mul_3"))
    for version in ("8.5.2", "10.3.0"):
        plan = plan_build(s, version, has_qdq=True)
        assert not plan.strongly_typed and {"INT8", "FP16"} <= set(plan.builder_flags)
        assert plan.fp32_layers == ("student/add", "head/node_Mul_3")
    eleven = plan_build(s, "11.0.0", has_qdq=True)
    assert eleven.strongly_typed and eleven.fp32_layers == () and "strongly typed" in eleven.notes[0]
    cmd = trtexec_command("model.onnx", s, (3, 64, 64), trt_version="10.3")
    assert "--precisionConstraints=obey" in cmd and "--layerPrecisions=student/add:fp32,head/node_Mul_3:fp32" in cmd
    assert "--noTF32" in cmd  # the pinned layers run IEEE FP32, as the search judged them
    assert "--layerPrecisions" not in trtexec_command("model.onnx", BuildSettings(precision="int8"), (3, 64, 64))
    # the shipped model types its FP16 layers: strongly typed from 10.x on, no layer precisions or flags
    for version in ("10.3.0", "11.0.0"):
        typed = plan_build(s, version, has_qdq=True, fp16_model=True)
        assert typed.strongly_typed and typed.fp32_layers == () and typed.builder_flags == () and not typed.notes
        assert typed.cleared_flags == ("TF32",)
    assert not plan_build(s, "8.5.2", has_qdq=True, fp16_model=True).strongly_typed  # 8.x: no strong typing
    dla = BuildSettings(precision="int8", fp32_layers=("a",), dla_core=0)
    assert not plan_build(dla, "10.3.0", has_qdq=True, fp16_model=True).strongly_typed  # DLA: weak
    cmd10 = trtexec_command("model.onnx", s, (3, 64, 64), trt_version="10.3", fp16_model=True)
    assert "--stronglyTyped" in cmd10 and "--layerPrecisions" not in cmd10 and "--int8" not in cmd10
    half = plan_build(BuildSettings(precision="fp16", fp32_layers=("a",)), "10.3.0", has_qdq=False)
    assert half.builder_flags == ("FP16",) and half.fp32_layers == ("a",)  # precision auto quantized nothing
    for bad in (dict(precision="fp32"), dict(precision="int8", strongly_typed=True)):
        with pytest.raises(UadcError, match="fp32_layers"):
            BuildSettings(fp32_layers=("a",), **bad)
    with pytest.raises(UadcError, match="'a,b' is not a layer name"):
        BuildSettings(precision="int8", fp32_layers=("a,b",))


def test_an_auto_result_with_every_layer_fp32_ships_an_fp32_build(tmp_path):
    """Precision auto that quantized nothing and kept every float layer FP32 (a small model, no group saving
    its min_saving) shipped an FP16 build: TensorRT 11's branch of build_engine.sh refused it (not FP16-typed)."""
    from uadc.config.targets import get_target
    from uadc.pipeline.precision_trt import fp32_layers
    from uadc.pipeline.trt_bundle import write_trt_files
    model = _convs(size=8, channels=8)
    every = fp32_layers(model, [], frozenset())
    assert every
    section = write_trt_files(tmp_path, model, model, get_target("trt-int8"), None, 8, False, fp32_layers=every)
    script = (tmp_path / "build_engine.sh").read_text()
    assert "--fp16" not in script and "--layerPrecisions" not in script and "cannot build" not in script
    assert "--noTF32" in section["trtexec"] and "--fp16" not in section["trtexec"]
    assert section["trtexec_for"].startswith("TensorRT 8.5 ")   # one of the script's commands: it says which
    readme = (tmp_path / "README.md").read_text()   # it described a strongly/weakly typed mixed build
    assert "FP32 everywhere" in readme and "Precision auto" not in readme
    assert plan_build(BuildSettings(precision="fp32"), "11.0.0", has_qdq=False).builder_flags == ()


@pytest.fixture(scope="module")
def trt_base(tmp_path_factory, tiny_data):
    from conftest import write_recipe
    from uadc.config.recipe import load_recipe
    from uadc.models import build_model
    d = tmp_path_factory.mktemp("trt_auto")
    recipe = load_recipe(write_recipe(d / "tiny.yaml", tiny_data, train={"threads": 1}, data={"val_fraction": 0.25},
                                      compile={"auto": {**SMALL, **LOOSE}}))
    torch.manual_seed(0)
    return uadc.baseline(build_model(recipe.cfg["model"], recipe.data.image_size), recipe, threads=1)


def test_trt_auto_assigns_int8_fp16_fp32_and_ships_the_fp32_layers(trt_base, tmp_path, monkeypatch):
    from uadc.passes.pipeline import PASSES, opset_of
    opset_runs, opset, cleanup = [], PASSES["opset"], PASSES["cleanup"]
    monkeypatch.setitem(PASSES, "opset", lambda m, ctx: opset_runs.append("opset") or opset(m, ctx))
    monkeypatch.setitem(PASSES, "cleanup", lambda m, ctx: opset_runs.append("cleanup") or cleanup(m, ctx))
    # INT8 candidates in the student only: the loose budget takes them all, the teacher's and head's stay FP16
    runs = [uadc.compile(trt_base, "jetson-int8", precision="auto", out=tmp_path / f"a{i}", evaluate=False,
                         quantize=["student"]) for i in range(2)]
    # the search's candidates skip both (same ORT outputs); each shipped model runs them
    assert opset_runs == ["opset", "cleanup"] * 2
    recs = [json.loads((r.path / "report.json").read_text())["precision_search"] for r in runs]
    assert [g["precision"] for g in recs[0]["groups"]] == [g["precision"] for g in recs[1]["groups"]]
    rec = recs[0]
    assert rec["profile"]["gpu"] == "orin-nano-8gb" and rec["fidelity_runtime"].endswith("(FP16 layers simulated)")
    assert rec["float_stage"]["fp16_groups"] > 0 and rec["final"]["int8_groups"] > 0  # a loose budget takes both
    for g in rec["groups"]:
        assert g["op"].split()[0] in ("Conv", "MatMul", "Gemm", "Add") and g["fp16_us"] <= g["fp32_us"]
    model = onnx.load(str(runs[0].path / "model.onnx"))
    assert opset_of(model) == 17
    names = {n.name for n in model.graph.node}
    # the chosen FP16 nodes are FP16-typed in the shipped model, and it computes what was judged
    half = {n.name for n in model.graph.node if any(
        i.name == t and i.data_type == TensorProto.FLOAT16 for t in n.input for i in model.graph.initializer)}
    assert half and trt_backend.is_fp16_model(model)
    typed, int8 = runs[0].verification["fp16_typed_vs_simulated"], runs[0].verification["fp32_vs_compiled"]
    assert typed["nodes_fp16"] >= len(half) and typed["outputs"]["anomaly_map"]["max_rel"] < 0.02
    assert typed["max_abs"] < 0.1 * int8["max_abs"]  # FP16-sized differences, far below the INT8 ones
    script = (runs[0].path / "build_engine.sh").read_text().split("\nrm -f -- ")[0]   # the dispatch, not what follows
    eleven, rest = script.split("elif (( major >= 10 ))")
    ten, eight = rest.rsplit("\nelse\n", 1)
    for cmd in (eleven.split("major >= 11")[1], ten):  # strongly typed (always on 11): the model's types rule
        assert "--layerPrecisions" not in cmd and "--fp16" not in cmd and "--int8" not in cmd
    assert "--stronglyTyped" in ten
    spec = eight.split("--layerPrecisions=")[1].split()[0].strip("'\"")  # TensorRT 8.x: weak typing + pins
    layers = [item.rsplit(":", 1) for item in spec.split(",")]
    assert layers and all(p == "fp32" and n in names and n not in half for n, p in layers)
    assert "--fp16" in eight and "--int8" in eight
    assert "Precision auto" in (runs[0].path / "README.md").read_text()
    assert "nodes FP16-typed) vs their simulation" in (runs[0].path / "report.md").read_text()


def test_fp16_that_breaks_the_budget_stays_fp32(trt_base, tmp_path, monkeypatch):
    """Where FP16 costs too much fidelity (here a stand-in that also perturbs the FP16 layers'
    weights by 30 %), the float stage returns groups to FP32 until the budget holds, and the
    bundle keeps them FP32."""
    import zlib
    from uadc.pipeline import precision as P, precision_trt as T

    def coarse(model, nodes):  # deterministic: the same nodes, the same perturbation
        out = simulate_fp16(model, nodes)
        for init in out.graph.initializer:
            if init.name.endswith("__fp16w"):
                w = numpy_helper.to_array(init)
                rng = np.random.default_rng(zlib.crc32(init.name.encode()))
                init.CopyFrom(numpy_helper.from_array(w * (1 + 0.3 * rng.standard_normal(w.shape)).astype(w.dtype),
                                                      init.name))
        return out
    monkeypatch.setattr(T, "simulate_fp16", coarse)
    monkeypatch.setattr(P, "simulate_fp16", coarse)
    default = trt_base.recipe.with_overrides(compile={"auto": {"spearman_min": 0.99, "decision_agreement_min": 0.99,
                                                               "top1_overlap_min": 0.9}})
    base = uadc.baseline(trt_base.model, default, threads=1)
    r = uadc.compile(base, "trt-int8", precision="auto", out=tmp_path / "s", evaluate=False)
    rec = json.loads((r.path / "report.json").read_text())["precision_search"]
    assert rec["profile"]["gpu"] == "l4" and rec["final"]["within_budget"]
    fs = rec["float_stage"]
    assert fs["fp16_groups"] < fs["groups"] and fs["steps"][0]["fidelity"]["spearman"] < 0.99
    reverted = [g["name"] for g in fs["kept_fp32"] if g["reason"] == "fidelity budget"]
    assert reverted and all(g["fidelity_cost"] is not None for g in fs["kept_fp32"] if g["name"] in reverted)
    assert {g["precision"] for g in rec["groups"] if g["name"] in reverted} <= {"int8", "fp32"}
    script = (r.path / "build_engine.sh").read_text()
    assert ("--int8" in script) == (rec["final"]["int8_groups"] > 0)
    # the precision shipped: int8 said over a build without one INT8 layer before
    shipped = "int8" if rec["final"]["int8_groups"] else "fp16" if fs["fp16_groups"] else "fp32"
    assert r.precision == json.loads((r.path / "artifact.json").read_text())["precision"] == shipped
    kept = script.split("--layerPrecisions=")[1].split()[0]
    int8 = {g["name"] for g in rec["groups"] if g["precision"] == "int8"}
    assert all(f"{name}:fp32" in kept.split(",") for name in reverted if name not in int8)


def test_unknown_gpu_fails_before_any_work(trt_base, tmp_path):
    base = uadc.baseline(trt_base.model, trt_base.recipe.with_overrides(compile={"auto": {"gpu": "tpu"}}), threads=1)
    with pytest.raises(UadcError, match="compile.auto.gpu: 'tpu' is not one of orin-nano-8gb") as e:
        uadc.compile(base, "jetson-int8", precision="auto", out=tmp_path / "x", evaluate=False)
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_an_emulated_target_says_so_in_report_md_and_labels_the_precision_it_ships(trt_base, tmp_path):
    """report.md never said its TensorRT 'compiled' figures came from ONNX Runtime (float targets lost the
    note too), and precision auto that kept every group float was labelled int8."""
    from types import SimpleNamespace
    from uadc.config.targets import get_target
    from uadc.pipeline.compile import _runtime_label, _shipped
    res = uadc.compile(trt_base, "trt-fp16", out=tmp_path / "f16", latency_runs=1)
    md = (res.path / "report.md").read_text()
    assert "| compiled, onnxruntime CPU emulating tensorrt (gpu, fp16) |" in md and "> Emulated: " in md
    assert "TensorRT is not run here: 'compiled' is the fp16 ONNX evaluated with ONNX Runtime" in md
    kept_float = SimpleNamespace(nodes=[], fp16_nodes=frozenset())
    assert _runtime_label(_shipped(get_target("trt-int8"), kept_float))[0].endswith("(gpu, fp32)")
