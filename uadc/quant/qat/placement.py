"""Quantization placement: where ORT's PTQ Q/DQ model quantizes, in terms of the FP32 graph.

Read off the PTQ model by :func:`read_placement`, then adjusted as ORT's quantizer would see it:
:func:`tie_activation_inputs` (a quantized Relu/Clip's sole-reader input shares its output's
scale) and :func:`clip_bounds` (a Clip ORT removed caps the learned scale)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from uadc.core.constants import QDQ_OPS
from uadc.core.errors import UadcError
from uadc.core.ort_session import ort_quantization
from uadc.export.partitions import partition_of


@dataclass
class ActQuant:
    """One activation quantizer: the tensors sharing a PTQ scale/zero point."""

    tensors: list[str]
    scale: float
    zero_point: int
    qmin: int   # clamp range of the zero point's dtype (what QuantizeLinear saturates to)
    qmax: int
    max_scale: float = math.inf  # keeps a removed Clip's bound (see clip_bounds)


@dataclass
class Placement:
    """Where the PTQ model quantizes, in terms of the FP32 graph's nodes and tensors."""

    acts: list[ActQuant]
    act_edges: dict[tuple[str, int], int]            # (node, input index) -> acts index
    weight_edges: dict[tuple[str, int], int | None]  # (node, input index) -> channel axis / None
    weight_names: dict[tuple[str, int], str]         # (node, input index) -> FP32 initializer
    bias_edges: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)  # -> (input, weight) index
    #: symmetric integer weights span [-weight_qmax, weight_qmax]: 127, or 64 for ORT's 7-bit ``reduce_range``
    weight_qmax: int = 127

    def head_view(self, model: onnx.ModelProto) -> dict[str, int]:
        """Tensors the head reads through Q/DQ -> their quantizer."""
        out = {}
        for n in model.graph.node:
            if partition_of(n) == "head":
                for i, t in enumerate(n.input):
                    if (n.name, i) in self.act_edges:
                        out.setdefault(t, self.act_edges[(n.name, i)])
        return out


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _qrange(dtype: int) -> tuple[int, int]:
    info = np.iinfo(onnx.helper.tensor_dtype_to_np_dtype(dtype))
    return int(info.min), int(info.max)


def _axis(node: onnx.NodeProto, scale: np.ndarray) -> int | None:
    if scale.size <= 1:
        return None
    return next((a.i for a in node.attribute if a.name == "axis"), 1)  # ONNX default axis is 1


def read_placement(ptq: onnx.ModelProto, fp32: onnx.ModelProto) -> Placement:
    """Read the PTQ model's quantized edges; node names are shared with ``fp32``."""
    inits = initializers(ptq)
    producer = {o: n for n in ptq.graph.node for o in n.output}
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    groups: dict[str, int] = {}   # scale initializer / tensor -> acts index
    acts: list[ActQuant] = []
    act_edges, weight_edges, weight_names, bias_edges = {}, {}, {}, {}
    int_weights: list[int] = []
    for n in ptq.graph.node:
        if n.op_type in QDQ_OPS:
            continue
        if n.name not in fp32_nodes:
            raise UadcError(f"qat: node {n.name} of the Q/DQ model is not in the FP32 graph")
        for i, t in enumerate(n.input):
            dq = producer.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            src, q = dq.input[0], producer.get(dq.input[0])
            scale = numpy_helper.to_array(inits[dq.input[1]])
            if src in inits:  # int8 weight, or int32 bias with scale input scale x weight scale
                if inits[src].data_type == onnx.TensorProto.INT32:
                    bias_edges[(n.name, i)] = (0, 1)  # ORT quantizes Conv/Gemm biases from inputs 0 and 1
                    continue
                weight_edges[(n.name, i)] = _axis(dq, scale)
                weight_names[(n.name, i)] = fp32_nodes[n.name].input[i]
                if inits[src].data_type == onnx.TensorProto.INT8:   # a head's uint8 constant (127) made 7-bit 8-bit
                    int_weights.append(int(np.abs(numpy_helper.to_array(inits[src]).astype(np.int32)).max()))
            elif q is not None and q.op_type == "QuantizeLinear" and q.input[0] in inits:
                weight_edges[(n.name, i)] = _axis(q, scale)  # TensorRT: float weight behind Q -> DQ
                weight_names[(n.name, i)] = fp32_nodes[n.name].input[i]
            elif q is not None and q.op_type == "QuantizeLinear":
                act_edges[(n.name, i)] = _act_group(q, inits, groups, acts)
    # min-max symmetric weights reach the range's end in their largest channel: 64 only with 7 bits
    qmax = REDUCED_QMAX if int_weights and max(int_weights) <= REDUCED_QMAX else 127
    return Placement(acts, act_edges, weight_edges, weight_names, bias_edges, qmax)


