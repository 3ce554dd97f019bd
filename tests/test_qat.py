"""Quantization-aware training: the ONNX -> torch interpreter, fake-quant placement fidelity
against ONNX Runtime's PTQ Q/DQ models, fine-tuning, Q/DQ export and the CLI.

Fidelity tolerances. FP32: the interpreter and ORT compute the same float math in different
orders, so they agree to ~1e-6 relative (asserted: 1e-4). Fake-quant at the PTQ scales: same
edges, ORT's divide-and-round, int32 biases, so the interpreter reproduces the Q/DQ model exactly
except where float accumulation order (torch vs MLAS) flips a rounding tie, which then cascades
through later quantizers. Asserted per student output: mean |diff| <= 1e-4 and max |diff| <= 1%
of max |output|. Measured: 0 for ort-cpu-int8, mean 2e-5 / max 2e-3 for trt-int8; the placement
bugs this caught while being written (bias rounding not emulated, a Relu's input not tied to its
output's scale) showed ~4e-4 mean and 0.15 max.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
import yaml
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from uadc.cli import main
from uadc.config.settings import resolve_ptq
from uadc.config.targets import get_target
from uadc.core.errors import UadcError
from uadc.export.partitions import partition_of
from uadc.passes.pipeline import run_ort
from uadc.quant.qat.export import EXPORT_TOLERANCE, head_inputs_onnx, max_rel_diff, onnx_frozen_features
from uadc.quant.qat.interpreter import GraphInterpreter, weight_scale
from uadc.quant.qat.net import QatNet
from uadc.quant.qat.run import QatOptions, build_qat_net, check_target, ptq_init, qat_settings, run_qat

TARGET = "ort-cpu-int8"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------ interpreter

def _ops_graph() -> onnx.ModelProto:
    """Every op the interpreter promises, with non-default attributes, on a 2x4x9x9 input."""
    rng = np.random.default_rng(0)
    inits = []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", init("w1", f32(6, 2, 3, 3)), init("b1", f32(6))], ["c1"], group=2,
                         pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2]),
        helper.make_node("Clip", ["c1", init("lo", np.float32(-0.5)), init("hi", np.float32(1.5))], ["c2"]),
        helper.make_node("LeakyRelu", ["c2"], ["c3"], alpha=0.2),
        helper.make_node("ConvTranspose", ["c3", init("w2", f32(6, 4, 3, 3)), init("b2", f32(4))], ["d1"],
                         strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
        helper.make_node("Relu", ["d1"], ["d2"]),
        helper.make_node("Resize", ["d2", "", "", init("sizes", np.array([2, 4, 9, 9], np.int64))], ["r1"],
                         mode="linear", coordinate_transformation_mode="half_pixel"),
        helper.make_node("Resize", ["x", "", init("scales", np.array([1, 1, 2, 2], np.float32))], ["r2"],
                         mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("MaxPool", ["r2"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                         ceil_mode=1),
        helper.make_node("AveragePool", ["x"], ["p2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0),
        helper.make_node("Sub", ["r1", "p2"], ["s1"]),
        helper.make_node("Mul", ["s1", init("m", f32(1, 4, 1, 1))], ["s2"]),
        helper.make_node("Div", ["s2", init("dv", np.float32(1.7))], ["s3"]),
        helper.make_node("Add", ["s3", "x"], ["s4"]),
        helper.make_node("Sigmoid", ["s4"], ["s5"]),
        helper.make_node("Pad", ["s5", init("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))], ["q1"],
                         mode="reflect"),
        helper.make_node("Pad", ["p1", init("pads2", np.array([0, 0, 1, 0, 0, 0, 1, 2], np.int64)),
                                 init("pv", np.float32(0.25))], ["q2"], mode="constant"),
        helper.make_node("Concat", ["q1", "q2"], ["k1"], axis=1),
        helper.make_node("Identity", ["k1"], ["k2"]),
        helper.make_node("GlobalAveragePool", ["k2"], ["g1"]),
        helper.make_node("Reshape", ["g1", init("shape", np.array([0, -1], np.int64))], ["y"]),
    ]
    for i, n in enumerate(nodes):
        n.name = f"{n.op_type}_{i}"
    graph = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 9, 9])],
                              [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in ("y", "k2", "d1")],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_interpreter_ops_match_onnxruntime():
    model = _ops_graph()
    x = np.random.default_rng(1).standard_normal((2, 4, 9, 9)).astype(np.float32)
    ref = run_ort(model, {"x": x}, ["y", "k2", "d1"])
    interp = GraphInterpreter(model, [n.name for n in model.graph.node])
    with torch.no_grad():
        out = interp({"x": torch.from_numpy(x)}, ["y", "k2", "d1"])
    for name, r in zip(["y", "k2", "d1"], ref):
        assert out[name].shape == r.shape, name
        np.testing.assert_allclose(out[name].numpy(), r, rtol=1e-5, atol=1e-5, err_msg=name)


def test_unsupported_op_is_named():
    node = helper.make_node("Softmax", ["x"], ["y"], name="student/node_softmax")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    with pytest.raises(UadcError, match=r"op Softmax \(node student/node_softmax\) is not supported"):
        GraphInterpreter(model, ["student/node_softmax"])


# ------------------------------------------------------------------------- trained tiny model

@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, tiny_data):
    """A tiny STFPM checkpoint, its FP32 Baseline (export cached) and one QAT run for ort-cpu-int8."""
    from conftest import write_recipe

    from uadc.config.recipe import load_recipe
    from uadc.core.scoped import torch_threads
    from uadc.pipeline import api
    from uadc.training.run import load_images
    d = tmp_path_factory.mktemp("qat")
    path = write_recipe(d / "tiny.yaml", tiny_data, train={"epochs": 4, "threads": 1},
                        qat={"epochs": 3, "lr": 0.001, "batch_size": 8})
    recipe, art = load_recipe(path), d / "artifacts"
    expected = _global_draws(1234)  # the caller's streams, untouched by uadc below
    _global_draws(1234, draw=False)
    api.train(path, artifacts=art)
    base = api.baseline(recipe, artifacts=art)
    opts = QatOptions(TARGET)
    _, ptq = qat_settings(recipe, opts, check_target(TARGET))
    with torch_threads(recipe.train.threads):
        images = load_images(base.data.train, "loading images")
        result = run_qat(recipe, opts, base.fp32, base.model, images,
                         base.calibration_images(ptq.calib_data, ptq.calib_samples), base.checkpoint, art,
                         base.checkpoint_sha256)
    return {"recipe_path": path, "recipe": recipe, "art": art, "baseline": base, "result": result,
            "streams_kept": _global_draws() == expected}


def _global_draws(seed: int | None = None, draw: bool = True) -> tuple | None:
    """Seed (if given) Python's, NumPy's and torch's global generators, then draw from each."""
    import random
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    return (random.random(), float(np.random.random()), float(torch.rand(1))) if draw else None


