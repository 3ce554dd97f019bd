"""TensorRT backend: Q/DQ rule validator, calibration cache, build plans, trtexec scripts, engines.

Everything except the engine tests runs without TensorRT. Engine build and ORT-vs-TRT
comparison tests run only where ``tensorrt`` imports and a CUDA GPU is visible.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from uadc.backends.tensorrt import (
    BuildSettings,
    build_engine,
    plan_build,
    run_engine,
    trt_available,
    trtexec_command,
    write_build_script,
)
from uadc.backends.tensorrt.cache import (
    cache_header,
    read_calibration_cache,
    read_calibration_header,
    trt_version_code,
    write_calibration_cache,
)
from uadc.backends.tensorrt.rules import RULES, Violation, check_trt_rules, format_violations
from uadc.core.errors import UadcError
from uadc.verify.polygraphy_compare import compare
from uadc.verify.trt import compare_onnx_vs_trt

TRT_OK, TRT_REASON = trt_available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=f"TensorRT engine tests need TensorRT and a GPU: {TRT_REASON}")
H = W = 8


# ------------------------------------------------------------------ tiny AD-shaped models


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _ad_tail(feature: str) -> list[onnx.NodeProto]:
    """feature (N, 4, H, W) -> anomaly_map (N, 1, H, W) and score (N)."""
    return [
        helper.make_node("ReduceMean", [feature], ["anomaly_map"], name="map", axes=[1], keepdims=1),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], name="score", axes=[1, 2, 3], keepdims=0),
    ]


def _io() -> tuple[list, list]:
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, H, W])]
    outputs = [
        helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", 1, H, W]),
        helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
    ]
    return inputs, outputs


def _weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), rng.normal(0, 0.1, 4).astype(np.float32)


def _model(nodes: list, inits: list, opset: int = 13) -> onnx.ModelProto:
    inputs, outputs = _io()
    graph = helper.make_graph(nodes, "tiny_ad", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # readable by TensorRT 8.5's parser and ONNX Runtime
    return model


def float_model(seed: int = 0) -> onnx.ModelProto:
    w, b = _weights(seed)
    conv = helper.make_node("Conv", ["image", "w", "b"], ["feat"], name="conv", pads=[1, 1, 1, 1])
    return _model([conv, *_ad_tail("feat")], [_init("w", w), _init("b", b)])


def qdq_model() -> onnx.ModelProto:
    """Conv with per-tensor int8 Q/DQ on the input and per-channel (axis 0) Q/DQ on the weights."""
    w, b = _weights()
    inits = [
        _init("x_scale", np.float32(4.0 / 127)),
        _init("x_zp", np.int8(0)),
        _init("w", w),
        _init("w_scale", (np.abs(w).reshape(4, -1).max(axis=1) / 127).astype(np.float32)),
        _init("w_zp", np.zeros(4, np.int8)),
        _init("b", b),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["image", "x_scale", "x_zp"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_x"),
        helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["w_q"], name="q_w", axis=0),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="dq_w", axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq", "b"], ["feat"], name="conv", pads=[1, 1, 1, 1]),
        *_ad_tail("feat"),
    ]
    return _model(nodes, inits)


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.name == name)


def _set_init(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    inits = model.graph.initializer
    index = next(i for i, init in enumerate(inits) if init.name == name)
    inits[index].CopyFrom(_init(name, array))


def _set_attr(model: onnx.ModelProto, node_name: str, **attrs) -> None:
    node = _node(model, node_name)
    for key, value in attrs.items():
        kept = [a for a in node.attribute if a.name != key]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute(key, value)])


def _run_ort(model: onnx.ModelProto, images: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["anomaly_map", "score"], {"image": images})


def _images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, H, W)).astype(np.float32)


# ------------------------------------------------------------------ Q/DQ rules


def test_valid_qdq_model_has_no_violations_and_runs_in_ort():
    model = qdq_model()
    onnx.checker.check_model(model, full_check=True)
    assert check_trt_rules(model) == []
    anomaly_map, score = _run_ort(model, _images(2))
    assert anomaly_map.shape == (2, 1, H, W) and score.shape == (2,)
    assert format_violations([]) == "no TensorRT Q/DQ rule violations"


def test_prequantized_int8_weights_and_float_models_are_clean():
    model = qdq_model()
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    scale = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w_scale"))
    q = np.clip(np.round(w / scale[:, None, None, None]), -127, 127).astype(np.int8)
    _set_init(model, "w", q)  # DQ now reads int8 weights directly; drop the weight Q
    model.graph.node.remove(_node(model, "q_w"))
    _node(model, "dq_w").input[0] = "w"
    assert check_trt_rules(model) == []
    _run_ort(model, _images(1))
    assert check_trt_rules(float_model()) == []


def _opset_10(m):
    m.opset_import[0].version = 10


def _asymmetric(m):
    _set_init(m, "x_zp", np.int8(3))


def _uint8_zero_point(m):
    _set_init(m, "x_zp", np.uint8(0))


def _missing_zero_point(m):
    for name in ("q_x", "dq_x"):
        del _node(m, name).input[2]


def _dq_without_zero_point(m):   # an absent zero point is 0: no QDQ010 "different zero point" besides QDQ003
    del _node(m, "dq_x").input[2]


def _nonpositive_scale(m):
    _set_init(m, "w_scale", np.array([0.01, 0.0, 0.02, 0.01], np.float32))


def _runtime_scale(m):
    # scale = max|image| / 127 computed in the graph (dynamic quantization), static scalar shape
    m.graph.initializer.append(_init("inv127", np.float32(1 / 127)))
    nodes = [
        helper.make_node("Abs", ["image"], ["abs"], name="abs"),
        helper.make_node("ReduceMax", ["abs"], ["amax"], name="amax", keepdims=0),
        helper.make_node("Mul", ["amax", "inv127"], ["dyn_scale"], name="dyn_scale"),
    ]
    for node in reversed(nodes):
        m.graph.node.insert(0, node)
    for name in ("q_x", "dq_x"):
        _node(m, name).input[1] = "dyn_scale"


def _dynamic_shaped_scale(m):
    m.graph.input.append(helper.make_tensor_value_info("act_scale", TensorProto.FLOAT, ["S"]))
    for name in ("q_x", "dq_x"):
        _node(m, name).input[1] = "act_scale"


def _per_channel_activation(m):
    _set_init(m, "x_scale", np.full(3, 4.0 / 127, np.float32))
    _set_init(m, "x_zp", np.zeros(3, np.int8))
    for name in ("q_x", "dq_x"):
        _set_attr(m, name, axis=1)


def _wrong_weight_axis(m):
    # 3 scales along axis 1 (input channels): valid ONNX, but TensorRT quantizes per output channel
    _set_init(m, "w_scale", np.full(3, 0.01, np.float32))
    _set_init(m, "w_zp", np.zeros(3, np.int8))
    for name in ("q_w", "dq_w"):
        _set_attr(m, name, axis=1)


def _blocked(m):
    for name in ("q_w", "dq_w"):
        _set_attr(m, name, block_size=2)


def _unpaired_q(m):
    m.graph.initializer.append(_init("x_scale_2", np.float32(3.0 / 127)))
    _node(m, "dq_x").input[1] = "x_scale_2"


def _q_without_dq(m):
    _node(m, "conv").input[0] = "x_q"  # the quantized tensor goes straight into Conv
    m.graph.node.remove(_node(m, "dq_x"))


def _scale_of_rank_4(m):   # (K,1,1,1): ONNX Runtime refuses it ("scale must be 1D"); check-trt passed it
    w, _ = _weights()
    _set_init(m, "w_scale", (np.abs(w).reshape(4, -1).max(axis=1) / 127).astype(np.float32).reshape(4, 1, 1, 1))


def _fp16_scale_before_opset_19(m):
    _set_init(m, "x_scale", np.float16(4.0 / 127))


def _qoperator_op(m):
    m.graph.node.append(helper.make_node("DynamicQuantizeLinear", ["image"], ["y", "y_s", "y_zp"], name="dql"))


VIOLATION_CASES = {
    "opset_below_13": (_opset_10, {"QDQ001"}),
    "asymmetric_zero_point": (_asymmetric, {"QDQ002"}),
    "uint8_zero_point": (_uint8_zero_point, {"QDQ003"}),
    "missing_zero_point_is_uint8": (_missing_zero_point, {"QDQ003"}),
    "dq_without_zero_point": (_dq_without_zero_point, {"QDQ003"}),
    "non_positive_scale": (_nonpositive_scale, {"QDQ004"}),
    "runtime_scale": (_runtime_scale, {"QDQ005"}),
    "dynamic_shaped_scale": (_dynamic_shaped_scale, {"QDQ005", "QDQ006"}),
    "per_channel_activation": (_per_channel_activation, {"QDQ007"}),
    "weight_axis_not_output_channels": (_wrong_weight_axis, {"QDQ008"}),
    "blocked_quantization": (_blocked, {"QDQ009"}),
    "q_with_other_scale_in_dq": (_unpaired_q, {"QDQ010"}),
    "q_without_dq": (_q_without_dq, {"QDQ010"}),
    "qoperator_op": (_qoperator_op, {"QDQ011"}),
    "scale_of_rank_4": (_scale_of_rank_4, {"QDQ012"}),
    "fp16_scale_before_opset_19": (_fp16_scale_before_opset_19, {"QDQ012"}),
}


@pytest.mark.parametrize("case", sorted(VIOLATION_CASES))
def test_each_violation_is_caught_with_its_rule_id(case):
    mutate, expected = VIOLATION_CASES[case]
    model = qdq_model()
    mutate(model)
    violations = check_trt_rules(model)
    assert {v.rule for v in violations} == expected, format_violations(violations)
    assert all(isinstance(v, Violation) and v.node and v.message and v.rule in RULES for v in violations)


def test_qdq_in_subgraphs_and_in_external_data_is_checked(tmp_path):
    """Both passed with 0 violations: check-trt read the top-level graph only, and took the values it
    could not read (external data) as fine."""
    from uadc.backends.tensorrt.check import check_trt_model
    m = qdq_model()
    _asymmetric(m)
    onnx.save(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data", size_threshold=0)
    res = check_trt_model(tmp_path / "ext.onnx")
    assert {v.rule for v in res.violations} == {"QDQ002"} and res.has_qdq
    body = lambda k, zp: helper.make_graph(   # noqa: E731
        [helper.make_node("QuantizeLinear", ["image", f"s{k}", f"z{k}"], [f"q{k}"], name=f"q{k}"),
         helper.make_node("DequantizeLinear", [f"q{k}", f"s{k}", f"z{k}"], [f"o{k}"], name=f"dq{k}")],
        f"body{k}", [], [helper.make_tensor_value_info(f"o{k}", TensorProto.FLOAT, None)],
        [_init(f"s{k}", np.float32(0.5)), _init(f"z{k}", np.int8(zp))])
    cond = helper.make_node("If", ["c"], ["feat"], then_branch=body(1, 5), else_branch=body(2, 0))
    inputs, outputs = _io()
    sub = helper.make_model(helper.make_graph([cond], "g", [*inputs, helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                                              outputs), opset_imports=[helper.make_opsetid("", 13)])
    assert [(v.rule, v.node) for v in check_trt_rules(sub)] == [("QDQ002", "q1"), ("QDQ002", "dq1")]
    del sub.graph.output[:]
    sub.graph.output.append(helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 3, 8, 8]))
    onnx.save(sub, str(tmp_path / "sub.onnx"), save_as_external_data=True, location="sub.data", size_threshold=0)
    assert [v.rule for v in check_trt_model(tmp_path / "sub.onnx").violations] == ["QDQ002", "QDQ002"]   # from any cwd


def test_violation_names_node_and_explains_fix():
    model = qdq_model()
    _asymmetric(model)
    text = format_violations(check_trt_rules(model))
    assert text.startswith("QDQ002 [dq_x]") or "QDQ002 [dq_x]" in text
    assert "symmetric" in text


def test_weight_axis_rule_knows_gemm_and_conv_transpose():
    w = np.ones((3, 5), np.float32)  # Gemm B (K=3, N=5) without transB: output features on axis 1
    inits = [_init("w", w), _init("s", np.full(5, 0.01, np.float32)), _init("z", np.zeros(5, np.int8))]
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], name="q", axis=1),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wdq"], name="dq", axis=1),
        helper.make_node("Gemm", ["x", "wdq"], ["y"], name="gemm"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=9)
    assert check_trt_rules(model) == []
    for node in model.graph.node[:2]:
        node.attribute[0].i = 0
    assert {v.rule for v in check_trt_rules(model)} == {"QDQ008"}


# ------------------------------------------------------------------ calibration cache


def test_calibration_cache_header_and_known_value(tmp_path):
    path = tmp_path / "calib.cache"
    write_calibration_cache(path, {"image": 1.0}, trt_version="8.5.1")
    # scale = 1/127 = 2^-7 * 1.00787...: biased exponent 120 -> 0x78 << 23 = 0x3c000000;
    # mantissa round(0.0078740 * 2^23) = 66052 = 0x10204 -> bits 0x3c010204
    assert path.read_text() == "TRT-8501-EntropyCalibration2\nimage: 3c010204\n"
    assert read_calibration_cache(path)["image"] == pytest.approx(1.0, rel=1e-7)
    assert read_calibration_header(path) == (8501, "EntropyCalibration2")


def test_calibration_cache_round_trip(tmp_path):
    amax = {
        "image": 2.640625,
        "/teacher/layer1/Relu_output_0": 0.0123,
        "input:0": 123.456,  # names may contain ':'
        "(Unnamed Layer* 0) [Convolution]_output": 7.5e-4,
        "score": 1e4,
    }
    path = tmp_path / "calib.cache"
    write_calibration_cache(path, amax, trt_version="10.3.0", calibrator="MinMaxCalibration")
    back = read_calibration_cache(path)
    assert list(back) == list(amax)
    for name, value in amax.items():
        assert back[name] == pytest.approx(value, rel=2e-7)  # float32 scale
    assert path.read_text().splitlines()[0] == "TRT-100300-MinMaxCalibration"


def test_reads_cache_written_by_tensorrt(tmp_path):
    # First lines of nvdla/sw umd/utils/calibdata/resnet50.txt, written by TensorRT 5.1's IInt8EntropyCalibrator2.
    path = tmp_path / "resnet50.txt"
    path.write_text(
        "TRT-5101-EntropyCalibration2\n"
        "data: 3f9839e4\n"
        "(Unnamed Layer* 0) [Convolution]_output: 40d0f64f\n"
        "prob: 3a7366ce\n"
    )
    amax = read_calibration_cache(path)
    assert read_calibration_header(path) == (5101, "EntropyCalibration2")
    assert amax["data"] == pytest.approx(struct.unpack(">f", bytes.fromhex("3f9839e4"))[0] * 127)
    assert amax["data"] == pytest.approx(151.0369, rel=1e-5)
    assert set(amax) == {"data", "(Unnamed Layer* 0) [Convolution]_output", "prob"}


def test_a_calibration_cache_reaches_tensorrt_from_memory_and_is_never_rewritten(tmp_path):
    """Polygraphy's Calibrator reads a cache only from a file: given one in memory it gave TensorRT
    none (and no batches), so every build from `calibration.cache` failed on a real GPU."""
    from types import SimpleNamespace
    from uadc.backends.tensorrt.build import _cache_calibrator
    path = tmp_path / "c.cache"
    write_calibration_cache(path, {"image": 1.0}, trt_version="8.5.1", calibrator="MinMaxCalibration")
    trt = SimpleNamespace(IInt8EntropyCalibrator2=type("Entropy2", (), {}), IInt8MinMaxCalibrator=type("MinMax", (), {}))
    cal = _cache_calibrator(trt, path, plan_build(BuildSettings(precision="int8"), "8.5.1", has_qdq=False,
                                                  calibration=True))
    assert isinstance(cal, trt.IInt8MinMaxCalibrator)
    assert cal.read_calibration_cache() == path.read_bytes() and cal.get_batch(["image"]) is None
    cal.write_calibration_cache(memoryview(b"other"))
    assert cal.read_calibration_cache() == path.read_bytes() == b"TRT-8501-MinMaxCalibration\nimage: 3c010204\n"
    # uadc's cache names 8.5.0: TensorRT 10.3 skipped it and calibrated on nothing (build_engine.sh rewrites the
    # header on the device; the API's build did not)
    other = _cache_calibrator(trt, path, plan_build(BuildSettings(precision="int8"), "10.3.0", has_qdq=False,
                                                    calibration=True))
    assert other.read_calibration_cache() == b"TRT-100300-MinMaxCalibration\nimage: 3c010204\n"
    assert path.read_bytes() == b"TRT-8501-MinMaxCalibration\nimage: 3c010204\n"


def test_version_codes():
    assert trt_version_code("8.5.2.2") == 8502
    assert trt_version_code("8.6") == 8600
    assert trt_version_code("10.3.0") == 100300
    assert cache_header("10.16.1") == "TRT-101601-EntropyCalibration2"
    with pytest.raises(UadcError):
        cache_header("8.5", calibrator="Percentile")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "image: 3c010204\n",  # no header
        "TRT-8501\nimage: 3c010204\n",
        "TRT-8501-EntropyCalibration2\nimage 3c010204\n",
        "TRT-8501-EntropyCalibration2\nimage: xyz\n",
        "TRT-8501-EntropyCalibration2\nimage: 3c0102041\n",
        "TRT-8501-EntropyCalibration2\n: 3c010204\n",
        "TRT-8501-EntropyCalibration2\nimage: 3c010204\nimage: 3c010204\n",
        "TRT-8501-EntropyCalibration2\nimage: 7fc00000\n",  # NaN
        "TRT-8501-EntropyCalibration2\nimage: bf800000\n",  # -1.0
    ],
)
def test_malformed_calibration_cache_raises(tmp_path, text):
    path = tmp_path / "bad.cache"
    path.write_text(text)
    with pytest.raises(UadcError):
        read_calibration_cache(path)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), 1e41, "x"])
def test_invalid_amax_is_refused(tmp_path, value):
    with pytest.raises(UadcError):
        write_calibration_cache(tmp_path / "c.cache", {"image": value})
    assert not (tmp_path / "c.cache").exists()


def test_missing_cache_file(tmp_path):
    with pytest.raises(UadcError, match="not found"):
        read_calibration_cache(tmp_path / "nope.cache")


# ------------------------------------------------------------------ build plans per TensorRT version


def test_plan_fp16_per_version():
    fp16 = BuildSettings(precision="fp16")
    p8 = plan_build(fp16, "8.5.2", has_qdq=False)
    assert p8.network_flags == ("EXPLICIT_BATCH",) and p8.builder_flags == ("FP16",) and p8.cleared_flags == ()
    fp32 = plan_build(BuildSettings(precision="fp32"), "10.3", has_qdq=False)
    assert fp32.builder_flags == () and fp32.cleared_flags == ("TF32",)
    p10 = plan_build(fp16, "10.3.0", has_qdq=False)
    assert p10.network_flags == () and p10.builder_flags == ("FP16",) and not p10.strongly_typed
    with pytest.raises(UadcError, match="FP16"):
        plan_build(fp16, "11.0", has_qdq=False)  # no FP16 flag in 11; an FP32 model stays FP32
    p11 = plan_build(fp16, "11.0", has_qdq=False, fp16_model=True)
    assert p11.strongly_typed and p11.builder_flags == () and p11.network_flags == ()


def test_plan_int8_qdq_per_version():
    int8 = BuildSettings(precision="int8")
    p8 = plan_build(int8, "8.5", has_qdq=True)
    assert p8.builder_flags == ("INT8", "FP16") and p8.network_flags == ("EXPLICIT_BATCH",)
    p10 = plan_build(int8, "10.3", has_qdq=True)
    assert p10.strongly_typed and p10.network_flags == ("STRONGLY_TYPED",) and p10.builder_flags == ()
    weak = plan_build(BuildSettings(precision="int8", strongly_typed=False), "10.3", has_qdq=True)
    assert not weak.strongly_typed and weak.builder_flags == ("INT8", "FP16")
    dla = plan_build(BuildSettings(precision="int8", dla_core=0), "10.3", has_qdq=True)
    assert not dla.strongly_typed and dla.builder_flags == ("INT8", "FP16", "GPU_FALLBACK")
    assert plan_build(int8, "11.1", has_qdq=True).strongly_typed


def test_plan_refuses_impossible_requests():
    int8 = BuildSettings(precision="int8")
    with pytest.raises(UadcError, match="TensorRT 11 removed implicit INT8 calibration"):
        plan_build(int8, "11.0", has_qdq=False, calibration=True)
    with pytest.raises(UadcError, match="Q/DQ"):
        plan_build(int8, "8.5", has_qdq=False)
    with pytest.raises(UadcError, match="ignores a calibration"):
        plan_build(int8, "8.5", has_qdq=True, calibration=True)
    with pytest.raises(UadcError, match="TensorRT >= 10"):
        plan_build(BuildSettings(precision="int8", strongly_typed=True), "8.5", has_qdq=True)
    with pytest.raises(UadcError, match="8.6"):
        plan_build(BuildSettings(builder_optimization_level=3), "8.5", has_qdq=False)
    calib10 = plan_build(int8, "10.3", has_qdq=False, calibration=True)
    assert calib10.builder_flags == ("INT8", "FP16") and any("deprecated" in n for n in calib10.notes)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"precision": "bf16"},
        {"workspace_mb": 0},
        {"min_batch": 4, "opt_batch": 2},
        {"dla_core": -1, "precision": "fp16"},
        {"dla_core": 0, "precision": "fp32"},
        {"builder_optimization_level": 9},
    ],
)
def test_invalid_settings(kwargs):
    with pytest.raises(UadcError):
        BuildSettings(**kwargs)


# ------------------------------------------------------------------ trtexec and build script


def _tokens(command: str) -> list[str]:
    return command.split()


def test_trtexec_fp16_command():
    settings = BuildSettings(precision="fp16", workspace_mb=2048, opt_batch=4, max_batch=8, timing_cache="timing.cache")
    tokens = _tokens(trtexec_command("model.onnx", settings, (3, 256, 256), trt_version="8.5"))
    assert tokens[0] == "trtexec"
    for expected in [
        "--onnx=model.onnx",
        "--saveEngine=model.engine",
        "--minShapes=image:1x3x256x256",
        "--optShapes=image:4x3x256x256",
        "--maxShapes=image:8x3x256x256",
        "--memPoolSize=workspace:2048",
        "--fp16",
        "--timingCacheFile=timing.cache",
    ]:
        assert expected in tokens
    assert "--int8" not in tokens and "--calib" not in " ".join(tokens)


def test_trtexec_int8_commands():
    settings = BuildSettings(precision="int8")
    qdq_85 = _tokens(trtexec_command("m.onnx", settings, (3, 64, 64), trt_version="8.5"))
    assert "--int8" in qdq_85 and "--fp16" in qdq_85 and not any(t.startswith("--calib=") for t in qdq_85)
    qdq_10 = _tokens(trtexec_command("m.onnx", settings, (3, 64, 64), trt_version="10.3"))
    assert "--stronglyTyped" in qdq_10 and "--int8" not in qdq_10 and "--fp16" not in qdq_10
    # its float layers are FP32, as the report's figures take them: TF32 (Ampere's, Orin's default) was left on
    assert "--noTF32" in qdq_10 and "--noTF32" not in qdq_85   # 8.x: weak typing, float layers may run FP16
    implicit = _tokens(trtexec_command("m.onnx", settings, (3, 64, 64), calib_cache="calib.cache", trt_version="8.5"))
    assert "--int8" in implicit and "--calib=calib.cache.device" in implicit   # headed with the device's version
    with pytest.raises(UadcError):
        trtexec_command("m.onnx", settings, (3, 64, 64), calib_cache="calib.cache", trt_version="11.0")


def test_trtexec_dla_command():
    settings = BuildSettings(precision="fp16", dla_core=1, max_batch=2)
    tokens = _tokens(trtexec_command("m.onnx", settings, (3, 128, 128), engine_name="dla.engine", trt_version="8.5"))
    assert {"--useDLACore=1", "--allowGPUFallback", "--fp16", "--saveEngine=dla.engine"} <= set(tokens)
    no_fallback = BuildSettings(precision="int8", dla_core=0, gpu_fallback=False)
    tokens = _tokens(trtexec_command("m.onnx", no_fallback, (3, 128, 128), trt_version="10.3"))
    assert "--useDLACore=0" in tokens and "--allowGPUFallback" not in tokens
    assert "--int8" in tokens and "--fp16" in tokens  # DLA keeps weak typing so non-INT8 layers get FP16


def _fake_trtexec(bin_dir: Path, code: str, log: Path) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "trtexec"
    script.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "${1:-}" == "--help" ]]; then\n'
        f'  echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{code}] # trtexec --help"; exit 0\n'
        "fi\n"
        f'echo "$*" > {log}\n'
    )
    script.chmod(0o755)


def _run_script(script: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("TRTEXEC", None)
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=20)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is needed to run the generated script")
def test_build_script_written_executable_and_dispatches_by_version(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    onnx.save(qdq_model(), bundle / "model.onnx")
    settings = BuildSettings(precision="int8", max_batch=4, timing_cache="timing.cache")
    note = "Image AUROC 0.981 vs 0.983 FP32."
    script = write_build_script(bundle, "model.onnx", settings, (3, H, W), precision_note=note)
    assert script == bundle / "build_engine.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text and "trtexec not found" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    readme = (bundle / "README.md").read_text()
    assert "INT8" in readme and "TensorRT version" in readme and "GPU" in readme and "AUROC 0.981" in readme

    log = tmp_path / "args.txt"
    for code, present, absent in [("8502", "--int8", "--stronglyTyped"), ("100300", "--stronglyTyped", "--int8")]:
        _fake_trtexec(tmp_path / f"bin{code}", code, log)
        result = _run_script(script, tmp_path / f"bin{code}")
        assert result.returncode == 0, result.stderr
        assert "TensorRT version:" in result.stdout
        args = log.read_text().split()
        assert present in args and absent not in args and "--maxShapes=image:4x3x8x8" in args

    _fake_trtexec(tmp_path / "old", "8401", log)
    old = _run_script(script, tmp_path / "old")
    assert old.returncode == 1 and "needs TensorRT >= 8.5" in old.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is needed to run the generated script")
def test_build_script_builds_its_own_folders_model_wherever_it_is_run_from(tmp_path):
    """`bash -- -b/build_engine.sh`: dirname took `-b` for an option, `cd ""` stayed, and trtexec built the caller's
    model.onnx (exit 0); with CDPATH set, `cd b` entered another folder's b; TRTEXEC=./x was looked up after the cd."""
    log = tmp_path / "log"
    for name in ("-b", "b"):
        bundle = tmp_path / "work" / name
        bundle.mkdir(parents=True)
        onnx.save(qdq_model(), bundle / "model.onnx")
        write_build_script(bundle, "model.onnx", BuildSettings(precision="int8"), (3, H, W))
    (tmp_path / "work" / "model.onnx").write_text("decoy")
    (tmp_path / "other" / "b").mkdir(parents=True)
    (tmp_path / "other" / "b" / "model.onnx").write_text("decoy")
    _fake_trtexec(tmp_path / "work" / "tools", "100300", log)
    fake = tmp_path / "work" / "tools" / "trtexec"
    fake.write_text(fake.read_text().replace('echo "$*"', 'echo "$PWD $*"'))
    env = dict(os.environ, CDPATH=str(tmp_path / "other"), TRTEXEC="./tools/trtexec")
    for name in ("-b", "b"):
        run = subprocess.run(["bash", "--", f"{name}/build_engine.sh"], env=env, cwd=tmp_path / "work",
                             capture_output=True, text=True, timeout=20)
        assert run.returncode == 0, run.stderr
        assert log.read_text().split()[0] == str((tmp_path / "work" / name).resolve()), (name, log.read_text())
    # TRTEXEC=trtexec, a name on PATH: "trtexec not found" (the -x test looked in the bundle's folder)
    env = dict(os.environ, TRTEXEC="trtexec", PATH=f"{tmp_path / 'work' / 'tools'}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run(["bash", "b/build_engine.sh"], env=env, cwd=tmp_path / "work", capture_output=True, text=True,
                         timeout=20)
    assert run.returncode == 0, run.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is needed to run the generated script")
