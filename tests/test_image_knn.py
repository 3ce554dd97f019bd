"""``model.image_knn``: the image score gains the standardised distance of the image's pooled teacher
features to the nearest training normal. The search is exact, the bank travels in the checkpoint
(its size is the data's), the graph scores as torch does, and a recipe without it is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uadc.core.errors import UadcError
from uadc.models.heads import ImageKNN


def _feats(n: int, seed: int, shift: float = 0.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 8, 4, 4, generator=g) + shift, torch.randn(n, 16, 2, 2, generator=g) + shift]


def _brute(q: list[torch.Tensor], bank: list[torch.Tensor], k: int) -> torch.Tensor:
    """Mean over the k nearest bank images of the summed per-tap squared distances of unit descriptors."""
    d = sum(torch.cdist(F.normalize(a.mean((2, 3)), dim=1), F.normalize(b.mean((2, 3)), dim=1)) ** 2
            for a, b in zip(q, bank))
    return torch.sort(d, dim=1).values[:, :k].mean(1)


@pytest.mark.parametrize("k", [1, 3])
def test_distance_is_the_exact_nearest_neighbour_search(k):
    knn = ImageKNN([0, 1], 1.0, k)
    bank, q = _feats(20, 0), _feats(5, 1)
    knn.set_bank(knn.describe(bank))
    torch.testing.assert_close(knn.distance(q), _brute(q, bank, k), atol=1e-5, rtol=1e-5)
    if k == 1:
        assert knn.distance(bank).abs().max() < 1e-5  # every bank image finds itself


def test_unfitted_passes_the_score_through_and_fitted_standardises():
    knn = ImageKNN([1], 2.0)
    score = torch.tensor([0.3, 0.5, 0.9])
    q = _feats(3, 2)
    assert not knn.fitted and torch.equal(knn(q, score), score)
    knn.set_bank(knn.describe(_feats(10, 3)))
    assert not knn.fitted    # the bank alone: no standardisation yet
    val_s, val_d = torch.tensor([0.2, 0.4, 0.6]), torch.tensor([1.0, 2.0, 3.0])
    stats = knn.set_stats(val_s, val_d)
    assert knn.fitted and stats["score_std"] == pytest.approx(0.2) and stats["dist_mean"] == pytest.approx(2.0)
    expected = score + 2.0 * (0.2 / 1.0) * knn.distance(q)
    torch.testing.assert_close(knn(q, score), expected)
    # ranks as the sum of the two terms standardised on the normals, and stays positive
    standardised = (score - 0.4) / 0.2 + 2.0 * (knn.distance(q) - 2.0) / 1.0
    assert torch.equal(torch.argsort(knn(q, score)), torch.argsort(standardised)) and (knn(q, score) > 0).all()


def test_an_image_wide_change_outranks_normals_with_the_same_map_score():
    """Why it exists: a change of the whole image (uneven brightness) moves the pooled features
    while the top of the map stays like a normal's."""
    knn = ImageKNN([0, 1], 1.0)
    knn.set_bank(knn.describe(_feats(40, 4)))
    val = _feats(10, 5)
    knn.set_stats(torch.full((10,), 0.5) + 0.01 * torch.randn(10), knn.distance(val))
    normal, changed = _feats(4, 6), _feats(4, 6, shift=1.5)
    same = torch.full((4,), 0.5)
    assert knn(changed, same).min() > knn(normal, same).max()


def test_checkpoint_round_trip_resizes_the_bank():
    a, b = ImageKNN([0], 1.0), ImageKNN([0], 1.0)
    a.set_bank(a.describe(_feats(7, 7)))
    a.set_stats(torch.rand(4), torch.rand(4))
    b.load_state_dict(a.state_dict())
    assert b.bank_t.shape == (8, 7) and b.bank_size == 7 and b.center.shape == (8,) and b.fitted
    q = _feats(2, 8)
    torch.testing.assert_close(b(q, torch.ones(2)), a(q, torch.ones(2)))


def _recipe(tmp_path, tiny_data, **model):
    from conftest import write_recipe
    from uadc.config.recipe import load_recipe
    return load_recipe(write_recipe(tmp_path / "r.yaml", tiny_data, model=model, data={"val_fraction": 0.25},
                                    train={"epochs": 1, "threads": 1}))


