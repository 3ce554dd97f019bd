"""``model.score_reduction``: the image score is the map's max or the mean of its top-k fraction,
picked by the recipe (strict schema), computed in the exported graph (torch and ONNX Runtime agree),
and a checkpoint serves either (heads hold no weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uadc.core.errors import UadcError
from uadc.models.heads import DistanceHead, FastDistanceHead, reduce_score, topk_count


def test_reduce_score_max_and_topk_mean():
    g = torch.Generator().manual_seed(0)
    amap = torch.rand(3, 1, 20, 20, generator=g)
    torch.testing.assert_close(reduce_score(amap, "max"), amap.flatten(1).amax(1))
    torch.testing.assert_close(reduce_score(amap, "topk_mean", 1.0), amap.flatten(1).mean(1))
    k = topk_count(0.05, 400)
    assert k == 20
    top = np.sort(amap.flatten(1).numpy(), axis=1)[:, ::-1][:, :k].mean(1)
    np.testing.assert_allclose(reduce_score(amap, "topk_mean", 0.05).numpy(), top, rtol=1e-6)
    assert topk_count(1e-6, 400) == 1  # at least one pixel: a tiny fraction is the max
    torch.testing.assert_close(reduce_score(amap, "topk_mean", 1e-6), amap.flatten(1).amax(1))


def test_topk_mean_prefers_an_area_over_one_hot_pixel():
    """Why the option exists: a lone hot pixel wins under max, a defect area under top-k mean."""
    amap = torch.zeros(2, 1, 32, 32)
    amap[0, 0, 5, 5] = 1.0              # one hot pixel
    amap[1, 0, 10:20, 10:20] = 0.6      # a 100-pixel area, less hot
    assert reduce_score(amap, "max")[0] > reduce_score(amap, "max")[1]
    s = reduce_score(amap, "topk_mean", 0.05)
    assert s[1] > s[0]


@pytest.mark.parametrize("cls", [DistanceHead, FastDistanceHead])
def test_head_score_uses_reduction(cls):
    g = torch.Generator().manual_seed(1)
    t = [torch.randn(2, 8, 16, 16, generator=g)]
    s = [t[0] + 0.5 * torch.randn(2, 8, 16, 16, generator=g)]
    amap, smax = cls(64, "l2", "product", 1.0)(t, s)
    amap2, stop = cls(64, "l2", "product", 1.0, score_reduction="topk_mean", score_topk=0.01)(t, s)
    torch.testing.assert_close(amap2, amap)
    torch.testing.assert_close(smax, amap.flatten(1).amax(1))
    torch.testing.assert_close(stop, reduce_score(amap, "topk_mean", 0.01))
    assert (stop < smax).all()


def test_recipe_schema_default_and_strict(tmp_path, tiny_data):
    from conftest import write_recipe
    from uadc.config.recipe import load_recipe
    r = load_recipe(write_recipe(tmp_path / "a.yaml", tiny_data))
    assert (r.model.score_reduction, r.model.score_topk) == ("max", 0.01)
    for bad in ({"score_reduction": "mean"}, {"score_topk": 0}, {"score_topk": 1.5}, {"score_topk": "0.1"}):
        with pytest.raises(UadcError):
            load_recipe(write_recipe(tmp_path / "bad.yaml", tiny_data, model=bad))


def test_checkpoint_serves_either_reduction_and_ort_agrees(tmp_path, tiny_data):
    from conftest import write_recipe
    from uadc.backends.ort import make_session
    from uadc.config.recipe import load_recipe
    from uadc.export.onnx_export import export_model
    from uadc.models import build_model
    from uadc.training.checkpoint import load_checkpoint, save_checkpoint

    plain = load_recipe(write_recipe(tmp_path / "max.yaml", tiny_data))
    topk = load_recipe(write_recipe(tmp_path / "topk.yaml", tiny_data,
                                    model={"score_reduction": "topk_mean", "score_topk": 0.02}))
    torch.manual_seed(0)
    model = build_model(plain.cfg["model"], plain.data.image_size).eval()
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", model, plain, [], ["stripes", "gray"])
    loaded, _ = load_checkpoint(ckpt, topk)  # trained with max, served with top-k mean
    assert loaded.head.score_reduction == "topk_mean" and loaded.head.score_topk == 0.02
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        tmap, tscore = loaded(torch.from_numpy(x))
        _, max_score = model(torch.from_numpy(x))
    torch.testing.assert_close(tscore, reduce_score(tmap, "topk_mean", 0.02))
    assert not torch.allclose(tscore, max_score)
    onx = export_model(loaded, topk.data.image_size, {})
    assert "TopK" in {n.op_type for n in onx.graph.node}
    amap, score = make_session(onx, 1).run(None, {"image": x})
    np.testing.assert_allclose(amap, tmap.numpy(), atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(score, tscore.numpy(), atol=1e-4, rtol=1e-3)


def test_pooled_score_reads_the_average_pooled_map():
    g = torch.Generator().manual_seed(2)
    amap = torch.rand(3, 1, 32, 32, generator=g)
    pooled = amap.reshape(3, 1, 8, 4, 8, 4).mean((3, 5))  # 4x4 blocks
    torch.testing.assert_close(reduce_score(amap, "topk_mean", 0.05, pool=4), reduce_score(pooled, "topk_mean", 0.05))
    torch.testing.assert_close(reduce_score(amap, "max", pool=4), pooled.flatten(1).amax(1))
    assert not torch.allclose(reduce_score(amap, "topk_mean", 0.05, pool=4), reduce_score(amap, "topk_mean", 0.05))


@pytest.mark.parametrize("cls", [DistanceHead, FastDistanceHead])
def test_pooled_score_keeps_the_map_and_ranks_a_smooth_map_alike(cls):
    """The map output is untouched; on smoothed maps the pooled top-k mean orders images as the full one."""
    g = torch.Generator().manual_seed(3)
    t = [torch.randn(12, 8, 16, 16, generator=g)]
    s = [t[0] + torch.linspace(0.1, 2.0, 12).view(12, 1, 1, 1) * torch.randn(12, 8, 16, 16, generator=g)]
    full_map, full = cls(64, "l2", "product", 4.0, score_reduction="topk_mean", score_topk=0.05)(t, s)
    pool_map, pooled = cls(64, "l2", "product", 4.0, score_reduction="topk_mean", score_topk=0.05, score_pool=4)(t, s)
    torch.testing.assert_close(pool_map, full_map)
    assert not torch.allclose(pooled, full)
    assert (torch.argsort(pooled) == torch.argsort(full)).all()


def test_score_pool_must_divide_the_image_size(tmp_path, tiny_data):
    from conftest import write_recipe
    from uadc.config.recipe import load_recipe
    assert load_recipe(write_recipe(tmp_path / "a.yaml", tiny_data, model={"score_pool": 4})).model.score_pool == 4
    for bad in ({"score_pool": 0}, {"score_pool": 3}, {"score_pool": 2.5}):
        with pytest.raises(UadcError, match="score_pool"):
            load_recipe(write_recipe(tmp_path / "bad.yaml", tiny_data, model=bad))


def test_pooled_score_in_the_exported_graph(tmp_path, tiny_data):
    from conftest import write_recipe
    from uadc.backends.ort import make_session
    from uadc.config.recipe import load_recipe
    from uadc.export.onnx_export import export_model
    from uadc.models import build_model

    r = load_recipe(write_recipe(tmp_path / "p.yaml", tiny_data, model={"head": "fast", "score_reduction": "topk_mean",
                                                                        "score_topk": 0.05, "score_pool": 4}))
    torch.manual_seed(0)
    model = build_model(r.cfg["model"], r.data.image_size).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        tmap, tscore = model(torch.from_numpy(x))
    onx = export_model(model, r.data.image_size, {})
    ops = [n.op_type for n in onx.graph.node]
    assert "AveragePool" in ops and "TopK" in ops
    amap, score = make_session(onx, 1).run(None, {"image": x})
    np.testing.assert_allclose(amap, tmap.numpy(), atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(score, tscore.numpy(), atol=1e-4, rtol=1e-3)
