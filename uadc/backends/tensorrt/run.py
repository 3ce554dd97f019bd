"""Running a TensorRT engine through Polygraphy (tensorrt imported lazily)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from uadc.core.errors import UadcError

from uadc.backends.tensorrt.plan import IMAGE_INPUT  # noqa: F401

# --------------------------------------------------------------------------- running and comparing


def run_engine(engine_path: str | os.PathLike, images: np.ndarray, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Run ``images`` (N, C, H, W) through the engine in batches; returns outputs concatenated over N.

    The last partial batch is padded with copies of its last image (and the
    padding dropped) so engines with a fixed batch also work.
    """
    images = _check_images(images)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UadcError(f"batch_size must be a positive integer, got {batch_size!r}")
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    collected: dict[str, list[np.ndarray]] = {}
    with TrtRunner(EngineFromBytes(BytesFromPath(str(existing_file(engine_path)))), name="tensorrt") as runner:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            real = len(chunk)
            if real < batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
            outputs = runner.infer({IMAGE_INPUT: np.ascontiguousarray(chunk)})
            for name, value in outputs.items():
                collected.setdefault(name, []).append(np.array(value[:real], copy=True))  # runner reuses buffers
    return {name: np.concatenate(parts, axis=0) for name, parts in collected.items()}


def _check_images(images: np.ndarray) -> np.ndarray:
    array = np.asarray(images)
    if array.ndim != 4 or len(array) == 0:
        raise UadcError(f"images must be a non-empty (N, C, H, W) array, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


def existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UadcError(f"file not found: {path}")
    return path
