"""Progress bars: drawn only when stderr is a terminal (never into CI logs or pipes), and never
when the CLI says ``--quiet``. Library code calls ``progress(...)`` and never prints."""

from __future__ import annotations

from typing import Any, Iterable

_ENABLED: bool | None = None  # None: only on a terminal


def set_progress(enabled: bool | None) -> bool | None:
    """Set by the CLI (``--quiet`` -> False); returns the previous setting so callers restore it."""
    global _ENABLED
    old, _ENABLED = _ENABLED, enabled
    return old


def progress(iterable: Iterable | None = None, **kw: Any) -> Any:
    from tqdm import tqdm

    disable = (not _ENABLED) if _ENABLED is not None else None  # tqdm: None = auto (tty only)
    kw.setdefault("leave", False)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=disable, **kw)
