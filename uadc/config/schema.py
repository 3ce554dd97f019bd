"""The recipe's keys for people and editors: ``uadc recipe-schema`` (a key list; the README names the keys it discusses)
and ``--json`` (a JSON Schema), both read from the typed models in :mod:`uadc.config.recipe`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from uadc.config.recipe import RecipeConfig
from uadc.config.validation import submodel


def json_schema() -> dict:
    """JSON Schema of a recipe file (``uadc recipe-schema --json``)."""
    return RecipeConfig.model_json_schema()


def describe_schema(model: type[BaseModel] = RecipeConfig, prefix: str = "") -> list[str]:
    """Human-readable key list (``uadc recipe-schema``)."""
    lines = []
    for key, f in model.model_fields.items():
        ann, sub = f.annotation, submodel(f.annotation)
        if sub is not None and not _is_list(ann):
            lines += describe_schema(sub, f"{prefix}{key}.")
            continue
        default = None if f.is_required() else f.default
        if isinstance(default, BaseModel):
            default = default.model_dump()
        req = "required" if f.is_required() else f"default {default!r}"
        bounds = ", ".join(f"{k} {getattr(m, k)}" for m in f.metadata for k in ("ge", "gt", "le", "lt")
                           if hasattr(m, k))
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if isinstance(extra.get("enum"), list):   # compile.target: the JSON Schema's enum, here too
            bounds = ", ".join([*filter(None, [bounds]), "one of " + " | ".join(map(str, extra["enum"]))])
        line = f"{prefix}{key} ({_type_name(ann)}, {req}{', ' + bounds if bounds else ''})"
        lines.append(line + (f": {f.description}" if f.description else ""))
        if sub is not None:
            lines += describe_schema(sub, f"{prefix}{key}[].")
    return lines


def _is_list(ann: Any) -> bool:
    return getattr(ann, "__origin__", None) is list or any(_is_list(a) for a in getattr(ann, "__args__", ()) or ())


def _type_name(ann: Any) -> str:
    return str(ann).replace("typing.", "").replace("uadc.config.recipe.", "").replace("<class '", "").replace("'>", "")


__all__ = ["json_schema", "describe_schema"]
