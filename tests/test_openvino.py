"""OpenVINO CPU targets: the same ONNX / Q/DQ ONNX as the ORT targets, run by OpenVINO, with the
same verification, metrics and report; a clear one-line error when OpenVINO is missing."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

import uadc
from uadc.config.targets import get_target
from uadc.core.errors import UadcError


def test_targets_share_the_ort_scheme_and_passes():
    for ov_name, ort_name, hint in [("openvino-cpu-fp32", "ort-cpu-fp32", "f32"),
                                    ("openvino-cpu-int8", "ort-cpu-int8", "f32"),
                                    ("openvino-cpu-bf16", "ort-cpu-fp32", "bf16"),
                                    ("openvino-cpu-int8-bf16", "ort-cpu-int8", "bf16")]:
        ov_t, ort_t = get_target(ov_name), get_target(ort_name)
        assert ov_t.runtime == "openvino" and ov_t.device == "cpu" and ov_t.quantized == ort_t.quantized
        assert ov_t.passes == ort_t.passes and ov_t.scheme == ort_t.scheme
        assert ov_t.inference_hint == hint and ort_t.float_precision == "fp32"


def test_missing_openvino_is_one_line_error(monkeypatch):
    from uadc.backends import openvino as ov
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(UadcError, match=r"uadc\[openvino\]") as e:
        ov.compile_model(b"")
    assert "\n" not in str(e.value)
    assert ov.import_error() is not None
    from uadc.pipeline.doctor import doctor   # it said `run` for OpenVINO targets whenever the package's metadata existed
    assert {t.can for t in doctor().targets if t.runtime == "openvino"} == {"unavailable"}


def test_an_openvino_target_without_openvino_is_refused_before_any_work(base, tmp_path, monkeypatch):
    """compile exported, calibrated and checked the model (50 s on 32 px data), and qat ran all its epochs
    and wrote its model, before saying that OpenVINO is not installed."""
    import uadc.pipeline.api as api
    import uadc.pipeline.compile as comp

    def work_started(*_a, **_k):
        raise AssertionError("the work started")

    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setattr(comp, "check_replaceable", work_started)   # the first step after the options' checks
    with pytest.raises(UadcError, match=r"^OpenVINO is not installed: pip install 'uadc\[openvino\]' \(a runtime-only install: pip install openvino\)$"):
        uadc.compile(base, "openvino-cpu-int8", out=tmp_path / "a")
    monkeypatch.setattr(api, "baseline", work_started)   # it loads the checkpoint and the images QAT trains on
    with pytest.raises(UadcError, match=r"^OpenVINO is not installed"):
        uadc.qat(base.recipe, target="openvino-cpu-int8", artifacts=tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_data):
    from conftest import write_recipe
    from uadc.config.recipe import load_recipe
    from uadc.models import build_model
    d = tmp_path_factory.mktemp("ov")
    recipe = load_recipe(write_recipe(d / "tiny.yaml", tiny_data, train={"threads": 1}))
    model = build_model(recipe.cfg["model"], recipe.data.image_size)  # pretrained teacher, untrained student
    return uadc.baseline(model, recipe, threads=1)


def test_openvino_fp32_and_int8_compile_verify_and_report(base, tmp_path, monkeypatch):
    pytest.importorskip("openvino", reason="OpenVINO not installed (optional extra uadc[openvino])")
    from uadc.backends import openvino as ov
    from uadc.backends.ort import make_session

    fp32 = uadc.compile(base, "openvino-cpu-fp32", out=tmp_path / "fp32", latency_runs=3, threads=1)
    assert fp32.latency.runtime == "openvino CPU" and not fp32.latency.emulated
    assert fp32.verification["fp32_vs_compiled"]["max_abs"] < 1e-3  # same FP32 math (f32 pinned, not bf16)
    assert fp32.metrics.compiled_by == "openvino CPU"
    assert abs(fp32.metrics.drop["mean"]["image_auroc"]) < 1e-3
    report = json.loads((tmp_path / "fp32" / "report.json").read_text())
    assert report["runtime"] == "openvino" and report["environment"]["openvino"] == ov.version()
    assert "on openvino" in (tmp_path / "fp32" / "report.md").read_text()
    fp32_path = tmp_path / "fp32" / "model.onnx"
    # uadc.evaluate(artifact) scores it on OpenVINO, as its compile did (it ran ONNX Runtime before)
    calls = []
    real = ov.ov_predictor
    monkeypatch.setattr(ov, "ov_predictor", lambda compiled: calls.append(compiled) or real(compiled))
    again = uadc.evaluate(tmp_path / "fp32", base.recipe, write=False)
    assert len(calls) == 1 and again.mean == pytest.approx(fp32.metrics.compiled["mean"], abs=1e-9)
    by_file = uadc.evaluate(fp32_path, base.recipe, write=False)   # its model file too (ONNX Runtime before)
    assert len(calls) == 2 and by_file.extra["runtime"] == "openvino" and by_file.mean == again.mean
    beside = tmp_path / "fp32" / "other.onnx"   # another ONNX beside an artifact is not its target's model
    beside.write_bytes(fp32_path.read_bytes())
    assert uadc.evaluate(beside, base.recipe, write=False).extra["runtime"] == "onnxruntime" and len(calls) == 2
    beside.unlink()
    monkeypatch.undo()

    int8 = uadc.compile(base, "openvino-cpu-int8", out=tmp_path / "int8", latency_runs=3, threads=1)
    assert sum(int8.qdq_nodes.values()) > 0 and int8.latency.runtime == "openvino CPU"
    # OpenVINO runs the very Q/DQ ONNX that ONNX Runtime runs. Two INT8 kernels round differently
    # (and by CPU: VNNI, AMX), so the maps are compared through the FP32 model: OpenVINO's INT8 map
    # departs from it about as far as ONNX Runtime's does; not float (no departure), not broken.
    path = tmp_path / "int8" / "model.onnx"
    x = base.sample_feeds(1, 4)[0]["image"]
    amap_ov, score_ov = ov.infer_fn(ov.compile_model(path, 1))(x)
    amap_ort, score_ort = make_session(path, 1).run(None, {"image": x})
    amap_fp32, _ = make_session(fp32_path, 1).run(None, {"image": x})
    assert amap_ov.shape == amap_ort.shape and score_ov.shape == score_ort.shape
    assert np.corrcoef(amap_ov.ravel(), amap_ort.ravel())[0, 1] > 0.95

    def departure(amap):
        return float(np.abs(amap - amap_fp32).mean() / np.abs(amap_fp32).mean())
    assert 0.25 < departure(amap_ov) / departure(amap_ort) < 3.0


def test_verify_without_openvino_says_bf16_was_not_exercised(base, tmp_path, monkeypatch, caplog):
    """A bf16 artifact verified where openvino does not import ran its ONNX graph on ONNX Runtime in
    FP32 (max_abs 0 against the golden outputs), labelled "emulating openvino cpu bf16": a vacuous PASS."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (optional extra uadc[openvino])")
    from uadc.backends import openvino as ov
    if ov.precision_here("bf16") != "bf16":
        pytest.skip("this CPU does not run bf16: a bf16 target is refused at compile")
    res = uadc.compile(base, "openvino-cpu-bf16", out=tmp_path / "bf16", latency_runs=1, threads=1, evaluate=False)
    monkeypatch.setattr(ov, "import_error", lambda: "OpenVINO is not installed")
    with caplog.at_level("WARNING", logger="uadc"):
        v = uadc.verify(res.path, threads=1)
    assert v.runtime["candidate"] == "onnxruntime CPU (openvino not importable: the ONNX graph, bf16 not exercised)"
    assert "its bf16 inference is not exercised" in caplog.text