REDUCED_QMAX = 64  # ORT's reduce_range int8 weights: [-64, 64]


def _act_group(q: onnx.NodeProto, inits: dict, groups: dict[str, int], acts: list[ActQuant]) -> int:
    tensor, scale_name = q.input[0], q.input[1]
    k = groups.get(scale_name, groups.get(tensor))
    if k is None:
        zp = inits[q.input[2]]
        qmin, qmax = _qrange(zp.data_type)
        acts.append(ActQuant([], float(numpy_helper.to_array(inits[scale_name])),
                             int(numpy_helper.to_array(zp)), qmin, qmax))
        k = len(acts) - 1
    groups[scale_name] = groups[tensor] = k
    if tensor not in acts[k].tensors:
        acts[k].tensors.append(tensor)
    return k


def tie_activation_inputs(placement: Placement, fp32: onnx.ModelProto, quantize: list[str]) -> None:
    """Mirror ORT's ``adjust_tensor_ranges``: a quantized Relu/Clip whose input has no other reader
    gets the output's range on its input, so both quantizers must share one (learned) scale."""
    readers: dict[str, int] = {}
    for n in fp32.graph.node:
        for t in set(n.input):
            readers[t] = readers.get(t, 0) + 1
    group_of = {t: k for k, a in enumerate(placement.acts) for t in a.tensors}
    parent = list(range(len(placement.acts)))

    def root(k: int) -> int:
        while parent[k] != k:
            k = parent[k]
        return k

    for n in fp32.graph.node:
        if n.op_type in ("Relu", "Clip") and partition_of(n) in quantize and readers.get(n.input[0]) == 1 \
                and n.input[0] in group_of and n.output[0] in group_of:
            parent[root(group_of[n.input[0]])] = root(group_of[n.output[0]])
    if all(root(k) == k for k in range(len(parent))):
        return
    keep = [k for k in range(len(parent)) if root(k) == k]
    index = {k: i for i, k in enumerate(keep)}
    acts = [placement.acts[k] for k in keep]
    for k, a in enumerate(placement.acts):
        if root(k) != k:
            acts[index[root(k)]].tensors.extend(t for t in a.tensors if t not in acts[index[root(k)]].tensors)
    placement.acts = acts
    placement.act_edges = {e: index[root(k)] for e, k in placement.act_edges.items()}


def clip_bounds(placement: Placement, fp32: onnx.ModelProto, ptq: onnx.ModelProto) -> None:
    """ORT drops a Relu/Clip after a quantized op and lets the Q clamp instead; the interpreter
    keeps the Clip. Both agree while the quantized range stays inside the Clip's: cap the scale."""
    kept, inits = {n.name for n in ptq.graph.node}, initializers(fp32)
    group_of = {t: k for k, a in enumerate(placement.acts) for t in a.tensors}
    for n in fp32.graph.node:
        if n.op_type != "Clip" or n.name in kept or n.output[0] not in group_of:
            continue
        a = placement.acts[group_of[n.output[0]]]
        lo, hi = (float(numpy_helper.to_array(inits[t])) if t in inits else None
                  for t in (list(n.input[1:3]) + ["", ""])[:2])
        if hi is not None and a.qmax > a.zero_point:
            a.max_scale = min(a.max_scale, max(hi / (a.qmax - a.zero_point), a.scale))
        if lo is not None and lo < 0 and a.qmin < a.zero_point:
            a.max_scale = min(a.max_scale, max(lo / (a.qmin - a.zero_point), a.scale))


def scale_to_range(a: ActQuant, scale: float, symmetric: bool) -> tuple[float, float]:
    """A float range ORT's compute_scale_zp turns back into (``scale``, ``a.zero_point``)."""
    if symmetric:
        get_qmin_qmax_for_qType = ort_quantization("quant_utils").get_qmin_qmax_for_qType
        dtype = onnx.TensorProto.INT8 if a.qmin < 0 else onnx.TensorProto.UINT8
        qmin, qmax = (int(v) for v in get_qmin_qmax_for_qType(dtype, symmetric=True))
        half = scale * (qmax - qmin) / 2.0
        return -half, half
    return (a.qmin - a.zero_point) * scale, (a.qmax - a.zero_point) * scale