def test_build_script_refuses_calibration_on_trt11_and_missing_trtexec(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "calib.cache").write_text("TRT-8501-EntropyCalibration2\nimage: 3c010204\n")
    settings = BuildSettings(precision="int8")
    script = write_build_script(tmp_path, "model.onnx", settings, (3, H, W), calib_cache="calib.cache")
    # the cache read on the device names that device's TensorRT (a cache headed 8.5 was refused on JetPack 6)
    for code in ("8502", "100300"):
        _fake_trtexec(tmp_path / f"bin{code}", code, tmp_path / "log")
        result = _run_script(script, tmp_path / f"bin{code}")
        assert result.returncode == 0 and "--calib=calib.cache.device" in (tmp_path / "log").read_text(), result.stderr
        assert (tmp_path / "calib.cache.device").read_text() == f"TRT-{code}-EntropyCalibration2\nimage: 3c010204\n"
    (tmp_path / "calib.cache.device").unlink()
    _fake_trtexec(tmp_path / "bin", "110000", tmp_path / "log")
    result = _run_script(script, tmp_path / "bin")
    assert result.returncode == 3 and "removed implicit INT8 calibration" in result.stderr
    assert not (tmp_path / "calib.cache.device").exists()   # the refusal wrote a cache copy first
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    env = {"PATH": f"{empty}{os.pathsep}/usr/bin:/bin"}
    missing = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=20)
    if not Path("/usr/src/tensorrt/bin/trtexec").exists() and shutil.which("trtexec", path="/usr/bin:/bin") is None:
        assert missing.returncode == 1 and "trtexec not found" in missing.stderr


