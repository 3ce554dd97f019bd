"""``model.head: fast``: the same distances, maps that correlate with the exact head's, fewer
ONNX nodes, picked by the recipe, and a checkpoint serves either head (heads hold no weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uadc.models.heads import DistanceHead, FastDistanceHead, distance_head, fast_like


def _features(seed: int = 0, size: int = 128):
    """Teacher/student features at strides 4, 8, 16 with a local 'defect' where they differ."""
    g = torch.Generator().manual_seed(seed)
    t, s = [], []
    for stride, ch in ((4, 24), (8, 40), (16, 80)):
        n = size // stride
        a = torch.randn(2, ch, n, n, generator=g)
        b = a + 0.3 * torch.randn(2, ch, n, n, generator=g)
        b[0, :, n // 4:n // 2, n // 4:n // 2] += 2.0 * torch.randn(ch, 1, 1, generator=g)
        t.append(a)
        s.append(b)
    return t, s


@pytest.mark.parametrize("distance,combine", [("l2", "product"), ("cosine", "sum")])
def test_fast_distances_equal_exact(distance, combine):
    t, s = _features()
    exact, fast = DistanceHead(128, distance, combine, 2.0), FastDistanceHead(128, distance, combine, 2.0)
    for me, mf in zip(exact.layer_maps(t, s), fast.layer_maps(t, s)):
        torch.testing.assert_close(mf, me, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("sigma", [2.0, 4.0])
def test_fast_map_correlates_and_ranks_like_exact(sigma):
    t, s = _features(1)
    (me, se), (mf, sf) = DistanceHead(128, "l2", "product", sigma)(t, s), FastDistanceHead(128, "l2", "product", sigma)(t, s)
    assert mf.shape == me.shape == (2, 1, 128, 128) and sf.shape == se.shape == (2,)
    corr = np.corrcoef(me.numpy().ravel(), mf.numpy().ravel())[0, 1]
    assert corr > 0.99, corr
    assert (se[0] > se[1]) == (sf[0] > sf[1])  # the 'defect' image scores higher with both heads


@pytest.mark.parametrize("reduction,topk,pool", [("topk_mean", 0.05, 1), ("max", 0.01, 1), ("topk_mean", 0.05, 4)])
def test_fast_like_keeps_every_setting_and_scores_alike(reduction, topk, pool):
    exact = DistanceHead(128, "cosine", "sum", 2.0, skip_teacher=1, score_reduction=reduction, score_topk=topk,
                         score_pool=pool)
    fast = fast_like(exact)
    assert type(fast) is FastDistanceHead
    for attr in ("image_size", "distance", "combine", "skip_teacher", "score_reduction", "score_topk", "score_pool"):
        assert getattr(fast, attr) == getattr(exact, attr), attr
    assert fast.blur.sigma == exact.blur.sigma
    t, s = _features(3)
    t = [torch.randn_like(t[0])] + t  # the skipped leading teacher output
    (_, se), (_, sf) = exact(t, s), fast(t, s)
    assert (se[0] > se[1]) == (sf[0] > sf[1])


@pytest.mark.parametrize("sigma,n", [(4.0, 128), (2.0, 64), (4.0, 20), (0.0, 16)])
def test_matrix_blur_equals_the_separable_convolution(sigma, n):
    from uadc.models.heads import GaussianBlur, MatrixBlur
    m = torch.rand(3, 1, n, n, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(MatrixBlur(sigma, n)(m), GaussianBlur(sigma)(m), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sigma,hw,n", [(4.0, (32, 32), 128), (4.0, (64, 64), 256), (2.0, (16, 24), 64),
                                         (0.0, (16, 16), 64)])
def test_matrix_blur_upsamples_a_smaller_map_as_resize_then_blur(sigma, hw, n):
    """Folding the bilinear upsampling into the smoothing matrices is the same map as resizing first."""
    from uadc.models.heads import GaussianBlur, MatrixBlur
    m = torch.rand(2, 1, *hw, generator=torch.Generator().manual_seed(n))
    ref = GaussianBlur(sigma)(F.interpolate(m, size=(n, n), mode="bilinear", align_corners=False))
    out = MatrixBlur(sigma, n)(m)
    assert out.shape == (2, 1, n, n)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_fast_top_k_mean_is_unsorted_and_takes_the_same_pixels():
    from uadc.models.heads import reduce_score
    amap = torch.rand(3, 1, 64, 64)
    torch.testing.assert_close(reduce_score(amap, "topk_mean", 0.05, ordered=False),
                               reduce_score(amap, "topk_mean", 0.05), atol=1e-6, rtol=1e-6)


def test_single_tap_at_input_resolution_is_exact():
    t, s = _features(2)
    t, s = [F.interpolate(t[0], size=(128, 128))], [F.interpolate(s[0], size=(128, 128))]
    exact, fast = DistanceHead(128, "l2", "product", 2.0), FastDistanceHead(128, "l2", "product", 2.0)
    for a, b in zip(fast(t, s), exact(t, s)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_recipe_picks_the_head_and_checkpoints_serve_both(tmp_path, tiny_data):
    from conftest import write_recipe
    from uadc.config.recipe import load_recipe
    from uadc.models import build_model
    from uadc.training.checkpoint import load_checkpoint, save_checkpoint

    exact_r = load_recipe(write_recipe(tmp_path / "exact.yaml", tiny_data))
    fast_r = load_recipe(write_recipe(tmp_path / "fast.yaml", tiny_data, model={"head": "fast"}))
    assert exact_r.model.head == "exact"  # default unchanged
    model = build_model(exact_r.cfg["model"], exact_r.data.image_size)
    assert type(model.head) is DistanceHead
    assert type(distance_head(fast_r.cfg["model"], 64, "l2")) is FastDistanceHead
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", model, exact_r, [], ["stripes", "gray"])
    loaded, _ = load_checkpoint(ckpt, fast_r)
    assert type(loaded.head) is FastDistanceHead
    model.head = FastDistanceHead(64, "l2", "product", 1.0)  # same weights, same head: same outputs
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_fast_head_exports_fewer_nodes_and_matches_in_ort(tmp_path, tiny_data):
    from conftest import write_recipe
    from uadc.backends.ort import make_session
    from uadc.config.recipe import load_recipe
    from uadc.export.onnx_export import export_model
    from uadc.export.partitions import partition_of
    from uadc.models import build_model

    heads = {}
    for kind in ("exact", "fast"):
        r = load_recipe(write_recipe(tmp_path / f"{kind}.yaml", tiny_data,
                                        model={"head": kind, "score_reduction": "topk_mean", "score_topk": 0.05}))
        torch.manual_seed(0)
        model = build_model(r.cfg["model"], r.data.image_size).eval()
        onx = export_model(model, r.data.image_size, {})
        head = [n for n in onx.graph.node if partition_of(n) == "head"]
        heads[kind] = [n.op_type for n in head]
        topk = [a.i for n in head if n.op_type == "TopK" for a in n.attribute if a.name == "sorted"]
        assert topk == ([1] if kind == "exact" else [0]), topk  # fast: same pixels, no final sort
        x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
        amap, score = make_session(onx, 1).run(None, {"image": x})
        with torch.no_grad():
            tmap, tscore = model(torch.from_numpy(x))
        np.testing.assert_allclose(amap, tmap.numpy(), atol=1e-4, rtol=1e-3)
    assert len(heads["fast"]) < len(heads["exact"]), heads
    assert "Transpose" not in heads["fast"]
    assert "MatMul" in heads["fast"] and "Conv" not in heads["fast"] and "Pad" not in heads["fast"]
