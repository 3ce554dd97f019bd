"""``uadc doctor``: what uadc sees on this machine and what each target can do here.

Per target, one of:
- ``run``: the target's own runtime is here; compile measures accuracy and latency on it.
- ``emulate``: a stand-in runs here (a Jetson target's engine built on this machine's GPU); the
  engine for the device itself must be built on the device.
- ``bundle only``: the target's runtime is absent; ``uadc compile`` writes the device bundle
  (model.onnx, build_engine.sh, ...) and predicts INT8 accuracy with ONNX Runtime running the
  same Q/DQ model (``emulated_int8`` in report.json); no engine, no target latency.
- ``unavailable``: a package is missing or does not import (the detail names it and why).

Versions come from package metadata, CPU features from /proc/cpuinfo, TensorRT/GPU presence from
the TensorRT backend's own check; the packages every compile needs (``COMPILE_NEEDS``) are imported,
and OpenVINO in a child process, as metadata alone says "installed" of a broken install.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from uadc import __version__
from uadc.backends.openvino import import_error as ov_import_error, precision_here
from uadc.backends.tensorrt.plan import cuda_device_count, trt_available
from uadc.config.targets import TARGETS, Target
from uadc.core.io import JsonResult
from uadc.core.scoped import process_state_kept

PACKAGES = {"torch": ("torch",), "onnx": ("onnx",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
            "polygraphy": ("polygraphy",), "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11"),
            "openvino": ("openvino",)}
# /proc/cpuinfo flag -> name: the ones that decide INT8 / bf16 speed, on x86 ("flags") and on Arm ("Features")
CPU_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
                "amx_tile": "AMX", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16", "avx512_bf16": "AVX-512 BF16"}
ARM_FEATURES = {"asimddp": "dot product", "i8mm": "I8MM", "bf16": "BF16", "sve": "SVE"}
INT8_FEATURES = ("AVX-512 VNNI", "AVX-VNNI", "AMX-INT8", "dot product", "I8MM")
BF16_FEATURES = ("AMX-BF16", "AVX-512 BF16", "BF16")
# modules every compile imports besides the backends': metadata alone says "installed" of a broken install
COMPILE_NEEDS = ("torch", "onnx", "onnxruntime", "polygraphy.backend.onnxrt", "PIL", "filelock", "onnxsim", "sklearn")


@dataclass
class TargetSupport:
    """Whether this machine can run one target, emulate it (another runtime on the CPU), only bundle it, or not."""

    target: str
    runtime: str
    precision: str
    can: str            # run | emulate | bundle only | unavailable
    detail: str


@dataclass
class DoctorReport(JsonResult):
    uadc: str
    python: str
    platform: str
    versions: dict[str, str | None]          # None: not installed
    cpu: str
    cpu_features: dict[str, bool | None]     # None: unknown (no /proc/cpuinfo)
    cores: int
    threads: dict[str, int | str | None]
    gpu: str | None                          # None: no CUDA GPU visible
    tensorrt: str | None                     # None: engines cannot be built here
    tensorrt_reason: str
    onnxruntime_providers: list[str]
    targets: list[TargetSupport] = field(default_factory=list)
    not_importing: list[str] = field(default_factory=list)   # installed (a version), yet it does not import

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        v = ", ".join(f"{k} {ver or 'not installed'}" + (" (does not import)" if k in self.not_importing else "")
                      for k, ver in self.versions.items())
        feats = ", ".join(f"{k} {'yes' if on else 'no' if on is not None else '?'}"
                          for k, on in self.cpu_features.items())
        t = self.threads
        lines = [f"uadc {self.uadc}, Python {self.python}, {self.platform}", f"versions: {v}",
                 f"CPU: {self.cpu}; {self.cores} cores", f"CPU features for INT8: {feats}",
                 f"threads: torch {t['torch'] if t['torch'] is not None else 'not installed'}, usable cores {t['affinity']}, OMP_NUM_THREADS "
                 f"{t['omp_num_threads'] or 'unset'}",
                 f"GPU: {self.gpu or 'none'}",
                 f"TensorRT: {self.tensorrt or 'no'} ({self.tensorrt_reason})",
                 f"ONNX Runtime providers: {', '.join(self.onnxruntime_providers) or 'none'}",
                 "targets:"]
        width = max(len(s.target) for s in self.targets) if self.targets else 0
        lines += [f"  {s.target:<{width}}  {s.can:<11}  {s.detail}" for s in self.targets]
        return "\n".join(lines)


def doctor() -> DoctorReport:
    """What uadc sees on this machine (``uadc doctor``): versions, CPU INT8 features, threads,
    GPU / TensorRT, and per target whether it runs here, is emulated, or can only be bundled."""
    with process_state_kept():   # its imports' environment variables, warning filters and draws (torch may not import)
        return _doctor()


def _doctor() -> DoctorReport:
    versions = {name: _version(dists) for name, dists in PACKAGES.items()}
    table, flags = _cpu_flags()
    features = {label: (flag in flags if flags is not None else None) for flag, label in table.items()}
    trt_ok, trt_reason = trt_available()
    gpu = _gpu()
    # the one that imports (trt_available imported it): a tarball's or PYTHONPATH's TensorRT has no package metadata
    versions["tensorrt"] = getattr(sys.modules.get("tensorrt"), "__version__", None) or versions["tensorrt"]
    report = DoctorReport(
        uadc=__version__, python=platform.python_version(), platform=platform.platform(), versions=versions,
        cpu=_cpu_model(), cpu_features=features, cores=os.cpu_count() or 1, threads=_threads(),
        gpu=gpu, tensorrt=versions["tensorrt"] if trt_ok else None,
        tensorrt_reason=trt_reason or "found", onnxruntime_providers=_ort_providers())
    broken = _compile_blocker()
    ov, bf16 = _openvino_check() if versions["openvino"] else ("OpenVINO not installed: pip install 'uadc[openvino]'",
                                                                None)
    report.targets = [TargetSupport(t.name, t.runtime, t.precision, "unavailable", broken) if broken else
                      _support(t, report, trt_ok, ov, bf16) for t in TARGETS.values()]
    # the versions line named a broken install's version as if it worked (its targets said otherwise)
    report.not_importing = [n for n in ("torch", "onnx", "onnxruntime", "polygraphy") if versions[n] and not _imports(n)]
    report.not_importing += ["openvino"] if versions["openvino"] and ov is not None else []
    return report


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - ImportError, or OSError for a missing shared library
        return False


_OV_CHECK = ("import sys\nsys.path[:] = [p for p in sys.path if p]\n"   # not the current folder: an openvino.py there ran
             "from uadc.backends.openvino import import_error, precision_here\n"
             "why = import_error()\nprint(why or '', precision_here('bf16') if why is None else '', sep='\\n', end='')")


def _openvino_check() -> tuple[str | None, str | None]:
    """(why the installed OpenVINO does not import, or None; the precision it computes in when asked for
    bf16), found by a child process unless this one imported it already: ``import openvino`` starts
    OpenVINO's telemetry, whose thread outlived the call."""
    if "openvino" in sys.modules:
        why = ov_import_error()
        return why, None if why else precision_here("bf16")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}   # this process's uadc
    try:
        done = subprocess.run([sys.executable, "-c", _OV_CHECK], capture_output=True, text=True, timeout=300, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"OpenVINO's import could not be checked: {exc}", None
    if done.returncode:   # a broken shared library may end the process rather than raise
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"OpenVINO does not import here: the import ended with exit code {done.returncode} ({last[:200]})", None
    why, _, used = done.stdout.partition("\n")
    return why.strip() or None, used.strip() or None


def _compile_blocker() -> str | None:
    """Why no target compiles here: a package every compile imports that does not import (its
    metadata alone said "installed"), or None."""
    for name in COMPILE_NEEDS:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - ImportError, or OSError for a missing shared library
            return f"{name.split('.')[0]} does not import here ({type(exc).__name__}: {exc}); every compile needs it"
    return None


def _support(t: Target, r: DoctorReport, trt_ok: bool, ov_error: str | None, bf16: str | None = None
             ) -> TargetSupport:
    def out(can: str, detail: str) -> TargetSupport:
        return TargetSupport(t.name, t.runtime, t.precision, can, detail)

    if t.runtime == "onnxruntime":
        if r.versions["onnxruntime"] is None:
            return out("unavailable", "onnxruntime not installed")
        return out("run", "ONNX Runtime CPU" + (_int8_note(r) if t.quantized else ""))
    if t.runtime == "openvino":
        if ov_error is not None:   # not installed, or installed yet broken: say why
            return out("unavailable", ov_error)
        if t.float_precision == "bf16" and bf16 not in (None, "bf16"):   # compile refuses it here
            return out("unavailable", f"OpenVINO computes in {bf16} on this CPU when asked for bf16")
        note = _bf16_note(r) if t.float_precision == "bf16" else ""
        return out("run", "OpenVINO CPU" + (_int8_note(r) if t.quantized else "") + note)
    if t.runtime == "tensorrt":
        if trt_ok and (t.device != "jetson" or _is_jetson()):
            return out("run", f"TensorRT {r.versions['tensorrt']} on {r.gpu or 'the GPU'}: --build-engine builds it")
        if trt_ok:
            return out("emulate", "TensorRT engine built on this GPU stands in; build the device's engine on "
                                  "the Jetson with the bundle's build_engine.sh")
        acc = "; INT8 accuracy emulated by ONNX Runtime" if t.quantized else ""
        return out("bundle only", f"writes model.onnx + build_engine.sh for the device{acc} "
                                  f"({'no TensorRT' if r.versions['tensorrt'] is None else 'TensorRT unusable'}, "
                                  f"{'no GPU' if r.gpu is None else r.gpu})")
    return out("unavailable", f"unknown runtime {t.runtime!r}")


def _is_jetson() -> bool:
    """A Jetson (L4T), not any Arm machine with a GPU (a Grace Hopper server's engines are not a Jetson's)."""
    try:
        model = Path("/proc/device-tree/model").read_bytes().decode("utf-8", "replace")
    except OSError:
        model = ""
    return Path("/etc/nv_tegra_release").is_file() or "jetson" in model.lower()


def _int8_note(r: DoctorReport) -> str:
    f = r.cpu_features
    if set(f.values()) == {None}:
        return "; CPU INT8 features unknown"
    have = [k for k in INT8_FEATURES if f.get(k)]
    if have:
        return "; CPU INT8 instructions: " + ", ".join(have)
    if "dot product" in f:   # Arm: no x86 u8 x s8 pair sums, so nothing saturates
        return "; no dot product / I8MM: INT8 may not be faster than FP32 on this CPU"
    return ("; no VNNI/AMX: INT8 may not be faster than FP32 on this CPU, and artifacts with 8-bit weights "
            "(compile.reduce_range: false, or compiled before uadc's 7-bit default) saturate here: other scores")


def _bf16_note(r: DoctorReport) -> str:
    f = r.cpu_features
    if set(f.values()) == {None}:
        return "; CPU bf16 features unknown"
    have = [k for k in BF16_FEATURES if f.get(k)]
    if have:
        return "; CPU bf16 instructions: " + ", ".join(have)
    return f"; no {' / '.join(k for k in BF16_FEATURES if k in f)}: OpenVINO emulates bf16 here (slower)"


def _version(dists: tuple[str, ...]) -> str | None:
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []


def _cpu_model() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_flags() -> tuple[dict[str, str], set[str] | None]:
    """The feature table of this CPU's kind and its flags (None: unknown)."""
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):   # x86 / Arm
            return (CPU_FEATURES if line.startswith("flags") else ARM_FEATURES), set(line.split(":", 1)[1].split())
    return (ARM_FEATURES if platform.machine() in ("aarch64", "arm64") else CPU_FEATURES), None


def _torch() -> Any:
    try:
        import torch
    except Exception:  # noqa: BLE001 - not importable: the targets say so (_compile_blocker)
        return None
    return torch


def _threads() -> dict[str, int | str | None]:
    torch = _torch()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"torch": torch.get_num_threads() if torch else None, "affinity": affinity,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def _gpu() -> str | None:
    torch = _torch()
    if torch is not None and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} CUDA device(s): {torch.cuda.get_device_name(0)}"
    n = cuda_device_count()[0]   # a CPU torch sees none where the driver (and TensorRT) sees some
    return f"{n} CUDA device(s)" if n > 0 else None


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except Exception:  # noqa: BLE001 - OSError for a missing shared library: the targets say why
        return []
    return list(onnxruntime.get_available_providers())


__all__ = ["DoctorReport", "TargetSupport", "doctor"]