def test_recipe_checks(tmp_path, tiny_data):
    from uadc.training.checkpoint import make_model
    plain = make_model(_recipe(tmp_path, tiny_data))
    assert plain.head.image_knn is None and not any("image_knn" in k for k in plain.state_dict())
    on = make_model(_recipe(tmp_path, tiny_data, image_knn={"weight": 1.0, "taps": ["blocks.3"]}))
    assert on.head.image_knn.tap_index == [1]
    with pytest.raises(UadcError, match="image_knn.taps must be among model.taps"):
        _recipe(tmp_path, tiny_data, image_knn={"weight": 1.0, "taps": ["blocks.5"]})
    with pytest.raises(UadcError, match="not available for method us"):
        _recipe(tmp_path, tiny_data, method="us", taps=["blocks.3"], image_knn={"weight": 1.0})
    with pytest.raises(UadcError):
        _recipe(tmp_path, tiny_data, image_knn={"weight": -1.0})


def test_train_fits_it_and_the_exported_graph_scores_as_torch(tmp_path, tiny_data):
    import onnxruntime as ort

    import uadc
    from uadc.export.onnx_export import export_model
    from uadc.training.checkpoint import load_checkpoint, read_checkpoint
    recipe = _recipe(tmp_path, tiny_data, image_knn={"weight": 1.0})
    res = uadc.train(recipe.path, artifacts=tmp_path / "art")
    blob = read_checkpoint(res.checkpoints[0])
    info = blob["image_knn"]
    assert info["bank_images"] > 0 and info["val_images"] >= 2 and info["score_std"] > 0
    model, _ = load_checkpoint(res.checkpoints[0], recipe)
    assert model.head.image_knn.fitted and model.head.image_knn.bank_size == info["bank_images"]
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        _, score = model(x)
    sess = ort.InferenceSession(export_model(model, 64, {}).SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out[1], score.numpy(), atol=1e-4, rtol=1e-4)


def test_train_without_validation_normals_fails_before_training(tmp_path, tiny_data):
    import uadc
    from conftest import write_recipe
    path = write_recipe(tmp_path / "r.yaml", tiny_data, model={"image_knn": {"weight": 1.0}},
                        data={"val_fraction": 0.0}, train={"epochs": 1, "threads": 1})
    with pytest.raises(UadcError, match="needs at least 2 validation normals"):
        uadc.train(path, artifacts=tmp_path / "art")
    assert not (tmp_path / "art" / "r" / "checkpoint.pt").exists()


def test_bank_subset_is_seeded(tmp_path, tiny_data):
    from uadc.training.checkpoint import make_model
    from uadc.training.fit import fit_image_knn
    recipe = _recipe(tmp_path, tiny_data, image_knn={"weight": 1.0})
    x, v = torch.randn(12, 3, 64, 64), torch.randn(4, 3, 64, 64)
    banks = []
    for _ in range(2):
        model = make_model(recipe)
        fit_image_knn(model, x, v, max_bank=5, seed=3)
        banks.append(model.head.image_knn.bank_t.clone())
    assert banks[0].shape[1] == 5 and torch.equal(banks[0], banks[1])


@pytest.fixture(scope="module")
def knn_trained(tmp_path_factory, tiny_data):
    """A tiny STFPM model trained with the image kNN: (recipe path, artifacts root, checkpoint blob)."""
    import uadc
    from conftest import write_recipe
    from uadc.training.checkpoint import read_checkpoint
    d = tmp_path_factory.mktemp("knn")
    path = write_recipe(d / "knn.yaml", tiny_data, model={"image_knn": {"weight": 1.0}},
                        data={"val_fraction": 0.25}, train={"epochs": 1, "threads": 1})
    res = uadc.train(path, artifacts=d / "art")
    return path, d / "art", read_checkpoint(res.checkpoints[0])


def _bank(folder) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    from uadc.models.heads import BANK_INITIALIZER
    model = onnx.load(str(folder / "model.onnx"))
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == BANK_INITIALIZER))