def test_a_bf16_target_on_a_cpu_without_bf16_is_refused_before_any_work(base, tmp_path, monkeypatch):
    """OpenVINO takes the bf16 hint on such a CPU and computes in f32 without a word: the artifact said bf16
    while its thresholds and kNN bank were f32 ones, and a bf16 CPU then scored it 1.4x differently."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (optional extra uadc[openvino])")
    from uadc.backends import openvino as ov
    import uadc.pipeline.compile as comp
    monkeypatch.setattr(ov, "precision_here", lambda hint: "f32")
    monkeypatch.setattr(comp, "check_replaceable", lambda *a, **k: pytest.fail("the work started"))
    for target in ("openvino-cpu-bf16", "openvino-cpu-int8-bf16"):
        with pytest.raises(UadcError, match=f"^{target}: this CPU does not run bf16 \\(OpenVINO computes in f32 here"):
            uadc.compile(base, target, out=tmp_path / "a")
    assert not list(tmp_path.iterdir())


def test_openvino_reports_unloadable_model(tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO not installed (optional extra uadc[openvino])")
    from uadc.backends import openvino as ov
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(UadcError, match="OpenVINO cannot load the model"):
        ov.compile_model(bad)


def _knn_like_graph(offset: float = 40.0):
    """image -> teacher conv -> anomaly_map (head), and a score tail the map does not need: the
    distance of the pooled features to a far-away bank point as |q|^2 + |b|^2 - 2 q.b, which subtracts
    near-equal numbers (as the image kNN's centred distance does)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    bank = (np.full((8, 1), offset) + rng.standard_normal((8, 1))).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bank, "bank"),
             numpy_helper.from_array(np.array([(bank ** 2).sum()], np.float32), "bank_sq"),
             numpy_helper.from_array(np.array([2.0], np.float32), "two"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "axes_c"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes_hw")]
    shift = numpy_helper.from_array(np.full((8,), offset, np.float32), "shift")
    nodes = [helper.make_node("Conv", ["image", "w"], ["feat0"], "teacher/conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["feat0", "shift_b"], ["feat"], "teacher/shift"),
             helper.make_node("Sub", ["feat", "shift_b"], ["centred"], "head/centre"),
             helper.make_node("Mul", ["centred", "centred"], ["sq"], "head/sq"),
             helper.make_node("ReduceMean", ["sq", "axes_c1"], ["anomaly_map"], "head/map", keepdims=1),
             helper.make_node("ReduceMean", ["feat", "axes_hw"], ["q"], "head/pool", keepdims=0),
             helper.make_node("Mul", ["q", "q"], ["q2"], "head/q2"),
             helper.make_node("ReduceSum", ["q2", "axes_one"], ["qsq"], "head/qsq", keepdims=0),
             helper.make_node("MatMul", ["q", "bank"], ["dot"], "head/dot"),
             helper.make_node("Reshape", ["dot", "flat"], ["dot1"], "head/flat"),
             helper.make_node("Add", ["qsq", "bank_sq"], ["norms"], "head/norms"),
             helper.make_node("Mul", ["dot1", "two"], ["dot2"], "head/dot2"),
             helper.make_node("Sub", ["norms", "dot2"], ["score"], "head/dist")]
    inits += [shift, numpy_helper.from_array(np.array([1], np.int64), "axes_c1"),
              numpy_helper.from_array(np.array([1], np.int64), "axes_one"),
              numpy_helper.from_array(np.array([-1], np.int64), "flat")]
    nodes.insert(1, helper.make_node("Reshape", ["shift", "shift_shape"], ["shift_b"], "teacher/shift_shape"))
    inits.append(numpy_helper.from_array(np.array([1, 8, 1, 1], np.int64), "shift_shape"))
    del inits[4]  # axes_c: unused
    graph = helper.make_graph(nodes, "knn_like", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [None, 1, 8, 8]),
                               helper.make_tensor_value_info("score", TensorProto.FLOAT, [None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_float_tail_cuts_where_the_map_stops():
    from uadc.backends.ort import make_session
    from uadc.export.partitions import float_tail, partition_of
    model = _knn_like_graph()
    body, tail = float_tail(model)
    assert [o.name for o in body.graph.output] == ["anomaly_map", "feat"]
    assert [i.name for i in tail.graph.input] == ["feat"] and [o.name for o in tail.graph.output] == ["score"]
    assert {n.name for n in tail.graph.node} == {"head/pool", "head/q2", "head/qsq", "head/dot", "head/flat",
                                                  "head/norms", "head/dot2", "head/dist"}
    assert all(partition_of(n) == "head" for n in tail.graph.node)
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    amap, score = make_session(model, 1).run(None, {"image": x})
    b_map, feat = make_session(body, 1).run(None, {"image": x})
    (t_score,) = make_session(tail, 1).run(None, {"feat": feat})
    np.testing.assert_array_equal(b_map, amap)
    np.testing.assert_allclose(t_score, score, rtol=1e-6)
    # a graph whose outputs all need the map (or without a head) has no tail
    only_map = _knn_like_graph()
    del only_map.graph.output[1]
    assert float_tail(only_map) is None


def test_bf16_runs_the_score_tail_in_f32():
    """OpenVINO at bf16 rounded the kNN-style distance (near-equal terms subtracted) to noise; the
    network runs in bf16 and the nodes the map does not need in f32, so the score keeps FP32's value."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (optional extra uadc[openvino])")
    from uadc.backends import openvino as ov
    model = _knn_like_graph()
    compiled = ov.compile_model(model, 1, "bf16")
    if ov.inference_precision(compiled) != "bf16":
        pytest.skip("this CPU has no bf16: OpenVINO runs f32 whatever the hint")
    assert isinstance(compiled, ov.TwoPartModel)
    x = np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float32)
    amap32, score32 = ov.infer_fn(ov.compile_model(model, 1, "f32"))(x)
    amap16, score16 = ov.infer_fn(compiled)(x)
    _, whole16 = ov.infer_fn(ov._compile(model, 1, "bf16"))(x)   # one bf16 model: what uadc ran before
    assert np.abs(whole16 - score32).max() > 0.05 * np.abs(score32).max()  # the graph is bf16-sensitive
    np.testing.assert_allclose(score16, score32, rtol=0.02)
    assert amap16.shape == amap32.shape and np.abs(amap16 - amap32).max() < 0.05 * np.abs(amap32).max()
    assert ov.run_first_output(compiled, {"image": x}).shape == amap32.shape  # the graph's first output


def test_a_shape_the_body_hands_the_tail_is_no_output():
    """An image kNN's F.normalize exports an Expand to the batch's Shape, made in the bf16 body and read by the
    f32 tail: taken for an output of 1 row, it failed every openvino-cpu-bf16 compile of a kNN recipe
    (`OpenVINO returned outputs {'val_0': (1,)} for 2 image(s)`)."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (optional extra uadc[openvino])")
    from onnx import helper
    from uadc.backends import openvino as ov
    model = _knn_like_graph()
    dist = next(n for n in model.graph.node if n.name == "head/dist")
    dist.output[0] = "dist"
    model.graph.node.extend([helper.make_node("Shape", ["feat"], ["batch"], "teacher/batch", start=0, end=1),
                             helper.make_node("Reshape", ["dist", "batch"], ["score"], "head/rows")])
    compiled = ov.compile_model(model, 1, "bf16")
    if not isinstance(compiled, ov.TwoPartModel):
        pytest.skip("this CPU has no bf16: OpenVINO runs one f32 model, no tail")
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    got = ov._requester(compiled)({"image": x})
    assert {n: a.shape for n, a in got.items()} == {"anomaly_map": (2, 1, 8, 8), "score": (2,)}


def test_a_detector_on_openvino_can_be_shared_by_threads(base, tmp_path, tiny_data):
    """Four threads predicting through one OpenVINO Detector: most calls failed with "Infer Request is busy"
    (one infer request), reported as a RuntimeFault of the graph."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (optional extra uadc[openvino])")
    from concurrent.futures import ThreadPoolExecutor
    from uadc.runtime import Detector
    res = uadc.compile(base, "openvino-cpu-fp32", out=tmp_path / "ov", latency_runs=1, threads=1, evaluate=False)
    det = Detector.load(res.path)
    files = sorted((tiny_data / "gray" / "test").rglob("*.png"))[:6] * 8
    serial = [det.predict(f).score for f in files[:6]]
    with ThreadPoolExecutor(4) as pool:
        scores = list(pool.map(lambda f: det.predict(f).score, files))
    assert det.backend_name == "openvino" and scores == serial * 8


_TWO_MODELS_THEN_CTRL_C = """
import gc, signal, onnx
from onnx import TensorProto, helper
from uadc.backends import openvino as ov
io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in "xy"]
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", io[:1], io[1:])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
first, second = ov.compile_model(model), ov.compile_model(model)
del first; gc.collect(); del second; gc.collect()   # released in the order they were made
try:
    signal.raise_signal(signal.SIGINT)
except KeyboardInterrupt:
    print("KeyboardInterrupt")
"""


def test_ctrl_c_after_two_openvino_models_are_released_is_a_keyboard_interrupt(tmp_path):
    """OpenVINO's CPU plugin left the thread's signal stack pointing at memory it had freed (two models
    released first-in first-out): the next Ctrl-C ended the process with SIGSEGV (a test worker died on it)."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (optional extra uadc[openvino])")
    import subprocess
    for faults in ([], ["-X", "faulthandler"]):   # no signal stack of its own, and faulthandler's
        p = subprocess.run([sys.executable, *faults, "-c", _TWO_MODELS_THEN_CTRL_C], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
        assert (p.returncode, p.stdout.strip()) == (0, "KeyboardInterrupt"), (faults, p.returncode, p.stderr[-800:])


def test_a_compile_for_onnx_runtime_does_not_import_openvino(int8_artifact, tmp_path):
    """The report's environment records OpenVINO's version; importing it for that started OpenVINO's
    telemetry (a thread left running, a client ID and counters written to ~/intel/) in every compile."""
    import os
    import subprocess
    recipe, art, _ = int8_artifact
    code = ("import sys, uadc; r = uadc.compile(sys.argv[1], 'ort-cpu-fp32', artifacts=sys.argv[2], out=sys.argv[3], "
            "latency_runs=1, threads=1, evaluate=False); print(r.environment['openvino'], "
            "'openvino' in sys.modules)")
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    got = subprocess.run([sys.executable, "-c", code, str(recipe), str(art), str(tmp_path / "fp32")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-2000:]
    from uadc.backends.openvino import version
    assert got.stdout.split() == [str(version()), "False"]   # "None" where OpenVINO is not installed
    assert not (tmp_path / "home" / "intel").exists()


def test_importing_openvino_leaves_the_start_method_threads_and_home_alone(tmp_path):
    """`import openvino` sends a telemetry event at import: a thread pool left running forked a process,
    which fixed multiprocessing's start method to fork for the caller, and wrote ~/intel/."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (optional extra uadc[openvino])")
    import os
    import subprocess
    code = ("import multiprocessing as mp, os, threading, time\n"
            "from uadc.backends import openvino as ov\n"
            "ov.require(); time.sleep(1)\n"
            "print(mp.get_start_method(allow_none=True), len(threading.enumerate()), os.environ.get('CI'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "HOME": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["None", "1", "None"] and not (tmp_path / "intel").exists(), p.stdout


def test_an_openvino_artifact_where_openvino_does_not_import_says_it_runs_on_onnx_runtime(base, tmp_path, caplog,
                                                                                        monkeypatch):
    """Backend auto ran an OpenVINO artifact on ONNX Runtime without a word (fp32), or with only a rounding
    note (int8) that did not say OpenVINO was missing."""
    pytest.importorskip("openvino", reason="OpenVINO not installed (optional extra uadc[openvino])")
    import logging

    from uadc.backends import openvino as ov
    from uadc.runtime import Detector
    uadc.compile(base, "openvino-cpu-fp32", out=tmp_path / "ov", latency_runs=2, threads=1, evaluate=False)
    monkeypatch.setattr(ov, "import_error", lambda: "OpenVINO is not installed: pip install 'uadc[openvino]'")
    with caplog.at_level(logging.WARNING, "uadc"):
        det = Detector.load(tmp_path / "ov")
    assert det.backend_name == "onnxruntime"
    assert "an artifact of target openvino-cpu-fp32, but OpenVINO is not installed: pip install 'uadc[openvino]': " \
           "running it on ONNX Runtime (CPU) instead" in caplog.text
    monkeypatch.undo()   # an engine there and no TensorRT: the warning named ONNX Runtime while OpenVINO ran it
    (tmp_path / "ov" / "model.engine").write_bytes(b"stray")
    if importlib.util.find_spec("tensorrt") is None:
        det = Detector.load(tmp_path / "ov")
        assert det.backend_name == "openvino" and any("TensorRT cannot run here" in w and w.endswith(
            "running model.onnx on OpenVINO instead") for w in det.warnings), det.warnings