def test_training_and_qat_leave_the_callers_random_streams_alone(qat_run):
    # both seed the generators a model's initialisation draws from; a pipeline's own seeded
    # stream was reset to the recipe's seed by every uadc.train call
    assert qat_run["streams_kept"]


def _probe(base, n: int = 4) -> torch.Tensor:
    return torch.from_numpy(base.sample_feeds(1, n)[0]["image"])  # test images, defects included


def test_fp32_interpreter_reproduces_onnxruntime(qat_run):
    base = qat_run["baseline"]
    net = QatNet(base.fp32, None, ["student"])
    x = _probe(base)
    names = net.split.head_inputs
    with torch.no_grad():
        ours = {k: v.numpy() for k, v in net(x, names).items()}
    ref = head_inputs_onnx(base.fp32, names, {"image": x.numpy()})
    assert net.split.student_tensors and set(net.split.student_tensors) <= set(names)
    assert max_rel_diff(ref, ours) < 1e-4


def _rel_diffs(net, ptq, x) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per student output read by the head: |ours - ORT| / max |ORT|, with the teacher tensors
    from ORT and with the teacher interpreted in torch."""
    names = net.split.student_tensors
    with torch.no_grad():
        with_ort_teacher = net(x, names, onnx_frozen_features(ptq, net, x.numpy()))
        own_teacher = net(x, names)
    ref = head_inputs_onnx(ptq, names, {"image": x.numpy()})
    return {k: (np.abs(with_ort_teacher[k].numpy() - ref[k]) / np.abs(ref[k]).max(),
                np.abs(own_teacher[k].numpy() - ref[k]) / np.abs(ref[k]).max()) for k in names}


@pytest.mark.parametrize("target, quantize", [("ort-cpu-int8", ["student"]), ("trt-int8", ["student"]),
                                              ("ort-cpu-int8", ["student", "head"])])
def test_fake_quant_at_ptq_scales_reproduces_ptq_model(qat_run, target, quantize):
    """With the head quantized, its uint8 constant (127) was taken for an 8-bit weight: the interpreter emulated
    8-bit weights where ORT's PTQ had 7, and QAT trained another model than it shipped."""
    base = qat_run["baseline"]
    t = get_target(target)
    settings = resolve_ptq(qat_run["recipe"], t, t.default_calibrator, "random-normal", 8, quantize)
    images = base.calibration_images(settings.calib_data, settings.calib_samples)
    ptq, _, _ = ptq_init(base.fp32, images, t, settings)
    net, placement = build_qat_net(base.fp32, ptq, quantize)
    assert placement.acts and placement.weight_edges
    assert placement.weight_qmax == (64 if target == "ort-cpu-int8" else 127)  # CPU INT8: 7-bit weights
    # Weight scales recomputed from the weights are ORT's, bit for bit.
    inits = {i.name: numpy_helper.to_array(i) for i in ptq.graph.initializer}
    weights = {**net.net.weights(), **{k: v for k, v in net.net.consts.items()}}
    for (node, i), axis in placement.weight_edges.items():
        name = placement.weight_names[(node, i)]
        if name not in weights:   # the head's constant (ORT quantized it to uint8): no network weight
            continue
        ptq_scale = inits[f"{name}_scale"]
        np.testing.assert_array_equal(weight_scale(weights[name], axis, placement.weight_qmax).numpy().reshape(ptq_scale.shape), ptq_scale)
    for k, diffs in _rel_diffs(net, ptq, _probe(base)).items():
        for d in diffs:
            assert d.mean() <= 1e-4 and d.max() <= 1e-2, (k, d.mean(), d.max())