@pytest.mark.parametrize("quantize,redescribed", [(["student"], False), (["teacher", "student"], True)])
def test_compiled_bank_is_described_by_the_compiled_teacher(knn_trained, tmp_path, quantize, redescribed):
    """``knn_bank``: an INT8 teacher describes the bank itself (its own descriptors of the training
    images); with an FP32 teacher the bank is the checkpoint's, bit for bit."""
    import onnx

    import uadc
    from uadc.core.constants import INPUT_NAME
    from uadc.core.ort_session import make_session
    from uadc.passes.knn import bank_query
    from uadc.pipeline.baseline import Baseline, resolve_source
    from uadc.config.recipe import load_recipe
    path, art, blob = knn_trained
    res = uadc.compile(path, "ort-cpu-int8", artifacts=art, quantize=quantize, precision="target",
                       out=tmp_path / "int8", evaluate=False, latency_runs=2, threads=1)
    bank = _bank(res.path)
    trained = blob["state_dict"]["head.image_knn.bank_t"].numpy()
    assert bank.shape == trained.shape
    if not redescribed:
        assert np.array_equal(bank, trained)
        return
    assert not np.allclose(bank, trained, atol=1e-6)
    model = onnx.load(str(res.path / "model.onnx"))
    sub = onnx.utils.Extractor(model).extract_model([INPUT_NAME], [bank_query(model)])
    recipe = load_recipe(path)
    images = Baseline(recipe, resolve_source(None, recipe, art)).bank_images()
    desc = make_session(sub).run(None, {INPUT_NAME: images})[0]
    np.testing.assert_allclose(bank, (desc - desc.mean(0)).T, atol=1e-5)   # centred, as ImageKNN.set_bank


def _input_qdq(graph, scale: float = 0.05) -> None:
    """A Q/DQ pair on the image input: the teacher's descriptors move, so ``knn_bank`` runs."""
    import onnx

    from uadc.core.constants import INPUT_NAME
    q = onnx.helper.make_node("QuantizeLinear", [INPUT_NAME, "qs", "qz"], ["input_q"], name="teacher/q")
    dq = onnx.helper.make_node("DequantizeLinear", ["input_q", "qs", "qz"], ["input_dq"], name="teacher/dq")
    g = graph.graph
    for n in g.node:
        n.input[:] = ["input_dq" if i == INPUT_NAME else i for i in n.input]
    g.node.insert(0, dq)
    g.node.insert(0, q)
    g.initializer.extend([onnx.numpy_helper.from_array(np.float32(scale), "qs"),
                          onnx.numpy_helper.from_array(np.uint8(128), "qz")])


def test_probe_bank_of_the_nearest_entries_scores_as_the_whole_bank(knn_trained):
    """``bank_subset`` (the precision search's probes): describing only the FP32 nearest bank entries
    of the scored images gives those images the scores the whole re-described bank gives."""
    from uadc.config.recipe import load_recipe
    from uadc.config.targets import get_target
    from uadc.core.constants import INPUT_NAME
    from uadc.core.ort_session import make_session
    from uadc.export.onnx_export import export_model
    from uadc.models.heads import BANK_INITIALIZER
    from uadc.passes.knn import bank_neighbours, knn_bank
    from uadc.passes.pipeline import PassContext
    from uadc.pipeline.baseline import Baseline, resolve_source
    from uadc.training.checkpoint import load_checkpoint
    path, art, _ = knn_trained
    recipe = load_recipe(path)
    base = Baseline(recipe, resolve_source(None, recipe, art))
    bank = base.bank_images()
    model, _ = load_checkpoint(art / "knn" / "checkpoint.pt")
    fp32 = export_model(model, recipe.data.image_size, {})
    queries = np.concatenate([bank[:2] + 0.3, np.random.default_rng(0).standard_normal((2, *bank.shape[1:]))
                              ]).astype(np.float32)
    near = bank_neighbours(fp32, queries, 2)
    assert near is not None and np.array_equal(near, np.unique(near)) and 1 <= len(near) < len(bank)
    graph = fp32.__class__()
    graph.CopyFrom(fp32)
    _input_qdq(graph)
    ctx = PassContext(target=get_target("ort-cpu-int8"), bank_images=lambda: bank)
    whole = knn_bank(graph, ctx)
    part = knn_bank(graph, PassContext(target=ctx.target, bank_images=ctx.bank_images, bank_subset=near))
    dims = {m: next(t.dims for t in g.graph.initializer if t.name == BANK_INITIALIZER) for m, g in
            (("whole", whole), ("part", part))}
    assert dims["whole"][1] == len(bank) and dims["part"][1] == len(near)
    score = lambda g: make_session(g).run(None, {INPUT_NAME: queries})[1]  # noqa: E731
    np.testing.assert_allclose(score(part), score(whole), rtol=1e-5, atol=1e-7)
    assert bank_neighbours(graph.__class__(), queries, 2) is None  # no image kNN: nothing to shrink


