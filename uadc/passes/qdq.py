"""Q/DQ insertion: ONNX Runtime's QDQ quantizer with *our* calibrated ranges, restricted to
the partitions being quantized (registered as the ``qdq`` pass)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import re
import threading

import numpy as np
import onnx

from uadc.core.constants import PARTITION_KEY, PARTITIONS, QDQ_OPS
from uadc.core.errors import UadcError
from uadc.core.ort_session import ort_quantization
from uadc.core.scoped import root_logging_untouched
from uadc.export.partitions import GraphIndex, assign_partitions, clear_partition, nodes_in, partition_of
from uadc.passes.pipeline import PassContext, copy_model, opset_of, register_pass

@register_pass("qdq")
def qdq(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Q/DQ insertion on ``ctx.quantize_partitions`` with ``ctx.ranges`` (see :func:`quantize_qdq`)."""
    return quantize_qdq(model, ctx)




# ---------------------------------------------------------------------------------------- QDQ

def quantized_op_types() -> list[str]:
    """Op types ORT's static quantizer handles in QDQ format (its default for quantize_static)."""
    registry = ort_quantization("registry")
    return sorted(set(registry.QDQRegistry) | set(registry.QLinearOpsRegistry))


def _fork_shared(model: onnx.ModelProto, quantized: set[str]) -> dict[str, str]:
    """Give quantized-partition consumers their own copy of tensors they share with float ones.

    ORT rewires *every* consumer of a quantized tensor to its DequantizeLinear output, so the
    image (read by teacher and student) or a teacher activation feeding the student would reach
    the float teacher fake-quantized. Activations get an ``Identity`` fork (removed again after
    quantization); float initializers are duplicated. An activation several quantized partitions read
    is forked too, so that each has its own Q/DQ (the same range). Tensors produced inside a quantized
    partition are not forked: a float consumer of those reads the DQ output (partition boundary).
    Returns {forked activation: original}."""
    g = GraphIndex(model)
    part = [partition_of(n) for n in g.nodes]
    inits = {i.name: i for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}  # a graph output is a float reader too
    forks: dict[str, str] = {}
    fork_nodes: dict[str, list[onnx.NodeProto]] = {}  # tensor -> its Identity forks
    new_inits = []
    for tensor, users in g.consumers.items():
        q_users = [c for c in users if part[c] in quantized]
        # every reader quantized: one Q/DQ serves them, unless they are partitions of their own reading an
        # activation (the image read by a quantized teacher and student): one pair went to the teacher, the
        # student read the teacher's tensor, and the `branches` schedule could not run them apart
        alone = tensor in inits or len({part[c] for c in q_users}) == 1
        if not q_users or (len(q_users) == len(users) and tensor not in outputs and alone):
            continue
        if tensor in g.producer and part[g.producer[tensor]] in quantized:
            continue
        for p in sorted({part[c] for c in q_users}, key=PARTITIONS.index):
            fork = f"{tensor}__{p}"
            if tensor in inits:
                if inits[tensor].data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                    continue  # shapes/axes: never quantized
                dup = copy.deepcopy(inits[tensor])
                dup.name = fork
                new_inits.append(dup)
            else:
                node = onnx.helper.make_node("Identity", [tensor], [fork], name=f"{p}/{fork}_fork")
                node.metadata_props.add(key=PARTITION_KEY, value=p)
                fork_nodes.setdefault(tensor, []).append(node)
                forks[fork] = tensor
            for c in q_users:
                if part[c] == p:
                    n = g.nodes[c]
                    n.input[:] = [fork if t == tensor else t for t in n.input]
    model.graph.initializer.extend(new_inits)
    if fork_nodes:
        _insert_after_producers(model, fork_nodes, g.producer)
    return forks


def _insert_after_producers(model: onnx.ModelProto, after: dict[str, list[onnx.NodeProto]],
                            producer: dict[str, int]) -> None:
    """Put the nodes reading tensor t right after t's producer (graph inputs: first), so a sorted
    graph stays sorted without another sort pass."""
    ordered = [n for t, ns in after.items() if t not in producer for n in ns]
    for n in model.graph.node:
        ordered.append(n)
        for t in n.output:
            ordered.extend(after.get(t, ()))
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def _unfork(model: onnx.ModelProto, forks: dict[str, str]) -> None:
    """Remove the Identity forks: their readers (Q nodes by now) read the original tensor."""
    keep = []
    for n in model.graph.node:
        if n.op_type == "Identity" and len(n.output) == 1 and n.output[0] in forks:
            continue
        n.input[:] = [forks.get(t, t) for t in n.input]
        keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    vi = [v for v in model.graph.value_info if v.name not in forks]
    del model.graph.value_info[:]
    model.graph.value_info.extend(vi)


