"""One wording for user-input errors: pydantic's validation errors (``key.path[i]: what was expected, got
what``), a value listed twice, a command-line comma list."""

from __future__ import annotations

import difflib
import math
import reprlib
import typing
import unicodedata
from typing import Any

from pydantic import BaseModel, ValidationError

from uadc.core.errors import UadcError


def short(value: Any) -> str:
    """A bounded repr of a user's value for an error line (``true`` / ``null`` as a YAML file writes them)."""
    if value is None or isinstance(value, bool):   # `one_class: [true, true]` was said "lists True twice"
        return "null" if value is None else str(value).lower()
    if isinstance(value, list) and len(value) <= 4 and all(v is None or isinstance(v, (bool, int, float)) for v in value):
        return "[" + ", ".join(short(v) for v in value) + "]"   # `[true, null]`, not `[True, None]`
    # reprlib: bounded depth and items, so nested YAML anchors (a "billion laughs") cannot expand
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, 60, 60
    try:
        text = r.repr(value)
    except ValueError:   # an int past Python's 4300-digit limit for repr
        text = f"an integer of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def listed_twice(name: str, items: "list | tuple") -> str | None:
    """``NAME lists 'x' twice`` for the first value repeated in a user's list (a tap, an axis value,
    a calibrator: each would count or run twice), else None. Values may be unhashable (lists)."""
    seen: set = set()
    for i, v in enumerate(items):   # a set where values hash: 60k seeds took 29 s, checked pairwise
        try:
            if v in seen:
                return f"{name} lists {short(v)} twice"
            seen.add(v)
        except TypeError:
            if v in items[:i]:
                return f"{name} lists {short(v)} twice"
    return None


def comma_list(value: str | None, name: str | None = None) -> list[str] | None:
    """A command-line ``a,b`` -> [a, b]; an empty item (``,``) is a user error, not "the default";
    so is one given twice. ``name`` (the option or argument) starts the error."""
    if value is None:
        return None
    items = [p.strip() for p in value.split(",")]
    where = f"{name}: " if name else ""
    if not items or any(not p for p in items):
        raise UadcError(f"{where}expected a comma-separated list without empty items, got {value!r}")
    if listed_twice(repr(value), items):
        raise UadcError(where + listed_twice(repr(value), items))
    return items


def name_list(value: Any, name: str) -> list[str] | None:
    """An API list of names: ``"a,b"`` as on the command line, or a sequence of strings (a bare
    string was iterated letter by letter: "unknown calibrator 'm'")."""
    if value is None or isinstance(value, str):
        return comma_list(value, name)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return comma_list(",".join(value), name)
    raise UadcError(f"{name}: expected names as 'a,b' or a non-empty list of strings, got {value!r:.80}")


def merged(base: dict, over: dict) -> dict:
    """``over`` laid on ``base``: mappings merged key by key at every depth, anything else (a list
    included) replaced whole."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def _is_label(part: Any) -> bool:
    """A union branch's label in an error location, a model's among them (`recipes[0].RecipeEntry.path`);
    a user's capitalised key (`LR`) is not one: it was dropped from "unknown key"."""
    return part in ("literal", "str", "int", "float", "bool", "list", "none") or (
        isinstance(part, str) and (part.startswith(("constrained-", "function-")) or part in _model_names(BaseModel)))


def _model_names(model: type) -> set[str]:
    return {n for sub in model.__subclasses__() for n in (sub.__name__, *_model_names(sub))}


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The model class in a field's annotation (``Optional[X]``, ``list[X]``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in typing.get_args(annotation) if (m := submodel(a))), None)


def _did_you_mean(model: type[BaseModel] | None, loc: tuple) -> str:
    """`` (did you mean 'epochs'?)`` for a mistyped key of ``model`` at ``loc``, else ''."""
    for part in loc[:-1]:
        if model is None or isinstance(part, int) or _is_label(part):
            continue
        field = model.model_fields.get(part)
        model = submodel(field.annotation) if field else None
    near = difflib.get_close_matches(str(loc[-1]).lower(), list(model.model_fields), 1, 0.6) if model else []   # `LR`
    return f" (did you mean {near[0]!r}?)" if near else ""


