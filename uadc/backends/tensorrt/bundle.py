"""trtexec commands, build_engine.sh and the device README of a TensorRT bundle."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Sequence

import onnx

from uadc.core.constants import ENGINE_SOURCE_SUFFIX
from uadc.core.io import atomic_write_bytes
from uadc.backends.tensorrt.cache import (
    parse_trt_version,
)
from uadc.core.errors import UadcError

from uadc.backends.tensorrt.plan import BuildSettings, IMAGE_INPUT, MIN_TRT, plan_build  # noqa: F401
from uadc.backends.tensorrt.build import has_qdq, is_fp16_model
from uadc.backends.tensorrt.plan import check_input_shape

# --------------------------------------------------------------------------- trtexec and device bundle


def trtexec_command(
    onnx_name: str,
    settings: BuildSettings,
    input_shape: Sequence[int],
    engine_name: str = "model.engine",
    calib_cache: str | None = None,
    trt_version: str = "8.5",
    fp16_model: bool = False,
) -> str:
    """The ``trtexec`` command line that builds the same engine on a device with ``trt_version``.

    Without ``calib_cache`` an INT8 build assumes the model carries Q/DQ nodes.
    """
    args = _trtexec_args(onnx_name, settings, input_shape, engine_name, calib_cache, trt_version, fp16_model)
    return shlex.join(["trtexec", *args])


def _trtexec_args(
    onnx_name: str,
    settings: BuildSettings,
    input_shape: Sequence[int],
    engine_name: str,
    calib_cache: str | None,
    trt_version: str,
    fp16_model: bool,
) -> list[str]:
    calibration = calib_cache is not None
    plan = plan_build(
        settings,
        trt_version,
        has_qdq=settings.precision == "int8" and not calibration,
        fp16_model=fp16_model,
        calibration=calibration,
    )
    shapes = {key: "x".join(str(d) for d in dims) for key, dims in settings.batch_shapes(input_shape).items()}
    args = [
        f"--onnx={onnx_name}",
        f"--saveEngine={engine_name}",
        f"--minShapes={IMAGE_INPUT}:{shapes['min']}",
        f"--optShapes={IMAGE_INPUT}:{shapes['opt']}",
        f"--maxShapes={IMAGE_INPUT}:{shapes['max']}",
        # poolfmt is pool:sizeInMiB in 8.4/8.5; later versions also take unit suffixes and default to MiB.
        f"--memPoolSize=workspace:{settings.workspace_mb}",
    ]
    args += [flag for name, flag in (("FP16", "--fp16"), ("INT8", "--int8")) if name in plan.builder_flags]
    if "TF32" in plan.cleared_flags:
        args.append("--noTF32")
    if plan.strongly_typed and plan.major < 11:
        args.append("--stronglyTyped")  # TensorRT 11 is always strongly typed
    if plan.fp32_layers:  # precision auto (trtexec >= 8.2 takes both)
        args += ["--precisionConstraints=obey", "--layerPrecisions=" + ",".join(f"{n}:fp32" for n in plan.fp32_layers)]
    if calibration:
        args += [f"--calib={device_cache(calib_cache)}", f"--optShapesCalib={IMAGE_INPUT}:{shapes['opt']}"]
    if settings.dla_core is not None:
        args.append(f"--useDLACore={settings.dla_core}")
        if "GPU_FALLBACK" in plan.builder_flags:
            args.append("--allowGPUFallback")
    if settings.timing_cache is not None:
        args.append(f"--timingCacheFile={settings.timing_cache}")
    if settings.builder_optimization_level is not None:
        args.append(f"--builderOptimizationLevel={settings.builder_optimization_level}")
    return args


def write_build_script(
    out_dir: str | os.PathLike,
    onnx_name: str,
    settings: BuildSettings,
    input_shape: Sequence[int],
    calib_cache: str | None = None,
    min_trt_version: str = "8.5",
    engine_name: str = "model.engine",
    precision_note: str | None = None,
) -> Path:
    """Write ``build_engine.sh`` and a device ``README.md`` into ``out_dir``; returns the script path.

    The script reads the TensorRT version from trtexec on the device and runs
    the command for that major version (8.x, 10.x or 11+), refusing versions
    below ``min_trt_version``. ``onnx_name`` and ``calib_cache`` are paths
    relative to ``out_dir``. ``precision_note`` is added to the README's
    precision section (e.g. the measured accuracy impact).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chw = check_input_shape(input_shape)
    min_version = parse_trt_version(min_trt_version)
    if min_version[:2] < MIN_TRT:
        raise UadcError(f"min_trt_version {min_trt_version} is too old; uadc needs TensorRT >= 8.4")
    model = _bundle_model(out_dir / onnx_name)
    if model is not None and settings.precision == "int8" and calib_cache is None and not has_qdq(model):
        # trtexec --int8 without Q/DQ or a cache silently uses placeholder ranges (for benchmarking only).
        raise UadcError(f"{onnx_name} has no Q/DQ nodes: INT8 needs a Q/DQ model or a calibration cache")
    fp16_model = model is not None and is_fp16_model(model)
    variants = _script_variants(onnx_name, settings, chw, engine_name, calib_cache, min_trt_version, fp16_model)
    script = out_dir / "build_engine.sh"
    text = _render_script(onnx_name, engine_name, calib_cache, min_version, variants)
    atomic_write_bytes(script, text.encode("utf-8"), executable=True)
    readme = _render_readme(
        onnx_name, engine_name, settings, chw, calib_cache, min_trt_version, variants, precision_note,
        _io_text(model, chw, settings)
    )
    atomic_write_bytes(out_dir / "README.md", readme.encode("utf-8"))
    return script


