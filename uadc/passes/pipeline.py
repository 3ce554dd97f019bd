"""The compile pass pipeline: named ``(model, ctx) -> model`` functions run in order.

Every node of a uadc graph belongs to a partition (``teacher``, ``student``, ``head``), recorded
twice: as the node-name prefix (``student/node_Conv_3``) and as node metadata ``uadc.partition``.
Tools that rebuild nodes (onnxsim, onnxslim, ORT's quantizer, the float16 converter) drop the
metadata or add untagged nodes, so the passes restore tags by name and ``partition_check``
re-derives the rest from the graph: name prefix, else producers, else consumers. Q/DQ nodes go
to the quantized partition they serve (a Q/DQ pair between a teacher output and a student Conv
is the student's input quantization).

Passes:
  shape_inference  onnx shape inference (non-strict)
  simplify         onnxsim, falling back to onnxslim; numerics checked with onnxruntime
  partition_check  every node gets exactly one partition, name prefix == metadata
  qdq              Q/DQ insertion by ONNX Runtime's QDQQuantizer with *our* calibrated ranges,
                   restricted to ``ctx.quantize_partitions``
  fp16             float16 weights/compute, float32 graph I/O
  knn_bank         the image kNN's bank re-described by the quantized teacher (uadc.passes.knn)
  cleanup          drop dead nodes/initializers, topological order, onnx checker
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from uadc.config.recipe import Recipe
from uadc.config.targets import Target
from uadc.core.errors import UadcError, raise_interrupt_behind
from uadc.core.manifest import check_outside_artifacts
from uadc.core.io import is_marker, replaced_dir
from uadc.core.ort_session import make_session
from uadc.core.scoped import native_stderr_logged, quiet_third_party
from uadc.data.sources import check_outside_data
from uadc.export.partitions import (
    assign_partitions, meta_partition, partition_of, prefix_partition, set_partition,
)

log = logging.getLogger(__name__)
#: numerics gate for float-preserving passes: max |a - b| <= NUMERIC_RTOL * max(1, max |ref|)
NUMERIC_RTOL = 1e-4


@dataclass
class PassContext:
    target: Target
    ranges: dict[str, tuple[float, float]] | None = None
    quantize_partitions: list[str] = field(default_factory=lambda: ["student"])
    sample_feeds: dict[str, np.ndarray] | None = None
    dump_dir: Path | None = None
    per_channel: bool | None = None   # overrides target.scheme.per_channel when set
    reduce_range: bool | None = None  # overrides target.scheme.weight_reduce_range when set
    #: tensor -> (scale, zero_point) used as-is (ORT TensorQuantOverrides), e.g. QAT's learned scales
    quant_params: dict[str, tuple[float, int]] | None = None
    #: weight -> its ORT TensorQuantOverrides entries, read off an earlier Q/DQ of the same model with the
    #: same scheme and ranges (``qdq.weight_quant_params``): the numbers ORT would compute, without its
    #: per-channel loop (the precision search quantizes dozens of candidates)
    weight_params: dict[str, list[dict]] | None = None
    #: ORT's integer weights by (weight, scale, zero point), shared by the candidates of one search so that
    #: ORT's per-channel Python loop quantizes each weight once (``qdq.reusing_quantized_weights``); None: off
    weight_memo: dict | None = None
    #: quantize only these nodes of ``quantize_partitions`` (``compile.precision: auto``); None: all of them
    quantize_nodes: list[str] | None = None
    #: the training images of the image kNN's bank, in bank order (``knn_bank``); called only when needed
    bank_images: Callable[[], np.ndarray] | None = None
    #: ``(sub-graph, feeds) -> output`` on the target's runtime (``knn_bank``); None: ONNX Runtime
    bank_runner: Callable[[onnx.ModelProto, dict[str, np.ndarray]], np.ndarray] | None = None
    #: describe only these bank images (indices; ``knn_bank`` shrinks the bank to them): the precision
    #: search's probes, which score a few images (``knn.bank_neighbours``); None: the whole bank
    bank_subset: np.ndarray | None = None


Pass = Callable[[onnx.ModelProto, PassContext], onnx.ModelProto]
PASSES: dict[str, Pass] = {}


def register_pass(name: str) -> Callable[[Pass], Pass]:
    def deco(fn: Pass) -> Pass:
        PASSES[name] = fn
        return fn
    return deco


# --------------------------------------------------------------------------------- graph utils

def apply_ir_passes(model: onnx.ModelProto, passes: list) -> onnx.ModelProto:
    """Run ``onnx_ir`` passes on a copy of ``model`` (node names, metadata and tags survive the
    round trip); a graph they cannot process is a UadcError."""
    import onnx_ir as ir

    try:
        result = ir.passes.PassManager(passes)(ir.serde.deserialize_model(model))
        return ir.serde.serialize_model(result.model)
    except Exception as exc:
        raise_interrupt_behind(exc)
        raise UadcError(f"graph rewrite failed ({', '.join(type(p).__name__ for p in passes)}): {exc}") from None


def topological_sort(model: onnx.ModelProto) -> None:
    """Sort nodes in place (onnx_ir's TopologicalSortPass)."""
    from onnx_ir.passes.common import TopologicalSortPass

    model.CopyFrom(apply_ir_passes(model, [TopologicalSortPass()]))


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# ----------------------------------------------------------------------------------- numerics

def default_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Random N(0,1) inputs (symbolic dims -> 2) for a numeric check when no sample is given."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 2 for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[vi.name] = (rng.standard_normal(shape) if np.issubdtype(dtype, np.floating)
                          else np.zeros(shape)).astype(dtype)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
            outputs: list[str] | None = None, optimize: bool = False) -> list[np.ndarray]:
    """Run ``model`` on the CPU EP (graph optimisations off unless ``optimize``)."""
    return make_session(model, optimize=optimize).run(outputs, feeds)


