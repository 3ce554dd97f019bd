"""User-facing errors: the CLI prints these as one line and exits with their code (2)."""

import contextlib
import re
from typing import Iterator


class UadcError(Exception):
    """A problem caused by user input (recipe, data, paths, options) rather than a bug."""

    exit_code = 2

    def __str__(self) -> str:
        # One line, bounded: a message built from user input never floods the terminal.
        text = " ".join(super().__str__().split())
        return text if len(text) <= 2000 else text[:1997] + "..."


def one_line(text: str) -> str:
    """``text`` with its control characters shown as ``\\xNN``: a file name holding a newline cannot
    start a line of its own (a fake ``error:`` line for a pipeline's grep)."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)


def md_cell(text: object) -> str:
    """``text`` fit for one Markdown table cell: a ``|`` in a category's name split the row."""
    return one_line(str(text)).replace("|", "\\|")


class NonFiniteOutputs(UadcError):
    """A model produced NaN/Inf outputs on real inputs (a search may judge such a candidate instead)."""


class RuntimeFault(UadcError):
    """A runtime could not compile or run a graph uadc built, or returned outputs that do not fit its
    inputs (a runtime defect on that graph): a search judges such a candidate as unfaithful."""


@contextlib.contextmanager
def dependencies_checked() -> Iterator[None]:
    """A package uadc imports that does not import here (uninstalled after uadc, or a broken install)
    is one UadcError naming it, not a traceback ending in ``ModuleNotFoundError``. (uadc's own modules
    missing is a broken uadc: that traceback stands.)"""
    try:
        yield
    except ModuleNotFoundError as exc:
        name = (exc.name or "").split(".")[0]
        if not name or name == "uadc":
            raise
        raise UadcError(f"the {name} module does not import here ({exc}); this command needs it: install uadc's "
                        f"dependencies again (pip install uadc, with the extras you use)") from None


def raise_interrupt_behind(exc: BaseException) -> None:
    """Re-raise a Ctrl-C / SIGTERM that a library turned into an ordinary exception (torch's lazy
    imports during ONNX export chain it as the cause of an AttributeError), so that a stop is a stop,
    not a failure of the step it landed in."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            raise cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
