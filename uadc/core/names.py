"""Names uadc joins to folders (categories, sweeps, recipes) and compares as a user reads them."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from uadc.core.errors import UadcError


def same_name(a: str, b: str) -> bool:
    """Two names that read the same: a folder copied from macOS is named in decomposed Unicode (NFD),
    the name a user types is composed (NFC); 'Prüfteil' was "not found (found: Prüfteil)"."""
    return a == b or unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b)


def is_plain_name(name: str) -> bool:
    """One path component that stays inside the folder it is joined to: no separators, no ``..``,
    no leading dot (hidden), no control characters (a newline in a folder name breaks every log)."""
    return bool(name) and name not in (".", "..") and not name.startswith(".") and _encodable(name) and \
        not any(c in _NOT_IN_NAMES or ord(c) < 32 for c in name)   # controls, line breaks, bidi overrides


# other C1 characters stay: a Windows-1252 name read as latin-1 holds them (U+0092 for an apostrophe)
_NOT_IN_NAMES = frozenset("/\\\x7f\x85\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _encodable(name: str) -> bool:
    """A file name the OS can take: a lone surrogate (YAML's "\\ud800") passed, then file_lock raised."""
    try:
        os.fsencode(name)
        return True
    except UnicodeError:
        return False


def contained(root: Path, name: str, what: str = "name") -> Path:
    """``root / name`` where ``name`` is one plain path component (:func:`is_plain_name`)."""
    if not is_plain_name(name):
        raise UadcError(f"{what} {name!r} is not a plain folder name (no '/', '..', leading '.', control or "
                        f"line-break character)")
    return Path(root) / name


def is_output_name(name: str, max_bytes: int = 128) -> bool:
    """A name a user gives an output folder (a recipe's, a sweep's): plain, valid UTF-8 (a lone surrogate from
    a file stem gave --json paths no reader maps back), at most ``max_bytes`` (128 'é' made a 256-byte
    folder name), and no space at either end (`name: ' '` trained into `artifacts/ /`)."""
    try:
        return is_plain_name(name) and name == name.strip() and len(name.encode("utf-8")) <= max_bytes
    except UnicodeEncodeError:
        return False
