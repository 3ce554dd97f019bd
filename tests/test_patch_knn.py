"""``model.patch_knn``: the map gains, at each location, the scaled distance of the teacher's local
features to the nearest training patch (a greedy coreset). The search is exact, the coreset is seeded
and covers the patches better than a random subset, the bank travels in the checkpoint, the graph
scores as torch does, and a recipe without it is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uadc.core.errors import UadcError
from uadc.models.heads import PatchKNN
from uadc.training.fit import greedy_coreset


def _feats(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 8, 8, 8, generator=g), torch.randn(n, 16, 4, 4, generator=g)]


def _local(feats: list[torch.Tensor]) -> torch.Tensor:
    """Brute force: each tap 3x3 averaged, resized to 8x8, concatenated; (N, D, 8, 8)."""
    out = [F.interpolate(F.avg_pool2d(f, 3, 1, 1, count_include_pad=False), size=(8, 8), mode="bilinear",
                         align_corners=False) for f in feats]
    return torch.cat(out, 1)


def test_distance_is_the_exact_nearest_patch_search():
    knn = PatchKNN([0, 1], 1.0)
    bank_imgs, q = _feats(6, 0), _feats(3, 1)
    rows = _local(bank_imgs).permute(0, 2, 3, 1).reshape(-1, 24)
    knn.set_bank(knn.patches(knn.describe(bank_imgs)))
    assert knn.bank_size == 6 * 64
    qrows = _local(q).permute(0, 2, 3, 1).reshape(-1, 24)
    brute = (torch.cdist(qrows.double(), rows.double()) ** 2).amin(1).reshape(3, 1, 8, 8).float()
    torch.testing.assert_close(knn.distance(q), brute, atol=1e-4, rtol=1e-4)
    assert knn.distance(bank_imgs).abs().max() < 1e-4   # every bank patch finds itself


def test_unfitted_passes_the_map_through_and_fitted_adds_the_scaled_distance():
    knn = PatchKNN([0], 0.5)
    q, amap = _feats(2, 2), torch.rand(2, 1, 16, 16)
    assert not knn.fitted and torch.equal(knn(q, amap), amap)
    knn.set_bank(knn.patches(knn.describe(_feats(4, 3))))
    stats = knn.set_stats(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 6.0]))
    assert knn.fitted and stats["map_std"] == pytest.approx(2 ** 0.5) and stats["dist_std"] == pytest.approx(8 ** 0.5)
    d = F.interpolate(knn.distance(q), size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(knn(q, amap), amap + 0.5 * (2 ** 0.5 / 8 ** 0.5) * d)
    assert (knn(q, amap) >= amap).all()


def test_a_local_change_raises_the_map_where_it_is():
    knn = PatchKNN([0, 1], 1.0)
    knn.set_bank(knn.patches(knn.describe(_feats(20, 4))))
    knn.set_stats(torch.rand(50), knn.distance(_feats(5, 5)).flatten())
    q = _feats(1, 6)
    q[0][:, :, 1:3, 5:7] += 4.0
    d = knn(q, torch.zeros(1, 1, 8, 8))[0, 0]
    assert d[1:3, 5:7].min() > d[5:, :3].max()


def test_checkpoint_round_trip_resizes_the_bank():
    a, b = PatchKNN([1], 1.0), PatchKNN([1], 1.0)
    a.set_bank(a.patches(a.describe(_feats(3, 7))))
    a.set_stats(torch.rand(10), torch.rand(10))
    b.load_state_dict(a.state_dict())
    assert b.bank_t.shape == (16, 48) and b.fitted
    q, amap = _feats(2, 8), torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(b(q, amap), a(q, amap))


def test_coreset_is_seeded_and_covers_better_than_a_random_subset():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2000, 4, generator=g), torch.randn(20, 4, generator=g) + 8])  # a rare cluster
    a, b = greedy_coreset(x, 50, seed=1), greedy_coreset(x, 50, seed=1)
    assert torch.equal(a, b) and len(a.unique()) == 50
    assert torch.equal(greedy_coreset(x[:30], 50, seed=1), torch.arange(30))
    rand = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:50]

    def cover(idx):   # the farthest any point lies from its nearest pick
        return torch.cdist(x, x[idx]).amin(1).max()
    assert cover(a) < cover(rand)
    assert (a >= 2000).any()   # the rare cluster is represented


def _recipe(tmp_path, tiny_data, val_fraction=0.25, **model):
    from conftest import write_recipe
    from uadc.config.recipe import load_recipe
    return load_recipe(write_recipe(tmp_path / "r.yaml", tiny_data, model=model, data={"val_fraction": val_fraction},
                                    train={"epochs": 1, "threads": 1}))


def test_recipe_checks(tmp_path, tiny_data):
    from uadc.training.checkpoint import make_model
    plain = make_model(_recipe(tmp_path, tiny_data))
    assert plain.head.patch_knn is None and not any("patch_knn" in k for k in plain.state_dict())
    on = make_model(_recipe(tmp_path, tiny_data, patch_knn={"weight": 1.0, "taps": ["blocks.3"]}))
    assert on.head.patch_knn.tap_index == [1]
    with pytest.raises(UadcError, match="patch_knn.taps must be among model.taps"):
        _recipe(tmp_path, tiny_data, patch_knn={"weight": 1.0, "taps": ["blocks.5"]})
    with pytest.raises(UadcError, match="patch_knn: not available for method us"):
        _recipe(tmp_path, tiny_data, method="us", taps=["blocks.3"], patch_knn={"weight": 1.0})


@pytest.mark.parametrize("head", ["exact", "fast"])
def test_train_fits_it_and_the_exported_graph_scores_as_torch(tmp_path, tiny_data, head):
    import onnxruntime as ort

    import uadc
    from uadc.export.onnx_export import export_model
    from uadc.training.checkpoint import load_checkpoint, read_checkpoint
    recipe = _recipe(tmp_path, tiny_data, head=head, patch_knn={"weight": 1.0, "bank": 40},
                     image_knn={"weight": 1.0})
    res = uadc.train(recipe.path, artifacts=tmp_path / "art")
    blob = read_checkpoint(res.checkpoints[0])
    info = blob["patch_knn"]
    assert info["bank_patches"] == 40 < info["training_patches"] and info["map_std"] > 0
    assert blob["image_knn"]["score_std"] > 0
    model, _ = load_checkpoint(res.checkpoints[0], recipe)
    knn = model.head.patch_knn
    assert knn.fitted and knn.bank_size == 40
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        amap, score = model(x)
        knn.weight = 0.0
        plain, _ = model(x)
        knn.weight = 1.0
    assert (amap - plain).abs().max() > 1e-6   # the patch term is in the map
    sess = ort.InferenceSession(export_model(model, 64, {}).SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out[0], amap.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out[1], score.numpy(), atol=1e-4, rtol=1e-4)


def test_train_without_validation_normals_fails_before_training(tmp_path, tiny_data):
    import uadc
    recipe = _recipe(tmp_path, tiny_data, val_fraction=0.0, patch_knn={"weight": 1.0})
    # the count and the categories (a one-class run said "set data.val_fraction > 0" when it was 0.1)
    with pytest.raises(UadcError, match=r"model.patch_knn needs at least 2 validation normals to standardise its "
                                        r"score, \S+ has 0: raise data.val_fraction"):
        uadc.train(recipe.path, artifacts=tmp_path / "art")
    assert not (tmp_path / "art" / "r" / "checkpoint.pt").exists()
