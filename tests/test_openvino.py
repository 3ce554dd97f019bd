"""OpenVINO CPU targets: the same ONNX / Q/DQ ONNX as the ORT targets, run by OpenVINO, with the
same verification, metrics and report; a clear one-line error when OpenVINO is missing."""

from __future__ import annotations

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
    assert ov.version() is None


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


def test_openvino_reports_unloadable_model(tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO not installed (optional extra uadc[openvino])")
    from uadc.backends import openvino as ov
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(UadcError, match="OpenVINO cannot load the model"):
        ov.compile_model(bad)
