"""Built-in recipes: the repository's ``recipes/`` folder, installed as ``uadc.recipes`` package
data (and the demo data as ``uadc.examples``), so ``uadc train demo`` works from a wheel.

A recipe argument that names an existing file is that file; otherwise a plain name (``demo``,
``stfpm_effnet_lite0``, optionally with ``.yaml``) is the packaged recipe of that name. Relative
paths inside a recipe resolve against the recipe file's folder, wherever it lives: the demo's
``../examples/hazelnut_toy_256`` is inside the package; the other recipes' ``../../shared/data``
only exists beside this project's source tree (elsewhere: copy the recipe with
``uadc recipes show NAME > my.yaml`` and set ``data.sources[i].root``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

from uadc.config.yaml_file import file_checked, load_yaml_text, yaml_text
from uadc.core.errors import UadcError
from uadc.core.images import shown

log = logging.getLogger(__name__)

RECIPE_SUFFIXES = (".yaml", ".yml")
# a recipe line holding a path (data root, validation folder, weights file): its value, quoted or not
_SHOWN_HEADER = re.compile(r"\A# uadc recipe .*\n# reads the same files from any folder\.\n"
                           r"(?:# Its name \(artifacts folder\) is its file name: .*\n)?")
_PATH_LINE = re.compile(r"^(\s*(?:-\s+)?(?:root|folder|weights):\s*)(?:(['\"])([^'\"\\]+)\2|([^'\"#\s]+))(.*)$")


@dataclass(frozen=True)
class PackagedRecipe:
    name: str
    path: Path
    summary: str            # the recipe's first comment line

    def to_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "summary": self.summary}

    def copy_text(self) -> str:
        """The recipe's text with its relative paths made absolute (against its folder, as loading
        resolves them), comments kept: a copy saved anywhere reads the same files."""
        def absolute(m: re.Match) -> str:
            written = m.group(3) or m.group(4)
            if Path(written).is_absolute() or m.group(4) in ("null", "Null", "NULL", "~"):   # no path: the copy
                return m.group(0)                                      # train writes has `weights: null`
            path = str((self.path.parent / written).resolve())
            # quoted when YAML needs it; an "ü" as written, not "\u00fc" (a control or undecodable byte escaped)
            value = path if re.fullmatch(r"[\w./-]+", path) else json.dumps(path, ensure_ascii=not path.isprintable())
            return f"{m.group(1)}{value}{m.group(5)}"
        original = yaml_text(self.path).removeprefix("\ufeff")   # a BOM (Notepad) in the copy came after its header
        text = "".join(_PATH_LINE.sub(absolute, line) for line in original.splitlines(keepends=True))
        # the rewrite reads plain `key: value` lines: check that the copy reads what the recipe reads
        if _path_values(text, None) != _path_values(original, self.path.parent):
            raise UadcError(f"{self.path}: cannot copy it with its paths made absolute (a path not written as a "
                            f"plain `key: value` line: flow style, an anchor, a tag, a block scalar or an escaped "
                            f"quote): copy the file and set data.sources[].root, data.val[].folder and model.weights "
                            f"to absolute paths by hand")
        return text

    def shown_text(self) -> str:
        """What `uadc recipes show` prints: a header, then :meth:`copy_text`."""
        named = isinstance(doc := _loaded(yaml_text(self.path)), dict) and doc.get("name") is not None
        name = "" if named else (f"\n# Its name (artifacts folder) is its file name: add `name: {self.name}` to share "
                                 f"this recipe's checkpoint.")
        body = _SHOWN_HEADER.sub("", self.copy_text(), count=1)   # a copy shown again: one header, not two
        return (f"# uadc recipe {str(doc['name']) if named else self.name!r} ({shown(self.path)}), its relative paths made "
                f"absolute: a copy\n# reads the same files from any folder.{name}\n{body}")


def _path_values(text: str, base: Path | None) -> list | None:
    """The recipe's path settings, resolved against ``base`` (None: as written); None if unreadable."""
    doc = _loaded(text)
    if doc is _UNREADABLE:
        return None
    if not isinstance(doc, dict):
        return []
    data, model = doc.get("data") or {}, doc.get("model") or {}
    entries = [("root", s) for s in data.get("sources") or [] if isinstance(s, dict)] + \
        [("folder", v) for v in data.get("val") or [] if isinstance(v, dict)] + [("weights", model)]
    values = [e.get(k) for k, e in entries if isinstance(e, dict) and e.get(k) is not None]
    return [str((base / v).resolve()) if base is not None and isinstance(v, str) and not Path(v).is_absolute()
            else v for v in values]


_UNREADABLE = object()


def _loaded(text: str) -> object:
    """The recipe's text read as loading reads it (YAML 1.2: `root: on` is a folder), else _UNREADABLE."""
    import yaml
    try:
        return load_yaml_text(text)
    except (yaml.YAMLError, RecursionError):
        return _UNREADABLE


def recipes_dir() -> Path:
    """Folder of the built-in recipes (installed package data, or the source tree's recipes/)."""
    try:
        return Path(str(resources.files("uadc.recipes")))
    except ModuleNotFoundError:  # an editable install made before recipes/ became package data
        return Path(__file__).resolve().parents[2] / "recipes"