def _qtype(name: str):
    QuantType = ort_quantization().QuantType
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    if name not in types:
        raise UadcError(f"unsupported quantization type {name!r}; expected one of {', '.join(types)}")
    return types[name]


def _overrides(params: dict[str, tuple[float, int]], forks: dict[str, str], activation_type: str) -> dict:
    """ORT TensorQuantOverrides fixing scale and zero point of the given tensors (and of their
    forks), so learned scales reach the Q/DQ nodes exactly, with no range round trip."""
    zp_type = {"uint8": np.uint8, "int8": np.int8}[activation_type]
    by_tensor = dict(params)
    by_tensor.update({f: params[o] for f, o in forks.items() if o in params})
    return {t: [{"scale": np.array(s, dtype=np.float32), "zero_point": np.array(z, dtype=zp_type)}]
            for t, (s, z) in by_tensor.items()}


def weight_quant_params(model: onnx.ModelProto) -> dict[str, list[dict]]:
    """Scale, zero point (and per-channel axis) of every weight ORT quantized in ``model`` (its
    integer ``*_quantized`` initializers behind a DequantizeLinear; on TensorRT targets the float
    weight behind its QuantizeLinear), as TensorQuantOverrides entries for ``PassContext.weight_params``.
    They depend only on the weight, the scheme and the input range (ORT widens a weight's scale when
    the int32 bias would overflow), so every candidate of one search shares them."""
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, list[dict]] = {}
    for n in model.graph.node:
        name = _quantized_weight(n, inits)
        if name is None or len(n.input) < 3 or not {n.input[1], n.input[2]} <= inits.keys():
            continue
        scale = onnx.numpy_helper.to_array(inits[n.input[1]])
        zero = onnx.numpy_helper.to_array(inits[n.input[2]])
        axis = next((a.i for a in n.attribute if a.name == "axis"), None)
        if scale.ndim == 0:
            out[name] = [{"scale": scale, "zero_point": zero}]
        else:
            out[name] = [{"scale": np.array(s), "zero_point": np.array(z)} for s, z in zip(scale, zero)]
            out[name][0]["axis"] = 1 if axis is None else axis  # DequantizeLinear's default axis
    return out


