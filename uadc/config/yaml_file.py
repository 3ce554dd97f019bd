"""Reading a user's YAML file (recipe, sweep file): safe, size-bounded, one-line errors.

``yaml.safe_load`` runs no tags, but it keeps the last of two equal keys silently: a ``data:``
section appended to a copied recipe replaced the whole original one, and the error that followed
named a key the user could see in the file. Here a key given twice in one mapping is refused with
both line numbers (YAML 1.2 forbids it too).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from uadc.config.validation import short
from uadc.core.errors import UadcError
from uadc.core.images import shown

MAX_YAML_BYTES = 1 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a key repeated in one mapping (merge keys ``<<`` may override)."""

    def flatten_mapping(self, node):
        # checked here, once per node: PyYAML flattens a mapping in place, its merged keys put before its own,
        # so an anchored mapping that overrides a merged key read as a repeated key where an alias met it again,
        # and a mapping merged in (`<<: {seed: 1, seed: 2}`) is flattened here without construct_mapping's turn
        checked = self.__dict__.setdefault("_checked", set())
        if node not in checked:
            checked.add(node)
            seen: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.YAMLError(f"key {key_node.value!r} appears twice in one mapping "
                                         f"(lines {seen[key]} and {key_node.start_mark.line + 1})")
                seen[key] = key_node.start_mark.line + 1
        super().flatten_mapping(node)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, KeyError, AttributeError, TypeError, OverflowError) as exc:
            # a tag on a value it cannot read (`!!float abc`, `!!bool maybe`, `!!timestamp x`): PyYAML's
            # constructors raise these raw, a traceback where a line and column say it
            what = node.value if isinstance(node, yaml.ScalarNode) else node.id
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {what!r} as {node.tag.rsplit(':', 1)[-1]} ({type(exc).__name__})",
                node.start_mark) from None


# YAML 1.2 numbers and booleans, as every other tool reads them; PyYAML's YAML 1.1 read `seed: 010` as 8,
# `1:30` as 90, `0b11` as 3, `no` / `on` as booleans, and `1e-3` as text (its floats need a dot); and no
# timestamps (not in YAML 1.2's core schema): `name: 2024-01-05` was a date, "expected str"
_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT, _TIMESTAMP)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_UniqueKeyLoader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                       list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver(   # YAML 1.2 core floats: no `1:30.0` (90.0), no `1_000.5`
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                       r"|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _yaml12_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if len(text) > 100:   # no setting needs more; a 5000-digit one ended in a traceback wherever it was shown
        raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(text)} characters is too long",
                                                node.start_mark)
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    try:
        return int(text[2:] if base != 10 else text, base)
    except ValueError:   # an explicit !!int tag on something else
        raise yaml.constructor.ConstructorError(None, None, f"not an integer: {text!r}", node.start_mark) from None


_UniqueKeyLoader.add_constructor(_INT, _yaml12_int)


