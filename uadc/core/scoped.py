"""Process-wide state a library call may need for a while, always restored on exit."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from typing import Any, Iterator

import numpy as np

from uadc.core.errors import UadcError

log = logging.getLogger("uadc")


def check_threads(threads: Any) -> int | None:
    """A thread count as given to the API: None or 0 (the default), else a whole number >= 1."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
        raise UadcError(f"threads: expected a whole number >= 1 (or None or 0 for the default), got {threads!r}")
    return int(threads)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` torch intra-op threads; the caller's count comes back."""
    import torch

    threads = check_threads(threads)
    before = torch.get_num_threads()
    n = int(threads) if threads else before
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block from ``seed`` on Python's, NumPy's and torch's global generators (a model's
    initialisation and dropout draw from them); the caller's streams come back on exit."""
    import random

    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM arriving in the block takes effect right after it, through the handler the
    caller had: a commit of several files (overlays, then the tables naming them) is all or nothing.
    Outside the main thread (no signal handlers there) the block just runs."""
    import signal
    import threading

    kinds = (signal.SIGINT, signal.SIGTERM)
    old = {k: signal.getsignal(k) for k in kinds} if threading.current_thread() is threading.main_thread() else {}
    if not old or None in old.values():   # a handler not set from Python cannot be put back
        yield
        return
    got: list[int] = []
    for k in kinds:
        signal.signal(k, lambda number, frame: got.append(number))
    try:
        yield
    finally:
        for k, handler in old.items():
            signal.signal(k, handler)
        if got:
            signal.raise_signal(got[0])


@contextlib.contextmanager
def environment_kept() -> Iterator[None]:
    """A library that sets environment variables or warning filters as it is first imported
    (scikit-learn's ``KMP_DUPLICATE_LIB_OK``, which children inherit; torch._dynamo's cache folder;
    scipy's filters): on exit both are the caller's again."""
    env, filters = dict(os.environ), warnings.filters[:]
    try:
        yield
    finally:
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)
        warnings.filters[:] = filters


@contextlib.contextmanager
def logged_warnings(logger: str = "uadc") -> Iterator[list[str]]:
    """The messages of the warnings logged under ``logger`` in the block, in order (logged as usual
    too): a result can list every warning its run printed (``uadc predict --json``'s ``warnings``)."""
    said: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    handler, log = _Keep(logging.WARNING), logging.getLogger(logger)
    log.addHandler(handler)
    try:
        yield said
    finally:
        log.removeHandler(handler)


def settle_exit() -> None:
    """The process's outcome is decided and written: SIGTERM and Ctrl-C are ignored through the
    interpreter's teardown (a second or two with torch loaded), where their default action ended it
    with 143 / 130 and no word, after a success document. (A Python handler would be reset to the
    default as the interpreter finalizes; an ignored signal stays ignored.) Main thread only."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    """For a library that starts services in this process (Ray): on exit the environment variables,
    ``sys.excepthook``, the SIGTERM / SIGINT handlers (Ray's ended the process on the caller's next
    SIGTERM), the warning filters and Python's and NumPy's global random streams are the caller's again."""
    import random
    import signal
    import threading

    hook, py_state, np_state = sys.excepthook, random.getstate(), np.random.get_state()
    main = threading.current_thread() is threading.main_thread()   # handlers belong to the main thread
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        with environment_kept():
            yield
    finally:
        sys.excepthook = hook
        for sig, handler in handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[io.StringIO]:
    """Capture what third-party code prints to stdout/stderr (and its warnings) for the block.

    The text is logged at DEBUG (``uadc --verbose`` shows it); sys.stdout/sys.stderr and the
    warning filters are the caller's again afterwards. File descriptors are not touched."""
    buf = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, _captured_logs() as records, \
            contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("always")
        try:
            yield buf
        finally:
            pass
    for w in caught:
        log.debug("warning from %s: %s", w.filename, w.message)
    for r in records:
        log.debug("log from %s: %s", r.name, r.getMessage())
    text = buf.getvalue().strip()
    if text:
        log.debug("third-party output:\n%s", text[-4000:])


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _captured_logs() -> Iterator[list[logging.LogRecord]]:
    """Third-party loggers with their own handlers (torch's write to the stderr they saw at import,
    e.g. the exporter's "torchvision is not installed" warnings) collect into a list instead; their
    handlers come back afterwards. Loggers without handlers reach the redirected sys.stderr."""
    collect = _Collect()
    swapped = []
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.handlers and name.split(".")[0] != "uadc":
            swapped.append((logger, logger.handlers[:]))
            logger.handlers[:] = [collect]
    try:
        yield collect.records
    finally:
        for logger, handlers in swapped:
            logger.handlers[:] = handlers


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator:
    """For --json: while the command runs, everything bound for stdout (our text, third-party
    prints, C-level writes to fd 1) goes to stderr; yields the real stdout for the one document."""
    real = sys.stdout
    real.flush()
    try:
        fd = real.fileno()
    except (AttributeError, OSError, ValueError):   # not a real file (click's test runner)
        fd = None
    saved = os.dup(fd) if fd is not None else None
    if saved is not None:
        os.dup2(sys.stderr.fileno(), fd)
    sys.stdout = sys.stderr
    try:
        yield real
    finally:
        sys.stdout = real
        if saved is not None:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)


@contextlib.contextmanager
def root_logging_untouched() -> Iterator[None]:
    """A library's bare ``logging.info(...)`` configures the caller's root logger (``basicConfig``)
    when it has no handler, and every later log line of the process then prints twice or as
    ``WARNING:name:``: a NullHandler holds the place during the block and leaves with it."""
    root = logging.getLogger()
    guard = None if root.handlers else logging.NullHandler()
    if guard is not None:
        root.addHandler(guard)
    try:
        yield
    finally:
        if guard is not None:
            root.removeHandler(guard)


@contextlib.contextmanager
def native_stderr_logged() -> Iterator[None]:
    """What native code writes to fd 2 during the block (ONNX Runtime's own error lines while onnxsim
    probes a graph) goes to a temp file and is logged at DEBUG (``uadc --verbose``); fd 2 is the
    caller's again afterwards."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                logging.getLogger("uadc").debug("native output: %s", text)