def test_build_script_refuses_impossible_requests(tmp_path):
    with pytest.raises(UadcError, match="8.6"):
        write_build_script(tmp_path, "m.onnx", BuildSettings(builder_optimization_level=3), (3, H, W))
    onnx.save(float_model(), tmp_path / "float.onnx")  # INT8 without Q/DQ or cache would get placeholder ranges
    with pytest.raises(UadcError, match="no Q/DQ"):
        write_build_script(tmp_path, "float.onnx", BuildSettings(precision="int8"), (3, H, W))


# ------------------------------------------------------------------ comparison helper (ORT on both sides)


def test_comparator_helper_reports_errors_per_output(tmp_path):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    paths = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(float_model(seed), paths[name])

    def runners(ref, other):
        return [
            OnnxrtRunner(SessionFromOnnx(str(paths[ref]), providers=["cpu"]), name="reference"),
            OnnxrtRunner(SessionFromOnnx(str(paths[other]), providers=["cpu"]), name="candidate"),
        ]

    feeds = [{"image": _images(2, seed)} for seed in range(2)]
    same = compare(runners("a", "b"), feeds, atol=1e-6, rtol=1e-6)
    assert same["passed"] and same["iterations"] == 2
    assert set(same["outputs"]) == {"anomaly_map", "score"}
    assert same["outputs"]["score"]["max_abs"] == 0.0 and same["outputs"]["score"]["passed"]
    different = compare(runners("a", "c"), feeds, atol=1e-6, rtol=1e-6)
    assert not different["passed"] and different["outputs"]["anomaly_map"]["max_abs"] > 1e-3
    assert different["outputs"]["anomaly_map"]["mean_abs"] <= different["outputs"]["anomaly_map"]["max_abs"]