def test_bank_of_another_size_is_refused(knn_trained):
    from uadc.export.onnx_export import export_model
    from uadc.models.heads import BANK_INITIALIZER
    from uadc.passes.knn import knn_bank
    from uadc.passes.pipeline import PassContext
    from uadc.config.targets import get_target
    from uadc.training.checkpoint import load_checkpoint
    path, art, _ = knn_trained
    model, _ = load_checkpoint(art / "knn" / "checkpoint.pt")
    graph = export_model(model, 64, {})
    assert any(t.name == BANK_INITIALIZER for t in graph.graph.initializer)
    ctx = PassContext(target=get_target("ort-cpu-int8"), bank_images=lambda: np.zeros((1, 3, 64, 64), np.float32))
    assert knn_bank(graph, ctx) is graph      # FP32 teacher: nothing to re-describe, images never read
    # a Q/DQ pair on the descriptor's path makes the pass run; the bank size must match the images
    _input_qdq(graph)
    with pytest.raises(UadcError, match="bank holds .* images but the recipe's training data gives 1"):
        knn_bank(graph, ctx)


def test_search_probes_with_the_nearest_bank_entries_rank_as_with_the_whole_bank(knn_trained, monkeypatch):
    """The precision search's probes describe only the bank entries nearest their images: the same
    sensitivities, steps and assignment as probes that re-describe the whole bank."""
    import uadc
    from conftest import fake_profile
    from uadc.config.recipe import load_recipe
    from uadc.config.targets import get_target
    from uadc.pipeline import precision as P
    from uadc.pipeline.compile import CompileOptions

    monkeypatch.setattr(P, "node_times", fake_profile)  # INT8 pays everywhere: the strict budget reverts
    path, art, _ = knn_trained
    recipe = load_recipe(path).with_overrides(compile={"auto": {"val_images": 4, "random_images": 4,
                                                                "spearman_min": 0.999, "top1_overlap_min": 0.99}})
    base = uadc.baseline(recipe, artifacts=art, threads=1)
    target = get_target("ort-cpu-int8")
    ptq = P.auto_candidates(base, target, CompileOptions(target=target.name, precision="auto"))
    passes = ["qdq", "partition_check", "knn_bank"]
    described = []
    real = P._Search.probe_model

    def spy(self, int8):
        described.append(self.probe_bank)
        return real(self, int8)

    monkeypatch.setattr(P._Search, "probe_model", spy)
    probed = P.search_precision(base, target, base.fp32, ptq, passes, 1)
    assert described and all(b is not None and 0 < len(b) < len(base.bank_images()) for b in described)
    monkeypatch.setattr(P._Search, "probe_bank", property(lambda self: None))
    whole = P.search_precision(base, target, base.fp32, ptq, passes, 1)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert any(g["fidelity_cost"] for g in whole.record["groups"])  # the probes ran and measured a cost
    assert strip(probed.record) == strip(whole.record) and probed.nodes == whole.nodes


def test_another_head_setting_on_a_knn_checkpoint_says_the_scale_is_the_trained_heads(knn_trained, caplog):
    """A checkpoint serves any head setting, but the kNN term was scaled to the score of the head it was trained
    with: `score_reduction: topk_mean` on a `max` checkpoint weighted the kNN ~7 % off, silently."""
    import logging
    from uadc.config.recipe import load_recipe
    from uadc.training.checkpoint import load_checkpoint
    path, art, _ = knn_trained
    recipe = load_recipe(path)
    ckpt = recipe.artifact_dir(art) / "checkpoint.pt"
    with caplog.at_level(logging.WARNING, logger="uadc"):
        load_checkpoint(ckpt, recipe)
        assert not caplog.records
        other = recipe.with_overrides(model={"score_reduction": "topk_mean" if recipe.cfg["model"]["score_reduction"]
                                             == "max" else "max"})
        load_checkpoint(ckpt, other)
    assert len(caplog.records) == 1 and "its image_knn scale was measured with the trained score_reduction" \
        in caplog.records[0].getMessage()


def test_k_above_the_bank_is_a_warning(recipe_factory, tmp_path, caplog):
    """k larger than the bank silently averaged over every bank image."""
    import uadc
    r = recipe_factory(train={"epochs": 1, "threads": 1}, data={"val_fraction": 0.25},
                       model={"image_knn": {"weight": 1.0, "k": 64, "taps": ["blocks.3"]}})
    with caplog.at_level("WARNING", logger="uadc"):
        uadc.train(r, artifacts=tmp_path / "art")
    assert "model.image_knn.k 64 is more than its bank of" in caplog.text
    # every training image is in the bank: raising max_bank, which it said, changes nothing
    assert "(lower k, or give more training images)" in caplog.text and "max_bank" not in caplog.text
