"""Post-training calibration: which images, which tensors, and their float ranges.

The ranges feed the ``qdq`` pass (ONNX Runtime's QDQ quantizer with our ranges instead of its
own calibration). ``collect_ranges`` runs the float model once per batch with the tensors to
calibrate exposed as extra outputs and streams each tensor into its own calibrator
(``calibrators.get_calibrator``), so memory stays bounded by one batch of activations.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from uadc.calibrators import get_calibrator
from uadc.config.settings import PtqSettings
from uadc.config.targets import Target
from uadc.core.constants import CALIBRATION_KINDS
from uadc.core.errors import UadcError
from uadc.core.ort_session import make_session
from uadc.core.progress import progress
from uadc.core.scoped import environment_kept, quiet_third_party, streams_kept
from uadc.export.partitions import nodes_in
from uadc.passes.qdq import quantized_op_types

log = logging.getLogger(__name__)
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16)


# ------------------------------------------------------------------------------------- images

def _train_images(n: int, rng: np.random.Generator, train_images: Callable[[list[int]], np.ndarray] | None,
                  num_train: int) -> np.ndarray:
    if train_images is None or num_train < 1:
        raise UadcError("calibration from training images needs the training set (none given or empty)")
    idx = rng.choice(num_train, size=n, replace=n > num_train)  # with replacement only if we must
    if n > num_train:   # the recorded sample count overstated what the ranges rest on
        log.warning("calibration: %d samples drawn from %d training images (with replacement: %d distinct ones)",
                    n, num_train, len(set(idx.tolist())))
    return np.asarray(train_images([int(i) for i in idx]), dtype=np.float32)


def calibration_images(kind: str, n: int, seed: int, train_images: Callable[[list[int]], np.ndarray] | None,
                       num_train: int, image_size: int) -> np.ndarray:
    """``n`` calibration inputs (N,3,H,W) float32 in the model's normalised input space.

    ``train``: training images picked with a seeded RNG (``train_images(indices)`` loads them);
    ``random-normal``: N(0,1) noise, the data-free option; ``mixed``: half of each, shuffled so
    every batch sees both."""
    if kind not in CALIBRATION_KINDS:
        raise UadcError(f"unknown calibration data kind {kind!r}; expected one of {', '.join(CALIBRATION_KINDS)}")
    if n < 1:
        raise UadcError(f"calibration needs at least one image, got n={n}")
    rng = np.random.default_rng(seed)
    shape = (3, image_size, image_size)
    if kind == "train":
        out = _train_images(n, rng, train_images, num_train)
    elif kind == "random-normal":
        out = rng.standard_normal((n, *shape), dtype=np.float32)
    else:
        n_train = n // 2
        noise = rng.standard_normal((n - n_train, *shape), dtype=np.float32)
        parts = [_train_images(n_train, rng, train_images, num_train)] if n_train else []
        out = np.concatenate(parts + [noise])
        out = out[rng.permutation(n)]
    if out.shape != (n, *shape):
        raise UadcError(f"calibration images have shape {out.shape}, expected {(n, *shape)}")
    return np.ascontiguousarray(out, dtype=np.float32)


# ------------------------------------------------------------------------------------ tensors

def _float_tensors(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    return {v.name for v in [*g.value_info, *g.input, *g.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type in _FLOAT_TYPES}


def tensors_to_calibrate(model: onnx.ModelProto, partitions: list[str] | tuple[str, ...]) -> list[str]:
    """Float activations the QDQ quantizer needs ranges for: inputs and outputs of the nodes in
    ``partitions`` whose op type ORT quantizes (its QDQ + QLinear registries), without
    initializers, in graph order. A superset for TensorRT targets (which skip Conv outputs)."""
    ops = set(quantized_op_types())
    wanted = set(nodes_in(model, partitions))
    inits = {i.name for i in model.graph.initializer}
    floats = _float_tensors(model)
    out: dict[str, None] = {}
    for n in model.graph.node:
        if n.name in wanted and n.op_type in ops:
            for t in [*n.input, *n.output]:
                if t and t not in inits and t in floats:
                    out[t] = None
    return list(out)


# ------------------------------------------------------------------------------------- ranges

def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (Polygraphy's ModifyOutputs)."""
    from polygraphy.backend.onnx import ModifyOutputs

    keep = [o.name for o in model.graph.output]
    with quiet_third_party():  # Polygraphy logs what it marks
        return ModifyOutputs(model, outputs=keep + [n for n in names if n not in keep], copy=True)()


