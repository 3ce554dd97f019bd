"""``Detector``: load a compiled artifact folder and turn images into decisions.

Torch-free by design (numpy, Pillow, onnxruntime; TensorRT through Polygraphy when the folder
holds ``model.engine`` and ``tensorrt`` imports; OpenVINO for the ``openvino-cpu-*`` targets when
``openvino`` imports), so it runs on an edge box without PyTorch::

    from uadc.runtime import Detector
    det = Detector.load("artifacts/stfpm_effnet_lite0/ort-cpu-int8")   # checks artifact.json hashes
    p = det.predict("part.png", category="bottle")
    p.label, p.normalized_score, p.mask
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Sequence, TypeAlias, TypeVar, Union, overload

import numpy as np
from PIL.Image import Image as PILImage

from uadc.core.constants import ENGINE_FILE
from uadc.core.errors import NonFiniteOutputs, RuntimeFault, UadcError, one_line
from uadc.core.io import JsonResult, PathArg, as_path
from uadc.core.manifest import GLOBAL, NO_VALIDATION_ADVICE, CategoryThresholds, Manifest, read_manifest
from uadc.core.scoped import check_threads, logged_warnings
from uadc.runtime.preprocess import preprocess

log = logging.getLogger(__name__)
_D = TypeVar("_D", bound="Detector")
# what predict takes as one image (-> one Prediction); an array may be one or a batch
OneImage: TypeAlias = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, IO[bytes], PILImage]


@dataclass
class Prediction(JsonResult):
    """One image's result. ``score``/``anomaly_map`` are raw model outputs; ``normalized_score``
    maps the operating threshold to 0.5 (anomalib's convention); ``label`` is 1 for defective."""

    score: float
    normalized_score: float
    label: int
    anomaly_map: np.ndarray            # (H, W) float32, raw
    mask: np.ndarray                   # (H, W) bool: anomaly_map >= pixel threshold
    category: str | None               # None: the global thresholds were used
    threshold: float                   # raw image threshold applied
    latency_ms: float = field(compare=False)   # model run time per image (batch time / batch size): two runs' equal
    source: str | None = None          # the path, when predicted from a file
    extra: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "defective" if self.label else "good"

    def __eq__(self, other: object) -> bool:   # the generated one compared the maps with ==: "truth value ... ambiguous"
        if not isinstance(other, Prediction):
            return NotImplemented
        return all(np.array_equal(getattr(self, f.name), getattr(other, f.name)) if f.name in ("anomaly_map", "mask")
                   else getattr(self, f.name) == getattr(other, f.name) for f in fields(self) if f.compare)

    def to_dict(self) -> dict:
        """JSON-ready summary (arrays left out: the mask's area is given instead)."""
        return {"path": self.source, "category": self.category, "score": self.score,
                "normalized_score": self.normalized_score, "label": self.label, "verdict": self.verdict,
                "threshold": self.threshold, "mask_fraction": float(self.mask.mean()),
                "latency_ms": round(self.latency_ms, 3), **self.extra}


class _OrtBackend:
    name = "onnxruntime"

    def __init__(self, model: Path, threads: int | None, schedule: str = "auto"):
        from uadc.backends.parallel import ParallelSession
        # the cores split across teacher/student or batch chunks: the same outputs, sooner
        self.session = ParallelSession(model, threads, schedule)

    def run(self, images: np.ndarray, input_name: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            amap, score = self.session.run(["anomaly_map", "score"], {input_name: images})
        except UadcError:
            raise
        except Exception as exc:   # ORT's Fail / RuntimeException (an allocation it cannot make): a traceback before
            why = (str(exc).strip().splitlines() or [""])[-1][:300]
            raise RuntimeFault(f"ONNX Runtime failed to run the model: {type(exc).__name__}: {why}") from None
        return amap[:, 0], score.reshape(-1)

    def metadata(self) -> dict[str, str]:
        return dict(self.session.whole.get_modelmeta().custom_metadata_map)

    def close(self) -> None:   # its worker threads end; the sessions go with the Detector
        self.session.close()


class _TrtBackend:
    name = "tensorrt"

    def __init__(self, engine: Path):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="uadc-runtime")
        try:
            self.runner.activate()
        except Exception as exc:  # noqa: BLE001 - Polygraphy's "Could not deserialize engine", CUDA errors
            raise UadcError(f"{engine}: TensorRT cannot load it ({one_line(str(exc))[:200]}); an engine runs only on the "
                            f"TensorRT version and GPU it was built on: run build_engine.sh again on this device") from None
        self.max_batch = _max_batch(self.runner)

    def run(self, images: np.ndarray, input_name: str) -> tuple[np.ndarray, np.ndarray]:
        step = self.max_batch or len(images)   # a --batch-size above the engine's profile: in its batches
        maps, scores = [], []
        for i in range(0, len(images), step):   # copied at once: the runner reuses its output buffers
            out = self.runner.infer({input_name: images[i:i + step]})
            maps.append(np.array(out["anomaly_map"][:, 0], copy=True))
            scores.append(np.array(out["score"], copy=True).reshape(-1))
        return np.concatenate(maps), np.concatenate(scores)

    def close(self) -> None:   # the engine's context and device buffers
        if self.runner.is_active:
            self.runner.deactivate()


def _max_batch(runner: Any) -> int | None:
    """The largest batch the engine's first optimisation profile takes (None: unknown, or not dynamic)."""
    try:
        engine = runner.engine
        name = engine.get_tensor_name(0)
        return int(engine.get_tensor_profile_shape(name, 0)[2][0]) or None
    except Exception:  # noqa: BLE001 - an engine without profiles, an older TensorRT API
        return None


class _OvBackend:
    name = "openvino"

    def __init__(self, model: Path, threads: int | None, target: str):
        from uadc.backends import openvino as ov
        from uadc.config.targets import inference_hint_of
        # The artifact's thresholds were set on OpenVINO at its target's float precision (bf16 or f32).
        compiled = ov.compile_model(model, threads, inference_hint_of(target))
        self.precision = ov.inference_precision(compiled)   # "f32" where the CPU does not run the bf16 asked for
        self.run_fn = ov.infer_fn(compiled)
        self.lock = threading.Lock()   # one infer request: threads sharing a Detector take turns ("busy")

    def run(self, images: np.ndarray, input_name: str) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            amap, score = self.run_fn(images)
            return np.array(amap[:, 0], copy=True), np.array(score, copy=True).reshape(-1)

    def close(self) -> None:
        with self.lock:
            self.run_fn = None   # the compiled model and its infer request go with it


def _check_importable(module: str, how: str) -> None:   # one line, not the loader's traceback
    if not _importable(module):
        raise UadcError(f"backend {module}: the {module} Python package does not import here ({how}); "
                        f"backend auto runs the artifact with what is here")


def _trt_here() -> tuple[bool, str]:
    """TensorRT imports and sees a CUDA GPU (a container started without the NVIDIA runtime: ONNX Runtime)."""
    if not _importable("tensorrt"):
        return False, "tensorrt does not import"
    if not _importable("polygraphy"):   # the engine runs through it: a runtime-only install need not hold it
        return False, "polygraphy, which runs the engine, does not import (pip install polygraphy)"
    from uadc.backends.tensorrt.plan import trt_available
    return trt_available()


def _openvino_missing() -> str | None:
    """Why OpenVINO cannot run here, or None (imported without its import-time telemetry)."""
    from uadc.backends.openvino import import_error
    return import_error()


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


def _single(inputs: Any) -> bool:
    """One image rather than a batch: a path, bytes, a file object, a PIL image or an array below 4-D."""
    if isinstance(inputs, np.ndarray):   # an array of paths is a batch (it was refused as one malformed image)
        return inputs.ndim < 4 and not (inputs.ndim == 1 and inputs.dtype.kind in "UO")   # (bytes: numpy drops
                                                                                        # their trailing zeros)
    if isinstance(getattr(inputs, "ndim", None), int) and inputs.ndim >= 2 and hasattr(inputs, "__array__"):
        return inputs.ndim < 4   # a torch tensor: iterated, its one image was scored as 32 rows (a pandas Series of paths: a batch)
    return isinstance(inputs, (str, Path, bytes, bytearray, memoryview)) or hasattr(inputs, "read") \
        or hasattr(inputs, "getpixel") or not hasattr(inputs, "__iter__")


def _check_precision(manifest: Manifest, backend: str, runs_in: str = "fp32", auto: bool = False) -> None:
    """An INT8 artifact's thresholds were set on its own runtime's INT8 kernels, which another runtime
    rounds differently. A bf16 artifact's thresholds and kNN bank were made of bf16 features: in fp32
    ONNX Runtime scored one 1.4x higher and flipped 4 of 80 decisions, so backend auto refuses to run it so."""
    from uadc.config.targets import TARGETS, inference_hint_of
    own = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}.get(manifest.runtime)
    if manifest.runtime == "tensorrt" and backend != "TensorRT":   # set on ONNX Runtime's emulation of its INT8
        own = "ONNX Runtime"                                       # (OpenVINO ran it without a word)
    target = TARGETS.get(manifest.target)
    if own and own != backend and target is not None and target.quantized:
        log.warning("%s: its thresholds were set on %s's INT8 kernels; %s rounds INT8 differently, so images scored "
                    "near a threshold may be decided differently", manifest.folder, own, backend)
    if manifest.runtime == "openvino" and inference_hint_of(manifest.target) == "bf16" and runs_in != "bf16":
        said = (f"{manifest.folder}: its thresholds and kNN bank were made by OpenVINO in bf16, and {backend} computes "
                f"in {runs_in} here: its scores shift, and images near a threshold are decided differently")
        if auto:
            raise UadcError(f"{said}; run it where OpenVINO runs bf16 (a CPU with AMX or AVX-512 BF16, pip install "
                            f"'uadc[openvino]'), compile an fp32 target for this machine, or choose the backend to run "
                            f"it anyway")
        log.warning("%s", said)