def _io_text(model: onnx.ModelProto | None, chw: tuple[int, ...], settings: BuildSettings) -> str:
    """The engine's inputs and outputs as the bundle's model has them (the README named two outputs of
    every model, also of one with in-graph post-processing)."""
    text = (f"Input `{IMAGE_INPUT}`: float32 (N, {chw[0]}, {chw[1]}, {chw[2]}), preprocessed exactly as for the ONNX "
            f"model, with {settings.min_batch} <= N <= {settings.max_batch} (fastest at N = {settings.opt_batch}). ")
    if model is None:
        return text + "Outputs: those `artifact.json` lists (`anomaly_map` (N, 1, H, W) and `score` (N), at least)."
    types = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.BOOL: "bool", onnx.TensorProto.INT64: "int64",
             onnx.TensorProto.FLOAT16: "float16"}

    def shape(v: onnx.ValueInfoProto) -> str:
        dims = [d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim]
        return f"{types.get(v.type.tensor_type.elem_type, 'tensor')} ({', '.join(dims)})"
    outputs = ", ".join(f"`{o.name}` {shape(o)}" for o in model.graph.output)
    text += f"Outputs: {outputs}."
    defaults = {i.name for i in model.graph.initializer} & {i.name for i in model.graph.input}
    if defaults:   # onnx-tensorrt imports an input that has an initializer as that constant
        text += (f" The model's input{'s' if len(defaults) > 1 else ''} {', '.join(f'`{n}`' for n in sorted(defaults))} "
                 f"{'have defaults' if len(defaults) > 1 else 'has a default'} (in-graph post-processing's category: "
                 f"the global thresholds), which TensorRT's ONNX parser builds in as a constant: the engine's "
                 f"`pred_*` outputs are the global decision. For one category's, compare `score` and `anomaly_map` "
                 f"with its thresholds in `artifact.json` (`thresholds.categories`), as `uadc predict` does.")
    return text


def _bundle_model(path: Path) -> onnx.ModelProto | None:
    """The bundle's ONNX graph when it is already there (checks need it; the script can be written first)."""
    if not path.is_file():
        return None
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:
        return None