@pytest.mark.skipif(TRT_OK, reason="checks the error raised where TensorRT is missing")
def test_build_engine_without_tensorrt_says_why(tmp_path):
    onnx.save(float_model(), tmp_path / "m.onnx")
    with pytest.raises(UadcError, match="cannot build TensorRT engines here"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", BuildSettings())
    assert not (tmp_path / "m.engine").exists()


def test_build_engine_validates_qdq_before_building(tmp_path):
    model = qdq_model()
    _asymmetric(model)
    # weights, scales and zero points stored beside the model (as for >2 GB exports) are still checked
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="m.bin", size_threshold=0)
    with pytest.raises(UadcError, match="QDQ002"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", BuildSettings(precision="int8"))


# ------------------------------------------------------------------ real engines (TensorRT + GPU only)


def _build(tmp_path: Path, model: onnx.ModelProto, settings: BuildSettings) -> tuple[Path, Path]:
    onnx_path = tmp_path / "model.onnx"
    onnx.save(model, onnx_path)
    return onnx_path, build_engine(onnx_path, tmp_path / "model.engine", settings)


@needs_trt
def test_fp32_engine_matches_onnxruntime_and_runs_batches(tmp_path):
    timing = tmp_path / "timing.cache"
    settings = BuildSettings(precision="fp32", min_batch=1, opt_batch=2, max_batch=4, timing_cache=timing)
    onnx_path, engine = _build(tmp_path, float_model(), settings)
    assert engine.stat().st_size > 0 and timing.stat().st_size > 0
    report = compare_onnx_vs_trt(onnx_path, engine, [{"image": _images(n, n)} for n in (1, 3, 4)], atol=1e-4, rtol=1e-3)
    assert report["passed"], report
    images = _images(5)
    outputs = run_engine(engine, images, batch_size=2)
    anomaly_map, score = _run_ort(float_model(), images)
    assert outputs["anomaly_map"].shape == (5, 1, H, W) and outputs["score"].shape == (5,)
    np.testing.assert_allclose(outputs["score"], score, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(outputs["anomaly_map"], anomaly_map, atol=1e-4, rtol=1e-3)


@needs_trt
def test_fp16_engine_close_to_onnxruntime(tmp_path):
    onnx_path, engine = _build(tmp_path, float_model(), BuildSettings(precision="fp16", max_batch=2))
    report = compare_onnx_vs_trt(onnx_path, engine, [{"image": _images(2)}], atol=2e-2, rtol=2e-2)
    assert report["passed"], report


@needs_trt
def test_int8_qdq_engine_close_to_onnxruntime(tmp_path):
    onnx_path, engine = _build(tmp_path, qdq_model(), BuildSettings(precision="int8", max_batch=2))
    report = compare_onnx_vs_trt(onnx_path, engine, [{"image": _images(2)}], atol=5e-2, rtol=5e-2)
    assert report["passed"], report
    assert report["outputs"]["score"]["max_abs"] < 5e-2


@needs_trt
def test_parser_errors_are_reported(tmp_path):
    model = float_model()
    model.graph.node.append(helper.make_node("NoSuchOp", ["score"], ["extra"], name="bogus", domain="uadc.test"))
    model.opset_import.append(helper.make_opsetid("uadc.test", 1))
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(UadcError, match="(?i)pars"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.engine", BuildSettings())  # Polygraphy: "Failed to parse"
    assert not (tmp_path / "bad.engine").exists()


# ------------------------------------------------------------------ the plan mapped onto Polygraphy's loaders

class _FakeTrt:
    """Just the enum values ``_create_config`` reads; Polygraphy's loaders are lazy, so building the
    config loader needs no TensorRT."""
    __version__ = "10.3.0"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"


@pytest.mark.parametrize("precision, version, qdq, fp16, int8, tf32", [
    ("fp32", "10.3.0", False, False, False, False),   # TF32 off so FP32 engines match ORT
    ("fp16", "8.6.1", False, True, False, True),      # weak typing: the FP16 builder flag
    ("int8", "8.6.1", True, True, True, True),        # weak typing, FP16 fallback
    ("int8", "10.3.0", True, False, False, False),    # strongly typed Q/DQ: no precision flags, float layers FP32
])
def test_build_plan_maps_onto_polygraphy_config(precision, version, qdq, fp16, int8, tf32):
    from uadc.backends.tensorrt.build import _create_config

    settings = BuildSettings(precision=precision, min_batch=1, opt_batch=2, max_batch=4, workspace_mb=512,
                             builder_optimization_level=3)
    plan = plan_build(settings, version, has_qdq=qdq)
    config = _create_config(_FakeTrt, plan, settings, (3, H, W), None)
    assert (config.fp16, config.int8, config.tf32) == (fp16, int8, tf32)
    shapes = config.profiles[0]["image"]
    assert (tuple(shapes.min), tuple(shapes.opt), tuple(shapes.max)) == ((1, 3, H, W), (2, 3, H, W), (4, 3, H, W))
    assert config.memory_pool_limits == {"WORKSPACE": 512 << 20}
    assert config.builder_optimization_level == 3 and config.calibrator is None


def test_engine_input_shape_comes_from_the_onnx_graph(tmp_path):
    from uadc.backends.tensorrt.build import _merge_chw, _onnx_chw

    model = float_model()
    assert _merge_chw(_onnx_chw(model, BuildSettings()), None) == tuple(
        d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(UadcError, match="fixed batch of 2"):
        _onnx_chw(model, BuildSettings())


def test_precision_auto_build_maps_fp32_layers_onto_polygraphy(tmp_path, monkeypatch):
    """Without TensorRT: the build hands Polygraphy the layer precisions, obeyed constraints,
    INT8 + FP16 and no TF32 (a stand-in ``tensorrt`` module and engine builder record them)."""
    import types

    import polygraphy.backend.trt as poly_trt
    from uadc.backends.tensorrt import build as build_mod
    fake = types.SimpleNamespace(__version__="10.3.0", float32="FLOAT32",
                                 MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"))
    seen = {}

    class Recorder:
        def __init__(self, network, config=None, save_timing_cache=None):
            seen["network"], seen["config"], seen["timing"] = network, config, save_timing_cache

        def __call__(self):
            return b"engine"
    monkeypatch.setattr(build_mod, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(poly_trt, "EngineBytesFromNetwork", Recorder)
    onnx.save(qdq_model(), str(tmp_path / "m.onnx"))
    settings = BuildSettings(precision="int8", fp32_layers=("conv",), max_batch=2)
    assert build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", settings).read_bytes() == b"engine"
    assert isinstance(seen["network"], poly_trt.SetLayerPrecisions)
    config = seen["config"]
    assert config.precision_constraints == "obey" and config.fp16 and config.int8 and not config.tf32
    plain = BuildSettings(precision="int8", strongly_typed=False, max_batch=2)
    build_engine(tmp_path / "m.onnx", tmp_path / "p.engine", plain)
    assert not isinstance(seen["network"], poly_trt.SetLayerPrecisions)
    assert seen["config"].precision_constraints is None
    # the target's timing cache beside the engine (it was the working folder's `timing.cache`, shared by every
    # target and a traceback where that folder is read-only), as build_engine.sh keeps it
    (tmp_path / "engines").mkdir()
    build_engine(tmp_path / "m.onnx", tmp_path / "engines" / "m.engine", dataclasses.replace(plain, timing_cache="t.cache"))
    assert seen["timing"] == str(tmp_path / "engines" / "t.cache")


def test_only_an_int8_targets_emulated_figures_are_called_emulated_int8():
    """trt-fp16 / jetson-fp32 reports carried `emulated_int8`: FP16 / FP32 figures that a script read as INT8."""
    from uadc.report.results import Metrics
    m = {"mean": {"image_auroc": 1.0}}
    note = "TensorRT is not run here"
    assert "emulated_int8" in Metrics(m, m, {}, "onnxruntime CPU", note, True).to_dict()
    d = Metrics(m, m, {}, "onnxruntime CPU", note, False).to_dict()
    assert "emulated_int8" not in d and d["compiled_note"] == note


def test_an_empty_tensorrt_folder_on_the_path_is_no_tensorrt(monkeypatch):
    """A namespace package (an empty `tensorrt/` folder on the path) imports: doctor said "no CUDA GPU visible"
    of it, and on a GPU machine `trt.__version__` was an AttributeError."""
    import sys
    import types
    stub = types.ModuleType("tensorrt")
    stub.__path__ = ["/somewhere/tensorrt"]
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    assert trt_available.__wrapped__() == (False, "tensorrt imports from /somewhere/tensorrt but is no TensorRT (no __version__)")