def _only_auto(schedule: str, runtime: str) -> None:
    """A schedule splits ONNX Runtime's work; on another runtime one asked for would be ignored."""
    if schedule != "auto":
        raise UadcError(f"schedule {schedule!r} applies to ONNX Runtime, not to the {runtime} backend that runs "
                        f"this artifact (leave the schedule auto, or choose backend onnxruntime)")


class Detector:
    """A loaded artifact: ``predict`` images, paths, PIL images, arrays or lists of them."""

    def __init__(self, manifest: Manifest, backend: Any, batch_size: int = 8, warnings: Sequence[str] = ()):
        self.manifest = manifest
        self.backend = backend
        self.batch_size = batch_size
        self.warnings = list(warnings)   # logged as it loaded (its thresholds may not fit this runtime, threads capped)
        self.closed = False

    def close(self) -> None:
        """Free the runtime (worker threads, sessions, a TensorRT context); later runs are an error. Also
        ``with Detector.load(...) as det:``."""
        if not self.closed:
            self.closed = True
            self.backend.close()

    def _check_open(self) -> None:   # the backend's own error would be an AttributeError or a dead pool's
        if self.closed:
            raise UadcError(f"{self.manifest.folder}: this Detector was closed; load the artifact again")

    def __enter__(self: _D) -> _D:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def load(cls, artifact: PathArg, backend: str = "auto", threads: int | None = None,
             verify: bool = True, batch_size: int = 8, schedule: str = "auto") -> "Detector":
        """Read and verify ``artifact.json`` (sha256 of every listed file), then open the model:
        ``backend`` ``auto`` (TensorRT when ``model.engine`` exists and tensorrt imports; OpenVINO
        for an OpenVINO target's artifact when openvino imports; else ONNX Runtime),
        ``onnxruntime``, ``openvino`` or ``tensorrt``. On ONNX Runtime, ``schedule`` says how the
        ``threads`` cores (default: all this process may use) share the work
        (``uadc.backends.parallel``): ``auto``, ``branches``, ``batch`` or ``sequential`` (one session).
        ``warnings``: what it logged as it loaded."""
        with logged_warnings() as said:
            det = cls._open(artifact, backend, threads, verify, batch_size, schedule)
            thr = det.manifest.thresholds
            if none := [c for c, n in (thr.validation.items() if thr else ()) if n == 0]:   # named at compile only
                log.warning("%s: %s had no validation normals and %s judged at the global thresholds",
                            det.manifest.folder, ", ".join(map(repr, none)), "is" if len(none) == 1 else "are")
        det.warnings = said
        return det

    @classmethod
    def _open(cls, artifact: str | Path, backend: str, threads: int | None, verify: bool, batch_size: int,
              schedule: str) -> "Detector":
        folder = as_path(artifact, "artifact")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UadcError(f"batch_size: expected a whole number >= 1, got {batch_size!r}")   # numpy's as threads=
        batch_size = int(batch_size)
        threads = check_threads(threads)
        manifest = read_manifest(folder, verify=verify)
        engine = folder / ENGINE_FILE
        if backend not in ("auto", "onnxruntime", "openvino", "tensorrt"):
            raise UadcError(f"backend must be auto, onnxruntime, openvino or tensorrt, got {backend!r}")
        trt_here, trt_why = _trt_here() if backend == "auto" and engine.is_file() else (False, "")
        if backend == "tensorrt" or (backend == "auto" and engine.is_file() and trt_here):
            if not engine.is_file():
                raise UadcError(f"{folder}: no {ENGINE_FILE} (run build_engine.sh on the device first)"
                                if manifest.runtime == "tensorrt" else
                                f"{folder}: an artifact of target {manifest.target} has no TensorRT engine; backend auto or "
                                f"{manifest.runtime}")
            _check_importable("tensorrt", "it needs an NVIDIA GPU with TensorRT")
            if not _importable("polygraphy"):
                raise UadcError("backend tensorrt: the polygraphy Python package does not import here (uadc runs the "
                                "engine through it: pip install polygraphy); backend auto runs the artifact with what "
                                "is here")
            _only_auto(schedule, "TensorRT")
            _check_precision(manifest, "TensorRT")
            if (folder / manifest.model_file).is_file():   # the ONNX the engine was built from, as compile wrote it
                manifest.check_model_file()
            unrecorded = manifest.check_engine(engine)
            if unrecorded:
                log.warning("%s", unrecorded)
            return cls(manifest, _TrtBackend(engine), batch_size)
        model = folder / manifest.model_file
        ov_missing = _openvino_missing() if backend in ("openvino", "auto") and manifest.runtime == "openvino" \
            or backend == "openvino" else None
        if backend == "auto" and engine.is_file():   # a JetPack venv without tensorrt ran the ONNX on the CPU unsaid
            log.warning("%s: %s is here but TensorRT cannot run here (%s): running %s on %s instead", folder,
                        ENGINE_FILE, trt_why, manifest.model_file,
                        "OpenVINO" if manifest.runtime == "openvino" and not ov_missing else "ONNX Runtime (CPU)")
        if backend == "openvino" or (backend == "auto" and manifest.runtime == "openvino" and not ov_missing):
            if ov_missing:   # installed and broken: its reason, not only "pip install"
                raise UadcError(f"backend openvino: the openvino Python package does not import here ({ov_missing}); "
                                f"backend auto runs the artifact with what is here")
            _only_auto(schedule, "OpenVINO")
            manifest.check_model_file()   # ONNX Runtime's session checks it below
            from uadc.backends.parallel import cap_threads   # more than the cores: said, as on ONNX Runtime
            ovb = _OvBackend(model, cap_threads(threads) if threads else None, manifest.target)
            try:
                _check_precision(manifest, "OpenVINO", ovb.precision, auto=backend == "auto")
            except UadcError:
                ovb.close()
                raise
            return cls(manifest, ovb, batch_size)
        _check_precision(manifest, "ONNX Runtime", auto=backend == "auto")
        if backend == "auto" and ov_missing:   # it fell back without a word (after a refusal: no such line)
            log.warning("%s: an artifact of target %s, but %s: running it on ONNX Runtime (CPU) instead", folder,
                        manifest.target, ov_missing)
        backend = _OrtBackend(model, threads, schedule)
        first = backend.session.get_inputs()[0]   # the runtime's own view of the model
        manifest.check_model_input(first.name, first.shape)
        manifest.check_model_metadata(backend.metadata())
        return cls(manifest, backend, batch_size)

    # -- properties -------------------------------------------------------------------------
    @property
    def categories(self) -> list[str]:
        return list(self.manifest.categories)

    @property
    def image_size(self) -> int:
        return self.manifest.preprocessing.image_size

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def thresholds(self, category: str | None = None) -> CategoryThresholds:
        """The operating thresholds (image and pixel) of ``category``; None: the global ones."""
        if self.manifest.thresholds is None:
            raise UadcError(f"{self.manifest.folder}: the artifact has no operating thresholds (compiled without "
                            f"validation normals: {NO_VALIDATION_ADVICE}, and compile again)")
        return self.manifest.thresholds.get(category)

    # -- running ----------------------------------------------------------------------------
    def preprocess(self, source: Any) -> np.ndarray:
        """(3, H, W) float32 model input of one image (path, PIL image or array)."""
        return preprocess(source, self.manifest.preprocessing)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Raw outputs for preprocessed (N, 3, H, W) images: (maps (N,H,W), scores (N,), ms per image)."""
        self._check_open()
        images = self._batch(images)
        maps, scores, seconds = [], [], 0.0
        for i in range(0, len(images), self.batch_size):
            t0 = time.perf_counter()
            try:
                m, s = self.backend.run(images[i:i + self.batch_size], self.manifest.input_name)
            except Exception:
                self._check_open()   # closed by another thread meanwhile: say so, not the dead pool's error
                raise
            seconds += time.perf_counter() - t0
            maps.append(np.asarray(m, np.float32))
            scores.append(np.asarray(s, np.float32))
            self._check_outputs(maps[-1], scores[-1], len(images[i:i + self.batch_size]))
        return np.concatenate(maps), np.concatenate(scores), 1000 * seconds / len(images)

    def _batch(self, images: Any) -> np.ndarray:
        """(N, 3, H, W) float32 at the model's size, N >= 1: the runtime's own error would not say what to pass."""
        size = self.image_size
        try:
            arr = np.ascontiguousarray(images, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise UadcError(f"run: expected preprocessed images as an (N, 3, {size}, {size}) float32 array ({exc})"
                            ) from None
        if arr.ndim != 4 or arr.shape[1:] != (3, size, size) or not len(arr):
            raise UadcError(f"run: expected preprocessed images (N, 3, {size}, {size}) with N >= 1, got shape "
                            f"{arr.shape} (Detector.preprocess makes one (3, {size}, {size}) image)")
        return arr

    def _check_outputs(self, maps: np.ndarray, scores: np.ndarray, n: int) -> None:
        """One score and one image-sized map per input image: other shapes would be decided wrongly."""
        size = self.image_size
        if maps.shape != (n, size, size) or scores.shape != (n,):
            raise RuntimeFault(f"{self.manifest.model_file} gave an anomaly map {list(maps.shape)} and scores "
                               f"{list(scores.shape)} for {n} image(s); expected [{n}, {size}, {size}] and [{n}] "
                               f"(not the model this artifact was compiled with)")

    def decide(self, maps: np.ndarray, scores: np.ndarray, category: str | None = None,
               latency_ms: float = 0.0, sources: Sequence[str | None] | None = None) -> list[Prediction]:
        """Predictions from raw model outputs (maps (N,H,W), scores (N,)) at ``category``'s thresholds."""
        thr = self.thresholds(category)
        category = None if category == GLOBAL else category   # as uncategorised rows: no category
        maps, scores = np.asarray(maps), np.asarray(scores)
        if maps.ndim != 3 or scores.shape != (len(maps),):   # numpy's broadcast error, or a wrong pairing
            raise UadcError(f"decide: expected maps (N, H, W) and scores (N,), got {maps.shape} and {scores.shape}")
        sources = list(sources) if sources is not None else [None] * len(scores)
        if len(sources) != len(scores):   # an IndexError, or a verdict named after another image
            raise UadcError(f"decide: {len(sources)} sources for {len(scores)} images")
        finite = np.isfinite(scores) & np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)
        if not finite.all():   # NaN compares False with every threshold: a defect would pass as good
            i = int(np.argmin(finite))
            raise NonFiniteOutputs(f"{sources[i] or f'image {i}'}: the model's score or anomaly map is NaN/Inf, so "
                                   f"it has no verdict (a runtime or precision fault; check the artifact with "
                                   f"`uadc verify`)")
        norm = thr.image.normalize(scores)
        labels = thr.image.decide(scores)
        masks = thr.pixel.decide(maps)
        # each its own arrays: a view kept the whole batch's maps alive as long as one result was kept
        return [Prediction(float(scores[i]), float(norm[i]), int(labels[i]), maps[i].copy(), masks[i].copy(), category,
                           thr.image.value, latency_ms, sources[i]) for i in range(len(scores))]

    @overload
    def predict(self, inputs: OneImage, category: str | None = None) -> Prediction: ...

    @overload
    def predict(self, inputs: "list[Any] | tuple[Any, ...]", category: "str | None | Sequence[str | None]" = None
                ) -> list[Prediction]: ...

    @overload   # an array: HxW(x3) is one image, NxHxWx3 a batch
    def predict(self, inputs: Any, category: "str | None | Sequence[str | None]" = None
                ) -> "Prediction | list[Prediction]": ...

    def predict(self, inputs: Any, category: "str | None | Sequence[str | None]" = None
                ) -> "Prediction | list[Prediction]":
        """One image (path, encoded bytes or binary file, PIL image, HxW(x3) array) -> ``Prediction``;
        a list, tuple or other iterable of them, or an (N, H, W, 3) uint8 array -> list.
        ``category`` picks the thresholds (``None``: global): one for all, or one per image."""
        if isinstance(inputs, dict):   # its keys were read as image paths
            raise UadcError("inputs: expected an image or a list of images, got a dict")
        self._check_open()
        single = _single(inputs)
        items = [inputs] if single else list(inputs)
        cats = self._per_image(category, len(items), single)
        if not items:
            return []
        for c in dict.fromkeys(cats):
            self.thresholds(c)              # an unknown category fails before any work
        preds: list[Prediction] = []
        for i in range(0, len(items), self.batch_size):   # inputs a batch at a time: 3x a map's memory each
            chunk = items[i:i + self.batch_size]
            batch = [self._input(x, None if single else i + j) for j, x in enumerate(chunk)]
            maps, scores, ms = self.run(np.stack(batch))
            preds += [self.decide(maps[j:j + 1], scores[j:j + 1], cats[i + j], ms,
                                  [os.fsdecode(x) if isinstance(x, (str, os.PathLike)) else None])[0] for j, x in enumerate(chunk)]
        return preds[0] if single else preds

    def _input(self, x: Any, index: int | None) -> np.ndarray:
        """One preprocessed input; an error names its place among several (an array batch has no names)."""
        try:
            return self.preprocess(x)
        except UadcError as exc:
            if index is None:
                raise
            raise UadcError(f"input {index}: {exc}") from None

    @staticmethod
    def _per_image(category: Any, n: int, single: bool) -> list[str | None]:
        if category is None or isinstance(category, str):   # "global" is None: a row's empty category
            return [None if category == GLOBAL else category] * n
        cats = list(category) if isinstance(category, (list, tuple)) else None   # not a number, a set
        if cats is None or single or len(cats) != n or not all(c is None or isinstance(c, str) for c in cats):
            want = "a name or None for one image" if single else \
                f"one name for all images or one per image (a list of {n} names or None)"
            raise UadcError(f"category: {want}, got {category!r}"[:300])
        return [None if c == GLOBAL else c for c in cats]

    def __reduce__(self) -> Any:   # its runtime sessions are native objects: pickle's TypeError named a C type
        raise UadcError(f"a Detector cannot be pickled (it holds runtime sessions): pass its artifact folder "
                        f"{self.manifest.folder} and Detector.load it in the other process")

    def __repr__(self) -> str:
        m = self.manifest
        return f"Detector({m.folder}, target={m.target}, backend={self.backend_name}, categories={m.categories})"