def check_numerics(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray],
                   what: str = "pass", rtol: float = NUMERIC_RTOL) -> float:
    """Raise UadcError if ``candidate``'s outputs differ from ``reference``'s beyond float noise
    (max |diff| > rtol * max(1, max |ref|), per output). Returns the worst relative error."""
    names = [o.name for o in reference.graph.output]
    ref = run_ort(reference, feeds, names)
    try:
        new = run_ort(candidate, feeds, names)
    except Exception as exc:
        raise UadcError(f"{what}: the transformed model no longer runs in onnxruntime: {exc}") from None
    worst = 0.0
    for name, a, b in zip(names, ref, new):
        if a.shape != b.shape:
            raise UadcError(f"{what}: output {name!r} changed shape {a.shape} -> {b.shape}")
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        if not np.array_equal(np.isnan(a64), np.isnan(b64)):
            raise UadcError(f"{what}: output {name!r} changed where it is NaN")
        finite = ~np.isnan(a64)
        scale = max(1.0, float(np.abs(a64[finite]).max(initial=0.0)))
        err = float(np.abs(a64[finite] - b64[finite]).max(initial=0.0)) / scale
        worst = max(worst, err)
        if err > rtol:
            raise UadcError(f"{what} changed numerics beyond float noise: output {name!r} "
                            f"max |diff| = {err * scale:.3g} (allowed {rtol * scale:.3g})")
    return worst


def _feeds(model: onnx.ModelProto, ctx: PassContext) -> dict[str, np.ndarray]:
    return ctx.sample_feeds if ctx.sample_feeds is not None else default_feeds(model)


# ------------------------------------------------------------------------------------- passes

@register_pass("shape_inference")
def shape_inference(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """ONNX shape inference, non-strict (an op it cannot infer keeps its unknown shape)."""
    return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)


def _restore_tags(model: onnx.ModelProto, before: onnx.ModelProto) -> None:
    """Simplifiers keep node names but drop node metadata: re-attach tags by name, and keep
    the model-level metadata the exporter wrote."""
    tags = {n.name: partition_of(n) for n in before.graph.node}
    for n in model.graph.node:
        p = meta_partition(n) or tags.get(n.name) or prefix_partition(n)
        if p:
            set_partition(n, p)
    have = {p.key for p in model.metadata_props}
    for p in before.metadata_props:
        if p.key not in have:
            model.metadata_props.add(key=p.key, value=p.value)