def test_qat_loss_decreases(qat_run):
    s = qat_run["result"].summary
    h = s["history"]
    assert len(h) == 3 and all(np.isfinite(e["loss"]) for e in h)
    assert h[-1]["loss"] < h[0]["loss"]
    assert s["final_loss"] < s["ptq_loss"]


def test_a_fine_tune_that_raised_its_loss_is_a_warning(qat_run, tmp_path, monkeypatch, caplog):
    """`qat.lr: 100` collapsed the student (loss 2.22 -> 3.25) and QAT wrote it without a word."""
    import logging

    from uadc.core.scoped import torch_threads
    from uadc.quant.qat import run as qat_module
    from uadc.training.run import load_images
    base, recipe = qat_run["baseline"], qat_run["recipe"]
    losses = iter([1.0, 2.5])
    monkeypatch.setattr(qat_module, "mean_loss", lambda *a, **k: next(losses))
    monkeypatch.setattr(qat_module, "fine_tune", lambda *a, **k: [])
    opts = QatOptions(TARGET)
    _, ptq = qat_settings(recipe, opts, check_target(TARGET))
    with torch_threads(1), caplog.at_level(logging.WARNING, "uadc"):
        images = load_images(base.data.train, "loading images")
        res = run_qat(recipe, opts, base.fp32, base.model, images,
                      base.calibration_images(ptq.calib_data, ptq.calib_samples), base.checkpoint,
                      tmp_path / "art", base.checkpoint_sha256)
    assert (res.summary["ptq_loss"], res.summary["final_loss"]) == (1.0, 2.5)
    assert "fine-tuning raised the distillation loss (1.0000 after PTQ -> 2.5000)" in caplog.text