def _session(model: onnx.ModelProto):
    # Fusions would rename or remove the very tensors we calibrate.
    return make_session(model, optimize=False)


def _input_name(model: onnx.ModelProto) -> tuple[str, int | None]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    if len(inputs) != 1:
        raise UadcError(f"calibration expects a model with one image input, found {[v.name for v in inputs]}")
    dim0 = inputs[0].type.tensor_type.shape.dim
    fixed = dim0[0].dim_value if dim0 and dim0[0].HasField("dim_value") else None
    return inputs[0].name, fixed


def _plugin_call(calibrator: str, tensor: str, what: str, fn: Callable, *args: Any) -> Any:
    """A calibrator's code (a plug-in's too) that fails, or calls sys.exit (which ended uadc without a
    word), is one line naming it, not a traceback; what it prints is logged at DEBUG, not on stdout."""
    try:
        with quiet_third_party():
            return fn(*args)
    except UadcError:
        raise
    except SystemExit as exc:
        raise UadcError(f"calibrator {calibrator!r}: {what} of tensor {tensor!r} called sys.exit({exc.code!r})") \
            from None
    except Exception as exc:
        if what == "compute_range" and isinstance(exc, ValueError):   # the protocol's "nothing observed"
            raise UadcError(f"calibrator {calibrator!r}: tensor {tensor!r} produced no finite values ({exc})") \
                from None
        raise UadcError(f"calibrator {calibrator!r}: {what} of tensor {tensor!r} failed: "
                        f"{type(exc).__name__}: {exc}") from None


def _range_of(calibrator: str, tensor: str, cal: Any) -> tuple[float, float]:
    """``compute_range()`` checked: two finite floats, lo <= hi (a plug-in's 3-tuple or strings read
    as "no finite values", its NaN as an anonymous qdq error)."""
    got = _plugin_call(calibrator, tensor, "compute_range", cal.compute_range)
    try:   # numbers: "-1" or True read as floats and compiled
        if not all(isinstance(v, (numbers.Real, np.number)) and not isinstance(v, (bool, np.bool_)) for v in got):
            raise TypeError
        lo, hi = (float(v) for v in got)
    except (TypeError, ValueError):
        raise UadcError(f"calibrator {calibrator!r}: compute_range returned {got!r} for tensor {tensor!r}; "
                        f"expected (lo, hi), two numbers") from None
    # float32's range: the quantizer's scale (hi - lo) / 255 is a float32; 1e39 became inf (a traceback after QAT)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi and max(-lo, hi) <= _RANGE_LIMIT):
        raise UadcError(f"calibrator {calibrator!r}: compute_range returned ({lo}, {hi}) for tensor {tensor!r}; "
                        f"expected finite lo <= hi, each within +-{_RANGE_LIMIT:.3g} (float32)")
    return lo, hi


_RANGE_LIMIT = float(np.finfo(np.float32).max) / 2