def packaged_recipes() -> list[PackagedRecipe]:
    folder = recipes_dir()
    paths = sorted(p for p in folder.iterdir() if p.suffix in RECIPE_SUFFIXES and p.is_file()) \
        if folder.is_dir() else []
    return [PackagedRecipe(p.stem, p, _summary(p)) for p in paths]


def packaged_recipe(name: str) -> PackagedRecipe:
    """The built-in recipe called ``name``; an unknown name is a one-line error listing them."""
    stem = _stem(name)
    for r in packaged_recipes():
        if r.name == stem:
            return r
    names = ", ".join(r.name for r in packaged_recipes()) or "none"
    raise UadcError(f"recipe not found: {shown(name)} (not a file, nor a built-in recipe: {names})")


def resolve_recipe_path(source: "str | Path", base: Path | None = None) -> Path:
    """The file a recipe argument means: an existing file as given (relative to ``base``, default the
    current folder), else a built-in by name."""
    if not isinstance(source, (str, os.PathLike)):
        raise UadcError(f"recipe: expected a path, a built-in recipe's name, a dict or a Recipe, "
                        f"got {type(source).__name__}")
    source = os.fsdecode(source)   # an app's own PathLike: its path, not its repr
    path = Path(source)
    if base is not None and not path.is_absolute():
        path = base / path
    if (path.exists() and not path.is_dir()) or not _is_name(str(source)):
        return path   # a file, or a pipe named like a built-in (said to be one, not "not found")
    if path.is_dir() and str(source) not in {r.name for r in packaged_recipes()}:
        return path   # a folder given as the recipe: said to be one, not "not found" (a built-in's name still wins)
    built_in = packaged_recipe(str(source)).path
    mine = next((p for p in (path.with_name(path.name + s) for s in RECIPE_SUFFIXES) if p.is_file()), None)
    if mine is not None:   # `recipes show demo > demo.yaml`, edited, then `uadc train demo`: the built-in ran
        log.warning("recipe %s: the built-in recipe of that name, not %s here (give the file name to use it)",
                    source, shown(mine))
    return built_in


def check_recipe_file(path: Path, given: "str | os.PathLike[str] | None" = None) -> None:
    """A missing recipe file named like a built-in one (the README's ``recipes/quickstart.yaml``
    outside a checkout, or ``./demo``) says that built-ins go by name; ``given``: as typed."""
    if not path.exists() and not path.is_symlink() and _stem(path.name) in {r.name for r in packaged_recipes()}:
        raise UadcError(f"recipe not found: {shown(os.fsdecode(given) if given is not None else path)} (no such file; "
                        f"built-in recipes go by name, not path: give {_stem(path.name)!r})")


# keys of a sweep file that no recipe has (uadc.pipeline.sweep.spec.SweepSpec; a test keeps the two in step)
SWEEP_FILE_KEYS = ("recipe", "recipes", "axes")


def check_not_a_sweep_file(raw: dict, path: Path, recipe_keys: Iterable[str]) -> None:
    """A sweep file given as a recipe said "recipe: unknown key", as if the recipe were mistyped; a recipe
    with a stray ``recipe:`` key (it holds a recipe's own keys; ``name`` is a key of both) is mistyped."""
    keys = [k for k in SWEEP_FILE_KEYS if k in raw]
    if keys and not any(k in raw for k in recipe_keys if k != "name"):
        raise UadcError(f"{shown(path)}: a sweep file (its {' and '.join(keys)} key{'s' * (len(keys) > 1)}), "
                        f"not a recipe: run it with `uadc sweep {shlex.quote(shown(path))}`, or give one of the "
                        f"recipes it names")


def shown_recipe(source: str) -> PackagedRecipe:
    """A recipe to print as a portable copy: a recipe file as given, else a built-in by name."""
    path = resolve_recipe_path(source)
    check_recipe_file(path, source)
    file_checked(path, "recipe")
    try:
        yaml_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise UadcError(f"recipe {source}: cannot read it as text ({type(exc).__name__})") from exc
    # the name loading gives it (the file's stem, whatever its suffix: `r.json` is `r`)
    return PackagedRecipe(path.stem, path.resolve(), _summary(path))


def _is_name(text: str) -> bool:
    return bool(text) and not any(c in text for c in "/\\") and text not in (".", "..")


def _stem(name: str) -> str:
    for suffix in RECIPE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _summary(path: Path) -> str:
    """The first sentence of the recipe's leading comment block (whole, not cut at a line end)."""
    lines = []
    try:
        for line in yaml_text(path).splitlines():
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
    except (OSError, UnicodeDecodeError):
        pass
    text = " ".join(x for x in lines if x)
    return re.split(r"(?<=[.!?])\s+(?=[A-Z(`])", text, maxsplit=1)[0].strip()


__all__ = ["PackagedRecipe", "packaged_recipe", "packaged_recipes", "recipes_dir", "resolve_recipe_path",
           "shown_recipe"]
