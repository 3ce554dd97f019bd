"""DCAM: the loss terms behave as defined, the recipe keys are strict, the attention blocks train the
student (DCAM changes the weights) and are dropped afterwards: the checkpoint and the ONNX export of a
DCAM-trained model are node-for-node the plain student's."""

import json
from pathlib import Path

import pytest
import torch

from uadc.config.recipe import DcamConfig, load_recipe
from uadc.core.errors import UadcError
from uadc.models.dcam import DcamLoss, attention_block, build_dcam, channel_cosine, spatial_kl


def test_spatial_kl_is_zero_only_for_matching_spatial_distributions():
    t = torch.randn(2, 3, 5, 5)
    assert spatial_kl(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert spatial_kl(t, t + 7.0).item() == pytest.approx(0.0, abs=1e-5)  # softmax ignores a shift
    assert spatial_kl(t, torch.randn(2, 3, 5, 5)).item() > 0.05
    # per channel over H*W: a distribution moved to another position is penalised
    a = torch.zeros(1, 1, 2, 2)
    a[0, 0, 0, 0] = 5.0
    b = torch.zeros(1, 1, 2, 2)
    b[0, 0, 1, 1] = 5.0
    assert spatial_kl(a, b).item() > 1.0
    # a higher temperature flattens the distributions (before the T^2 scaling)
    assert spatial_kl(a, b, 4.0).item() / 16 < spatial_kl(a, b).item()


def test_channel_cosine_is_per_channel_and_scale_invariant():
    t = torch.randn(2, 4, 6, 6)
    scale = torch.rand(1, 4, 1, 1) + 0.1  # a different positive scale per channel: still cosine 1
    assert channel_cosine(t, t * scale).item() == pytest.approx(0.0, abs=1e-6)
    assert channel_cosine(t, -t).item() == pytest.approx(2.0, abs=1e-6)
    # channels swapped: each channel's spatial pattern is compared with another channel's
    assert channel_cosine(t, t[:, [1, 2, 3, 0]]).item() > 0.5


@pytest.mark.parametrize("kind,modules", [("channel", 1), ("spatial", 1), ("cbam", 2)])
def test_attention_blocks_keep_the_shape_and_mask(kind, modules):
    block = attention_block(16, kind, reduction=4)
    assert len(block) == modules
    x = torch.rand(2, 16, 8, 8)
    y = block(x)
    assert y.shape == x.shape
    assert torch.all(y <= x + 1e-6) and torch.all(y >= 0)  # sigmoid masks only attenuate (x >= 0 here)


def test_dcam_loss_combines_the_configured_terms():
    torch.manual_seed(0)
    t = [torch.randn(2, 8, 4, 4)]
    s = [torch.randn(2, 8, 4, 4, requires_grad=True)]

    class Plain:  # the method's own loss, counted with feature_weight
        head = None

        @staticmethod
        def loss(tf, sf):
            return torch.tensor(10.0)
    only_kl = DcamLoss([8], DcamConfig(kl_weight=1.0, cos_weight=0.0, feature_weight=0.0))
    a = only_kl.attend(s)
    assert only_kl(Plain, t, s).item() == pytest.approx(spatial_kl(t[0], a[0]).item(), rel=1e-6)
    both = DcamLoss([8], DcamConfig(kl_weight=2.0, cos_weight=3.0, feature_weight=0.5))
    both.load_state_dict(only_kl.state_dict())
    expect = 5.0 + 2.0 * spatial_kl(t[0], a[0]) + 3.0 * channel_cosine(t[0], a[0])
    total = both(Plain, t, s)
    assert total.item() == pytest.approx(expect.item(), rel=1e-5)
    total.backward()
    assert s[0].grad is not None and all(p.grad is not None for p in both.parameters())


def test_recipe_keys_are_strict(recipe_factory):
    r = load_recipe(recipe_factory(train={"dcam": {"enabled": True, "attention": "channel"}}))
    assert r.train.dcam.enabled and r.train.dcam.attention == "channel"
    assert not load_recipe(recipe_factory()).train.dcam.enabled  # off by default
    for dcam, msg in [({"enabled": True, "bogus": 1}, "train.dcam.bogus: unknown key"),
                      ({"attention": "se"}, "train.dcam.attention: 'se' is not one of"),
                      ({"kl_weight": -1.0}, "train.dcam.kl_weight: -1.0 is below the minimum 0"),
                      ({"enabled": True, "kl_weight": 0.0, "cos_weight": 0.0}, "both 0")]:
        with pytest.raises(UadcError, match=msg):
            load_recipe(recipe_factory(train={"dcam": dcam}))
    with pytest.raises(UadcError, match="DCAM applies to stfpm, paste and rd, not 'us'"):
        load_recipe(recipe_factory(model={"method": "us", "taps": ["blocks.3"]}, train={"dcam": {"enabled": True}}))


@pytest.mark.parametrize("model_cfg", [{"method": "paste", "split": "blocks.0"}, {"method": "rd"}],
                         ids=["paste", "rd"])
def test_dcam_fits_paste_and_rd(recipe_factory, model_cfg):
    from uadc.training.checkpoint import make_model
    from uadc.training.fit import fit
    r = load_recipe(recipe_factory(model=model_cfg, train={"epochs": 1, "dcam": {"enabled": True}}))
    torch.manual_seed(0)
    model = make_model(r)
    x = torch.randn(8, 3, 64, 64)
    dcam = build_dcam(model, r.train.dcam, x[:2])
    s = model.student_features(x[:2], model.teacher_features(x[:2]))
    assert [b[0].mlp[0].in_channels for b in dcam.blocks] == [f.shape[1] for f in s]
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    history = fit(model, x, r.train, seed=0)
    assert len(history) == 1 and history[0]["loss"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.student.state_dict().items())


def _graph(proto):
    g = proto.graph
    return ([(n.op_type, list(n.input), list(n.output)) for n in g.node],
            sorted((i.name, tuple(i.dims)) for i in g.initializer),
            [i.name for i in g.input], [o.name for o in g.output])


def test_dcam_export_is_node_for_node_the_plain_student(bench_run):
    """The unified plain and DCAM checkpoints of the bench run (same seed, epochs, data) export to the same graph."""
    import numpy as np
    import onnx

    from uadc.export.onnx_export import export_model
    from uadc.training.checkpoint import load_checkpoint
    res, variants, _ = bench_run
    models, protos = {}, {}
    for v, r in (("unified", variants["plain"]), ("dcam", variants["dcam"])):
        models[v], blob = load_checkpoint(Path(res["models"][v]["unified"]["path"]), r)
        assert blob["recipe"]["train"]["dcam"]["enabled"] is (v == "dcam")
        protos[v] = export_model(models[v], r.data.image_size, {"recipe": r.name})
    sp, sd = (models[v].state_dict() for v in ("unified", "dcam"))
    assert sp.keys() == sd.keys() and all(sp[k].shape == sd[k].shape for k in sp)  # no attention weights kept
    # same seed, same init and batches: only the DCAM loss can make the trained students differ
    assert any(not torch.equal(sp[k], sd[k]) for k in sp if k.startswith("student."))
    gp, gd = _graph(protos["unified"]), _graph(protos["dcam"])
    assert len(gp[0]) == len(gd[0]) > 0
    assert [n[0] for n in gp[0]] == [n[0] for n in gd[0]]  # op types, in order
    assert gp == gd  # and the wiring, initializer names/shapes, inputs and outputs
    onnx.checker.check_model(protos["dcam"])
    init_p = {i.name: onnx.numpy_helper.to_array(i) for i in protos["unified"].graph.initializer}
    init_d = {i.name: onnx.numpy_helper.to_array(i) for i in protos["dcam"].graph.initializer}
    assert any(not np.array_equal(init_p[k], init_d[k]) for k in init_p)  # the weights are DCAM's own


def test_the_report_says_which_detector_and_whether_it_trained_with_dcam(bench_run, tmp_path):
    """report.json / report.md named the recipe alone: a DCAM-trained checkpoint compiled under a plain
    recipe read exactly like a plain one."""
    import uadc
    res, variants, _ = bench_run
    for v, r in (("unified", variants["plain"]), ("dcam", variants["dcam"])):
        out = uadc.compile(Path(res["models"][v]["unified"]["path"]), "ort-cpu-fp32", recipe=variants["plain"],
                           out=tmp_path / v, evaluate=False, latency_runs=1, threads=1)
        m = json.loads((out.path / "report.json").read_text())["model"]
        assert m["method"] == "stfpm" and m["taps"] == r.cfg["model"]["taps"] and m["dcam"] is (v == "dcam")
        assert ("trained with DCAM" in (out.path / "report.md").read_text()) is (v == "dcam")


def test_the_report_names_the_taps_a_recipe_without_taps_uses(tiny_data, tmp_path):
    """A recipe without model.taps compiled to a report of `taps ` (none) and `"taps": null`."""
    from types import SimpleNamespace
    from conftest import write_recipe
    from uadc.config.recipe import load_recipe
    from uadc.core.constants import DEFAULT_TAPS
    from uadc.pipeline.compile import _model_record
    r = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_data))
    for model, taps in (({"taps": None}, list(DEFAULT_TAPS["efficientnet_lite0"])),
                        ({"taps": None, "method": "us", "head": "exact"}, list(DEFAULT_TAPS["efficientnet_lite0"])[:1]),
                        ({"taps": None, "backbone": "mobilenet_v2", "pretrained": False},
                         list(DEFAULT_TAPS["mobilenet_v2"]))):
        cfg = r.with_overrides(model=model)
        assert _model_record(SimpleNamespace(blob=None, recipe=cfg))["taps"] == taps, model


