"""Reverse Distillation and Uninformed Students: shapes, frozen teacher, trainability, dynamic-batch
ONNX export (numerics against onnxruntime, partition tags) and the US-only fitting steps.

Tiny configs (random-init resnet18, 64x64 input, narrow students) keep the whole file in seconds.
"""

from __future__ import annotations

import ast

import numpy as np
import pytest
import torch

from uadc.models import build_model

SIZE = 64
PARTITIONS = {"teacher", "student", "head"}

CONFIGS = {
    "rd": {"method": "rd", "backbone": "resnet18", "pretrained": False, "weights": None, "taps": None,
           "combine": "sum", "smoothing_sigma": 4.0, "student_width": 0.25},
    "us": {"method": "us", "backbone": "resnet18", "pretrained": False, "weights": None, "taps": None,
           "combine": "sum", "smoothing_sigma": 4.0, "students": 3, "descriptor_dim": 16,
           "student_width": 0.25},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy shared machine OpenMP
    # barriers make multi-threaded steps 10-100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def images(n: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def make(method: str, size: int = SIZE, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(CONFIGS[method], size)


def train_steps(model, x: torch.Tensor, steps: int, lr: float = 3e-3) -> list[float]:
    model.train()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        t = model.teacher_features(x)
        loss = model.loss(t, model.student_features(x, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("method", ["rd", "us"])
@pytest.mark.parametrize("size", [SIZE, 50])  # 50: strides do not divide it
def test_forward_shapes(method, size):
    model = make(method, size).eval()
    with torch.no_grad():
        amap, score = model(images(2, size=size))
        t = model.teacher(images(2, size=size))
        s = model.student(images(2, size=size), t)
    assert amap.shape == (2, 1, size, size) and score.shape == (2,)
    assert torch.isfinite(amap).all()
    if method == "rd":
        assert [f.shape for f in s] == [f.shape for f in t]  # compared tap by tap
    else:
        assert len(t) == 1 and len(s) == 3 and all(f.shape == t[0].shape for f in s)
        assert t[0].shape[1] == 16


@pytest.mark.parametrize("method", ["rd", "us"])
def test_teacher_frozen(method):
    model = make(method)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.student.parameters())
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    train_steps(model, images(4), 1)  # train mode too: teacher BN statistics must not move
    after = model.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["rd", "us"])
def test_loss_decreases(method):
    model = make(method)
    losses = train_steps(model, images(4), 10)
    assert losses[-1] < 0.9 * losses[0], losses
    with torch.no_grad():
        t = model.teacher_features(images(4))
        d = model.discrepancy(t, model.student_features(images(4), t))
    assert len(d) == 3 and all(np.isfinite(d))  # 3 taps (rd) / 3 students (us)


def test_us_pretrain_teacher():
    model = make("us")
    x = images(8)
    hist = model.pretrain_teacher(x, epochs=6, lr=1e-2, batch_size=4, seed=0)
    assert len(hist) == 6
    assert hist[-1]["reconstruction"] < 0.8 * hist[0]["reconstruction"], hist
    assert not any(p.requires_grad for p in model.teacher.parameters())  # frozen again
    with torch.no_grad():
        d = model.teacher(x)[0]  # standardised with the training-set statistics
    assert d.mean((0, 2, 3)).abs().max() < 1e-3
    assert (d.std((0, 2, 3)) - 1).abs().max() < 1e-2


def test_us_head_stats_and_state_dict():
    model = make("us")
    x = images(6)
    model.pretrain_teacher(x, epochs=1, lr=1e-3, batch_size=3, seed=0)
    train_steps(model, x, 2)
    stats = model.fit_head_stats(x, batch_size=4)
    assert stats["e_std"] > 0 and stats["v_std"] > 0
    assert float(model.head.e_mean) == pytest.approx(stats["e_mean"])
    # Teacher and head statistics are buffers: they travel with the checkpoint.
    fresh = make("us", seed=1)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x)[0], model.eval()(x)[0])


# ---------------------------------------------------------------- export

@pytest.fixture(scope="module", params=["rd", "us"])
def exported(request):
    model = make(request.param)
    x = images(4)
    if request.param == "us":
        model.pretrain_teacher(x, epochs=1, lr=1e-3, batch_size=2, seed=0)
    train_steps(model, x, 2)  # non-trivial BN running statistics
    if request.param == "us":
        model.fit_head_stats(x)
    model.eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(model, (images(2),), dynamo=True, dynamic_shapes=({0: batch},))
    return model, program.model_proto


