"""Progress bars: drawn only when stderr is a terminal (never into CI logs or pipes), and never
when the CLI says ``--quiet``. Library code calls ``progress(...)`` and never prints."""

from __future__ import annotations

import functools
from typing import Any, Iterable

from uadc.core.scoped import stderr_is_terminal

_ENABLED: bool | None = None  # None: only on a terminal


def set_progress(enabled: bool | None) -> bool | None:
    """Set by the CLI (``--quiet`` -> False); returns the previous setting so callers restore it."""
    global _ENABLED
    old, _ENABLED = _ENABLED, enabled
    return old


def progress(iterable: Iterable | None = None, **kw: Any) -> Any:
    from tqdm import tqdm

    disable = (not _ENABLED) if _ENABLED is not None else not stderr_is_terminal()
    kw.setdefault("leave", False)
    kw.setdefault("dynamic_ncols", True)
    return (_quiet_bar() if disable else tqdm)(iterable, disable=disable, **kw)


@functools.cache
def _quiet_bar() -> type:
    """tqdm without its monitor thread: tqdm's first bar starts one, drawn or not, which lives to the end
    of the process (a library call left it behind); and with a thread lock of its own: tqdm's own lock
    holds a multiprocessing RLock, which fixed the caller's start method (a later
    ``multiprocessing.set_start_method('spawn')`` raised "context has already been set")."""
    import threading

    from tqdm import tqdm
    return type("QuietBar", (tqdm,), {"monitor_interval": 0, "_lock": threading.RLock()})

