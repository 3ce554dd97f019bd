"""TensorRT INT8 calibration cache (the text file IInt8 calibrators read and write).

Format, as TensorRT writes it through ``writeCalibrationCache``::

    TRT-8501-EntropyCalibration2
    image: 3c010204
    /teacher/conv1/Conv_output_0: 3d8ac3a1

- line 1: ``TRT-<version code>-<calibrator>``; the version code is
  ``NV_TENSORRT_VERSION``: ``major*1000 + minor*100 + patch`` up to TensorRT 8.x
  and ``major*10000 + minor*100 + patch`` from TensorRT 10 (NvInferVersion.h /
  NvInferRuntime.h), e.g. 8.5.1 -> ``8501``, 10.3.0 -> ``100300``.
- then one ``<tensor name>: <hex>`` line per tensor, where ``<hex>`` is the
  IEEE-754 float32 bit pattern, written most-significant byte first (i.e.
  ``struct.pack(">f", scale).hex()``), of the per-tensor **scale** = amax / 127.

Verified against: a cache written by TensorRT 5.1 in nvdla/sw
(``umd/utils/calibdata/resnet50.txt``, header ``TRT-5101-EntropyCalibration2``,
lines like ``data: 3f9839e4``) and NVIDIA's reader for it
(``umd/utils/calibdata/calib_txt_to_json.py``: ``struct.unpack('>f', hex)`` ->
``scale``); NVIDIA TAO's QAT exporter writes ``amax / 127.0`` as
``hex(struct.unpack("i", struct.pack("f", scale)))`` under
``TRT-{version}-EntropyCalibration2``.

Tensor names may contain ``:`` (e.g. TensorFlow names), so a line is split on
its last ``:``.
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path

from uadc.core.errors import UadcError
from uadc.core.io import atomic_write_bytes

__all__ = [
    "CALIBRATORS",
    "cache_header",
    "parse_trt_version",
    "read_calibration_cache",
    "read_calibration_header",
    "trt_version_code",
    "write_calibration_cache",
]

# Calibrator names TensorRT puts in the header (CalibrationAlgoType).
CALIBRATORS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")

_INT8_MAX = 127.0
_HEADER_RE = re.compile(r"^TRT-(\d+)-([A-Za-z0-9_]+)$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{1,8}$")


def parse_trt_version(version: str) -> tuple[int, int, int]:
    """``"8.5.2.2"`` -> (8, 5, 2); missing parts are 0."""
    match = re.match(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(version))
    if not match:
        raise UadcError(f"cannot read TensorRT version {version!r}; expected e.g. '8.5.2' or '10.3'")
    major, minor, patch = (int(part) if part is not None else 0 for part in match.groups())
    return major, minor, patch


def trt_version_code(version: str) -> int:
    """``"8.5.1"`` -> 8501, ``"10.3.0"`` -> 100300 (NV_TENSORRT_VERSION encoding)."""
    major, minor, patch = parse_trt_version(version)
    if minor > 99 or patch > 99:
        raise UadcError(f"TensorRT version {version!r}: minor and patch must be below 100")
    if major >= 10:
        return major * 10000 + minor * 100 + patch
    if minor > 9:
        raise UadcError(f"TensorRT version {version!r}: TensorRT < 10 has single-digit minor versions")
    return major * 1000 + minor * 100 + patch


def cache_header(trt_version: str = "8.5.0", calibrator: str = "EntropyCalibration2") -> str:
    """The first line of a calibration cache, without the newline."""
    if calibrator not in CALIBRATORS:
        raise UadcError(f"unknown TensorRT calibrator {calibrator!r}; expected one of {', '.join(CALIBRATORS)}")
    return f"TRT-{trt_version_code(trt_version)}-{calibrator}"


def write_calibration_cache(
    path: str | os.PathLike,
    amax: dict[str, float],
    trt_version: str = "8.5.0",
    calibrator: str = "EntropyCalibration2",
) -> None:
    """Write per-tensor activation ranges (amax) as a TensorRT calibration cache.

    TensorRT stores the scale (amax / 127), not amax. The file is written
    atomically so a half-written cache never reaches a device.
    """
    if not amax:
        raise UadcError("calibration cache needs at least one tensor range")
    lines = [cache_header(trt_version, calibrator)]
    for name, value in amax.items():
        _check_name(name)
        _check_amax(name, value)
        lines.append(f"{name}: {_scale_to_hex(float(value) / _INT8_MAX)}")
    atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode("utf-8"))


def read_calibration_header(path: str | os.PathLike) -> tuple[int, str]:
    """Return ``(version code, calibrator name)`` from a cache's first line."""
    header, _ = _split_cache(Path(path))
    return header


def read_calibration_cache(path: str | os.PathLike) -> dict[str, float]:
    """Read a calibration cache and return amax (scale * 127) per tensor."""
    path = Path(path)
    _, entries = _split_cache(path)
    amax: dict[str, float] = {}
    for lineno, line in entries:
        name, scale = _parse_entry(path, lineno, line)
        if name in amax:
            raise UadcError(f"{path}:{lineno}: tensor {name!r} appears twice in the calibration cache")
        amax[name] = scale * _INT8_MAX
    return amax


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or "\n" in name or "\r" in name:
        raise UadcError(f"invalid tensor name for a calibration cache: {name!r}")
    if name != name.strip():
        raise UadcError(f"tensor name {name!r} has leading/trailing spaces, which TensorRT would not match")


def _check_amax(name: str, value: float) -> None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UadcError(f"amax for {name!r} is not a number: {value!r}") from None
    if not math.isfinite(number) or number <= 0.0:
        raise UadcError(f"amax for {name!r} must be a finite positive number, got {value!r}")
    try:
        struct.pack(">f", number / _INT8_MAX)
    except OverflowError:
        raise UadcError(f"amax for {name!r} ({value!r}) does not fit a float32 scale") from None


def _scale_to_hex(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def _split_cache(path: Path) -> tuple[tuple[int, str], list[tuple[int, str]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UadcError(f"calibration cache not found: {path}") from None
    except UnicodeDecodeError:
        raise UadcError(f"{path} is not a text calibration cache (not UTF-8)") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)]
    lines = [(number, line) for number, line in lines if line]
    if not lines:
        raise UadcError(f"{path}: empty calibration cache")
    first_line, header = lines[0]
    match = _HEADER_RE.match(header)
    if not match:
        raise UadcError(
            f"{path}:{first_line}: bad calibration cache header {header!r}; "
            "expected 'TRT-<version code>-<calibrator>', e.g. 'TRT-8501-EntropyCalibration2'"
        )
    return (int(match.group(1)), match.group(2)), lines[1:]


def _parse_entry(path: Path, lineno: int, line: str) -> tuple[str, float]:
    name, sep, value = line.rpartition(":")
    name, value = name.strip(), value.strip()
    if not sep or not name or not _HEX_RE.match(value):
        raise UadcError(f"{path}:{lineno}: expected '<tensor name>: <8 hex digits>', got {line!r}")
    scale = struct.unpack(">f", bytes.fromhex(value.rjust(8, "0")))[0]
    if not math.isfinite(scale) or scale < 0.0:
        raise UadcError(f"{path}:{lineno}: scale for {name!r} is {scale!r}; TensorRT scales are finite and >= 0")
    return name, scale