def test_a_checkpoint_of_another_method_is_refused_naming_the_method():
    """It named the first differing key alphabetically (`model.combine`), not the method."""
    from uadc.training.checkpoint import _first_difference
    said = _first_difference({"model": {"combine": "product", "method": "us"}}, {"model": {"combine": "sum", "method": "rd"}})
    assert said == "model.method: 'us' in the checkpoint, 'rd' in the recipe"


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_data):
    """bench.unified_table on tiny data: one-class, unified and DCAM models, 1 epoch, same seed."""
    from bench.unified_table import TableOptions, run_table, variant_recipes
    from conftest import write_recipe
    d = tmp_path_factory.mktemp("unified_table")
    recipe = write_recipe(d / "dcam_tiny.yaml", tiny_data, train={"epochs": 1, "dcam": {"enabled": True}})
    opts = TableOptions(threads=1, latency_runs=2, latency_rounds=2, log=lambda m: None)
    res = run_table(recipe, d / "art", d / "out", opts)
    return res, variant_recipes(load_recipe(recipe), opts), d


def test_unified_table_bench(bench_run):
    """Every model trained in its own process with the same epochs and seed, every AUROC in the markdown,
    the export check and latencies in the JSON; a second run reuses the checkpoints."""
    import json

    from bench.unified_table import RESULT_JSON, RESULT_MD, TableOptions, ensure_models, variant_recipes
    res, _, d = bench_run
    out = d / "out"
    assert set(res["auroc"]) == {"one_class", "unified", "dcam"}
    assert set(res["models"]["one_class"]) == {"stripes", "gray"}
    for infos in res["models"].values():
        for info in infos.values():
            # train_seconds is rounded: a 1-epoch one-class model on tiny data can take < 0.05 s
            assert info["epochs"] == 1 and info["train_seconds"] >= 0 and info["peak_rss_mb"] > 50
            assert not info["reused"]
    assert res["export"]["identical_graph"] is True
    assert res["export"]["graphs"]["unified"]["nodes"] == res["export"]["graphs"]["dcam"]["nodes"] > 0
    md = (out / RESULT_MD).read_text()
    assert json.loads((out / RESULT_JSON).read_text())["delta_dcam_vs_unified"] == res["delta_dcam_vs_unified"]
    for v in ("one_class", "unified", "dcam"):
        for cat, m in res["auroc"][v]["categories"].items():
            assert f"{m['image_auroc']:.4f}" in md and f"{m['pixel_auroc']:.4f}" in md, (v, cat)
    delta = res["delta_dcam_vs_unified"]["mean"]["image_auroc"]
    u, dc = res["auroc"]["unified"]["mean"]["image_auroc"], res["auroc"]["dcam"]["mean"]["image_auroc"]
    assert delta == pytest.approx(100 * (dc - u), abs=1e-3) and f"{delta:+.2f} points" in md
    # a second run reuses every checkpoint (same settings, threads aside) instead of training again
    opts = TableOptions(threads=2, log=lambda m: None)
    again = ensure_models(variant_recipes(load_recipe(d / "dcam_tiny.yaml"), opts), d / "art", opts)
    assert all(i["reused"] for infos in again.values() for i in infos.values())
    assert {v: {k: i["path"] for k, i in infos.items()} for v, infos in again.items()} == \
        {v: {k: i["path"] for k, i in infos.items()} for v, infos in res["models"].items()}


def test_a_validation_folder_in_a_settings_difference_is_not_none(recipe_factory, tiny_data):
    """`data.val: None in the checkpoint, [{'category': 'gray', 'folder': None}] in the recipe`: the folder
    the user typed read as None (where data lives is not compared, so it is shown as `<folder>`)."""
    from uadc.config.recipe import load_recipe
    from uadc.training.checkpoint import _model_difference
    plain = load_recipe(recipe_factory("plain"))
    val = load_recipe(recipe_factory("val", data={"val": [{"category": "gray", "folder": str(tiny_data)}]}))
    assert _model_difference(plain, val) == \
        "data.val: None in the checkpoint, [{'category': 'gray', 'folder': '<folder>'}] in the recipe"
