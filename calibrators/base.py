"""Calibrator interface, registry and the streaming |x| histogram used by entropy/percentile.

A calibrator follows the collect-then-compute protocol of ONNX Runtime's quantization
calibrators: ``observe`` is called once per batch of *one* tensor (so a model needs one
calibrator instance per tensor), then ``compute_range`` returns the float range ``(lo, hi)``
that the quantizer maps onto the integer grid. Observing streams: state is a histogram or a few
scalars, never the data itself.

Input handling common to all calibrators: the batch is flattened, non-finite values (``±inf``,
``nan``) are dropped (``torch.ao.quantization.HistogramObserver`` drops ``±inf`` too; ``nan``
would poison min/max), and empty batches are ignored. If only zeros were observed the range is
``(0.0, 0.0)``; the caller decides how to quantize a constant-zero tensor.

Registry: built-in calibrators register themselves with :func:`register`; third-party ones are
found through the ``uadc.calibrators`` entry-point group (``importlib.metadata``) and loaded on
first use.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import numpy as np

ENTRY_POINT_GROUP = "uadc.calibrators"

_REGISTRY: dict[str, type[Calibrator]] = {}

C = TypeVar("C", bound="type[Calibrator]")


class Calibrator(ABC):
    """Range calibrator for one tensor: ``observe`` batches, then ``compute_range``."""

    name: ClassVar[str] = ""
    #: True when ``compute_range`` returns ``(-t, t)``. Class default; an option may change it
    #: per instance (``MinMaxCalibrator(symmetric=True)``).
    symmetric: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.options = options  # kept for repr / logging only

    @abstractmethod
    def observe(self, x: np.ndarray) -> None:
        """Accumulate one batch of the tensor (any shape, float)."""

    @abstractmethod
    def compute_range(self) -> tuple[float, float]:
        """Return ``(lo, hi)`` in float units; ``ValueError`` if nothing was observed."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


# ------------------------------------------------------------------------------------ registry

