"""Benchmarks that reproduce the seed paper's tables on this project's data (``python -m bench.paper_tables``)."""

from __future__ import annotations

import argparse
import sys
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


def positive(text: str) -> int:
    """An argparse type: a whole number of 1 or more (``--cycles 0`` ended in numpy's traceback)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is below 1")
    return n