def _quantized_weight(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    """The float weight whose quantization ``node`` holds, if it does: ORT CPU's integer weight
    behind a DequantizeLinear, or TensorRT's float weight into a QuantizeLinear (``AddQDQPairToWeight``)."""
    t = inits.get(node.input[0]) if node.input else None
    if t is None:
        return None
    if node.op_type == "DequantizeLinear" and node.input[0].endswith(WEIGHT_SUFFIX) and t.data_type in _WEIGHT_TYPES:
        return node.input[0][:-len(WEIGHT_SUFFIX)]
    if node.op_type == "QuantizeLinear" and t.data_type == onnx.TensorProto.FLOAT:
        return node.input[0]
    return None


def _weight_overrides(params: dict[str, list[dict]], model: onnx.ModelProto) -> dict[str, list[dict]]:
    """``params`` for the float weights of ``model`` (ORT refuses overrides of absent tensors)."""
    return {t.name: params[t.name] for t in model.graph.initializer
            if t.name in params and t.data_type == onnx.TensorProto.FLOAT}


def qdq_options(ctx: PassContext) -> tuple[bool, bool, dict]:
    """(per_channel, reduce_range, ORT extra_options) for the target's scheme and the context's overrides.

    TensorRT explicit quantization wants: symmetric int8 (zero points 0), float weights behind a
    Q->DQ pair (TensorRT quantizes weights itself from the Q scale), float biases (no int32 DQ),
    a dedicated Q/DQ pair per consumer, and no Q/DQ on Conv/Gemm/MatMul outputs (TensorRT fuses
    the following activation and quantizes after it). ORT CPU uses the quantizer's defaults:
    int8 DQ weights, int32 biases, removable Relu/Clip folded into the Q range."""
    scheme = ctx.target.scheme
    per_channel = scheme.per_channel if ctx.per_channel is None else bool(ctx.per_channel)
    # TensorRT's int8 sums never saturate: the recipe's reduce_range (one recipe, every target) is for CPUs
    cpu = ctx.target.runtime != "tensorrt"
    reduce_range = bool(ctx.reduce_range) if ctx.reduce_range is not None and cpu else scheme.weight_reduce_range
    extra = {"ActivationSymmetric": scheme.activation_symmetric, "WeightSymmetric": scheme.weight_symmetric}
    if ctx.target.runtime == "tensorrt":
        extra.update({
            "AddQDQPairToWeight": True,
            "QuantizeBias": False,
            "DedicatedQDQPair": True,
            "OpTypesToExcludeOutputQuantization": ["Conv", "ConvTranspose", "Gemm", "MatMul"],
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        })
    return per_channel, reduce_range, extra


def weight_bits(ctx: PassContext) -> int:
    """Bits of the integer weights the qdq pass writes (7 with ``reduce_range``)."""
    return 7 if qdq_options(ctx)[1] else 8


WEIGHT_SUFFIX = "_quantized"  # ORT's name for a quantized initializer
_WEIGHT_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
_MISSING_RE = re.compile(r"not specified for param (\S+?)\.?\s")


def quantize_qdq(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Insert Q/DQ with ORT's QDQQuantizer, ranges from ``ctx.ranges``, only on nodes of
    ``ctx.quantize_partitions``; new nodes are tagged with the partition they serve."""
    cal = ort_quantization("calibrate")
    CalibrationMethod, TensorData, TensorsData = cal.CalibrationMethod, cal.TensorData, cal.TensorsData
    QDQQuantizer = ort_quantization("qdq_quantizer").QDQQuantizer

    scheme = ctx.target.scheme
    if scheme is None:
        raise UadcError(f"target {ctx.target.name!r} has no Q/DQ scheme; the qdq pass is for int8 targets")
    if ctx.ranges is None:
        raise UadcError("qdq pass needs calibrated activation ranges (run calibration first)")
    if opset_of(model) < 13:
        raise UadcError(f"qdq needs opset >= 13 (per-channel Q/DQ); the model has opset {opset_of(model)}")
    unknown = set(ctx.quantize_partitions) - set(PARTITIONS)
    if unknown:
        raise UadcError(f"unknown partition(s) to quantize: {sorted(unknown)}; expected {', '.join(PARTITIONS)}")
    model = copy_model(model)
    assign_partitions(model, ctx.quantize_partitions, strict=True)  # tags drive the node selection
    forks = _fork_shared(model, set(ctx.quantize_partitions))
    model = onnx.shape_inference.infer_shapes(model, strict_mode=False)  # ORT needs value types
    names = nodes_in(model, ctx.quantize_partitions)
    if ctx.quantize_nodes is not None:
        chosen = set(ctx.quantize_nodes)
        names = [n for n in names if n in chosen]
    if not names:  # ORT reads an empty list as "quantize everything"
        raise UadcError(f"no nodes in partition(s) {', '.join(ctx.quantize_partitions)} to quantize")
    bad = {k: v for k, v in ctx.ranges.items() if not (np.isfinite(v).all() and v[0] <= v[1])}
    if bad:
        name, r = next(iter(bad.items()))
        raise UadcError(f"qdq: invalid range {r} for tensor {name!r} ({len(bad)} invalid in all)")
    ranges = dict(ctx.ranges)
    ranges.update({f: ranges[o] for f, o in forks.items() if o in ranges})
    tensors_range = TensorsData(CalibrationMethod.MinMax, {
        k: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for k, (lo, hi) in ranges.items()})
    per_channel, reduce_range, extra = qdq_options(ctx)
    overrides = _overrides(ctx.quant_params, forks, scheme.activation_type) if ctx.quant_params else {}
    overrides.update(_weight_overrides(ctx.weight_params or {}, model))
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    before = {n.name for n in model.graph.node}
    # Keywords: the constructor is not public API and its positional order has changed before.
    try:
        with root_logging_untouched(), reusing_quantized_weights(ctx.weight_memo):   # ORT logs with logging.info
            quantizer = QDQQuantizer(
                model=model, per_channel=per_channel, reduce_range=reduce_range,
                weight_qType=_qtype(scheme.weight_type), activation_qType=_qtype(scheme.activation_type),
                tensors_range=tensors_range, nodes_to_quantize=names, nodes_to_exclude=[],
                op_types_to_quantize=quantized_op_types(), extra_options=extra)
            quantizer.quantize_model()
    except ValueError as exc:
        m = _MISSING_RE.search(str(exc) + " ")
        if m:
            name = forks.get(m.group(1), m.group(1))
            raise UadcError(f"qdq: no calibrated range for tensor {name!r} (input/output of a quantized "
                            f"node); calibrate the same model the passes quantize") from None
        raise
    quantizer.model.topological_sort()  # ORT appends its Q/DQ nodes; its own sort is the fast one
    out = quantizer.model.model
    _unfork(out, forks)
    for n in out.graph.node:
        if n.name not in before:  # ORT names new nodes after tensors: derive, never trust a prefix
            clear_partition(n)
    assign_partitions(out, ctx.quantize_partitions, strict=True)
    _check_float_partitions(out, set(ctx.quantize_partitions))
    if scheme.activation_symmetric and scheme.weight_symmetric:
        _check_zero_points(out)
    onnx.checker.check_model(out, full_check=False)
    return out


_MEMO_LOCK = threading.Lock()


@contextlib.contextmanager
def reusing_quantized_weights(memo: dict | None):
    """While ORT quantizes a model, give it the integer weights ``memo`` already holds for the same
    weight, type, scale and zero point. ORT quantizes a weight channel by channel in a Python loop (about
    20 ms a weight, a fifth of a candidate's build), and the precision search's candidates quantize the
    same weights to the same scales. ORT's module-level function is swapped for the call (under a lock)
    and restored; ORT versions that do not route weights through it (1.19.2) quantize as before."""
    ortq = ort_quantization("qdq_quantizer")

    original = getattr(ortq, "quantize_onnx_initializer", None)
    if memo is None or original is None:
        yield
        return

    def memoized(weight: onnx.TensorProto, quant_type, zero_point, scale, *args, **kwargs) -> onnx.TensorProto:
        arrays = tuple((a.dtype.str, a.shape, a.tobytes()) for a in map(np.asarray, (zero_point, scale)))
        key = (hashlib.blake2b(weight.SerializeToString(), digest_size=16).digest(), quant_type, arrays, args,
               tuple(sorted(kwargs.items())))
        if key not in memo:
            memo[key] = original(weight, quant_type, zero_point, scale, *args, **kwargs)
        out = onnx.TensorProto()
        out.CopyFrom(memo[key])  # ORT adds it to its model: never hand out the memo's own
        return out

    with _MEMO_LOCK:
        ortq.quantize_onnx_initializer = memoized
        try:
            yield
        finally:
            ortq.quantize_onnx_initializer = original


def _check_float_partitions(model: onnx.ModelProto, quantized: set[str]) -> None:
    """A float-partition node may read a DequantizeLinear output only at a boundary: the Q/DQ
    quantizes a tensor produced inside a quantized partition."""
    g = GraphIndex(model)
    for i, n in enumerate(g.nodes):
        if partition_of(n) in quantized or n.op_type in QDQ_OPS:
            continue
        for t in n.input:
            j = g.producer.get(t)
            if j is None or g.nodes[j].op_type != "DequantizeLinear":
                continue
            q = g.producer.get(g.nodes[j].input[0])
            src = g.producer.get(g.nodes[q].input[0]) if q is not None else None
            if src is None or partition_of(g.nodes[src]) not in quantized:
                raise RuntimeError(f"qdq: float node {n.name} reads fake-quantized tensor {t!r}")


def _check_zero_points(model: onnx.ModelProto) -> None:
    """Symmetric schemes (TensorRT) need every Q/DQ zero point to be 0."""
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in QDQ_OPS and len(n.input) > 2 and n.input[2] in inits:
            zp = onnx.numpy_helper.to_array(inits[n.input[2]])
            if zp.any():
                raise RuntimeError(f"qdq: symmetric scheme but {n.name} has a non-zero zero point")