def _script_variants(
    onnx_name: str,
    settings: BuildSettings,
    chw: tuple[int, ...],
    engine_name: str,
    calib_cache: str | None,
    min_trt_version: str,
    fp16_model: bool,
) -> dict[int, list[str] | str]:
    """trtexec arguments per TensorRT family (8: below 10, 10: 10.x, 11: 11 on), or why it cannot build.

    The family containing ``min_trt_version`` must work; later families may
    refuse (e.g. TensorRT 11 and a calibration cache) and the script says why.
    """
    min_major = parse_trt_version(min_trt_version)[0]
    families = [(8, min_major < 10), (10, min_major <= 10), (11, True)]
    variants: dict[int, list[str] | str] = {}
    for family, wanted in families:
        if not wanted:
            continue
        first = not variants
        version = min_trt_version if first else f"{family}.0"
        try:
            variants[family] = _trtexec_args(onnx_name, settings, chw, engine_name, calib_cache, version, fp16_model)
        except UadcError as exc:
            if first:
                raise UadcError(f"cannot build this engine with TensorRT {min_trt_version}: {exc}") from exc
            variants[family] = str(exc)
    return variants


def _render_script(
    onnx_name: str,
    engine_name: str,
    calib_cache: str | None,
    min_version: tuple[int, int, int],
    variants: dict[int, list[str] | str],
) -> str:
    q = shlex.quote
    lines = [
        "#!/usr/bin/env bash",
        f"# Builds the TensorRT engine {engine_name} from {onnx_name} on the target device (generated by uadc).",
        "# Engines only run on the GPU model and TensorRT version they were built with, so build on the device.",
        "# Usage: ./build_engine.sh [extra trtexec options]   (TRTEXEC=/path/to/trtexec overrides the lookup)",
        "set -euo pipefail",
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || true)}"',
        'if [[ -n "${TRTEXEC}" && "${TRTEXEC}" != */* ]]; then TRTEXEC="$(command -v -- "${TRTEXEC}" || true)"; fi  # a name on PATH',
        'if [[ "${TRTEXEC}" == */* && "${TRTEXEC}" != /* ]]; then TRTEXEC="${PWD}/${TRTEXEC}"; fi  # the caller\'s ./',
        "# its own folder, always: a folder named -x made dirname fail and `cd \"\"` stay, CDPATH led elsewhere",
        'HERE="$(dirname -- "${BASH_SOURCE[0]}")"',
        'HERE="$(CDPATH="" cd -- "${HERE}" && pwd -P)"',
        'cd -- "${HERE:?cannot enter the folder of build_engine.sh}"',
        "",
        'if [[ -z "${TRTEXEC}" && -x /usr/src/tensorrt/bin/trtexec ]]; then',
        "    TRTEXEC=/usr/src/tensorrt/bin/trtexec  # JetPack installs trtexec here, off PATH",
        "fi",
        'if [[ -z "${TRTEXEC}" || ! -x "${TRTEXEC}" ]]; then',
        '    echo "error: trtexec not found; install TensorRT or set TRTEXEC=/path/to/trtexec" >&2',
        "    exit 1",
        "fi",
    ]
    for name in [onnx_name] + ([calib_cache] if calib_cache else []):
        lines += [
            f"if [[ ! -f {q(name)} ]]; then",
            f"    echo {q(f'error: {name} not found next to build_engine.sh')} >&2",
            "    exit 1",
            "fi",
        ]
    record = q(engine_name + ENGINE_SOURCE_SUFFIX)   # which model.onnx the engine is: the runtime checks it
    lines += _version_lines(min_version) + _dispatch_lines(variants) + _cache_lines(calib_cache) + [   # refusals first
        "",
        f"rm -f -- {q(engine_name)} {record}   # a failed build leaves no engine of the model.onnx before",
        'echo "+ ${cmd[*]} $*"',
        '"${cmd[@]}" "$@"',
        f"sha=\"$( (sha256sum -- {q(onnx_name)} 2>/dev/null || shasum -a 256 -- {q(onnx_name)} 2>/dev/null || true)"
        " | cut -d' ' -f1)\"",
        'if [[ -n "${sha}" ]]; then',
        f'    printf \'%s\\n\' "${{sha}}" > {q(engine_name + ENGINE_SOURCE_SUFFIX + ".tmp")}',
        f"    mv -f -- {q(engine_name + ENGINE_SOURCE_SUFFIX + '.tmp')} {record}",
        "else",
        f"    echo {q(f'warning: neither sha256sum nor shasum here: {record} not written (uadc will warn that nothing records the model.onnx the engine was built from)')} >&2",
        "fi",
        f'echo {q(f"engine written to {engine_name}")}" (TensorRT ${{major}}.${{minor}}.${{patch}}; '
        'only valid on this GPU model and TensorRT version)"',
        "",
    ]
    return "\n".join(lines)


