"""In-tree CNN backbones (no torchvision) and a feature extractor that taps named stages.

Every backbone module exposes ``stages()``: an ordered list of ``(name, module)`` whose
sequential application is the network's feature path. Module attribute names follow the
original checkpoints (torchvision, lukemelas EfficientNet) so their state dicts load strictly.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from uadc.core.errors import UadcError, pickle_refusal

# name -> (constructor, default weights loader or None, input normalisation (mean, std))
_REGISTRY: dict[str, tuple[Callable[[], nn.Module], Callable[[], Path] | None, tuple]] = {}

from uadc.config.recipe import BACKBONE_NORMALIZATION, IMAGENET_NORM  # noqa: E402,F401  (owned by config)
from uadc.config.validation import short  # noqa: E402


def register(name: str, default_weights: Callable[[], Path] | None = None):
    def wrap(ctor: Callable[[], nn.Module]):
        _REGISTRY[name] = (ctor, default_weights, BACKBONE_NORMALIZATION[name])
        return ctor

    return wrap


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone's pretrained weights expect, in [0, 1] pixel units."""
    _load_all()
    return _REGISTRY[name][2]


def build_backbone(name: str, pretrained: bool = True, weights: str | Path | None = None) -> nn.Module:
    """Construct a backbone and load weights: an explicit path, else the packaged default.

    ``pretrained=True`` with no weights available is an error, never a silent random init.
    """
    _load_all()
    if name not in _REGISTRY:
        raise UadcError(f"unknown backbone {name!r}; expected one of {', '.join(sorted(_REGISTRY))}")
    ctor, default_weights, _ = _REGISTRY[name]
    model = ctor()
    if not pretrained and weights is None:
        return model
    path = Path(weights) if weights is not None else (default_weights() if default_weights else None)
    if path is None:
        raise UadcError(
            f"backbone {name!r} has no bundled weights: set model.weights to a torchvision-format "
            f"state dict file, or pretrained: false for a random init")
    load_state_dict_file(model, path, name)
    return model


def load_state_dict_file(model: nn.Module, path: Path, name: str) -> None:
    if not path.is_file():   # a folder was "not found" too; the key named, as other recipe errors do
        raise UadcError(f"model.weights: weights file for {name!r} " + ("is a folder, not a file" if path.is_dir()
                                                                          else "not found") + f": {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:   # not torch's advice to retry unsafely, which would run it
        raise UadcError(f"weights file {path} {pickle_refusal(exc)}") from None
    except Exception as exc:  # corrupt or foreign file: report, don't trace
        raise UadcError(f"cannot read weights file {path}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: a file for another architecture
        first = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc)
        raise UadcError(f"weights file {path} does not fit {name!r}: {first.strip()}") from None
    # The classifier is never a feature stage, so files without it are fine.
    missing = [k for k in missing if not k.startswith(_CLASSIFIER_PREFIXES)]
    if missing:
        raise UadcError(f"weights file {path} does not fit {name!r}: missing {len(missing)} tensors "
                        f"(first: {missing[0]})")


_CLASSIFIER_PREFIXES = ("fc.", "_fc.", "classifier.")


class FeatureExtractor(nn.Module):
    """Runs a backbone's stages in order and returns the tapped ones; stops after the last tap."""

    def __init__(self, backbone: nn.Module, taps: list[str], start: str | None = None):
        super().__init__()
        names = [n for n, _ in backbone.stages()]
        for t in taps:
            if t not in names:
                raise UadcError(f"model.taps: unknown feature tap {short(t)}; stages are: {', '.join(names)}")
        order = sorted(taps, key=names.index)
        if order != list(taps):
            raise UadcError(f"model.taps: feature taps must be in network order: {', '.join(order)}")
        first = 0 if start is None else names.index(start) + 1
        last = names.index(taps[-1])
        if first > names.index(taps[0]):
            raise UadcError(f"tap {short(taps[0])} lies before the split point {short(start)}")
        stages = backbone.stages()[first:last + 1]
        self.stage_names = [n for n, _ in stages]
        self.stages = nn.ModuleList([m for _, m in stages])
        self.taps = list(taps)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            if name in self.taps:
                feats.append(x)
        return feats


def _load_all() -> None:
    # Import for the registration side effect; cheap and idempotent.
    from uadc.models.backbones import efficientnet_lite  # noqa: F401
    try:
        from uadc.models.backbones import resnet  # noqa: F401
    except ImportError:
        pass
    try:
        from uadc.models.backbones import mobilenet_v2  # noqa: F401
    except ImportError:
        pass