def _act_quant(model: onnx.ModelProto) -> dict[str, float]:
    """Activation tensor -> scale of every QuantizeLinear whose input is not an initializer."""
    inits = {i.name: i for i in model.graph.initializer}
    return {n.input[0]: float(numpy_helper.to_array(inits[n.input[1]])) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def test_exported_qat_model_has_ptq_placement_and_qat_scales(qat_run):
    res = qat_run["result"]
    qat, ptq = res.model, res.ptq_model
    qdq = [n for n in qat.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and {partition_of(n) for n in qdq} == {"student"}
    assert sorted(n.op_type for n in qat.graph.node) == sorted(n.op_type for n in ptq.graph.node)
    ptq_scales, qat_scales = _act_quant(ptq), _act_quant(qat)
    assert set(qat_scales) == set(ptq_scales)
    learned = {t: s for a, s in zip(res.net.net.act_fq.specs, res.net.net.act_fq.current()) for t in a.tensors}
    for t, s in qat_scales.items():
        assert s == pytest.approx(learned[t], rel=1e-6), t
    assert sum(abs(qat_scales[t] - ptq_scales[t]) > 1e-4 * ptq_scales[t] for t in qat_scales) >= len(qat_scales) // 2
    check = res.summary["export_check"]
    assert check["scale_max_rel_diff"] <= 1e-6 and check["head_inputs_differing_fraction"] <= EXPORT_TOLERANCE
    # Fine-tuned weights went in: the student's int8 weights changed, the teacher's did not.
    p_inits = {i.name: numpy_helper.to_array(i) for i in ptq.graph.initializer}
    q_inits = {i.name: numpy_helper.to_array(i) for i in qat.graph.initializer}
    changed = {k for k in p_inits if k in q_inits and p_inits[k].shape == q_inits[k].shape
               and not np.array_equal(p_inits[k], q_inits[k])}
    assert any(k.startswith("student.") for k in changed) and not any(k.startswith("teacher.") for k in changed)
    # Files: the model and qat.json (history, ranges, settings) next to it.
    assert res.path.name == "qat_model.onnx" and res.path.parent.name == f"qat_{TARGET}"
    meta = json.loads((res.path.parent / "qat.json").read_text())
    assert [e["loss"] for e in meta["history"]] == [e["loss"] for e in res.summary["history"]]
    assert set(meta["ranges"]) >= set(qat_scales) and meta["settings"]["epochs"] == 3
    assert meta["loss_order"]["student"] and meta["loss_order"]["teacher"]


def _keys(report: dict) -> dict:
    return {k: sorted(v) if isinstance(v, dict) and k in ("metrics", "verification", "latency_ms") else None
            for k, v in report.items()}


def _artifacts_without_qat(qat_run, art):
    """A copy of the fixture's artifacts: the checkpoint, no QAT model yet."""
    name = qat_run["recipe"].name
    shutil.copytree(qat_run["art"] / name, art / name, ignore=shutil.ignore_patterns("qat_*"))
    return art


def test_cli_qat_then_compile_from_qat(qat_run, tmp_path):
    from uadc.pipeline import api
    recipe, path = qat_run["recipe"], qat_run["recipe_path"]
    art = _artifacts_without_qat(qat_run, tmp_path / "art")
    ptq_dir = api.compile(qat_run["baseline"], TARGET, out=tmp_path / "ptq", latency_runs=3).path
    ptq_report = json.loads((ptq_dir / "report.json").read_text())

    res = CliRunner().invoke(main, ["qat", str(path), "--target", TARGET, "--epochs", "1", "--artifacts", str(art)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.output.count("QAT model written") == 1 and res.output.count("artifact written") == 1   # twice before
    assert f"-> {TARGET} (QAT) " in res.output   # it read as the PTQ artifact's figure ("-> ort-cpu-int8 ...")
    # the epoch lines average the losses before each step (one step: the PTQ loss); the final one was DEBUG only
    import re
    said = re.search(r"distillation loss ([\d.]+) after PTQ -> ([\d.]+) after fine-tuning", res.output)
    summary = json.loads((art / recipe.name / f"qat_{TARGET}" / "qat.json").read_text())
    assert said and float(said[2]) == pytest.approx(summary["final_loss"], abs=1e-4), res.output
    art2 = _artifacts_without_qat(qat_run, tmp_path / "art2")
    quiet = CliRunner().invoke(main, ["-q", "qat", str(path), "--target", TARGET, "--epochs", "1", "--no-compile",
                                      "--artifacts", str(art2)], catch_exceptions=False)
    written = tmp_path / "art2" / recipe.name / f"qat_{TARGET}" / "qat_model.onnx"   # it was a log line: -q said nothing
    assert quiet.exit_code == 0 and quiet.stdout == f"QAT model written: {written}\n", quiet.output
    qat_report = json.loads((art / recipe.name / f"{TARGET}-qat" / "report.json").read_text())
    assert {k: v for k, v in _keys(qat_report).items() if k != "qat"} == _keys(ptq_report)
    assert qat_report["qdq_nodes"] == ptq_report["qdq_nodes"]
    summary = art / recipe.name / f"qat_{TARGET}" / "qat.json"
    assert json.loads(summary.read_text())["settings"]["epochs"] == 1
    # what the QAT model was fine-tuned with is in the compile's report (it was recorded nowhere)
    from uadc.core.hashing import sha256_file   # which qat_model.onnx: a later `uadc qat` replaces it under the same path
    assert qat_report["qat"] == {"settings": json.loads(summary.read_text())["settings"], "summary": str(summary),
                                 "model_sha256": sha256_file(summary.parent / "qat_model.onnx"), "target": TARGET}

    out = tmp_path / "from_qat"
    res = CliRunner().invoke(main, ["compile", str(path), "--target", TARGET, "--from-qat", "--artifacts", str(art),
                                    "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert {k: v for k, v in _keys(report).items() if k != "qat"} == _keys(ptq_report)
    assert report["qat"] == qat_report["qat"]
    assert "- calibrator: **qat** (scales learned by quantization-aware fine-tuning" in (out / "report.md").read_text()
    compiled = onnx.load(str(out / "model.onnx"))
    assert set(_act_quant(compiled)) == set(_act_quant(qat_run["result"].ptq_model))

    # a QAT model fine-tuned for one target compiled for another shipped, e.g. TensorRT with the CPU's
    # asymmetric 7-bit scheme; a model without Q/DQ was reported as an int8 QAT artifact
    import shutil
    shutil.copytree(art / recipe.name / f"qat_{TARGET}", art / recipe.name / "qat_trt-int8")
    res = CliRunner().invoke(main, ["compile", str(path), "--target", "trt-int8", "--from-qat", "--artifacts", str(art),
                                    "--out", str(tmp_path / "trt")])
    assert res.exit_code == 2 and f"was fine-tuned for {TARGET}, not trt-int8" in res.output, res.output
    from uadc.quant.qat.run import load_qat_model
    qat_model = load_qat_model(recipe, TARGET, art)
    with pytest.raises(UadcError, match=f"qat_model: fine-tuned for {TARGET}, not trt-int8"):
        api.compile(qat_run["baseline"], "trt-int8", qat_model=qat_model, out=tmp_path / "trt2")
    raw = onnx.load(str(art / recipe.name / f"qat_{TARGET}" / "qat_model.onnx"))   # read from disk: it shipped
    with pytest.raises(UadcError, match=f"qat_model: fine-tuned for {TARGET}, not trt-int8"):
        api.compile(qat_run["baseline"], "trt-int8", qat_model=raw, out=tmp_path / "trt3")
    for record in ('{bad', '{"target": 5}', '{"target": null, "settings": {"weights": {}}}', '{"target": ""}',
                   '{"summary": 5}', "[" * 100_000):   # edited by hand: KeyError, TypeError, RecursionError tracebacks
        raw.metadata_props[-1].value = record
        with pytest.raises(UadcError, match="^qat_model: its uadc.qat record"):
            api.compile(qat_run["baseline"], "trt-int8", qat_model=raw, out=tmp_path / "trt4")
    del raw.metadata_props[:]   # a model that says nothing of its target
    with pytest.raises(UadcError, match="qat_model: it says nothing of the target it was fine-tuned for"):
        api.compile(qat_run["baseline"], "trt-int8", qat_model=raw, out=tmp_path / "trt4")
    wide = onnx.ModelProto()
    wide.CopyFrom(qat_model)
    wide.graph.input[0].type.tensor_type.shape.dim[-1].dim_value = 999
    with pytest.raises(UadcError, match="qat_model: it takes 999 px inputs, the model being compiled "):
        api.compile(qat_run["baseline"], TARGET, qat_model=wide, out=tmp_path / "wide")
    with pytest.raises(UadcError, match="qat_model: it has no Q/DQ nodes"):
        api.compile(qat_run["baseline"], TARGET, qat_model=qat_run["baseline"].fp32, out=tmp_path / "fp32q")
    assert not (tmp_path / "trt").exists() and not (tmp_path / "trt2").exists() and not (tmp_path / "fp32q").exists()

    # Options the QAT model makes moot were accepted and ignored (and --quantize written into the report)
    for extra, said in ((["--quantize", "teacher"], "the QAT model quantizes student, not teacher"),
                        (["--calibrator", "mse"], "own scales, so these do not apply: --calibrator / calibrator"),
                        (["--per-tensor", "--calib-samples", "4"], "do not apply: --calib-samples / calib_samples; "
                                                                   "--per-channel, --per-tensor / per_channel")):
        res = CliRunner().invoke(main, ["compile", str(path), "--target", TARGET, "--from-qat", "--artifacts", str(art),
                                        "--out", str(tmp_path / "moot"), *extra])
        assert res.exit_code == 2 and said in res.output, res.output
    assert report["quantized_partitions"] == ["student"]

    # qat.json is tied to its model: another target's model copied in shipped as this target's, an empty one was
    # "no Q/DQ nodes", `settings: null` compiled with its weights unchecked
    qdir = art / recipe.name / f"qat_{TARGET}"
    model_bytes, meta_text = (qdir / "qat_model.onnx").read_bytes(), (qdir / "qat.json").read_text()
    for model, meta_doc, said in ((b"", None, "is not the one its qat.json describes (empty)"),
                                  (qat_run["baseline"].fp32.SerializeToString(), None, "(its sha256 differs)"),
                                  (None, {**json.loads(meta_text), "settings": None}, "its settings are not what")):
        (qdir / "qat_model.onnx").write_bytes(model_bytes if model is None else model)
        (qdir / "qat.json").write_text(meta_text if meta_doc is None else json.dumps(meta_doc))
        res = CliRunner().invoke(main, ["compile", str(path), "--target", TARGET, "--from-qat", "--artifacts",
                                        str(art), "--out", str(tmp_path / "swapped")])
        assert res.exit_code == 2 and said in res.output, res.output
    (qdir / "qat_model.onnx").write_bytes(model_bytes)
    (qdir / "qat.json").write_text(meta_text)
    both = path.parent / "both.yaml"   # the recipe's compile.quantize changed since: compiled as fine-tuned, unsaid
    both.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "name": recipe.name,
                                    "compile": {"quantize": ["student", "teacher"]}}))
    res = CliRunner().invoke(main, ["compile", str(both), "--target", TARGET, "--from-qat", "--artifacts", str(art),
                                    "--out", str(tmp_path / "both"), "--no-eval"])
    assert res.exit_code == 0 and "the QAT model quantizes student (as `uadc qat` was run), not the recipe's compile.quantize " \
        "student, teacher" in res.output, res.output

    # Stale or damaged: the recipe trained again since (another checkpoint file, same settings), or a
    # qat.json that is not the summary uadc wrote, is one error line, not a silent mixed artifact.
    import torch
    ckpt = art / recipe.name / "checkpoint.pt"
    blob = torch.load(ckpt, weights_only=True)
    torch.save({**blob, "train_seconds": (blob.get("train_seconds") or 0) + 1}, ckpt)
    meta = art / recipe.name / f"qat_{TARGET}" / "qat.json"
    orig = json.loads(meta.read_text())
    edited = [json.dumps({**orig, "settings": s}) for s in ("abc", {**orig["settings"], "weights": "x"},
                                                            {**orig["settings"], "weights": {"bits": 8}})]
    for damage, said in ((None, "fine-tuned from another checkpoint"), ("[1, 2]", "qat.json: not the summary `uadc qat` writes"),
                         ("{not json", "cannot read QAT summary"),   # TypeError / AttributeError / KeyError before:
                         *((e, "its settings are not what `uadc qat` writes") for e in edited)):
        if damage is not None:
            meta.write_text(damage)
        res = CliRunner().invoke(main, ["compile", str(path), "--target", TARGET, "--from-qat", "--artifacts",
                                        str(art), "--out", str(tmp_path / "stale")])
        assert res.exit_code == 2 and said in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / "stale").exists()


def test_a_stop_during_the_compile_after_qat_says_the_qat_model_was_written(qat_run, tmp_path, monkeypatch, caplog):
    """Ctrl-C in the compile that follows `uadc qat` said "nothing was written", while the QAT model had been."""
    from uadc.pipeline import api

    def stop(*a, **k):
        raise KeyboardInterrupt
    art = _artifacts_without_qat(qat_run, tmp_path / "art")
    monkeypatch.setattr(api, "compile", stop)
    with caplog.at_level("INFO", logger="uadc"), pytest.raises(KeyboardInterrupt):
        api.qat(qat_run["recipe_path"], TARGET, epochs=1, artifacts=art)
    written = art / qat_run["recipe"].name / f"qat_{TARGET}" / "qat_model.onnx"
    assert written.is_file() and f"QAT model written: {written}" in caplog.text


def test_a_users_folder_where_qat_writes_is_refused_before_the_epochs(qat_run, tmp_path, monkeypatch):
    """A user's folder at <target>-qat was refused only by the compile after the epochs (the QAT model
    already replaced), with "choose another --out", an option uadc qat does not have."""
    from uadc.pipeline import api
    from uadc.quant.qat import run as qat_run_module
    art = _artifacts_without_qat(qat_run, tmp_path / "art")
    folder = art / qat_run["recipe"].name
    monkeypatch.setattr(qat_run_module, "fine_tune", lambda *a, **k: pytest.fail("fine-tuned before the refusal"))
    for name, flags in ((f"{TARGET}-qat", []), (f"qat_{TARGET}", ["--no-compile"])):
        (folder / name).mkdir()
        (folder / name / "notes.txt").write_text("mine")
        before = sorted(p.relative_to(art) for p in art.rglob("*"))
        res = CliRunner().invoke(main, ["qat", str(qat_run["recipe_path"]), "--target", TARGET, "--artifacts", str(art),
                                        *flags])
        assert res.exit_code == 2, res.output
        line = res.output.strip().splitlines()[-1]
        assert line.startswith(f"error: output folder {folder / name} exists and was not written by uadc; move that "
                               "folder away (uadc qat has no --out)") and "--out (" not in line, line
        assert sorted(p.relative_to(art) for p in art.rglob("*")) == before
        with pytest.raises(UadcError, match="move that folder away"):
            api.qat(qat_run["recipe_path"], TARGET, artifacts=art, compile_after=not flags)
        shutil.rmtree(folder / name)


def test_compile_from_qat_without_qat_model(qat_run, tmp_path):
    art = _artifacts_without_qat(qat_run, tmp_path / "art")
    before = sorted(p.relative_to(art) for p in art.rglob("*"))
    res = CliRunner().invoke(main, ["compile", str(qat_run["recipe_path"]), "--target", TARGET, "--from-qat",
                                    "--artifacts", str(art)])
    assert res.exit_code == 2, res.output
    out = res.output.strip()
    # the hint names the target: `uadc qat` alone fine-tuned for the recipe's, and the compile failed again
    assert out.startswith("error: ") and f"run `uadc qat --target {TARGET}` first" in out and len(out.splitlines()) == 1
    assert "Traceback" not in out and sorted(p.relative_to(art) for p in art.rglob("*")) == before


def test_compile_from_qat_without_checkpoint_does_not_train(recipe_factory, tmp_path):
    art = tmp_path / "art"
    res = CliRunner().invoke(main, ["compile", str(recipe_factory()), "--target", TARGET, "--from-qat",
                                    "--artifacts", str(art)])
    assert res.exit_code == 2, res.output
    out = res.output.strip()
    assert out.startswith("error: ") and "no checkpoint" in out and "--train-if-missing" in out
    assert len(out.splitlines()) == 1 and "Traceback" not in out and not art.exists()


def test_qat_needs_int8_target(recipe_factory, tmp_path):
    res = CliRunner().invoke(main, ["qat", str(recipe_factory()), "--target", "ort-cpu-fp32",
                                    "--artifacts", str(tmp_path / "art")])
    assert res.exit_code == 2 and "needs an int8 target" in res.output
    # compile --from-qat of a float target said "run `uadc qat` first", which uadc qat then refused;
    # the list of QAT targets named three of the five that work
    from uadc.config.recipe import load_recipe
    from uadc.quant.qat.run import load_qat_model
    with pytest.raises(UadcError, match=r"QAT needs an int8 target \(ort-cpu-int8, openvino-cpu-int8, .*\); "
                       "ort-cpu-fp32 is fp32"):
        load_qat_model(load_recipe(recipe_factory()), "ort-cpu-fp32", tmp_path / "art")


def test_qat_without_checkpoint_does_not_train(recipe_factory, tmp_path):
    art = tmp_path / "art"
    res = CliRunner().invoke(main, ["qat", str(recipe_factory()), "--target", TARGET, "--artifacts", str(art)])
    assert res.exit_code == 2, res.output
    out = res.output.strip()
    assert out.startswith("error: ") and "run `uadc train` first" in out and len(out.splitlines()) == 1
    assert not art.exists()


def test_qat_with_another_recipes_baseline_compiles_into_its_own_folder(qat_run, tmp_path):
    """uadc.qat(recipe b, source=Baseline of recipe a) wrote the QAT model under b and compiled it into a's
    folder with a's deploy settings (b's postprocess and false-alarm rate ignored)."""
    import yaml

    import uadc
    with pytest.raises(UadcError, match="^qat: expected a recipe, a checkpoint, a KDModel or a Baseline, got int 42"):
        uadc.qat(qat_run["recipe_path"], TARGET, source=42)   # said "compile: ..."
    cfg = yaml.safe_load(qat_run["recipe_path"].read_text())
    cfg.update(name="other", deploy={"postprocess": True, "false_alarm_rate": 0.2})
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(cfg))
    res = uadc.qat(tmp_path / "other.yaml", TARGET, epochs=1, source=qat_run["baseline"], artifacts=tmp_path / "art")
    assert res.compiled.path == tmp_path / "art" / "other" / f"{TARGET}-qat"
    manifest = json.loads((res.compiled.path / "artifact.json").read_text())
    assert manifest["recipe"] == "other" and "pred_label" in manifest["outputs"] and manifest["postprocess"]
    assert not (qat_run["art"] / qat_run["recipe"].name / f"{TARGET}-qat").exists()


def test_a_qat_model_with_other_weight_bits_than_the_recipe_is_refused(qat_run):
    """`compile.reduce_range: false` at QAT, then the default recipe (7-bit) with --from-qat: the 8-bit model shipped
    under a 7-bit recipe (weights that saturate without VNNI), and nothing recorded its weights."""
    from uadc.quant.qat.run import load_qat_model
    recipe, art = qat_run["recipe"], qat_run["art"]
    assert qat_run["result"].summary["settings"]["weights"] == {"bits": 7, "per_channel": True}
    assert load_qat_model(recipe, TARGET, art) is not None
    for change, said in (({"reduce_range": False}, "has 7-bit per-channel weights, recipe tiny asks for 8-bit "
                                                   "per-channel"),
                         ({"per_channel": False}, "asks for 7-bit per-tensor")):
        with pytest.raises(UadcError, match=said):
            load_qat_model(recipe.with_overrides(compile=change), TARGET, art)
    from uadc.config.targets import get_target
    from uadc.quant.qat.run import check_qat_model   # the model read from disk into the API: the same check
    raw = onnx.load(str(art / recipe.name / f"qat_{TARGET}" / "qat_model.onnx"))
    check_qat_model(raw, get_target(TARGET), None, None)
    with pytest.raises(UadcError, match="qat_model: it has 7-bit per-channel weights, the recipe asks for 8-bit"):
        check_qat_model(raw, get_target(TARGET), None, False)