def _version_lines(min_version: tuple[int, int, int]) -> list[str]:
    min_text = f"{min_version[0]}.{min_version[1]}"
    return [
        "",
        "# trtexec's first line reads '&&&& RUNNING TensorRT.trtexec [TensorRT v8502]': NV_TENSORRT_VERSION,",
        "# major*1000+minor*100+patch up to TensorRT 8 (4 digits), major*10000+minor*100+patch later.",
        'banner="$("${TRTEXEC}" --help 2>&1 | head -n 5 || true)"',
        "code=\"$(printf '%s\\n' \"${banner}\" | sed -n 's/.*\\[TensorRT v\\([0-9][0-9]*\\)\\].*/\\1/p' | head -n 1)\"",
        'if [[ -z "${code}" ]]; then',
        '    echo "error: cannot read the TensorRT version from ${TRTEXEC} --help" >&2',
        "    exit 1",
        "fi",
        "if (( code >= 10000 )); then",
        "    major=$(( code / 10000 )); minor=$(( code / 100 % 100 )); patch=$(( code % 100 ))",
        "else",
        "    major=$(( code / 1000 )); minor=$(( code / 100 % 10 )); patch=$(( code % 100 ))",
        "fi",
        'echo "TensorRT version: ${major}.${minor}.${patch} (${TRTEXEC})"',
        f"if (( major * 100 + minor < {min_version[0] * 100 + min_version[1]} )); then",
        f'    echo "error: this bundle needs TensorRT >= {min_text}" >&2',
        "    exit 1",
        "fi",
        "",
    ]


def device_cache(calib_cache: str) -> str:
    """The copy of the calibration cache that build_engine.sh heads with the device's TensorRT version."""
    return f"{calib_cache}.device"


def _cache_lines(calib_cache: str | None) -> list[str]:
    """TensorRT reads a calibration cache whose header names its own version (``TRT-<code>-<calibrator>``);
    one written for 8.5.0 was refused on JetPack 6, which then calibrated on nothing."""
    if not calib_cache:
        return []
    q = shlex.quote
    return [
        "# the cache's first line names the TensorRT version that reads it: this device's",
        f"{{ printf 'TRT-%s-%s\\n' \"${{code}}\" \"$(head -n 1 {q(calib_cache)} | sed 's/^TRT-[0-9]*-//')\"; "
        f"tail -n +2 {q(calib_cache)}; }} > {q(device_cache(calib_cache))}",
        "",
    ]


def _dispatch_lines(variants: dict[int, list[str] | str]) -> list[str]:
    families = sorted(variants, reverse=True)  # 11, 10, 8: newest first, the oldest is the fallback
    lines = []
    for position, major in enumerate(families):
        if position == 0:
            lines.append(f"if (( major >= {major} )); then" if len(families) > 1 else "if true; then")
        elif position < len(families) - 1:
            lines.append(f"elif (( major >= {major} )); then")
        else:
            lines.append("else")
        variant = variants[major]
        if isinstance(variant, str):
            message = f"error: TensorRT {major}.x cannot build this engine: {variant}"
            lines += [f"    echo {shlex.quote(message)} >&2", "    exit 3"]
        else:
            lines.append('    cmd=("${TRTEXEC}" ' + " ".join(shlex.quote(a) for a in variant) + ")")
    lines.append("fi")
    return lines