def collect_ranges(model: onnx.ModelProto, images: np.ndarray, tensor_names: list[str], calibrator: str,
                   options: dict | None = None, batch_size: int = 8,
                   activation_symmetric: bool = False) -> dict[str, tuple[float, float]]:
    """Float range ``(lo, hi)`` of each tensor in ``tensor_names`` over ``images``.

    One calibrator instance per tensor, fed batch by batch. With an asymmetric scheme a tensor
    that never went negative gets ``lo = max(lo, 0)`` (a symmetric calibrator would otherwise
    spend half an unsigned grid on values that never occur); with ``activation_symmetric`` the
    result is ``(-a, a)``, ``a = max(|lo|, |hi|)``."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise UadcError(f"calibration images must be a non-empty (N,3,H,W) array, got shape {images.shape}")
    if not tensor_names:
        return {}
    try:
        with quiet_third_party():   # a plug-in's constructor may print
            cals = {t: get_calibrator(calibrator, **(options or {})) for t in tensor_names}
    except (ValueError, TypeError) as exc:   # unknown, a plug-in that does not load, its constructor failing
        raise UadcError(f"calibrator {calibrator!r}: {exc}") from None
    input_name, fixed_batch = _input_name(model)
    try:
        sess = _session(with_outputs(model, tensor_names))
    except Exception as exc:
        raise UadcError(f"calibration: cannot expose tensors as outputs: {str(exc).splitlines()[0]}") from None
    step = fixed_batch or max(1, int(batch_size))
    lo_seen, hi_seen = dict.fromkeys(tensor_names, np.inf), dict.fromkeys(tensor_names, -np.inf)
    starts = range(0, len(images), step)
    starts = progress(starts, desc=f"calibrate ({calibrator})", unit="batch")
    for s in starts:
        batch = images[s:s + step]
        if fixed_batch and len(batch) != fixed_batch:
            continue  # a static-batch model cannot take the remainder
        for name, value in zip(tensor_names, sess.run(tensor_names, {input_name: batch})):
            finite = value[np.isfinite(value)]   # before the calibrator sees it: a plug-in's np.abs(x, out=x)
            if finite.size:                      # made every tensor look non-negative (lo clipped to 0)
                lo_seen[name] = min(lo_seen[name], float(finite.min()))
                hi_seen[name] = max(hi_seen[name], float(finite.max()))
            _plugin_call(calibrator, name, "observe", cals[name].observe, value)
    ranges = {}
    for name, cal in cals.items():
        lo, hi = _range_of(calibrator, name, cal)
        if activation_symmetric:
            a = max(abs(lo), abs(hi))
            lo, hi = -a, a
        elif lo_seen[name] >= 0.0:
            if hi < 0.0:   # our own clamp would make (0, hi) and the qdq pass blame an "invalid range"
                raise UadcError(f"calibrator {calibrator!r}: compute_range returned ({lo}, {hi}) for tensor {name!r}, "
                                f"whose values were all >= 0")
            lo = max(lo, 0.0)
        ranges[name] = (lo, hi)
    _warn_of_absurd_ranges(calibrator, ranges, lo_seen, hi_seen)
    return ranges


def _warn_of_absurd_ranges(calibrator: str, ranges: dict, lo_seen: dict, hi_seen: dict) -> None:
    """A plug-in's range that leaves the values observed no INT8 steps compiled without a word: (0, 0) for
    values up to 3 (ONNX Runtime quantizes it with scale 1), or (-1e3, 1e3) (every value rounds to zero).
    Measured as ONNX Runtime uses a range, stretched to hold 0, against the size of the values: a
    built-in's (c, c) for a constant tensor, or (-1, 1) for a saturated sigmoid, is no such range."""
    def width(lo: float, hi: float) -> float:
        return max(hi, 0.0) - min(lo, 0.0)
    odd = []
    for name, (lo, hi) in ranges.items():
        size = max(abs(lo_seen[name]), abs(hi_seen[name])) if np.isfinite(lo_seen[name]) else 0.0
        if size > 0 and not 1e-5 * size <= width(lo, hi) <= 10 * size:   # built-ins: 1/4096 to 2 times
            odd.append((name, lo + 0.0, hi + 0.0, "next to no width against" if width(lo, hi) < size else
                        "over 10 times the size of"))
    if odd:
        name, lo, hi, what = odd[0]
        log.warning("calibrator %r: %d tensor(s) got a range of %s the values observed (%s: (%.6g, %.6g), values "
                    "%.6g..%.6g): its INT8 steps cannot tell those values apart; the compile's figures show the cost",
                    calibrator, len(odd), what, name, lo, hi, lo_seen[name], hi_seen[name])


@contextlib.contextmanager
def _folder_and_numpy_kept() -> Iterator[None]:
    """A plug-in's os.chdir (a relative --out then went elsewhere) and np.seterr end with the calibration."""
    folder, errors = os.getcwd(), np.geterr()
    try:
        yield
    finally:
        np.seterr(**errors)
        if os.getcwd() != folder:
            os.chdir(folder)


def calibrate_ranges(fp32: onnx.ModelProto, images: np.ndarray, ptq: PtqSettings, target: Target) -> dict:
    """Float ranges of every tensor the Q/DQ pass needs (the target's scheme), from ``images``."""
    tensors = tensors_to_calibrate(fp32, list(ptq.quantize))
    sym = bool(target.scheme and target.scheme.activation_symmetric)
    try:   # a calibrator's (a plug-in's) seeds, environment variables, warning filters, folder and numpy errors
        with streams_kept(), environment_kept(), _folder_and_numpy_kept():   # stay in the call
            return collect_ranges(fp32, images, tensors, ptq.calibrator, None, 8, activation_symmetric=sym)
    except ValueError as exc:
        raise UadcError(f"calibrator {ptq.calibrator!r}: {exc}") from None