def register(name: str, *, replace: bool = False) -> Callable[[C], C]:
    """Class decorator adding a :class:`Calibrator` subclass to the registry under ``name``."""

    def deco(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, Calibrator)):
            raise TypeError(f"{cls!r} is not a Calibrator subclass")
        old = _REGISTRY.get(name)
        if old is not None and old is not cls and not replace:
            raise ValueError(f"calibrator {name!r} is already registered ({old.__qualname__})")
        if not cls.__dict__.get("name"):  # keep a class's own name if it is listed twice
            cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_calibrators() -> list[str]:
    """Names of registered calibrators plus those advertised by entry points, sorted."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def calibrator_problem(name: str) -> str | None:
    """Why calibrator ``name`` cannot be used (a plug-in that does not load, is no ``Calibrator`` or
    shadows another), or None: ``uadc calibrators list`` listed broken plug-ins as usable."""
    try:
        cls = _REGISTRY.get(name) or _load_entry_point(name)
        if cls is None:
            return f"unknown calibrator {name!r}"
        _check_shadowing(name, cls)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def _load_entry_point(name: str) -> type[Calibrator] | None:
    ep = _entry_points().get(name)
    if ep is None:
        return None
    try:   # a plug-in's import error (syntax, missing module) is its own, named, not a traceback
        cls = ep.load()
    except Exception as exc:
        raise ValueError(f"cannot load plug-in {ep.value}: {type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Calibrator)):
        raise TypeError(f"entry point {name!r} ({ep.value}) is not a Calibrator subclass")
    # Built-ins are also declared as entry points; loading one returns the registered class.
    return _REGISTRY.get(name) or register(name)(cls)


def _check_shadowing(name: str, cls: type[Calibrator]) -> None:
    """A plug-in's entry point named like a registered calibrator was silently not used. Compared by
    what it loads (``pkg:Cls`` re-exported from ``pkg.mod`` is the same class)."""
    own = f"{cls.__module__}:{cls.__qualname__}"
    other = [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name and not _loads(ep, cls)]
    if other:
        raise ValueError(f"calibrator {name!r} is {own}, and a plug-in declares another under the same name "
                         f"({', '.join(other)}): rename the plug-in's entry point")


def _loads(ep: Any, cls: type) -> bool:
    try:
        return ep.load() is cls
    except Exception:   # a broken plug-in under the same name is another one
        return False


def get_calibrator(name: str, **options: Any) -> Calibrator:
    """Instantiate calibrator ``name`` with its options; ``ValueError`` for an unknown name, a plug-in
    that does not load or shadows another calibrator, or one whose constructor fails."""
    cls = _REGISTRY.get(name) or _load_entry_point(name)
    if cls is None:
        raise ValueError(
            f"unknown calibrator {name!r}; available: {', '.join(available_calibrators())}")
    _check_shadowing(name, cls)
    try:
        return cls(**options)
    except (ValueError, TypeError):   # an unknown option's TypeError, as any constructor's
        raise
    except SystemExit as exc:   # ended uadc with its exit code and no word
        raise ValueError(f"its constructor called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


def fingerprint(name: str) -> str:
    """What a cached result calibrated by ``name`` must agree with: its class and its source: a built-in's
    module, a plug-in's whole top-level package (a helper module it calls, edited since, gave the old
    ranges from a cache)."""
    import hashlib
    import inspect
    import sys
    cls = type(get_calibrator(name))
    digest = hashlib.sha256(f"{cls.__module__}:{cls.__qualname__}".encode())
    own = __name__.rsplit(".", 1)[0]   # this package: a built-in's source is its module
    top = None if cls.__module__.startswith(own + ".") else sys.modules.get(cls.__module__.split(".")[0])
    folders = [Path(d) for d in getattr(top, "__path__", [])] if top is not None else []
    files = sorted((f.relative_to(d).as_posix(), f) for d in folders for f in d.rglob("*.py"))
    try:
        for rel, f in files:
            digest.update(rel.encode() + b"\0" + f.read_bytes())
        if not files:   # a built-in, or a plug-in that is one module
            digest.update(inspect.getsource(sys.modules[cls.__module__]).encode())
    except (OSError, TypeError, KeyError):
        pass
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------ input handling

def finite_values(x: np.ndarray) -> np.ndarray:
    """Flatten ``x`` to 1-D floats (float32 at least: float16 bins of a histogram collapse) and drop
    non-finite values (copies only when needed)."""
    a = np.asarray(x)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    a = a.reshape(-1)
    finite = np.isfinite(a)
    return a if finite.all() else a[finite]


# ------------------------------------------------------------------- streaming |x| histogram

class AbsHistogram:
    """Histogram of ``|x|`` with ``num_bins`` equal bins over ``[0, max|x|]``, built batch by batch.

    The first non-zero batch fixes the bin width: ``max|x| / num_bins`` (``np.histogram`` with
    ``range=(0, max|x|)``, so a single batch gives exactly that histogram). When a later batch
    exceeds the covered range, bins of the same width are appended, as pytorch-quantization's
    ``HistogramCalibrator`` does. Unlike it, the bin count is capped at ``max_bins`` (default
    ``2 * num_bins``) by merging adjacent bin pairs, which keeps memory and the entropy search
    bounded while the resolution stays at least ``max|x| / num_bins``.
    """

    def __init__(self, num_bins: int = 2048, max_bins: int | None = None) -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        self.max_bins = max(max_bins or 2 * num_bins, num_bins)
        self.counts: np.ndarray | None = None  # int64 counts, or None until a non-zero value
        self.upper = 0.0       # right edge of the last bin
        self.max_abs = 0.0     # exact max |x| seen
        self.total = 0         # number of values seen
        self._zeros = 0        # zeros seen before the range was known

    @property
    def width(self) -> float:
        return self.upper / len(self.counts) if self.counts is not None else 0.0

    @property
    def edges(self) -> np.ndarray:
        n = 0 if self.counts is None else len(self.counts)
        return np.linspace(0.0, self.upper, n + 1)

    def add(self, a: np.ndarray) -> None:
        """Add a batch of non-negative finite values (1-D)."""
        if a.size == 0:
            return
        m = float(a.max())
        self.total += a.size
        self.max_abs = max(self.max_abs, m)
        if self.counts is None:
            if m == 0.0:
                self._zeros += a.size
                return
            self.counts, _ = np.histogram(a, bins=self.num_bins, range=(0.0, m))
            self.counts[0] += self._zeros
            self.upper = m
            return
        if m > self.upper:
            self._extend(m)
        self.counts += np.histogram(a, bins=len(self.counts), range=(0.0, self.upper))[0]

    def _extend(self, m: float) -> None:
        while True:
            width = self.width
            n = math.ceil(m / width)
            while n * width < m:  # guard against rounding in the division
                n += 1
            if n <= self.max_bins:
                break
            self._halve()
        self.counts = np.concatenate([self.counts, np.zeros(n - len(self.counts), np.int64)])
        self.upper = n * width

    def _halve(self) -> None:
        """Merge adjacent bin pairs (bin edges stay aligned, so no count is split)."""
        counts = self.counts
        if len(counts) % 2:
            self.upper += self.width
            counts = np.append(counts, 0)
        self.counts = counts.reshape(-1, 2).sum(axis=1)
