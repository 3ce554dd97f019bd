"""Process-wide state a library call may need for a while, always restored on exit."""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import numbers
import os
import sys
import threading
import time
import warnings
from typing import Any, Callable, Iterator

from uadc.core.constants import MAX_THREADS
from uadc.core.errors import UadcError
from uadc.core.process import signal_stack_kept

log = logging.getLogger("uadc")


def check_threads(threads: Any) -> int | None:
    """A thread count as given to the API: None or 0 (the default), else a whole number >= 1."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or not 0 <= threads <= MAX_THREADS:
        raise UadcError(f"threads: expected a whole number from 1 to {MAX_THREADS} (or None or 0 for the default), "
                        f"got {threads!r}")   # 10**6 aborted the caller's process in oneDNN
    return int(threads)


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """``model`` (a torch module) in eval mode in the block, each module's own mode back after it: a caller's
    model mid-fine-tune was left in eval mode by evaluate and compile (its BatchNorm stopped updating)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model.eval()
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def start_method_kept() -> Iterator[None]:
    """torch's ONNX exporter fixes multiprocessing's start method ('fork'); a caller's later
    ``set_start_method('spawn')`` then raised "context has already been set". Unset again if it was."""
    import multiprocessing.context as mpc

    unset = mpc._default_context._actual_context is None
    try:
        yield
    finally:
        mpc._default_context._actual_context = None if unset else mpc._default_context._actual_context


@contextlib.contextmanager
def training_state() -> Iterator[None]:
    """Gradients on and float32 as torch's default dtype in the block, the caller's back after it:
    training under a caller's ``torch.no_grad()`` or ``inference_mode()`` (a pipeline's habit) raised
    torch's "element 0 of tensors does not require grad", and under ``set_default_dtype(float64)`` a
    dtype mismatch deep in a backbone."""
    import torch

    with float32_default(), torch.inference_mode(False), torch.enable_grad():
        yield