def _render_readme(
    onnx_name: str,
    engine_name: str,
    settings: BuildSettings,
    chw: tuple[int, ...],
    calib_cache: str | None,
    min_trt_version: str,
    variants: dict[int, list[str] | str],
    precision_note: str | None,
    io_text: str = "",
) -> str:
    shapes = settings.batch_shapes(chw)
    opt = "x".join(str(d) for d in shapes["opt"])
    commands = []
    for major in sorted(variants):
        variant = variants[major]
        label = "TensorRT 8.x" if major == 8 else f"TensorRT {major}.x" + (" and later" if major == 11 else "")
        body = f"not possible: {variant}" if isinstance(variant, str) else f"`{shlex.join(['trtexec', *variant])}`"
        commands.append(f"- {label}: {body}")
    sections = [
        "# TensorRT engine for the anomaly detector",
        "",
        f"Files: `{onnx_name}` (the model), `build_engine.sh` (builds `{engine_name}`)"
        + (f", `{calib_cache}` (INT8 calibration cache)" if calib_cache else "")
        + ".",
        "",
        "## Build on the device",
        "",
        "```bash",
        "./build_engine.sh            # extra trtexec options are passed through, e.g. --verbose",
        "```",
        "",
        f"The script finds `trtexec` (PATH, then `/usr/src/tensorrt/bin/trtexec` as on JetPack), prints the "
        f"TensorRT version, refuses TensorRT older than {min_trt_version}, and runs the command for that version:",
        "",
        *commands,
        "",
        "## Run",
        "",
        io_text,
        "",
        "```bash",
        f"trtexec --loadEngine={engine_name} --shapes={IMAGE_INPUT}:{opt}   # latency/throughput benchmark",
        "```",
        "",
        "```python",
        "from polygraphy.backend.common import BytesFromPath",
        "from polygraphy.backend.trt import EngineFromBytes, TrtRunner",
        "",
        f'with TrtRunner(EngineFromBytes(BytesFromPath("{engine_name}"))) as runner:',
        f'    out = runner.infer({{"{IMAGE_INPUT}": images}})  # images: np.float32 array',
        '    anomaly_map, score = out["anomaly_map"], out["score"]',
        "```",
        "",
        "## Precision",
        "",
        _precision_text(settings, calib_cache),
    ]
    if precision_note:
        sections += ["", precision_note]
    sections += [
        "",
        "## Engines are not portable",
        "",
        f"`{engine_name}` only runs on the GPU model (compute capability; on Jetson the module, e.g. Orin NX vs "
        "AGX Orin) and the exact TensorRT version it was built with. Build it on the device itself, and rebuild "
        "after a JetPack or TensorRT upgrade; do not copy engines between machines. The ONNX model is the "
        "portable artifact.",
    ]
    if settings.timing_cache is not None:
        sections += [
            "",
            f"`{settings.timing_cache}` caches kernel timings so rebuilds on the same device are faster; it is "
            "tied to the device and TensorRT version in the same way.",
        ]
    return "\n".join(sections) + "\n"


def _precision_text(settings: BuildSettings, calib_cache: str | None) -> str:
    texts = {
        "fp32": "FP32: full IEEE FP32 math (TF32 switched off with `--noTF32`), the accuracy reference; slowest.",
        "fp16": "FP16: about twice the FP32 throughput on Tensor Cores with anomaly maps close to FP32; "
        "validate scores against the ONNX model before deploying.",
        "int8": "INT8, explicit quantization: the model carries QuantizeLinear/DequantizeLinear nodes whose "
        "scales were calibrated before export, and TensorRT follows them exactly. Layers outside Q/DQ pairs "
        "keep the model's float type where the network is strongly typed (`--stronglyTyped` on TensorRT 10.x; "
        "TensorRT 11 is always strongly typed) "
        "and may run in FP16 where `--fp16` is set.",
    }
    text = texts[settings.precision]
    if calib_cache:
        text = (
            f"INT8, implicit quantization from the calibration cache `{calib_cache}` (TensorRT 8.5 and 10.x only; "
            "TensorRT 11 removed calibration). TensorRT picks INT8 where it is faster and FP16/FP32 elsewhere."
        )
    if settings.dla_core is not None:
        fallback = "layers DLA cannot run fall back to the GPU" if settings.gpu_fallback else "no GPU fallback"
        text += f" Runs on DLA core {settings.dla_core} ({fallback}); DLA supports FP16 and INT8 only."
        if settings.min_batch != settings.max_batch:
            text += " DLA is meant for static shapes; a fixed batch (min = opt = max) keeps more layers on it."
    return text
