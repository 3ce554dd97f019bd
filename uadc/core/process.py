"""The process around a run: Ctrl-C / SIGTERM held back while a step is written, the thread's signal
stack, the command line's exit, and its stdout failing (a full disk, a closed pipe)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
from typing import Any, Callable, Iterator

from uadc.core.errors import UadcError


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
    done = False
    try:
        yield
        done = True
    finally:
        for k, handler in old.items():
            signal.signal(k, handler)
        if got:
            try:
                signal.raise_signal(got[0])
            except BaseException as exc:   # the caller's handler raised it: the step it waited for is whole
                exc.uadc_after_step = done   # type: ignore[attr-defined]
                raise


def interruption(exc: BaseException, default: str = "interrupted") -> str:
    """How to name the Ctrl-C / SIGTERM ``exc``: ``default``, unless :func:`signals_deferred` held it back
    while a step was being written and it took effect once the step was whole (the command line said
    "nothing was written" of a run whose last step, predict's tables, had just been written in full)."""
    after = getattr(exc, "uadc_after_step", False)
    return "interrupted just after a step was written in full; nothing after it ran" if after else default


class _FailingStdout:
    """``sys.stdout`` of the command line: a write that fails (a full disk, a closed pipe) is one error line
    rather than a traceback, and fd 1 then points at /dev/null so the exit's flush fails no more."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.failed: UadcError | None = None   # kept: click's probe of the stream swallows what it raises

    def _guarded(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except OSError as exc:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            self.failed = self.failed or UadcError(f"cannot write to stdout: {exc.strerror or exc}")
            raise self.failed from None

    def write(self, text: str) -> int:
        return self._guarded(lambda: self.stream.write(text))

    def flush(self) -> None:
        self._guarded(self.stream.flush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class _ClosedStream:
    """``sys.stdout`` where fd 1 was closed when the process started (``uadc doctor >&-``): Python
    made it None, and the first print was an AttributeError traceback; a write now fails as on a
    closed pipe."""

    def write(self, text: str) -> int:
        raise OSError(9, "Bad file descriptor")

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        raise OSError(9, "Bad file descriptor")

    def isatty(self) -> bool:
        return False


class _ForgivingStderr:
    """``sys.stderr`` of the command line: when its reader is gone (``2>&1 | head -1``) or it fails,
    the line is dropped and fd 2 points at /dev/null: a log line that cannot be shown is no reason to
    stop a training (a BrokenPipeError ended it with a silent exit 1)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def _guarded(self, call: Callable[[], Any], default: Any = None) -> Any:
        try:
            return call()
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            return default

    def write(self, text: str) -> int:
        return self._guarded(lambda: self.stream.write(text), len(text))

    def flush(self) -> None:
        self._guarded(self.stream.flush)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def standard_fds_held() -> None:
    """At the command line's start: a standard fd closed by the caller (``>&-``, ``2>&-``) is opened
    on /dev/null, so the next file uadc opens does not take its number (a native library's print to
    fd 1 would have written into a checkpoint); a closed stdout then fails its writes as one error
    line, and a closed stderr drops its lines."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
    if sys.stdout is None:
        sys.stdout = _ClosedStream()
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")   # noqa: SIM115 - the process's stderr, for its whole life


# one of each for the life of the process, pointed at the streams they guard: another thread's print() holds
# sys.stdout as a borrowed reference, and a guard freed as a command ended crashed the process (uadc.cli.main
# run in an app while a thread printed)
_GUARD, _QUIET_GUARD = _FailingStdout(None), _ForgivingStderr(None)


@contextlib.contextmanager
def stdout_failures_as_errors() -> Iterator[None]:
    """For the command line's own process: see :class:`_FailingStdout` and :class:`_ForgivingStderr`.
    A command run inside another (already guarded) keeps the guards as they are."""
    guard, quiet_guard = _GUARD, _QUIET_GUARD
    if sys.stdout is guard or sys.stderr is quiet_guard:
        yield
        return
    guard.stream, guard.failed, quiet_guard.stream = sys.stdout, None, sys.stderr
    sys.stdout, sys.stderr = guard, quiet_guard
    try:
        yield
    finally:
        try:
            guard.flush()   # what is still buffered: else it failed in the interpreter's exit, a traceback
        finally:
            if sys.stdout is guard:
                sys.stdout = guard.stream
            if sys.stderr is quiet_guard:
                sys.stderr = quiet_guard.stream
        if guard.failed is not None:   # the output is lost, whatever the command went on to say
            raise guard.failed


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


class _AltStack(ctypes.Structure):   # Linux's stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def signal_stack_kept() -> Iterator[None]:
    """The calling thread's alternate signal stack is put back after the block (Linux).

    OpenVINO's CPU plugin points it at a stack of its own while the plugin lives and frees that
    stack when the plugin goes: with two plugins released out of order, or one released from another
    thread, the thread was left pointing at freed memory, and its next signal (Ctrl-C: Python's
    handlers run on that stack) crashed the process with SIGSEGV instead of raising KeyboardInterrupt."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    kept = _AltStack()
    saved = libc.sigaltstack(None, ctypes.byref(kept)) == 0
    try:
        yield
    finally:
        if saved:
            libc.sigaltstack(ctypes.byref(kept), None)


def settle_exit() -> None:
    """The process's outcome is decided and written: SIGTERM and Ctrl-C are ignored through the
    interpreter's teardown (a second or two with torch loaded), where their default action ended it
    with 143 / 130 and no word, after a success document. (A Python handler would be reset to the
    default as the interpreter finalizes; an ignored signal stays ignored.) Main thread only."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so that no moment
    leaves ``b`` missing; False where the system or file system cannot (the caller renames twice)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2   # glibc 2.28+
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):   # not on this kernel / file system
        return False
    raise OSError(err, os.strerror(err), os.fsdecode(b))
