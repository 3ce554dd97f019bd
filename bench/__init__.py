"""Benchmarks that reproduce the seed paper's tables on this project's data (``python -m bench.paper_tables``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable


def summary(doc: str | None) -> str:
    """A script's ``--help`` description: its docstring's first paragraph, whole (not its first line)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def as_script(main: Callable[[], Any]) -> None:
    """``python -m bench.NAME``: a user mistake (a UadcError: missing recipe, unknown target, ...) is one
    ``error:`` line and exit 2, not a traceback."""
    from uadc.core.errors import UadcError
    try:
        code = main()
    except UadcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)


def _at_least(text: str, low: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"{n} is below {low}")
    return n


def non_negative(text: str) -> int:
    """An argparse type: a whole number of 0 or more."""
    return _at_least(text, 0)


def positives(text: str) -> list[int]:
    """An argparse type: a comma-separated list of whole numbers of 1 or more (``--batches 1,8``)."""
    return [positive(x.strip()) for x in text.split(",")]


def positive_floats(text: str) -> list[float]:
    """An argparse type: comma-separated finite numbers above 0 (``--weights 0.5,1``)."""
    out = []
    for x in text.split(","):
        try:
            v = float(x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{x.strip()!r} is not a number") from None
        if not 0 < v < float("inf"):
            raise argparse.ArgumentTypeError(f"{x.strip()} is not a finite number above 0")
        out.append(v)
    return out


def out_file(text: str) -> Path:
    """An argparse type: a file to write whose folder exists (checked before the work, not after it)."""
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no folder {path.parent}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a folder; give a file name")
    return path


def out_folder(text: str) -> Path:
    """An argparse type: a folder to write into (made if missing), checked before the work (an existing file
    there ended a run in FileExistsError after it)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: a file, not a folder")
    return path


def positive(text: str) -> int:
    """An argparse type: a whole number of 1 or more (``--cycles 0`` ended in numpy's traceback)."""
    return _at_least(text, 1)