def _visible(text: str) -> str:
    """Invisible characters of a key written as escapes: a byte-order mark pasted into a key read
    "\ufeffcompile: unknown key (did you mean 'compile'?)" with the difference unseen."""
    return "".join(c if c == " " or not unicodedata.category(c).startswith(("C", "Z")) else
                   c.encode("unicode_escape").decode("ascii") for c in text)


def _where(parts: tuple) -> str:
    """An error location as a user wrote the key (`recipes[0].path`), union branch labels left out."""
    loc = ""
    for part in parts:
        if isinstance(part, int):
            loc += f"[{part}]"
        elif not _is_label(part):
            loc += f".{_visible(str(part))}" if loc else _visible(str(part))
    return loc


def first_error(exc: ValidationError, root: str = "recipe", model: type[BaseModel] | None = None) -> str:
    """``key.path[i]: what was expected, got what`` for the first problem, worded as uadc's errors
    (recipes, sweep files, verify budgets); ``root`` names a problem of the whole document, and
    ``model`` (the document's) suggests the key meant by an unknown one."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    if err["type"] == "missing":   # `dta:` said "data: required", never naming the misspelt key beside it
        err = next((e for e in errors if e["type"] == "extra_forbidden" and e["loc"][:-1] == err["loc"][:-1]), err)
    if err["type"].endswith("_type"):   # `recipes: [""]` said "expected a mapping": the str branch's error fits
        err = next((e for e in errors if not e["type"].endswith("_type")
                    and _where(e["loc"]) == _where(err["loc"])), err)
    if err["type"] == "invalid_key":   # `1: 2` read "[1]: Keys should be strings", as if a list's item
        key = err.get("input")   # as YAML wrote it: `null:` was "key None ... write it in quotes"
        said = "null" if key is None else str(key).lower() if isinstance(key, bool) else short(key)
        return f"{_where(err['loc'][:-1]) or root}: key {said} is not a setting's name"
    loc = _where(err["loc"]) or root
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind in ("extra_forbidden", "no_such_attribute"):   # the latter: `section.typo = 1` through the API
        section, dot, key = str(err["loc"][-1]).partition(".")
        if dot and model is not None and len(err["loc"]) == 1 and section in model.model_fields:
            return f"{loc}: unknown key; write it nested, {{{section}: {{{key}: ...}}}}"
        return f"{loc}: unknown key{_did_you_mean(model, err['loc'])}"
    if kind == "missing":
        return f"{loc}: at least one {{root, categories}} entry is required" if loc == "data.sources" \
            else f"{loc}: required"
    if kind == "literal_error":
        expected = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
        return f"{loc}: {short(value)} is not one of {expected}"
    if kind == "greater_than_equal":
        return f"{loc}: {short(value)} is below the minimum {ctx['ge']}"
    if kind == "greater_than":    # an open bound: "0 is below the minimum 0.0" read as a contradiction
        return f"{loc}: must be above {ctx['gt']}, got {short(value)}"
    if kind == "less_than_equal":
        return f"{loc}: {short(value)} is above the maximum {ctx['le']}"
    if kind == "less_than":
        return f"{loc}: must be below {ctx['lt']}, got {short(value)}"
    if kind == "finite_number" or (isinstance(value, float) and not math.isfinite(value)):
        return f"{loc}: expected a finite number, got {short(value)}"
    if kind in ("too_short", "string_too_short"):
        return f"{loc}: must not be empty"
    if kind.endswith("_type") or kind in ("model_type", "dict_type"):
        expected = {"int_type": "int", "float_type": "number", "bool_type": "bool", "string_type": "str",
                    "list_type": "list", "model_type": "a mapping", "dict_type": "a mapping"}.get(kind, kind)
        # `categories: [02, 01]` (BTAD's names) read as numbers: YAML needs the quotes
        quote = " (a name that looks like a number needs quotes)" if expected == "str" and \
            isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        return f"{loc}: expected {expected}, got {short(value)}{quote}"
    return f"{loc}: {err['msg'].removeprefix('Value error, ')}"
