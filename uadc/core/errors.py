"""User-facing errors: the CLI prints these as one line and exits with their code (2)."""

import contextlib
import importlib
import importlib.util
import logging
import re
import sys
from typing import Iterator


class UadcError(Exception):
    """A problem caused by user input (recipe, data, paths, options) rather than a bug."""

    exit_code = 2
    line_prefix = "error: "   # the command line's line for it

    def __str__(self) -> str:
        # One line, bounded: a message built from user input never floods the terminal.
        text = " ".join(super().__str__().split())
        return text if len(text) <= 1993 else text[:1990] + "..."   # the line, with "error: ", at most 2000


_WARNED: set[tuple] = set()   # the keys warn_once has warned about in this process


def warn_once(logger: logging.Logger, key: tuple, msg: str, *args: object) -> None:
    """``logger.warning(msg, *args)`` the first time ``key`` is seen: a step that reads the same folder
    several times (a data layout checked by prepare, the checkpoint and the outside-data check) says it once."""
    if key in _WARNED:
        return
    if len(_WARNED) > 10_000:   # a long-running service sees many folders
        _WARNED.clear()
    _WARNED.add(key)
    logger.warning(msg, *args)


def one_line(text: str) -> str:
    """``text`` with its control characters shown as ``\\xNN`` (``\\uNNNN``): a file name holding a newline cannot
    start a line of its own (a fake ``error:`` line for a pipeline's grep), a C1 one (``\\x9b``, a terminal's CSI)
    cannot drive the terminal, a bidi override cannot show ``x.exe`` as ``exe.x``."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]",
                  lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text)


def md_cell(text: object) -> str:
    """``text`` fit for one Markdown table cell: a ``|`` in a category's name split the row, and a
    ``\\`` before it (``a\\|b``) escaped the escape."""
    return one_line(str(text)).replace("\\", "\\\\").replace("|", "\\|")


def csv_cell(value: object) -> object:
    """A text cell a spreadsheet would run as a formula (a file, folder or recipe named ``=HYPERLINK(...)``)
    gets a leading ``'`` (OWASP's CSV-injection advice); the JSON outputs keep the exact text."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def pickle_refusal(exc: BaseException) -> str:
    """What torch's ``weights_only`` loader refused in a file, without its advice to retry with
    ``weights_only=False`` (which would run the file's code)."""
    found = re.search(r"(?:unsupported GLOBAL|Unsupported global|Unsupported operand) ?[^\n]*?"
                      r"(?= was not an allowed|\.?\n|\.?$)", str(exc), re.IGNORECASE)
    return f"holds objects other than tensors and plain data; refused to load it " \
           f"({found.group(0)[:200] if found else 'unsupported content'})"


class NonFiniteOutputs(UadcError):
    """A model produced NaN/Inf outputs on real inputs (a search may judge such a candidate instead)."""


class RuntimeFault(UadcError):
    """A runtime could not compile or run a graph uadc built, or returned outputs that do not fit its
    inputs (a runtime defect on that graph): a search judges such a candidate as unfaithful."""


class MissingDependency(UadcError, ImportError):
    """A package uadc needs does not import here: one line, and still an ``ImportError`` to a caller that
    guards an optional import (``try: from uadc import train except ImportError``)."""


@contextlib.contextmanager
def dependencies_checked() -> Iterator[None]:
    """A package uadc imports that does not import here (uninstalled after uadc; a broken install: a
    missing shared library, an ABI mismatch; a version without a module uadc uses) is one UadcError
    naming it, not a traceback (with ``-v`` the traceback is logged too). Only a failure of an import
    made by uadc's code is converted: uadc's own modules missing, or an error while a package runs,
    keep their traceback."""
    try:
        yield
    except (ImportError, OSError) as exc:
        name = _failed_import(exc)
        if name is None:
            raise
        logging.getLogger("uadc").debug("the import of %s failed", name, exc_info=exc)
        why = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] == name and \
                exc.name != name and _imports(name):   # the package is there, without that module
            raise MissingDependency(f"{name} {_version(name)} has no module {exc.name} ({why}): a version uadc does "
                                    f"not support; install the one its requirements name (pip install uadc)") from None
        raise MissingDependency(f"the {name} module does not import here ({why}); this needs it: "
                                f"{_reinstall(name)}") from None


# the runtime-only install's packages (README: an edge box), by module -> PyPI name
RUNTIME_PACKAGES = {"numpy": "numpy", "PIL": "pillow", "onnxruntime": "onnxruntime", "click": "click",
                    "filelock": "filelock"}


def _reinstall(name: str) -> str:
    """How to get ``name`` back: on a runtime-only install (no torch) `pip install uadc` pulls the whole
    compile stack (GBs) where one package is missing."""
    if _torch_installed():
        return "install uadc's dependencies again (pip install uadc, with the extras you use)"
    if name in RUNTIME_PACKAGES:
        return f"pip install {RUNTIME_PACKAGES[name]}"
    # the command itself is beyond a runtime-only install: naming pydantic, its first import, hid that
    return ("the full install (pip install uadc: torch and the compile stack); a runtime-only install runs "
            "`uadc predict`, `uadc bundle` and `Detector`")


def _torch_installed() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):   # an import hook refusing it, a half-removed package
        return False


def _failed_import(exc: BaseException) -> str | None:
    """The top-level package whose import, made by uadc's code, raised ``exc``; None for anything else."""
    frames, tb = [], exc.__traceback__   # (module, code name); Python leaves importlib's own frames out
    while tb is not None:
        frames.append((str(tb.tb_frame.f_globals.get("__name__", "")), tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    ours = [i for i, (n, _) in enumerate(frames) if n == "uadc" or n.startswith("uadc.")]
    if not ours:
        return None
    if ours[-1] + 1 == len(frames):   # raised at uadc's import line: the module it names (ImportError's name)
        name = getattr(exc, "name", None) or ""
    elif frames[ours[-1] + 1][1] == "<module>":   # raised while a package's own module code ran: its import
        name = frames[ours[-1] + 1][0]
    else:
        return None   # raised while a package's function ran: not an import
    name = name.split(".")[0]
    return name if name and name != "uadc" else None


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - any failure: it does not import
        return False


def _version(name: str) -> str:
    return str(getattr(sys.modules.get(name), "__version__", "(version unknown)"))


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