def _onnxsim(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    import onnxsim

    kwargs = {"check_n": 1, "input_data": feeds}
    if "certify" in inspect.signature(onnxsim.simplify).parameters:
        kwargs["certify"] = False  # Z3 proofs are slow and we check numerics ourselves
    # it prints its check progress; ONNX Runtime, run inside it, logs a graph it cannot run to fd 2
    with quiet_third_party(), native_stderr_logged():   # this thread's prints (fd 2 only in the CLI's process)
        out, ok = onnxsim.simplify(copy_model(model), **kwargs)  # no input shapes: batch stays dynamic
    if not ok:
        raise RuntimeError("onnxsim's own output check failed")
    return out


def _onnxslim(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(copy_model(model))


@register_pass("simplify")
def simplify(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """onnxsim (constant folding, BN fusion, dead code), onnxslim when onnxsim fails; the result
    must reproduce the input's outputs on ``ctx.sample_feeds`` within float noise."""
    feeds = _feeds(model, ctx)
    errors = []
    for tool_name, tool in (("onnxsim", _onnxsim), ("onnxslim", _onnxslim)):
        try:
            out = tool(model, feeds)
            _restore_tags(out, model)
            assign_partitions(out, ctx.quantize_partitions, strict=False)  # fused nodes; orphans: partition_check
            check_numerics(model, out, feeds, what=f"simplify ({tool_name})")
            return out
        except Exception as exc:  # a failing simplifier is not fatal while another is left
            raise_interrupt_behind(exc)
            errors.append(f"{tool_name}: {exc}")
            log.debug("simplify: %s", errors[-1])   # the next tool runs; all failing is the error
    raise UadcError("simplify failed: " + "; ".join(errors))


@register_pass("partition_check")
def partition_check(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Every node gets one partition (prefix and metadata agree); an orphan is an error."""
    model = copy_model(model)
    derived = assign_partitions(model, ctx.quantize_partitions, strict=True)
    if derived:
        log.info("partition_check: derived the partition of %d node(s)", derived)
    return model


@register_pass("fp16")
def fp16(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Float16 weights and compute with float32 graph inputs/outputs.

    Uses onnxruntime.transformers.float16 (onnxconverter-common's converter, vendored in every
    onnxruntime wheel since long before our >=1.18 floor, so no hand-written fallback is kept;
    onnxconverter-common itself is not a dependency). It appends its I/O Casts at the end of the
    graph and leaves them untagged, so they are sorted and tagged here."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise UadcError(f"fp16 pass needs onnxruntime.transformers.float16: {exc}") from None
    out = convert_float_to_float16(copy_model(model), keep_io_types=True)
    bound_fp16_clips(out)
    topological_sort(out)
    assign_partitions(out, ctx.quantize_partitions, strict=True)
    onnx.checker.check_model(out, full_check=False)
    return out


FP16_CLIP_MAX = "uadc_fp16_clip_max"


def bound_fp16_clips(model: onnx.ModelProto) -> int:
    """Give every FP16 ``Clip`` with a lower bound alone an explicit upper one, FP16's largest value (the
    same function): ONNX Runtime 1.19's FP16 Clip without ``max`` returns 0, and the head's
    ``clamp_min`` before a division made every FP16 anomaly map NaN there. Returns how many."""
    from onnx import TensorProto, numpy_helper
    g = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    half = {v.name for v in [*g.value_info, *g.input] if v.type.tensor_type.elem_type == TensorProto.FLOAT16} | {
        i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16}
    count = 0
    for node in model.graph.node:
        if node.op_type == "Clip" and len(node.input) >= 2 and node.input[1] and node.input[0] in half and \
                (len(node.input) < 3 or not node.input[2]):
            if not count and FP16_CLIP_MAX not in {i.name for i in model.graph.initializer}:
                model.graph.initializer.append(numpy_helper.from_array(np.array(65504.0, np.float16), FP16_CLIP_MAX))
            if len(node.input) == 2:
                node.input.append(FP16_CLIP_MAX)
            else:
                node.input[2] = FP16_CLIP_MAX
            count += 1
    return count


@register_pass("cleanup")
def cleanup(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Drop nodes whose outputs nobody reads, unused initializers and opsets; sort (onnx_ir
    passes); run the checker."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass, TopologicalSortPass

    model = apply_ir_passes(model, [RemoveUnusedNodesPass(), RemoveUnusedOpsetsPass(), TopologicalSortPass()])
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise UadcError(f"cleanup: the compiled model is not valid ONNX: {str(exc).splitlines()[0]}") from None
    return model


# ------------------------------------------------------------------------------------- runner

DUMP_NAME = re.compile(r"\d\d_\w+\.onnx")   # what a dump holds: 00_input.onnx, 01_<pass>.onnx, ...
DUMP_MARKER, DUMP_KIND = "passes.json", "uadc pass dumps"   # only a folder marked so has its dumps replaced


def check_dump_dir(dump: Path, recipe: Recipe | None = None) -> None:
    """A dump folder must be new, empty or an earlier dump's (its marker and dumps only): a user's
    files of a dump's name (``01_resnet.onnx``) were replaced, and other files mixed in. Like ``--out``,
    never in an artifact folder (its next compile refused its files) or the recipe's data."""
    dump = Path(dump)
    check_outside_artifacts(dump, what="--dump-passes")
    if recipe is not None:
        check_outside_data(dump, recipe, what="--dump-passes")
    if dump.is_symlink():   # the swap that writes it whole replaced the link with a folder
        raise UadcError(f"--dump-passes {dump}: a symbolic link; give the folder it points to, or another path")
    if dump.exists() and not dump.is_dir():
        raise UadcError(f"--dump-passes: not a folder: {dump}")
    if dump.is_dir() and (Path.cwd() == dump.resolve() or dump.resolve() in Path.cwd().parents):
        raise UadcError(f"--dump-passes {dump}: the current folder or one above it, which the dump replaces whole; "
                        f"give a folder of its own")   # the compile then ran in a deleted folder (a traceback)
    names = sorted(p.name for p in dump.iterdir()) if dump.is_dir() else []
    other = [n for n in names if not DUMP_NAME.fullmatch(n) and n != DUMP_MARKER]
    if other or (names and not is_marker(dump / DUMP_MARKER, ("kind", "passes"))):
        raise UadcError(f"--dump-passes {dump}: a folder holding {(other or names)[0]}, not an earlier dump"
                        f"{'' if other else f' (no {DUMP_MARKER} of uadc)'}; give an empty or new folder")


def run_passes(model: onnx.ModelProto, names: list[str], ctx: PassContext) -> tuple[onnx.ModelProto, list[dict]]:
    """Run passes ``names`` in order. Returns the model and one record per pass:
    ``{"name", "seconds", "nodes_before", "nodes_after"}``. With ``ctx.dump_dir`` the model after
    pass k is saved as ``{k:02d}_{name}.onnx`` (k from 1), the model it starts from (the export after
    the shared stages: shape inference, simplify) as ``00_input.onnx``."""
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise UadcError(f"unknown pass(es) {', '.join(map(repr, unknown))}; available: {', '.join(PASSES)}")
    if ctx.dump_dir is None:
        return _run(model, names, ctx, None)
    check_dump_dir(ctx.dump_dir)
    # written beside it and swapped in whole: a stop half-way left the earlier dump's files deleted, a few of
    # this one's, and a passes.json listing passes it did not hold
    with replaced_dir(Path(ctx.dump_dir), lambda: check_dump_dir(ctx.dump_dir), io_errors=False) as tmp:
        (tmp / DUMP_MARKER).write_text(json.dumps({"kind": DUMP_KIND, "passes": names}) + "\n")
        (tmp / "00_input.onnx").write_bytes(model.SerializeToString())
        return _run(model, names, ctx, tmp)


def _run(model: onnx.ModelProto, names: list[str], ctx: PassContext, dump: Path | None) -> tuple:
    try:
        from uadc.core.progress import progress
        steps = progress(names, desc="passes", unit="pass")
    except ImportError:  # progress is cosmetic
        steps = names
    records = []
    for k, name in enumerate(steps, start=1):
        before = len(model.graph.node)
        t0 = time.perf_counter()
        model = PASSES[name](model, ctx)
        records.append({"name": name, "seconds": time.perf_counter() - t0,
                        "nodes_before": before, "nodes_after": len(model.graph.node)})
        if dump is not None:
            (dump / f"{k:02d}_{name}.onnx").write_bytes(model.SerializeToString())
    return model, records


def check_finite(model: onnx.ModelProto, feeds: dict[str, np.ndarray], stage: str) -> None:
    """A model with NaN/Inf weights, or NaN/Inf outputs on real inputs, is never shipped:
    UadcError naming the weights (first few) or the outputs, and the stage that found them."""
    from onnx import numpy_helper
    bad = []
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            bad.append(f"{init.name} ({int((~np.isfinite(a)).sum())} of {a.size})")
    if bad:
        raise UadcError(f"{stage}: NaN/Inf in the model weights: {', '.join(bad[:3])}"
                        f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}; check the checkpoint")
    names = [o.name for o in model.graph.output]
    for name, value in zip(names, run_ort(model, feeds, names)):
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise UadcError(f"{stage}: the model outputs NaN/Inf ({name!r}) on real test images although its "
                            f"weights are finite; the model is numerically broken")


# The qdq, opset and knn_bank passes register themselves on import (they need the registry above).
from uadc.passes import knn as _knn, opset as _opset, qdq as _qdq  # noqa: E402,F401
