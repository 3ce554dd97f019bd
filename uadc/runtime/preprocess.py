"""Image preprocessing that reproduces the training loader (uadc.data.mvtec.load_image and the
dataset's normalisation) with numpy and Pillow only: ``convert("RGB")`` (grayscale replicated),
bilinear resize to the square input size when the size differs, ``/ 255``, ``(x - mean) / std``
in float32, HWC -> CHW."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uadc.core.errors import UadcError, one_line
from uadc.core.images import eight_bit, find_images, open_image, upright
from uadc.core.manifest import RESIZE_FILTERS, Preprocessing

MAX_STREAM_BYTES = 1 << 30   # an 8-bit RGB image at twice Pillow's pixel limit (refused there) is 0.54 GB
_CHUNK = 16 << 20
_FILTERS = {name: getattr(Image.Resampling, name.upper()) for name in RESIZE_FILTERS}


def _from_pil(im: Image.Image, pre: Preprocessing, source: Any = "(a PIL image)", turn: bool = False) -> np.ndarray:
    """``turn``: by its EXIF orientation (files are turned as they are opened)."""
    try:
        im.load()
    except (OSError, ValueError) as exc:   # a closed image, a truncated file behind a lazy one
        raise UadcError(f"image {source}: cannot read its pixels ({exc})") from None
    im = upright(im) if turn else im
    if 0 in im.size:
        raise UadcError(f"image {source}: empty, {im.size[0]}x{im.size[1]} pixels")
    im = eight_bit(im, source).convert(pre.color)
    size = pre.image_size
    if im.size != (size, size):
        im = im.resize((size, size), _FILTERS[pre.resize])
    return np.asarray(im, dtype=np.float32) / 255.0


def _encoded(source: Any) -> io.BytesIO | None:
    """Encoded image bytes (``bytes``, ``bytearray``, ``memoryview``) or a binary file object, as a
    stream Pillow reads: what a service receives from a camera or an HTTP body."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    if hasattr(source, "read") and not isinstance(source, Image.Image):
        try:
            data = _read_capped(source)
        except UnicodeDecodeError:   # a file opened in text mode: its read() decodes, and PNG is not text
            data = None
        except (OSError, ValueError) as exc:   # closed, not readable
            raise UadcError(f"image stream: cannot read it ({exc})") from None
        if data is None:
            raise UadcError(f"image stream: expected a binary file object, got text from {type(source).__name__}")
        return io.BytesIO(data)
    return None


def _read_capped(source: Any) -> bytes | None:
    """The stream's bytes up to its end, in chunks (a raw stream's read(n) may return fewer), refused
    past MAX_STREAM_BYTES: a stream with no end (a device, a stalled camera feed) filled the memory
    until the system killed the process. None: the stream gives text."""
    parts, size = [], 0
    while True:
        part = source.read(_CHUNK)
        if not isinstance(part, (bytes, bytearray)) or not part:
            return None if isinstance(part, str) else b"".join(parts)
        size += len(part)
        if size > MAX_STREAM_BYTES:
            raise UadcError(f"image stream: more than {MAX_STREAM_BYTES >> 20} MiB without an end; an image file "
                            f"is smaller (a device or a stream that does not end?)")
        parts.append(part)


def _from_array(arr: np.ndarray, pre: Preprocessing) -> np.ndarray:
    size = pre.image_size
    if 0 in arr.shape:
        raise UadcError(f"image array: empty, shape {arr.shape}")
    if arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
        return _from_pil(Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr), pre)
    if arr.dtype.kind == "f" and arr.shape == (size, size, 3):
        # already RGB in [0, 1] at the model's size: a 0..255 float image or NaNs would score silently wrong
        if not np.isfinite(arr).all() or arr.min() < -1e-6 or arr.max() > 1 + 1e-6:   # rounding allowed
            raise UadcError(f"image array: float pixels must be finite and in [0, 1], got "
                            f"{'non-finite values' if not np.isfinite(arr).all() else f'{arr.min():g}..{arr.max():g}'}"
                            f" (pass uint8 for 0..255)")
        return arr.astype(np.float32)
    hint = " (channels first? pass HxWx3)" if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] > 4 else ""
    raise UadcError(f"image array: expected uint8 HxW / HxWx3 / HxWx4, or float HxWx3 in [0, 1] at "
                    f"{size}x{size}; got {arr.dtype} {arr.shape}{hint}")


def load_rgb(source: Any, pre: Preprocessing) -> np.ndarray:
    """float32 HWC in [0, 1] at the model's size from a path, encoded bytes or binary file object,
    PIL image or array."""
    if isinstance(source, (str, os.PathLike)):
        with open_image(source) as im:
            im.load()   # a truncated file: `unreadable image PATH: ...` as training says it, whatever the format
            return _from_pil(im, pre, source)
    stream = _encoded(source)
    if stream is not None:
        with open_image(stream, "image bytes") as im:
            im.load()
            return _from_pil(im, pre, "image bytes")
    if isinstance(source, Image.Image):   # as displayed, as a path or bytes of it are read
        return _from_pil(source, pre, turn=True)
    try:   # a torch tensor that requires grad or lives on a GPU: torch's RuntimeError / TypeError
        arr = np.asarray(source)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise UadcError(f"image: a {type(source).__name__} numpy cannot read ({one_line(str(exc))[:120]}); "
                        f"pass a CPU array (tensor.detach().cpu())") from None
    if not isinstance(source, np.ndarray) and (arr.dtype == object or arr.ndim == 0):
        raise UadcError(f"image: expected a path, image bytes, a binary file, a PIL image or an array, "
                        f"got {type(source).__name__}")
    return _from_array(arr, pre)


def preprocess(source: Any, pre: Preprocessing) -> np.ndarray:
    """One image -> the model's (3, H, W) float32 input, exactly as the training loader makes it."""
    return model_input(load_rgb(source, pre), pre)


def model_input(rgb: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """:func:`load_rgb`'s HWC image -> the model's (3, H, W) float32 input."""
    img = (rgb - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def list_images(paths: "list[Path] | Path | str") -> list[Path]:
    """Files given directly, and image files found recursively in folders (sorted; ``find_images``)."""
    return find_images(paths).files