class _Dumper(yaml.SafeDumper):
    """Quotes a string wherever uadc's reader would take it unquoted for something else: PyYAML
    writes YAML 1.1, so a category named ``1e3`` was written bare and read back as a number."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    plain = _UniqueKeyLoader.resolve(_UniqueKeyLoader, yaml.ScalarNode, value, (True, False))
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=None if plain.endswith(":str") else "'")


_Dumper.add_representer(str, _str)


def dump_yaml(data: dict) -> str:
    """``data`` as YAML that ``read_yaml_mapping`` reads back equal (keys in their order)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def load_yaml_text(text: str) -> object:
    """``text`` read as uadc reads every YAML file (YAML 1.2 scalars, a repeated key refused); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no tags run code


def file_checked(path: Path, what: str) -> None:
    """One line for a ``what`` path that is not a regular file: missing, a folder, or a pipe
    (`uadc train <(cat r.yaml)` read "not found"; its relative paths would have no folder to resolve in)."""
    if path.is_file():
        return
    named = shown(path)
    if path.is_dir():
        raise UadcError(f"{what} {named}: a folder, not a YAML file")
    if path.exists():
        raise UadcError(f"{what} {named}: not a regular file (a pipe or a device); save it to a file first")
    raise UadcError(f"{what} not found: {named}")


def yaml_text(path: Path) -> str:
    """A YAML file's text: UTF-8 (a leading BOM left to YAML), or UTF-16 / UTF-32 with a BOM, as YAML allows:
    Windows PowerShell 5 writes `uadc recipes show demo > my.yaml` as UTF-16, which read "not a text file"."""
    data = Path(path).read_bytes()
    wide = "utf-32" if data[:4] in (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff") else \
        "utf-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else None
    if wide is None:
        return data.decode("utf-8")
    text = data.decode(wide)
    if any(c < " " and c not in "\t\n\r\x0c" for c in text) or (text.strip() and not any(c in text for c in ":#\n")):
        raise UnicodeDecodeError(wide, data, 0, len(data), "binary")   # binary that starts like a BOM
    return text


def _tabbed_json(text: str, named: str) -> object:
    """A JSON document PyYAML cannot read (tabs: `json.dump(..., indent="\\t")`), read as JSON with a repeated
    key refused as YAML refuses it; None if it is no JSON either."""
    body = text.lstrip("\ufeff")
    if "\t" not in body or not body.lstrip().startswith("{"):
        return None

    def unique(pairs: list) -> dict:
        out: dict = {}
        for k, v in pairs:   # a set, not pairwise: 58,000 keys took 95 s
            if k in out:
                raise UadcError(f"{named}: not valid JSON: key {short(k)} appears twice in one object")
            out[k] = v
        return out

    def number(text: str) -> int:   # as the YAML reader: a 5000-digit integer is no setting
        if len(text) > 100:
            raise UadcError(f"{named}: an integer of {len(text)} characters is too long")
        return int(text)

    def constant(text: str) -> float:   # NaN / Infinity: text to the YAML reader, as with spaces
        raise ValueError(text)
    try:
        return json.loads(body, object_pairs_hook=unique, parse_int=number, parse_constant=constant)
    except (ValueError, RecursionError):
        return None


def read_yaml_mapping(path: Path, what: str, max_bytes: int = MAX_YAML_BYTES) -> dict:
    """A YAML file's top-level mapping, size-bounded; one-line UadcError for a missing, oversized,
    binary, malformed (a repeated key included) or non-mapping file."""
    path = Path(path)
    named = shown(path)   # a newline in its name would end the error line
    file_checked(path, what)
    if path.stat().st_size > max_bytes:
        raise UadcError(f"{named}: {what} larger than {max_bytes} bytes")
    text = ""
    try:
        text = yaml_text(path)
        raw = load_yaml_text(text)
    except UnicodeDecodeError as exc:   # a latin-1 comment read "not a text file"
        if exc.reason == "binary" or b"\x00" in exc.object[:8192]:
            raise UadcError(f"{named}: not a text file") from None
        line = exc.object[:exc.start].count(b"\n") + 1
        raise UadcError(f"{named}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); "
                        f"save it as UTF-8") from None
    except yaml.reader.ReaderError as exc:   # a NUL or control character: PyYAML gives its offset alone
        line = text[:exc.position].count("\n") + 1
        raise UadcError(f"{named}: not valid YAML: character #x{exc.character:04x} on line {line} "
                        f"is not allowed in YAML") from None
    except yaml.YAMLError as exc:
        raw = _tabbed_json(text, named)
        if raw is None:
            mark, first = getattr(exc, "problem_mark", None), str(exc).splitlines()[0][:200]
            problem = getattr(exc, "problem", None)   # a tab: "while scanning for the next token", where?
            where = f" (line {mark.line + 1}, column {mark.column + 1}" + (f": {problem})" if problem != first else ")") \
                if mark and problem else ""
            raise UadcError(f"{named}: not valid YAML: {first}{where}") from None
    except RecursionError:
        raise UadcError(f"{named}: YAML nested too deeply") from None
    except OSError as exc:   # no read permission: a PermissionError traceback from `uadc sweep` and the API
        raise UadcError(f"{named}: cannot read the {what}: {exc.strerror or type(exc).__name__}") from None
    if raw is not None and not isinstance(raw, dict):
        raise UadcError(f"{named}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw or {}


__all__ = ["MAX_YAML_BYTES", "dump_yaml", "file_checked", "load_yaml_text", "read_yaml_mapping", "yaml_text"]
