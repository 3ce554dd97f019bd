"""train -> eval -> compile on tiny synthetic data with the bundled EfficientNet-Lite0 teacher (a random teacher reached only
0.67 image AUROC in this budget, measured): the planted
defects must be separated clearly, the export must be exact and Q/DQ must stay in the student."""

import json
import shutil

import onnx
import pytest
from click.testing import CliRunner

from uadc.cli import main
from uadc.export.partitions import partition_of


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    from conftest import write_recipe
    d = tmp_path_factory.mktemp("e2e")
    recipe = write_recipe(d / "tiny.yaml", tiny_data)
    art = d / "artifacts"
    res = CliRunner().invoke(main, ["train", str(recipe), "--artifacts", str(art)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return recipe, art


def test_train_writes_checkpoint_and_history(trained):
    import torch
    recipe, art = trained
    blob = torch.load(art / "tiny" / "checkpoint.pt", weights_only=False)
    h = blob["history"]
    assert len(h) == 12 and h[-1]["loss"] < h[0]["loss"]
    assert h[-1]["discrepancy"][0] < h[0]["discrepancy"][0]  # student approaches the teacher on normal data
    assert blob["categories"] == ["stripes", "gray"] and (art / "tiny" / "recipe.yaml").is_file()


def test_eval_separates_planted_defects(trained):
    recipe, art = trained
    res = CliRunner().invoke(main, ["eval", str(recipe), "--artifacts", str(art)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ev = json.loads((art / "tiny" / "eval.json").read_text())
    assert set(ev["categories"]) == {"stripes", "gray"}
    for cat in ev["categories"].values():
        assert set(cat) >= {"image_auroc", "pixel_auroc", "aupro", "pixel_f1"}
    assert ev["mean"]["image_auroc"] >= 0.9, ev["mean"]
    assert ev["mean"]["pixel_auroc"] >= 0.9, ev["mean"]


def test_compile_int8_student_only(trained):
    recipe, art = trained
    res = CliRunner().invoke(main, ["compile", str(recipe), "--target", "ort-cpu-int8", "--artifacts", str(art),
                                    "--calibrator", "entropy", "--split"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = art / "tiny" / "ort-cpu-int8"
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == 3 and report["quantized_partitions"] == ["student"]
    assert report["verification"]["torch_vs_ort_fp32"]["passed"]
    assert report["verification"]["torch_vs_ort_fp32"]["max_abs"] < 1e-4
    model = onnx.load(str(out / "model.onnx"))
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and {partition_of(n) for n in qdq} == {"student"}
    assert {partition_of(n) for n in model.graph.node} == {"teacher", "student", "head"}
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["uadc.method"] == "stfpm" and json.loads(meta["uadc.image_size"]) == 64
    for key in ("fp32", "compiled", "drop"):
        assert set(report["metrics"][key]["mean"]) == {"image_auroc", "pixel_auroc", "aupro", "pixel_f1"}
    assert report["metrics"]["compiled"]["mean"]["image_auroc"] >= 0.8
    for k in ("torch_fp32", "ort_fp32", "compiled"):
        assert report["latency_ms"][k]["p50"] > 0
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["calibrator"] == "entropy" and cal["ranges"]
    assert sorted(p.name for p in (out / "partitions").iterdir()) == ["head.onnx", "student.onnx", "teacher.onnx"]
    md = (out / "report.md").read_text()
    assert md.startswith("# uadc compile report")
    # how latency was timed, and each output's own differences (mean_abs alone is the two outputs' means' mean)
    lat = report["latency_ms"]
    assert lat["compiled"]["runs"] == lat["ort_fp32"]["runs"] and lat["compiled"]["warmup"] == 5
    assert f"## Latency (batch 1, {lat['threads']} thread" in md and \
        f"{lat['compiled']['runs']} timed runs after 5 warm-up" in md
    fvc = report["verification"]["fp32_vs_compiled"]
    assert f"anomaly_map max abs {fvc['outputs']['anomaly_map']['max_abs']:.4g}" in md and "; score max abs" in md
    # ORT's asymmetric Q/DQ breaks TensorRT's rules: a count, and that the artifact is no TensorRT one (52 bare lines)
    res = CliRunner().invoke(main, ["check-trt", str(out)])
    n = res.output.count("\nQDQ") + res.output.startswith("QDQ")
    assert res.exit_code == 1 and res.output.splitlines()[-1] == \
        f"{out}: {n} violations of TensorRT Q/DQ rules; its target ort-cpu-int8 is not a TensorRT one"
    doc = json.loads(CliRunner().invoke(main, ["check-trt", str(out), "--json"]).stdout)   # the same, for a pipeline
    assert doc["exit_code"] == 1 and len(doc["violations"]) == n and doc["other_target"] == "ort-cpu-int8"
    assert doc["has_qdq"] and set(doc["violations"][0]) == {"rule", "node", "message"}
    meta = json.loads((out / "artifact.json").read_text())      # a newer uadc's target: no note, no KeyError
    (out / "artifact.json").write_text(json.dumps({**meta, "target": "ort-gpu-future"}))
    res = CliRunner().invoke(main, ["check-trt", str(out)])
    (out / "artifact.json").write_text(json.dumps(meta))
    assert res.exit_code == 1 and res.output.splitlines()[-1] == f"{out}: {n} violations of TensorRT Q/DQ rules"
    model_bytes = (out / "model.onnx").read_bytes()   # another model in the folder was checked under its target
    (out / "model.onnx").write_bytes(model_bytes + b"x")
    res = CliRunner().invoke(main, ["check-trt", str(out)])
    (out / "model.onnx").write_bytes(model_bytes)
    assert res.exit_code == 2 and "model.onnx does not match its sha256 in artifact.json" in res.output, res.output
    # a partition judged alone: ONNX Runtime's traceback (exit 1, nothing on stdout under --json) or an AttributeError
    for part in ("student", "head"):
        model = out / "partitions" / f"{part}.onnx"
        for args in (["eval", str(recipe), "--artifacts", str(art), "--checkpoint", str(model), "--json"],
                     ["diff", str(out), str(model), "--json", "-"], ["verify", str(model), "--golden", str(out), "--json", "-"]):
            res = CliRunner().invoke(main, args)
            assert res.exit_code == 2 and json.loads(res.stdout)["error"].startswith(
                f"{model}: not a whole uadc model (input 'image', outputs anomaly_map, score)"), (args, res.output)


def test_the_calibration_cache_holds_the_qdq_models_own_ranges(trained, tmp_path):
    """With the head quantized, ORT's quantizer gives each Resize output its input's scale; the
    cache gave it the output's own calibrated range (1.648 vs 1.690 on the demo), so an implicit
    build ran other ranges than the explicit one the README calls the same."""
    from onnx import numpy_helper

    from uadc.backends.tensorrt.cache import read_calibration_cache
    recipe, art = trained
    res = CliRunner().invoke(main, ["compile", str(recipe), "--target", "jetson-int8", "--artifacts", str(art),
                                    "--out", str(tmp_path / "all"), "--no-eval", "--quantize",
                                    "student,teacher,head"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    model = onnx.load(tmp_path / "all" / "model.onnx")
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    qdq = {n.input[0]: float(consts[n.input[1]]) * 127 for n in model.graph.node
           if n.op_type == "QuantizeLinear" and n.input[0] not in consts}
    cache = read_calibration_cache(tmp_path / "all" / "calibration.cache")
    assert "Resize" in {producer.get(t) for t in qdq}
    for tensor, amax in qdq.items():
        assert cache[tensor] == pytest.approx(amax, rel=1e-6), tensor
    # and nothing else: the float tensors (`anomaly_map`, the student's last features) had ranges an implicit
    # build may use to quantize them, unlike the verified model
    assert set(cache) <= set(qdq) and "anomaly_map" not in cache, sorted(set(cache) - set(qdq))[:5]


def test_compile_jetson_int8_bundle(trained):
    recipe, art = trained
    res = CliRunner().invoke(main, ["compile", str(recipe), "--target", "jetson-int8", "--artifacts", str(art),
                                    "--no-eval"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = art / "tiny" / "jetson-int8"
    report = json.loads((out / "report.json").read_text())
    assert report["engine"]["trt_rule_violations"] == 0
    assert "not built" in report["engine"]["status"]
    for f in ("model.onnx", "model_fp32.onnx", "calibration.cache", "build_engine.sh", "README.md"):
        assert (out / f).is_file(), f
    readme = (out / "README.md").read_text()   # the explicit-INT8 note was dropped where the implicit one was added
    assert "Also here: `model_fp32.onnx` (the float model" in readme and "Explicit quantization" in readme
    # its command saves an engine for the batches build_engine.sh's does (an unsaved batch-1 one before)
    assert "--saveEngine=model_implicit.engine --minShapes=image:1x3x64x64" in readme
    assert "--maxShapes=image:8x3x64x64 --optShapesCalib=image:1x3x64x64`" in readme
    # for TensorRT 8.5 too, which parses opset 17 (it was the exported opset 18)
    from uadc.passes.pipeline import opset_of
    assert opset_of(onnx.load(out / "model_fp32.onnx")) == 17 == opset_of(onnx.load(out / "model.onnx"))
    for given in (out / "model.onnx", out):     # the artifact folder reads its model.onnx ('model not found' before)
        res = CliRunner().invoke(main, ["check-trt", str(given)])
        assert res.exit_code == 0 and "0 violations of TensorRT Q/DQ rules\n" in res.output, res.output
    res = CliRunner().invoke(main, ["check-trt", str(out / "model_fp32.onnx")])  # passes, but checks nothing
    assert res.exit_code == 0 and "0 violations of TensorRT Q/DQ rules (it has no Q/DQ nodes)" in res.output
    res = CliRunner().invoke(main, ["check-trt", str(art)])
    assert res.exit_code == 2 and f"{art}: a folder without model.onnx" in res.output
    qat_like = art / "qat_like"   # `uadc qat`'s folder holds qat_model.onnx: named, not only "without model.onnx"
    qat_like.mkdir()
    shutil.copy(out / "model.onnx", qat_like / "qat_model.onnx")
    res = CliRunner().invoke(main, ["check-trt", str(qat_like)])
    assert res.exit_code == 2 and f"(it holds qat_model.onnx: give {qat_like / 'qat_model.onnx'})" in res.output
    shutil.copy(out / "model.onnx", qat_like / "00_input.onnx")   # a pass dump: the first file was named (the FP32 one)
    res = CliRunner().invoke(main, ["check-trt", str(qat_like)])
    assert res.exit_code == 2 and "(it holds 2 ONNX files, 00_input.onnx, qat_model.onnx: give the path of one of them)" in res.output