@pytest.mark.parametrize("n", [2, 3])
def test_onnx_matches_torch(exported, n):
    ort = pytest.importorskip("onnxruntime")
    model, proto = exported
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = images(n, seed=10 + n)
    with torch.no_grad():
        ref = [t.numpy() for t in model(x)]
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert out[0].shape == (n, 1, SIZE, SIZE) and out[1].shape == (n,)
    for o, r in zip(out, ref):
        np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-4)


def test_onnx_nodes_tagged_by_partition(exported):
    _, proto = exported
    seen = set()
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        if len(scopes) >= 2 and scopes[1] in PARTITIONS:
            seen.add(scopes[1])
            continue
        # Only the dynamic-batch shape helpers live outside the three partitions.
        assert node.op_type in {"Shape", "Gather", "Concat", "Unsqueeze", "Squeeze", "Reshape",
                                "Constant", "Slice", "Cast"}, (node.op_type, scopes)
    assert seen == PARTITIONS


def test_a_batch_of_one_image_at_a_1x1_bottleneck_is_one_line(recipe_factory, tmp_path):
    """RD at 32 px with batch_size 1 (or train_limit 1) ended in torch's batch-norm traceback."""
    import uadc
    r = recipe_factory(data={"image_size": 32}, model={"method": "rd", "taps": None},
                       train={"epochs": 1, "batch_size": 1, "threads": 1})
    with pytest.raises(uadc.UadcError, match=r"^the model: training batches of 1 image \(\d+ training images, "
                                             r"train.batch_size 1\) reach a 1x1 feature map.*raise train.batch_size"):
        uadc.train(r, artifacts=tmp_path / "a")
    assert not (tmp_path / "a" / "tiny" / "checkpoint.pt").exists()


def test_a_one_class_category_of_one_image_is_refused_before_any_model_is_replaced(tiny_data, tmp_path):
    """`train --one-class` replaced stripes' model, then failed on gray (1 training image) with advice to
    raise train.batch_size, which cannot help: a batch holds at most the category's images."""
    import shutil
    import uadc
    from conftest import write_recipe
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for f in sorted((data / "gray" / "train" / "good").iterdir())[1:]:
        f.unlink()
    r = write_recipe(tmp_path / "tiny.yaml", data, data={"image_size": 32, "val_fraction": 0.0},
                     model={"taps": ["blocks.1", "blocks.14"]}, train={"epochs": 1, "batch_size": 32, "threads": 1})
    with pytest.raises(uadc.UadcError, match=r"^category gray: training batches of 1 image \(1 training image, "
                                             r"train.batch_size 32\) reach a 1x1 feature map.*give it more training "
                                             r"images .*nothing was trained$"):
        uadc.train(r, artifacts=tmp_path / "a", one_class=True)
    assert not list((tmp_path / "a").rglob("checkpoint.pt"))


def test_the_epoch_line_names_what_each_discrepancy_is_for(recipe_factory, tmp_path, caplog):
    """US logged "normal discrepancy per tap [a, b]" for one tap: the values are per student."""
    import logging
    import uadc
    r = recipe_factory(data={"image_size": 32}, model={"method": "us", "taps": ["blocks.3"], "students": 2,
                                                       "descriptor_dim": 16}, train={"epochs": 1, "threads": 1})
    with caplog.at_level(logging.INFO, logger="uadc"):
        uadc.train(r, artifacts=tmp_path / "a")
    line = next(m for m in caplog.messages if ": epoch 1/1" in m)
    assert "normal discrepancy per student [" in line and line.split("[")[1].count(",") == 1, line


def test_rd_compiles_to_trt_fp16(tmp_path):
    """The opset pass judged an FP16-typed model at float32's tolerance: ONNX Runtime's FP16 ReduceL2 and Resize
    differ by an FP16 step between opsets 18 and 17, and every RD compile to trt-fp16 or jetson-fp16 was refused."""
    import sys
    from pathlib import Path

    import uadc
    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic import make_tiny_recipe
    recipe = make_tiny_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("method: stfpm", "method: rd"))
    uadc.train(recipe, artifacts=tmp_path / "art")
    res = uadc.compile(recipe, "trt-fp16", evaluate=False, latency_runs=1, artifacts=tmp_path / "art")
    assert res.precision == "fp16" and [p["name"] for p in res.passes][-2:] == ["opset", "cleanup"]
