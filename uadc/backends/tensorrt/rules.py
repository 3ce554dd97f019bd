"""Checks an ONNX model against TensorRT's explicit-quantization (Q/DQ) rules.

TensorRT builds an explicitly quantized (INT8) engine from QuantizeLinear /
DequantizeLinear pairs. Models that ONNX Runtime runs happily can still fail
to parse, or worse parse and compute something else, in TensorRT. Sources:

- onnx/onnx-tensorrt ``onnxOpImporters.cpp`` (``QuantDequantLinearHelper``):
  zero points must be all zeros ("TensorRT only supports symmetric
  quantization"), UINT8 zero points are replaced by INT8 with a warning, scale
  coefficients must all be positive, per-channel scales are assumed to be
  weight quantization (KCRS, "Activations-quantization does not support
  per-axis quantization"), and the number of scales must equal the size of the
  quantized axis.
  Older releases of the importer (``builtin_op_importers.cpp``) require all
  three DequantizeLinear inputs.
- TensorRT 8.6 operator reference (Quantize/Dequantize): scale and zero point
  must be build-time constant scalars or 1-D tensors; output type int8.
- TensorRT developer guide, "Explicit Quantization" / "Working with Quantized
  Types": symmetric INT8, per-tensor activations, per-channel weights along the
  output-channel axis (K of KCRS for convolution).
- ONNX operator spec: QuantizeLinear without ``y_zero_point`` produces UINT8,
  ``axis`` defaults to 1, ``block_size`` (opset 21) is blocked quantization.

Usable on any ONNX model: a model without Q/DQ only gets the QOperator check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from uadc.core.constants import QDQ_OPS
from uadc.export.partitions import GraphIndex

__all__ = ["RULES", "Violation", "check_trt_rules", "format_violations"]

RULES: dict[str, str] = {
    "QDQ001": "Q/DQ model with opset < 13",
    "QDQ002": "asymmetric zero point",
    "QDQ003": "zero point / quantized type is not int8",
    "QDQ004": "scale not strictly positive and finite",
    "QDQ005": "scale or zero point is not a constant",
    "QDQ006": "scale with a dynamic shape",
    "QDQ007": "per-channel quantization of an activation",
    "QDQ008": "per-channel weight axis is not the output-channel axis",
    "QDQ009": "blocked quantization (block_size)",
    "QDQ010": "QuantizeLinear not paired with a matching DequantizeLinear",
    "QDQ011": "QOperator / integer op TensorRT cannot run",
    "QDQ012": "scale that is not a scalar or 1-D float32 (float16 from opset 19)",
}

# QOperator-format and integer ops (ONNX and ORT com.microsoft) that the
# TensorRT ONNX parser does not import; TensorRT wants the QDQ format instead.
_QOPERATOR_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSoftmax", "QLinearReduceMean",
    "QLinearWhere", "QLinearConvTranspose", "QAttention", "DynamicQuantizeLSTM"})
_DEFAULT_DOMAINS = ("", "ai.onnx")
_ONNX_DEFAULT_AXIS = 1


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``rule`` is an id from ``RULES``, ``node`` the ONNX node name."""

    rule: str
    node: str
    message: str


def check_trt_rules(model: onnx.ModelProto) -> list[Violation]:
    """Return every TensorRT Q/DQ rule the model breaks (empty list when clean)."""
    graph = _GraphIndex(model)
    violations = _check_qoperator_ops(graph)
    qdq_nodes = [node for node in graph.all_nodes if _is_qdq(node)]   # inside If/Loop bodies too
    if not qdq_nodes:
        return violations
    if graph.opset < 13:
        violations.append(Violation("QDQ001", "<model>", f"default-domain opset is {graph.opset}; TensorRT Q/DQ needs "
                                    "opset >= 13 (per-channel scales and the 'axis' attribute arrived in opset 13). "
                                    "Re-export with opset_version >= 13."))
    for node in qdq_nodes:
        violations.extend(_check_qdq_node(graph, node))
    for node in qdq_nodes:
        if node.op_type == "QuantizeLinear":
            violations.extend(_check_pairing(graph, node))
    return violations


def format_violations(violations: Iterable[Violation]) -> str:
    """One line per violation: ``QDQ002 [node]: message``."""
    lines = [f"{v.rule} [{v.node}]: {v.message}" for v in violations]
    return "\n".join(lines) if lines else "no TensorRT Q/DQ rule violations"