@contextlib.contextmanager
def float32_default() -> Iterator[None]:
    """float32 as torch's default dtype in the block, the caller's back after it (a caller's float64 default
    built float64 models from checkpoints and exported float64 constants next to float32 weights)."""
    import torch

    # process-wide: the first block in saves the caller's, the last one out restores it (each restoring its
    # own left a float32 default behind two overlapping calls)
    with _shared_state("dtype", torch.get_default_dtype, torch.set_default_dtype):
        torch.set_default_dtype(torch.float32)
        yield


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` torch intra-op threads; the caller's count comes back."""
    import torch

    threads = check_threads(threads)
    # the count is the thread's, and each set also what threads started later get (two calls in worker threads
    # left a pool's new threads at one's 1): the first block in keeps that, the last one out puts it back
    with _shared_state("threads", lambda: _in_new_thread(torch.get_num_threads),
                       lambda n: _in_new_thread(lambda: torch.set_num_threads(n))):
        before = torch.get_num_threads()
        n = int(threads) if threads else before
        if n != before:
            torch.set_num_threads(n)
        try:
            yield n
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)


def _in_new_thread(call: Callable[[], Any]) -> Any:
    """``call()`` in a thread of its own (torch's thread count as a new thread sees it, or sets it)."""
    out: list = []
    (t := threading.Thread(target=lambda: out.append(call()), name="uadc-threads", daemon=True)).start()
    t.join()
    return out[0] if out else None


@contextlib.contextmanager
def streams_kept(cuda: bool = False) -> Iterator[None]:
    """Python's, NumPy's and torch's global random streams are the caller's again on exit, whatever the
    block draws or seeds (a calibrator plug-in's ``np.random.seed``); such blocks in several threads run
    one at a time (two trainings at once drew from each other's seeded streams). torch's CUDA generators
    take part only with ``cuda``: forking them starts a CUDA context, which a CPU run on a GPU machine
    has no use for."""
    import random

    import numpy as np   # here, not at import: `uadc.<name>` imports this module before it keeps the filters
    import torch

    with _RANDOM:
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=None if cuda else []):
            try:
                yield
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


@contextlib.contextmanager
def seeded(seed: int, cuda: bool = False) -> Iterator[None]:
    """Run the block from ``seed`` on torch's global generator (a model's initialisation and dropout
    draw from it; CUDA's only with ``cuda``, training on a GPU); the caller's comes back on exit.
    Python's and NumPy's global streams are not touched: uadc draws from generators of its own, and
    seeding them handed an app's other threads the recipe's numbers for the whole training (then
    replayed their own draws once it ended)."""
    import torch

    with _RANDOM, torch.random.fork_rng(devices=None if cuda else []):
        if cuda:
            torch.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield


_SHARED = threading.RLock()
_users: dict[str, int] = {}
_saved: dict[str, Any] = {}
_RANDOM = threading.RLock()   # held by streams_kept / seeded blocks


def _new_locks() -> None:   # a child forked while another thread held one would wait for ever
    global _SHARED, _RANDOM
    _SHARED, _RANDOM = threading.RLock(), threading.RLock()


os.register_at_fork(after_in_child=_new_locks)


@contextlib.contextmanager
def _shared_state(name: str, save: Callable[[], Any], restore: Callable[[Any], None]) -> Iterator[None]:
    """Process-wide state changed by nested or concurrent blocks (API calls in several threads): the
    first block in saves it, the last one out restores it. (Each restoring its own copy, a block
    that ended first left the other's change in place for good: sys.stdout a buffer.)"""
    with _SHARED:
        if not _users.get(name):
            _saved[name] = save()
        _users[name] = _users.get(name, 0) + 1
    try:
        yield
    finally:
        with _SHARED:
            _users[name] -= 1
            if not _users[name]:
                restore(_saved.pop(name))


# First while quiet blocks run: every warning is theirs to keep, whatever the caller's filters (an `error`
# filter made the exporter's FutureWarning, which Python attributes to copyreg, an export failure). Filters
# are process-wide: meanwhile other threads' warnings are shown (to them) rather than raised or ignored.
_ALWAYS = ("always", None, Warning, None, 0)


class _Ignore(tuple):
    """A filter of :func:`warnings_ignored`: one object per block, so it is found by identity."""


_ignoring: set[int] = set()   # ids of the _Ignore filters whose blocks run


def _set_filters(filters: list, quiet: bool) -> None:
    """The warning filters, with ``_ALWAYS`` first exactly while a quiet block runs (in any thread), and
    no ignore filter of a block that ended (a copy saved while it ran put it back for good)."""
    kept = [f for f in filters if f is not _ALWAYS and not (isinstance(f, _Ignore) and id(f) not in _ignoring)]
    warnings.filters[:] = ([_ALWAYS] if quiet else []) + kept
    getattr(warnings, "_filters_mutated", lambda: None)()   # what catch_warnings does: cached decisions go


@contextlib.contextmanager
def warnings_ignored(category: type[Warning] = Warning) -> Iterator[None]:
    """Warnings of ``category`` are ignored in the block. Not ``catch_warnings``: it puts back the copy
    it saved, so two threads' blocks that overlapped left the later one's filter in place for good (every
    warning of the app ignored after calls from several threads)."""
    item = _Ignore(("ignore", None, category, None, 0))
    with _SHARED:
        _ignoring.add(id(item))
        _set_filters([item, *warnings.filters], bool(_users.get("quiet")))
    try:
        yield
    finally:
        with _SHARED:
            _ignoring.discard(id(item))
            _set_filters(warnings.filters[:], bool(_users.get("quiet")))


@contextlib.contextmanager
def filters_serialized() -> Iterator[None]:
    """For third-party code that sets warning filters with ``catch_warnings`` (scikit-learn's
    ``type_of_target`` makes numpy's VisibleDeprecationWarning an error for a moment): such blocks run
    one at a time and never beside uadc's own filter changes. Two evaluations in two threads left that
    ``error`` filter in place for good (each put back the copy it saved, the other's change in it)."""
    with _SHARED:
        yield


def _restore_environment(saved: tuple[dict, list]) -> None:
    env, filters = saved
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update(env)
    _set_filters(filters, bool(_users.get("quiet")))


@contextlib.contextmanager
def environment_kept() -> Iterator[None]:
    """A library that sets environment variables or warning filters as it is first imported
    (scikit-learn's ``KMP_DUPLICATE_LIB_OK``, which children inherit; torch._dynamo's cache folder;
    scipy's filters): on exit both are the caller's again."""
    with _shared_state("environment", lambda: (dict(os.environ), warnings.filters[:]), _restore_environment):
        yield


@contextlib.contextmanager
def logged_warnings(logger: str = "uadc") -> Iterator[list[str]]:
    """The messages of the warnings logged under ``logger`` in the block, in order (logged as usual
    too): a result can list every warning its run printed (``uadc predict --json``'s ``warnings``)."""
    said: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    handler, log = _Keep(logging.WARNING), logging.getLogger(logger)
    me = threading.get_ident()   # another thread's run (a Detector loading beside this one) is not this one's
    handler.addFilter(lambda record: record.thread == me)
    log.addHandler(handler)
    try:
        yield said
    finally:
        log.removeHandler(handler)


@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    """For a library that starts services in this process (Ray): on exit the environment variables,
    ``sys.excepthook``, the SIGTERM / SIGINT handlers (Ray's ended the process on the caller's next
    SIGTERM), the thread's signal stack, the warning filters, Python's and NumPy's global random
    streams and whether faulthandler is on are the caller's again."""
    import faulthandler
    import random
    import signal
    import threading

    import numpy as np

    hook, py_state, np_state = sys.excepthook, random.getstate(), np.random.get_state()
    faults = faulthandler.is_enabled()   # Ray's driver enables it for good
    main = threading.current_thread() is threading.main_thread()   # handlers belong to the main thread
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        with environment_kept(), signal_stack_kept():
            yield
    finally:
        sys.excepthook = hook
        for sig, handler in handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        random.setstate(py_state)
        np.random.set_state(np_state)
        if not faults and faulthandler.is_enabled():
            faulthandler.disable()


class _Capture:
    """What third-party code did in one thread's quiet block."""

    def __init__(self) -> None:
        self.text = io.StringIO()
        self.warnings: list[tuple[str, Any]] = []
        self.records: list[logging.LogRecord] = []


_quiet: dict[int, list[_Capture]] = {}   # thread -> its open quiet blocks, innermost last


def _capture(thread: int | None = None) -> _Capture | None:
    blocks = _quiet.get(threading.get_ident() if thread is None else thread)
    return blocks[-1] if blocks else None


class _Routed:
    """``sys.stdout`` / ``sys.stderr`` while quiet blocks run: what a thread inside one writes goes to
    its capture; every other thread (the embedding app's) writes to the stream as before."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        cap = _capture()
        return cap.text.write(text) if cap else self.stream.write(text)

    def flush(self) -> None:
        if _capture() is None:
            self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class _QuietRecords(logging.Filter):
    """On third-party loggers' handlers (torch's write to the stderr they saw at import): a record
    made in a quiet block goes to its capture; other threads' pass (the app's logs kept flowing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        cap = _capture(record.thread)
        if cap is None or record.name.split(".")[0] == "uadc":   # a handler may be the root's too (pytest's)
            return True
        if not cap.records or cap.records[-1] is not record:   # once, however many handlers it reaches
            cap.records.append(record)
        return False


_RECORDS = _QuietRecords()
# a router per stream, kept: print() holds sys.stdout as a borrowed reference across its writes, and a router
# freed as the last quiet block ended crashed another thread's print. One that nothing else holds (a handler
# made in a block holds its own) goes a minute after it was put back, with the stream it held.
_routers: dict[int, list] = {}   # id(stream) -> [its router, when it was put back (0: in place)]
_put_back: collections.deque = collections.deque()   # (when, id(stream)), oldest first: no scan of every router


def _router(stream: Any) -> Any:
    while _put_back and time.monotonic() - _put_back[0][0] > 60:
        when, key = _put_back.popleft()
        entry = _routers.get(key)
        if entry is not None and entry[1] == when and sys.getrefcount(entry[0]) <= 2:
            del _routers[key]
    if isinstance(stream, _Routed):
        return stream
    entry = _routers.setdefault(id(stream), [_Routed(stream), 0.0])   # it holds the stream: the id stays its own
    entry[1] = 0.0
    return entry[0]


def _route() -> tuple:
    show = warnings.showwarning

    def routed_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                       line: Any = None) -> None:
        cap = _capture()
        if cap is None:
            return show(message, category, filename, lineno, file, line)
        cap.warnings.append((filename, message))

    handlers = [h for name, lg in list(logging.root.manager.loggerDict.items()) if isinstance(lg, logging.Logger)
                and name.split(".")[0] != "uadc" for h in lg.handlers]
    for h in handlers:
        h.addFilter(_RECORDS)
    saved = (sys.stdout, sys.stderr, show, routed_warning, handlers)
    sys.stdout, sys.stderr, warnings.showwarning = _router(sys.stdout), _router(sys.stderr), routed_warning
    # a caller's `error` filter made the exporter's FutureWarning an export failure; `default` marked a
    # warning seen here as shown, so the caller never saw it
    _set_filters(warnings.filters[:], True)
    return saved


def _unroute(saved: tuple) -> None:
    out, err, show, routed_warning, handlers = saved
    for key in {id(out), id(err)}:
        if key in _routers:
            _routers[key][1] = now = time.monotonic()
            _put_back.append((now, key))
    if isinstance(sys.stdout, _Routed):   # unless someone replaced it meanwhile
        sys.stdout = out
    if isinstance(sys.stderr, _Routed):
        sys.stderr = err
    if warnings.showwarning is routed_warning:
        warnings.showwarning = show
    for h in handlers:
        h.removeFilter(_RECORDS)
    _set_filters(warnings.filters[:], False)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[io.StringIO]:
    """Capture what third-party code run by this thread prints to stdout/stderr, warns and logs to
    loggers of its own for the block; the text is logged at DEBUG (``uadc --verbose`` shows it).
    Other threads print and log as before (their warnings are shown rather than raised or ignored
    meanwhile: warning filters are process-wide); afterwards sys.stdout/sys.stderr, ``warnings.showwarning``
    and the loggers are the caller's again. File descriptors are not touched."""
    cap, me = _Capture(), threading.get_ident()
    with _shared_state("quiet", _route, _unroute):
        _quiet.setdefault(me, []).append(cap)
        try:
            yield cap.text
        finally:
            _quiet[me].remove(cap)
            if not _quiet[me]:
                del _quiet[me]
    for filename, message in cap.warnings:
        log.debug("warning from %s: %s", filename, message)
    for r in cap.records:
        log.debug("log from %s: %s", r.name, r.getMessage())
    text = cap.text.getvalue().strip()
    if text:
        log.debug("third-party output:\n%s", text[-4000:])


@contextlib.contextmanager
def tqdm_monitor_off() -> Iterator[None]:
    """Progress bars made inside start no tqdm monitor thread: torch.fx's interpreter makes a bar (drawn or
    not) per graph it runs as torch.onnx exports, and the thread it started outlived the call."""
    from tqdm import tqdm

    def restore(interval: float) -> None:
        tqdm.monitor_interval = interval
    with _shared_state("tqdm monitor", lambda: tqdm.monitor_interval, restore):
        tqdm.monitor_interval = 0
        yield


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


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


_OWNED = False   # while the command line runs a command: the process is uadc's alone


@contextlib.contextmanager
def own_process() -> Iterator[None]:
    """The command line's claim while its command runs: no other code of the process writes to fd
    2 meanwhile (an app that calls ``uadc.cli.main`` in-process has it back afterwards)."""
    global _OWNED
    before, _OWNED = _OWNED, True
    try:
        yield
    finally:
        _OWNED = before


@contextlib.contextmanager
def native_stderr_logged() -> Iterator[None]:
    """In the command line's process, what native code writes to fd 2 during the block (ONNX
    Runtime's own error lines while onnxsim probes a graph) goes to a temp file and is logged at
    DEBUG (``uadc --verbose``); fd 2 is the caller's again afterwards. In a caller's process nothing
    is caught: fd 2 is the whole process's, and every thread's lines went to the temp file."""
    import tempfile

    if not _OWNED:
        yield
        return
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
