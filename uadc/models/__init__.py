"""Anomaly-detection methods, one module each; ``build_model`` picks one from a recipe."""

from __future__ import annotations

from uadc.core.constants import DEFAULT_TAPS
from uadc.core.errors import UadcError
from uadc.models.base import KDModel


def model_config(recipe_model: dict) -> dict:
    """The recipe's model section with the taps the model uses (the backbone's default when none are given;
    Uninformed Students describe the first only)."""
    m = dict(recipe_model)
    m["taps"] = m["taps"] or list(DEFAULT_TAPS[m["backbone"]])
    if m["method"] == "us":
        m["taps"] = m["taps"][:1]
    return m


def build_model(recipe_model: dict, image_size: int) -> KDModel:
    m = model_config(recipe_model)
    method = m["method"]
    if method == "stfpm":
        from uadc.models.stfpm import build_stfpm as build
    elif method == "paste":
        from uadc.models.paste import build_paste as build
    elif method == "rd":
        from uadc.models.rd import build_rd as build
    elif method == "us":
        from uadc.models.us import build_us as build
    else:
        raise UadcError(f"model.method: unknown method {method!r}")
    return build(m, image_size)