class _GraphIndex(GraphIndex):
    """The shared graph index plus what the rules need: node objects, constants, shapes, dtypes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model)
        self.opset = _default_opset(model)
        self.all_nodes = list(walk_nodes(model.graph))
        self.names = {id(node): node.name or f"{node.op_type}_{i}" for i, node in enumerate(self.nodes)}
        graphs = list(_walk_graphs(model.graph))   # a subgraph's Q/DQ parameters are its own initializers
        self.outputs = {out.name for g in graphs for out in g.output}
        self.initializer_protos = {init.name: init for g in graphs for init in g.initializer}
        self.constants = {
            node.output[0]: node for node in self.all_nodes if node.op_type == "Constant" and node.output
        }
        self.all_uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in self.all_nodes:
            for k, name in enumerate(node.input):
                if name:
                    self.all_uses.setdefault(name, []).append((node, k))
        self.producer_node = {t: self.nodes[i] for t, i in self.producer.items()}
        # (consumer node, input index) per tensor, in graph order
        self.uses = {t: [(self.nodes[i], k) for i in dict.fromkeys(users)
                         for k, name in enumerate(self.nodes[i].input) if name == t]
                     for t, users in self.consumers.items()}
        self.value_info = _infer_value_info(model)
        self._const_cache: dict[str, bool] = {}

    def name(self, node: onnx.NodeProto) -> str:
        return self.names.get(id(node), node.name or node.op_type)

    def value(self, tensor: str) -> np.ndarray | None:
        """Concrete value of an initializer or Constant output, else None (also for external data)."""
        if tensor in self.initializer_protos:
            init = self.initializer_protos[tensor]
            if init.data_location == TensorProto.EXTERNAL:
                return None  # weights stored beside the model (load_qdq_params reads the Q/DQ ones first)
            return numpy_helper.to_array(init)
        node = self.constants.get(tensor)
        if node is not None:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
                    return np.asarray(onnx.helper.get_attribute_value(attr))
        return None

    def elem_type(self, tensor: str) -> int | None:
        if tensor in self.initializers:
            return self.initializer_protos[tensor].data_type
        node = self.constants.get(tensor)
        if node is not None:
            for attr in node.attribute:
                if attr.name == "value":
                    return attr.t.data_type
        info = self.value_info.get(tensor)
        if info is not None and info.type.HasField("tensor_type"):
            return info.type.tensor_type.elem_type or None
        return None

    def shape(self, tensor: str) -> list[int | None] | None:
        """Static dims where known (None for symbolic/unknown dims); None when rank unknown."""
        if tensor in self.initializers:
            return list(self.initializer_protos[tensor].dims)
        value = self.value(tensor)
        if value is not None:
            return list(value.shape)
        info = self.value_info.get(tensor)
        if info is None or not info.type.HasField("tensor_type"):
            return None
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            return None
        return [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]

    def is_const(self, tensor: str) -> bool:
        """True for initializers, Constant outputs and anything computed only from them."""
        if tensor in self._const_cache:
            return self._const_cache[tensor]
        self._const_cache[tensor] = False  # guards against cycles in malformed graphs
        if tensor in self.initializers or tensor in self.constants:
            result = True
        else:
            node = self.producer_node.get(tensor)
            inputs = [name for name in node.input if name] if node is not None else []
            result = node is not None and all(self.is_const(name) for name in inputs)
        self._const_cache[tensor] = result
        return result


def _check_qoperator_ops(graph: _GraphIndex) -> list[Violation]:
    found = []
    for index, node in enumerate(graph.all_nodes):
        contrib_qdq = node.op_type in QDQ_OPS and node.domain not in _DEFAULT_DOMAINS
        if node.op_type in _QOPERATOR_OPS or contrib_qdq:
            op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            found.append(
                Violation(
                    "QDQ011",
                    node.name or f"{node.op_type}_{index}",
                    f"{op} is a QOperator/integer op that TensorRT does not import; export the QDQ format "
                    "instead (ONNX Runtime: quantize_static(..., quant_format=QuantFormat.QDQ)) with "
                    "default-domain QuantizeLinear/DequantizeLinear around float ops.",
                )
            )
    return found


def _check_qdq_node(graph: _GraphIndex, node: onnx.NodeProto) -> list[Violation]:
    name = graph.name(node)
    attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
    if attrs.get("block_size", 0):
        return [Violation("QDQ009", name, f"block_size={attrs['block_size']} (blocked quantization) is not supported "
                          "for INT8 Q/DQ by TensorRT; use per-tensor activations and per-channel weights.")]
    found = _check_scale(graph, node, name)
    found += _check_zero_point(graph, node, name, attrs)
    found += _check_per_channel(graph, node, name, attrs)
    return found


def _check_scale(graph: _GraphIndex, node: onnx.NodeProto, name: str) -> list[Violation]:
    scale = _input(node, 1)
    if not scale:
        return []
    return _check_scale_form(graph, scale, name) + _check_scale_values(graph, scale, name)


def _check_scale_form(graph: _GraphIndex, scale: str, name: str) -> list[Violation]:
    """A (K,1,1,1) scale or an fp16 one before opset 19 passed: ONNX Runtime refuses the model, as the spec does."""
    shape, dtype = graph.shape(scale), graph.elem_type(scale)
    allowed = (TensorProto.FLOAT, TensorProto.FLOAT16) if graph.opset >= 19 else (TensorProto.FLOAT,)
    problems = ([f"has {len(shape)} dimensions {shape}"] if shape is not None and len(shape) > 1 else []) + \
        ([f"is {TensorProto.DataType.Name(dtype).lower()}"] if dtype is not None and dtype not in allowed else [])
    return [Violation("QDQ012", name, f"scale '{scale}' {' and '.join(problems)}; Q/DQ scales are a scalar or 1-D "
                      f"{'float32 or float16' if graph.opset >= 19 else 'float32 (float16 from opset 19)'}. "
                      "Reshape it to 1-D (one value per channel) and store it as float32.")] if problems else []


def _check_scale_values(graph: _GraphIndex, scale: str, name: str) -> list[Violation]:
    value = graph.value(scale)
    if value is not None:
        values = value.astype(np.float64).ravel()
        if values.size == 0 or not np.all(np.isfinite(values)) or not np.all(values > 0):
            bad = values[~(np.isfinite(values) & (values > 0))][:4].tolist()
            return [Violation("QDQ004", name, f"scale '{scale}' has non-positive or non-finite values {bad}; TensorRT "
                              "requires every scale coefficient > 0. Recalibrate, or clamp amax to a small positive "
                              "value for constant/dead channels.")]
        return []
    found = []
    if not graph.is_const(scale):
        found.append(Violation("QDQ005", name, f"scale '{scale}' is computed at runtime; TensorRT 8.x requires Q/DQ "
                               "scales to be build-time constants (scalar or 1-D). Fold it into a constant initializer "
                               "(e.g. onnxsim / polygraphy surgeon sanitize --fold-constants)."))
    shape = graph.shape(scale)
    if shape is None or any(dim is None for dim in shape):
        found.append(Violation("QDQ006", name, f"scale '{scale}' has a dynamic or unknown shape {shape}; TensorRT "
                               "decides per-tensor vs per-channel quantization from the scale's static size. Give the "
                               "scale a static shape (scalar or 1-D of the channel count)."))
    return found


def _check_zero_point(graph: _GraphIndex, node: onnx.NodeProto, name: str, attrs: dict) -> list[Violation]:
    zero_point = _input(node, 2)
    if not zero_point:
        return _check_missing_zero_point(graph, node, name, attrs)
    found = []
    dtype = graph.elem_type(zero_point)
    if dtype is not None and dtype != TensorProto.INT8:
        found.append(_wrong_type(name, f"zero point '{zero_point}'", dtype))
    value = graph.value(zero_point)
    if value is None and not graph.is_const(zero_point):
        found.append(
            Violation(
                "QDQ005",
                name,
                f"zero point '{zero_point}' is computed at runtime; TensorRT needs a constant all-zero "
                "int8 zero point. Make it an initializer.",
            )
        )
    elif value is not None and np.any(value.astype(np.int64) != 0):
        found.append(
            Violation(
                "QDQ002",
                name,
                f"zero point '{zero_point}' is not all zeros (asymmetric quantization); TensorRT only "
                "supports symmetric quantization. Re-quantize symmetrically (ONNX Runtime: "
                "extra_options={'ActivationSymmetric': True, 'WeightSymmetric': True}).",
            )
        )
    return found


def _check_missing_zero_point(graph: _GraphIndex, node: onnx.NodeProto, name: str, attrs: dict) -> list[Violation]:
    if node.op_type == "QuantizeLinear":
        output_dtype = attrs.get("output_dtype", 0)
        if output_dtype == TensorProto.INT8:
            return []
        if output_dtype:
            return [_wrong_type(name, "output_dtype", output_dtype)]
        return [
            Violation(
                "QDQ003",
                name,
                "QuantizeLinear has no zero point, so ONNX (and ONNX Runtime) quantize to uint8 while "
                "TensorRT quantizes to int8: the two would disagree. Add an int8 zero point of 0.",
            )
        ]
    data = _input(node, 0)
    dtype = graph.elem_type(data)
    producer = graph.producer_node.get(data)
    if dtype is not None and dtype != TensorProto.INT8 and not (producer and producer.op_type == "QuantizeLinear"):
        return [_wrong_type(name, f"dequantized input '{data}'", dtype)]
    return [
        Violation(
            "QDQ003",
            name,
            "DequantizeLinear has no zero point; older TensorRT ONNX parsers require all three inputs "
            "('requires 3 inputs for the DequantizeLinear operator'). Add an int8 zero point of 0.",
        )
    ]


def _wrong_type(name: str, what: str, dtype: int) -> Violation:
    type_name = TensorProto.DataType.Name(dtype)
    hint = ""
    if dtype == TensorProto.INT32:
        hint = " (ONNX Runtime quantizes biases to int32: use extra_options={'QuantizeBias': False})"
    return Violation(
        "QDQ003",
        name,
        f"{what} is {type_name}; TensorRT INT8 Q/DQ supports only int8 (uint8 is silently reinterpreted "
        f"as int8; int4/fp8/int16 are not INT8 deployments){hint}. Quantize with QuantType.QInt8.",
    )


def _check_per_channel(graph: _GraphIndex, node: onnx.NodeProto, name: str, attrs: dict) -> list[Violation]:
    scale = _input(node, 1)
    scale_shape = graph.shape(scale) if scale else None
    if not scale_shape or any(dim is None for dim in scale_shape) or int(np.prod(scale_shape)) <= 1:
        return []
    data = _input(node, 0)
    if not graph.is_const(data):
        return [
            Violation(
                "QDQ007",
                name,
                f"per-channel scale ({int(np.prod(scale_shape))} values) on activation '{data}'; TensorRT "
                "supports only per-tensor quantization of activations. Use a scalar scale here.",
            )
        ]
    rank = len(graph.shape(data) or []) or None
    axis = int(attrs.get("axis", _ONNX_DEFAULT_AXIS))
    if rank:
        axis = axis + rank if axis < 0 else axis
    if node.op_type == "DequantizeLinear":
        return _check_weight_axis(graph, node, name, axis, rank, "axis" in attrs, int(np.prod(scale_shape)))
    return []


def _check_weight_axis(
    graph: _GraphIndex, node: onnx.NodeProto, name: str, axis: int, rank: int | None, explicit: bool, count: int
) -> list[Violation]:
    found = []
    data_shape = graph.shape(_input(node, 0)) or []
    if rank and 0 <= axis < rank and data_shape[axis] is not None and data_shape[axis] != count:
        found.append(
            Violation(
                "QDQ008",
                name,
                f"scale has {count} values but axis {axis} of the weight has {data_shape[axis]}; "
                "TensorRT needs one scale per output channel.",
            )
        )
    for consumer, index in graph.uses.get(node.output[0], []):
        expected = _output_channel_axis(consumer, index, rank)
        if expected is not None and axis != expected:
            default = "" if explicit else f" (no 'axis' attribute: ONNX defaults to {_ONNX_DEFAULT_AXIS})"
            found.append(
                Violation(
                    "QDQ008",
                    name,
                    f"per-channel weight quantization along axis {axis}{default}, but the output-channel "
                    f"axis of this {consumer.op_type} weight is {expected}; TensorRT quantizes weights "
                    f"per output channel. Set axis={expected} on the weight's QuantizeLinear/DequantizeLinear.",
                )
            )
    return found


def _output_channel_axis(consumer: onnx.NodeProto, index: int, rank: int | None) -> int | None:
    """Axis of a weight input that indexes output channels/features, if known."""
    if index != 1:
        return None
    if consumer.op_type == "Conv":
        return 0  # (M, C/group, kH, kW)
    if consumer.op_type == "ConvTranspose":
        return 1  # (C, M/group, kH, kW)
    if consumer.op_type == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1  # B is (N, K) when transposed, else (K, N)
    if consumer.op_type == "MatMul" and rank:
        return rank - 1  # B is (..., K, N)
    return None


def _check_pairing(graph: _GraphIndex, q_node: onnx.NodeProto) -> list[Violation]:
    name = graph.name(q_node)
    output = q_node.output[0]
    consumers = graph.all_uses.get(output, [])
    problems = []
    if output in graph.outputs:
        problems.append(f"its output '{output}' is a graph output")
    if not consumers and output not in graph.outputs:
        problems.append("its output is unused")
    for consumer, _ in consumers:
        if consumer.op_type != "DequantizeLinear" or consumer.domain not in _DEFAULT_DOMAINS:
            problems.append(f"it feeds {consumer.op_type} '{graph.name(consumer)}' instead of a DequantizeLinear")
        elif not _same_params(graph, q_node, consumer):
            problems.append(f"DequantizeLinear '{graph.name(consumer)}' uses a different scale/zero point/axis")
    if not problems:
        return []
    return [Violation("QDQ010", name, "QuantizeLinear must be followed only by DequantizeLinear nodes with the same "
                      f"scale, zero point and axis (TensorRT fuses Q/DQ pairs), but {'; '.join(problems)}.")]


def _same_params(graph: _GraphIndex, q_node: onnx.NodeProto, dq_node: onnx.NodeProto) -> bool:
    for index in (1, 2):
        left, right = _input(q_node, index), _input(dq_node, index)
        if index == 2 and not (left and right):   # an absent zero point is 0 (a missing one is QDQ003's matter)
            given = graph.value(left or right) if (left or right) else np.zeros(1)
            if given is not None and not np.any(given):
                continue
        if not _same_tensor(graph, left, right):
            return False
    q_scale = graph.value(_input(q_node, 1))
    if q_scale is not None and q_scale.size > 1:
        return _axis(q_node) == _axis(dq_node)
    return True


def _same_tensor(graph: _GraphIndex, left: str, right: str) -> bool:
    if left == right:
        return True
    if not left or not right:
        return False
    left_value, right_value = graph.value(left), graph.value(right)
    if left_value is None or right_value is None:
        return False
    return (
        left_value.dtype == right_value.dtype
        and left_value.size == right_value.size
        and bool(np.array_equal(left_value.ravel(), right_value.ravel()))
    )


def _axis(node: onnx.NodeProto) -> int:
    return next((attr.i for attr in node.attribute if attr.name == "axis"), _ONNX_DEFAULT_AXIS)


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _is_qdq(node: onnx.NodeProto) -> bool:
    return node.op_type in QDQ_OPS and node.domain in _DEFAULT_DOMAINS


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in _DEFAULT_DOMAINS:
            return int(opset.version)
    return 1


def _walk_graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _walk_graphs(sub)


def walk_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for g in _walk_graphs(graph):
        yield from g.node


def load_qdq_params(model: onnx.ModelProto, base_dir: Path) -> None:
    """Read the Q/DQ scales and zero points a model keeps as external data (subgraphs' too), and no
    other weights: the rules judged those values as fine, unread, and TensorRT reads its weights itself."""
    from onnx.external_data_helper import load_external_data_for_tensor
    names = {name for node in walk_nodes(model.graph) if node.op_type in QDQ_OPS for name in node.input[1:3]}
    for g in _walk_graphs(model.graph):
        for init in g.initializer:
            if init.name in names and init.data_location == onnx.TensorProto.EXTERNAL:
                load_external_data_for_tensor(init, str(base_dir))
                init.data_location = onnx.TensorProto.DEFAULT
                del init.external_data[:]


def _infer_value_info(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Value infos of graph inputs/outputs plus inferred intermediates (best effort)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is optional; >2 GB or odd models still get checked
        inferred = model
    graph = inferred.graph
    infos = {}
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        infos[info.name] = info
    return infos
