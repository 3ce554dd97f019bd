"""uadc.backends.parallel: teacher and student at the same time, or the batch split across cores,
with the same outputs as one plain session; graphs that do not split fall back or say why."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uadc.backends.parallel import ParallelSession
from uadc.core.errors import UadcError
from uadc.core.ort_session import make_session


def _exported(tmp_path, tiny_data, **model):
    from conftest import write_recipe
    from uadc.config.recipe import load_recipe
    from uadc.export.onnx_export import export_model
    from uadc.models import build_model
    r = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_data, model=model))
    torch.manual_seed(0)
    return export_model(build_model(r.cfg["model"], r.data.image_size).eval(), r.data.image_size, {})


@pytest.fixture(scope="module")
def stfpm(tmp_path_factory, tiny_data):
    return _exported(tmp_path_factory.mktemp("stfpm"), tiny_data, head="fast", score_reduction="topk_mean",
                     score_topk=0.05, score_pool=4)


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, 64, 64)).astype(np.float32)


@pytest.mark.parametrize("schedule,batch,plan", [("auto", 1, "branches"), ("auto", 5, "batch"),
                                                 ("branches", 3, "branches"), ("batch", 2, "batch"),
                                                 ("sequential", 4, "sequential")])
def test_schedules_give_the_plain_sessions_outputs(stfpm, schedule, batch, plan):
    x = _images(batch)
    ref = make_session(stfpm, 2).run(None, {"image": x})
    with ParallelSession(stfpm, 2, schedule) as sess:
        assert sess.plan(batch) == plan
        out = sess.run(None, {"image": x})
        assert [o.name for o in sess.get_outputs()] == ["anomaly_map", "score"]
        score_only = sess.run(["score"], {"image": x})
    for a, b in zip(ref, out):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(score_only[0], ref[1], rtol=1e-5, atol=1e-6)


def test_one_core_runs_one_session(stfpm):
    with ParallelSession(stfpm, 1, "auto") as sess:
        assert sess.plan(1) == sess.plan(8) == "sequential"


def test_a_student_that_reads_the_teacher_cannot_run_beside_it(tmp_path, tiny_data):
    paste = _exported(tmp_path, tiny_data, method="paste", split="blocks.0")
    for threads in (2, 1):   # one thread (a one-core box) ran it whole, exit 0, where two refused it
        with pytest.raises(UadcError, match="no independent teacher and student"):
            ParallelSession(paste, threads, "branches")
    x = _images(1)
    with ParallelSession(paste, 2, "auto") as sess:
        assert sess.plan(1) == "sequential" and sess.plan(4) == "batch"
        np.testing.assert_allclose(sess.run(None, {"image": x})[1], make_session(paste, 2).run(None, {"image": x})[1],
                                   rtol=1e-5, atol=1e-6)


def test_unknown_schedule_is_one_line_error(stfpm):
    with pytest.raises(UadcError, match="schedule must be one of"):
        ParallelSession(stfpm, 2, "fastest")


def test_detector_and_predict_cli_take_a_schedule(int8_artifact, tiny_data, tmp_path):
    """The INT8 artifact (Q/DQ graph) splits too, and every schedule decides alike."""
    from click.testing import CliRunner

    from uadc.cli import main
    from uadc.runtime import Detector
    _, _, res = int8_artifact
    images = sorted((tiny_data / "gray" / "test").rglob("*.png"))[:5]
    preds = {s: Detector.load(res.path, schedule=s, threads=2).predict(images, category="gray")
             for s in ("sequential", "branches", "batch", "auto")}
    assert Detector.load(res.path, threads=2).backend.session.plan(1) == "branches"
    for s, p in preds.items():
        np.testing.assert_allclose([q.score for q in p], [q.score for q in preds["sequential"]], rtol=1e-5, atol=1e-6)
        assert [q.label for q in p] == [q.label for q in preds["sequential"]], s
    r = CliRunner().invoke(main, ["predict", str(res.path), str(images[0]), "--schedule", "branches", "--threads", "2",
                                  "--out", str(tmp_path / "p"), "--category", "gray"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["predict", str(res.path), str(images[0]), "--schedule", "nope"])
    assert r.exit_code != 0 and "--schedule" in r.output


def test_branches_pass_post_processing_inputs_through(int8_artifact):
    """In-graph post-processing reads a ``category`` input after the head: a scheduled run fed with it
    decides as one session does (and takes its default when left out)."""
    _, _, res = int8_artifact
    model = res.path / "model.onnx"
    import onnx
    assert [i.name for i in onnx.load(str(model)).graph.input] == ["image", "category"]  # category has a default
    plain = make_session(model, 2)
    x = _images(4)
    with ParallelSession(model, 2, "branches") as sess:
        for cat in range(3):
            feeds = {"image": x, "category": np.full(4, cat, np.int64)}
            for a, b in zip(plain.run(None, feeds), sess.run(None, feeds)):
                np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        default = sess.run(["pred_score"], {"image": x})[0]
    np.testing.assert_allclose(default, plain.run(["pred_score"], {"image": x})[0], rtol=1e-5, atol=1e-6)


def test_peers_bench_times_ort_artifacts_as_the_runtime_runs_them(int8_artifact, tmp_path):
    from types import SimpleNamespace

    from bench import peers
    _, _, res = int8_artifact
    base = SimpleNamespace(recipe=SimpleNamespace(artifact_dir=lambda artifacts: res.path.parent))
    kinds = sorted(s["kind"] for s in peers.uadc_artifacts(base, tmp_path) if s["path"] == res.path / "model.onnx")
    assert kinds == ["onnxruntime", peers.SCHEDULED]
    t = peers._time_child(peers.SCHEDULED, str(res.path / "model.onnx"), 2, 2, 3, 64, None)
    assert t["p50"] > 0 and t["runs"] == 3


def test_a_fully_quantized_model_still_runs_its_branches_apart(int8_artifact, tiny_data, tmp_path):
    """With the teacher and the student quantized and no float reader of the image (the head quantized too, or
    US), one image Q/DQ went to the teacher and the student read it: `--schedule branches` was refused and
    `auto` ran one session. Each quantized partition now has its own Q/DQ of the image (the same range)."""
    import onnx

    import uadc
    from uadc.runtime import Detector
    recipe, art, _ = int8_artifact
    res = uadc.compile(recipe, "ort-cpu-int8", artifacts=art, quantize="student,teacher,head", evaluate=False,
                       out=tmp_path / "all", latency_runs=2, threads=1)
    model = onnx.load(str(res.path / "model.onnx"))
    assert sum(n.op_type == "QuantizeLinear" and n.input[0] == "image" for n in model.graph.node) == 2
    images = sorted((tiny_data / "gray" / "test").rglob("*.png"))[:3]
    preds = {s: Detector.load(res.path, schedule=s, threads=2).predict(images, category="gray")
             for s in ("sequential", "branches")}
    np.testing.assert_allclose([q.score for q in preds["branches"]], [q.score for q in preds["sequential"]],
                               rtol=1e-5, atol=1e-6)
