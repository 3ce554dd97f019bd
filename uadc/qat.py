"""Quantization-aware training (``uadc qat``) that lands in exactly the artifact PTQ produces.

Design: QAT does not re-derive *where* to quantize. It starts from the same simplified, tagged
FP32 ONNX graph ``uadc compile`` quantizes (BN already folded into Conv), calibrates it and runs
the same ``qdq`` pass (ONNX Runtime's QDQ quantizer, the target's scheme) to get the PTQ model,
then reads the quantization *placement* off that model:

* every graph edge ``(consumer node, input index)`` that reads an activation through Q -> DQ,
  grouped by the Q node's scale initializer (ORT re-uses the input's scale for e.g. MaxPool or
  Reshape outputs; one tensor with a Q/DQ pair per consumer is one group) and, as ORT's
  ``adjust_tensor_ranges`` does, a quantized Relu/Clip's sole-reader input tied to its output;
  with scale, zero point and the zero-point dtype's clamp range;
* every edge that reads a weight through DQ (int8 initializer) or Q -> DQ (TensorRT's float
  weight pairs), per-channel axis or per-tensor, and every int32 bias DQ (ORT CPU scheme).

A small ONNX -> torch interpreter (:class:`GraphInterpreter`) then runs the FP32 graph's teacher
and student partitions with fake-quant at exactly those edges, computed the way ORT computes Q/DQ
(divide by the scale, round half to even, saturate; torch's own fake_quantize multiplies by 1/s
and flips ties): activations with an LSQ-style learnable scale (zero point fixed, initialised
from the PTQ scale), weights with ORT's symmetric int8 min-max scale recomputed from the current
weights every step, int32 biases at input scale x weight scale (their rounding alone flips a few
percent of the int8 outputs), all with straight-through gradients. With unchanged weights and
scales it reproduces the PTQ model up to rare float-accumulation ties (tests/test_qat.py). Where
ORT removed a Relu/Clip and lets the Q clamp instead, the learned scale is capped so the
quantized range stays inside the Clip's and both graphs still agree.

Student Conv/ConvTranspose weights and biases (BN folded) and the activation scales are trained
with Adam; the frozen teacher (when not quantized) runs once and is cached. The head is never
interpreted: the loss is the torch model's own ``loss(t_feats, s_feats)`` on the tensors the ONNX
head reads, as it reads them (through DQ where the PTQ model does). Their order (which head
input is tap k, not recorded in the ONNX graph) is derived by value matching against the torch
model's ``teacher_features`` / ``student_features`` on a probe batch.

Export writes the tuned weights back into the FP32 initializers (by name) and runs the ``qdq``
pass once more with ``ctx.ranges`` = the calibrated ranges overridden by the learned scales
turned back into ranges ORT maps to the same scale/zero point (asymmetric: ``lo = (qmin - z) s``,
``hi = (qmax - z) s``; symmetric: ``+-s (qmax_s - qmin_s) / 2`` with ORT's symmetric clamp range),
with no re-calibration. Same graph, same quantizer, same options -> same Q/DQ placement; only
weights and scales differ (checked after export: scales exact, head inputs as trained).
``uadc compile --from-qat`` then runs the remaining target passes, verification, metrics and
report exactly as for PTQ.

Not emulated: ORT's weight-scale enlargement when a bias would overflow int32 (only for biases
~1e9 input x weight steps); ops outside :func:`supported_ops` raise UadcError.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn
from tqdm import tqdm

from uadc.errors import UadcError
from uadc.export import INPUT_NAME
from uadc.passes import QDQ_OPS, PassContext, partition_of, run_ort, run_passes
from uadc.recipe import Recipe
from uadc.targets import Target, get_target

QAT_FILE, QAT_JSON = "qat_model.onnx", "qat.json"
TRAINABLE_OPS = ("Conv", "ConvTranspose")
PROBE_IMAGES = 4
MATCH_RTOL = 1e-3  # value matching torch features <-> ONNX tensors (float noise is ~1e-6)


# ---------------------------------------------------------------------------------- placement

@dataclass
class ActQuant:
    """One activation quantizer: the tensors sharing a PTQ scale/zero point."""

    tensors: list[str]
    scale: float
    zero_point: int
    qmin: int   # clamp range of the zero point's dtype (what QuantizeLinear saturates to)
    qmax: int
    max_scale: float = math.inf  # keeps a removed Clip's bound (see _clip_bounds)


@dataclass
class Placement:
    """Where the PTQ model quantizes, in terms of the FP32 graph's nodes and tensors."""

    acts: list[ActQuant]
    act_edges: dict[tuple[str, int], int]            # (node, input index) -> acts index
    weight_edges: dict[tuple[str, int], int | None]  # (node, input index) -> channel axis / None
    weight_names: dict[tuple[str, int], str]         # (node, input index) -> FP32 initializer
    bias_edges: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)  # -> (input, weight) index

    def head_view(self, model: onnx.ModelProto) -> dict[str, int]:
        """Tensors the head reads through Q/DQ -> their quantizer."""
        out = {}
        for n in model.graph.node:
            if partition_of(n) == "head":
                for i, t in enumerate(n.input):
                    if (n.name, i) in self.act_edges:
                        out.setdefault(t, self.act_edges[(n.name, i)])
        return out


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
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
    inits = _inits(ptq)
    producer = {o: n for n in ptq.graph.node for o in n.output}
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    groups: dict[str, int] = {}   # scale initializer / tensor -> acts index
    acts: list[ActQuant] = []
    act_edges, weight_edges, weight_names, bias_edges = {}, {}, {}, {}
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
            elif q is not None and q.op_type == "QuantizeLinear" and q.input[0] in inits:
                weight_edges[(n.name, i)] = _axis(q, scale)  # TensorRT: float weight behind Q -> DQ
                weight_names[(n.name, i)] = fp32_nodes[n.name].input[i]
            elif q is not None and q.op_type == "QuantizeLinear":
                act_edges[(n.name, i)] = _act_group(q, inits, groups, acts)
    return Placement(acts, act_edges, weight_edges, weight_names, bias_edges)


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


def _tie_activation_inputs(placement: Placement, fp32: onnx.ModelProto, quantize: list[str]) -> None:
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


def _clip_bounds(placement: Placement, fp32: onnx.ModelProto, ptq: onnx.ModelProto) -> None:
    """ORT drops a Relu/Clip after a quantized op and lets the Q clamp instead; the interpreter
    keeps the Clip. Both agree while the quantized range stays inside the Clip's: cap the scale."""
    kept, inits = {n.name for n in ptq.graph.node}, _inits(fp32)
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
        from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType
        dtype = onnx.TensorProto.INT8 if a.qmin < 0 else onnx.TensorProto.UINT8
        qmin, qmax = (int(v) for v in get_qmin_qmax_for_qType(dtype, symmetric=True))
        half = scale * (qmax - qmin) / 2.0
        return -half, half
    return (a.qmin - a.zero_point) * scale, (a.qmax - a.zero_point) * scale


# -------------------------------------------------------------------------------- interpreter

def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


OpFn = Callable[[list, dict], "torch.Tensor | list[torch.Tensor]"]
_OPS: dict[str, OpFn] = {}


def _op(*names: str) -> Callable[[OpFn], OpFn]:
    def deco(fn: OpFn) -> OpFn:
        for name in names:
            _OPS[name] = fn
        return fn
    return deco


def supported_ops() -> list[str]:
    return sorted(_OPS)


def _spatial_pads(x: torch.Tensor, pads: list[int], nd: int, value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """ONNX pads (begins..., ends...) -> torch padding; asymmetric pads become an explicit F.pad."""
    if pads[:nd] == pads[nd:]:
        return x, list(pads[:nd])
    torch_pads = [p for d in reversed(range(nd)) for p in (pads[d], pads[d + nd])]
    return F.pad(x, torch_pads, value=value), [0] * nd


def _no_auto_pad(a: dict) -> None:
    if a.get("auto_pad", "NOTSET") != "NOTSET":
        raise UadcError(f"qat: auto_pad={a['auto_pad']} is not supported by the QAT interpreter")


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DECONV = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@_op("Conv")
def _conv(ins, a):
    _no_auto_pad(a)
    x, w, b = ins[0], ins[1], ins[2] if len(ins) > 2 else None
    nd = w.dim() - 2
    x, pad = _spatial_pads(x, a.get("pads", [0] * 2 * nd), nd)
    return _CONV[nd](x, w, b, a.get("strides", [1] * nd), pad, a.get("dilations", [1] * nd), a.get("group", 1))


@_op("ConvTranspose")
def _conv_transpose(ins, a):
    _no_auto_pad(a)
    x, w, b = ins[0], ins[1], ins[2] if len(ins) > 2 else None
    nd = w.dim() - 2
    pads = a.get("pads", [0] * 2 * nd)
    if "output_shape" in a or pads[:nd] != pads[nd:]:
        raise UadcError("qat: ConvTranspose with output_shape or asymmetric pads is not supported")
    return _DECONV[nd](x, w, b, a.get("strides", [1] * nd), pads[:nd], a.get("output_padding", [0] * nd),
                       a.get("group", 1), a.get("dilations", [1] * nd))


@_op("Clip")
def _clip(ins, a):
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("min")
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else a.get("max")
    lo, hi = (float(v) if v is not None else None for v in (lo, hi))
    return ins[0] if lo is None and hi is None else torch.clamp(ins[0], lo, hi)


_op("Relu")(lambda ins, a: F.relu(ins[0]))
_op("LeakyRelu")(lambda ins, a: F.leaky_relu(ins[0], a.get("alpha", 0.01)))
_op("Sigmoid")(lambda ins, a: torch.sigmoid(ins[0]))
_op("Tanh")(lambda ins, a: torch.tanh(ins[0]))
_op("HardSigmoid")(lambda ins, a: torch.clamp(a.get("alpha", 0.2) * ins[0] + a.get("beta", 0.5), 0, 1))
_op("HardSwish")(lambda ins, a: F.hardswish(ins[0]))
_op("Neg")(lambda ins, a: -ins[0])
_op("Sqrt")(lambda ins, a: torch.sqrt(ins[0]))
_op("Identity")(lambda ins, a: ins[0])
_op("Add")(lambda ins, a: ins[0] + ins[1])
_op("Sub")(lambda ins, a: ins[0] - ins[1])
_op("Mul")(lambda ins, a: ins[0] * ins[1])
_op("MatMul")(lambda ins, a: torch.matmul(ins[0], ins[1]))
_op("Concat")(lambda ins, a: torch.cat([t for t in ins if t is not None], dim=a["axis"]))
_op("Transpose")(lambda ins, a: ins[0].permute(*a.get("perm", list(reversed(range(ins[0].dim()))))))
_op("GlobalAveragePool")(lambda ins, a: ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True))
_op("GlobalMaxPool")(lambda ins, a: ins[0].amax(dim=tuple(range(2, ins[0].dim())), keepdim=True))
_op("Shape")(lambda ins, a: torch.tensor(ins[0].shape[a.get("start", 0):a.get("end")], dtype=torch.int64))


@_op("Div")
def _div(ins, a):
    if not ins[0].is_floating_point() and not ins[1].is_floating_point():
        return torch.div(ins[0], ins[1], rounding_mode="trunc")  # ONNX integer Div truncates
    return ins[0] / ins[1]


@_op("Pad")
def _pad(ins, a):
    x, pads = ins[0], ins[1].tolist()
    value = float(ins[2]) if len(ins) > 2 and ins[2] is not None else 0.0
    axes = [ax % x.dim() for ax in ins[3].tolist()] if len(ins) > 3 and ins[3] is not None else list(range(x.dim()))
    full = [0] * (2 * x.dim())
    for k, ax in enumerate(axes):
        full[ax], full[ax + x.dim()] = pads[k], pads[k + len(axes)]
    pairs = [p for d in reversed(range(x.dim())) for p in (full[d], full[d + x.dim()])]
    while pairs[-2:] == [0, 0] and len(pairs) > 2:  # torch pads trailing dims only
        pairs = pairs[:-2]
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    mode = modes[a.get("mode", "constant")]
    return F.pad(x, pairs, mode=mode, value=value) if mode == "constant" else F.pad(x, pairs, mode=mode)


@_op("Resize")
def _resize(ins, a):
    x = ins[0]
    scales = ins[2] if len(ins) > 2 and ins[2] is not None and ins[2].numel() else None
    sizes = ins[3] if len(ins) > 3 and ins[3] is not None and ins[3].numel() else None
    mode, ctm = a.get("mode", "nearest"), a.get("coordinate_transformation_mode", "half_pixel")
    if a.get("antialias", 0) or "axes" in a:
        raise UadcError("qat: Resize with antialias or axes is not supported")
    kw = {"size": [int(v) for v in sizes.tolist()[2:]]} if sizes is not None else {
        "scale_factor": [float(v) for v in scales.tolist()[2:]], "recompute_scale_factor": False}
    nd = x.dim() - 2
    if mode == "linear" and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        interp = {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
        return F.interpolate(x, mode=interp, align_corners=ctm == "align_corners", **kw)
    nearest = a.get("nearest_mode", "round_prefer_floor")
    if mode == "nearest" and ctm == "asymmetric" and nearest == "floor":
        return F.interpolate(x, mode="nearest", **kw)
    if mode == "nearest" and ctm == "half_pixel" and nearest == "round_prefer_ceil":
        return F.interpolate(x, mode="nearest-exact", **kw)
    raise UadcError(f"qat: Resize mode={mode} coordinate_transformation_mode={ctm} nearest_mode={nearest} "
                    f"is not supported by the QAT interpreter")


@_op("Reshape")
def _reshape(ins, a):
    shape = ins[1].tolist()
    if not a.get("allowzero", 0):
        shape = [ins[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return ins[0].reshape(shape)


@_op("Flatten")
def _flatten(ins, a):
    axis = a.get("axis", 1) % max(1, ins[0].dim())
    return ins[0].reshape(math.prod(ins[0].shape[:axis]), -1)


@_op("MaxPool")
def _max_pool(ins, a):
    _no_auto_pad(a)
    k = a["kernel_shape"]
    nd = len(k)
    x, pad = _spatial_pads(ins[0], a.get("pads", [0] * 2 * nd), nd, value=-math.inf)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    return fn(x, k, a.get("strides", [1] * nd), pad, a.get("dilations", [1] * nd), bool(a.get("ceil_mode", 0)))


@_op("AveragePool")
def _avg_pool(ins, a):
    _no_auto_pad(a)
    k = a["kernel_shape"]
    nd = len(k)
    pads = a.get("pads", [0] * 2 * nd)
    if pads[:nd] != pads[nd:] or any(d != 1 for d in a.get("dilations", [1] * nd)):
        raise UadcError("qat: AveragePool with asymmetric pads or dilations is not supported")
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    return fn(ins[0], k, a.get("strides", [1] * nd), pads[:nd], bool(a.get("ceil_mode", 0)),
              bool(a.get("count_include_pad", 0)))


@_op("Constant")
def _constant(ins, a):
    if "value" in a:
        return torch.from_numpy(numpy_helper.to_array(a["value"]).copy())
    key, v = next(iter(a.items()))
    return torch.tensor(v, dtype=torch.float32 if key.startswith("value_float") else torch.int64)


@_op("Gather")
def _gather(ins, a):
    x, idx = ins[0], ins[1].long()
    axis = a.get("axis", 0) % x.dim()
    flat = torch.index_select(x, axis, idx.reshape(-1) % x.shape[axis])
    return flat.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


def _axes_of(ins, a) -> list[int]:
    return ins[1].tolist() if len(ins) > 1 and ins[1] is not None else list(a.get("axes", []))


@_op("Unsqueeze")
def _unsqueeze(ins, a):
    x, axes = ins[0], _axes_of(ins, a)
    for ax in sorted(ax % (x.dim() + len(axes)) for ax in axes):
        x = x.unsqueeze(ax)
    return x


@_op("Squeeze")
def _squeeze(ins, a):
    axes = [ax % ins[0].dim() for ax in _axes_of(ins, a)] or [d for d, n in enumerate(ins[0].shape) if n == 1]
    return ins[0].squeeze(tuple(axes))


@_op("Slice")
def _slice(ins, a):
    x = ins[0]
    starts, ends = ins[1].tolist(), ins[2].tolist()
    axes = ins[3].tolist() if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = ins[4].tolist() if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st < 0:
            raise UadcError("qat: Slice with negative steps is not supported")
        dim = x.shape[ax]
        index[ax % x.dim()] = slice(max(-dim, min(s, dim)), max(-dim - 1, min(e, dim)), st)
    return x[tuple(index)]


@_op("Cast")
def _cast(ins, a):
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(a["to"])
    return ins[0].to(torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype)


@dataclass
class _Node:
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict
    fn: OpFn


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient times ``g`` (LSQ's step-size gradient scaling)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: float) -> torch.Tensor:
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.g, None


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()  # exact: |round(v) - v| <= 0.5 subtracts exactly


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """DequantizeLinear(QuantizeLinear(x)) bit-exactly as ONNX Runtime computes it (x / scale,
    round half to even, saturate): torch's fake_quantize multiplies by 1/scale, which flips ties.
    Gradients are LSQ's: straight-through for x inside the range, round(x/s) - x/s (inside) or
    the clamp bound (outside) for the scale."""
    q = torch.clamp(_round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


class ActFakeQuant(nn.Module):
    """Per-tensor activation fake-quant, one learnable scale per PTQ quantizer group; zero points
    stay at their PTQ values. Each scale is ``s0 * r`` with ``r`` learned from 1: Adam's steps
    (~lr) are then relative, where a raw scale of 5e-5 would be overshot below zero by one step;
    and ``s0 * 1`` is ``s0`` exactly, so training starts bit-exactly at the PTQ model."""

    MIN_RATIO = 1e-3

    def __init__(self, acts: list[ActQuant], learn: bool = True):
        super().__init__()
        self.specs, self.learn = acts, learn
        self.register_buffer("init_scales", torch.tensor([a.scale for a in acts], dtype=torch.float32))
        self.ratios = nn.ParameterList([nn.Parameter(torch.ones(1), requires_grad=learn) for _ in acts])

    def scale(self, k: int) -> torch.Tensor:
        return self.init_scales[k:k + 1] * self.ratios[k]

    def forward(self, k: int, x: torch.Tensor) -> torch.Tensor:
        a, s = self.specs[k], self.scale(k)
        # LSQ gradient scaling 1 / sqrt(numel * qmax), as torch's _LearnableFakeQuantize
        s = _GradScale.apply(s, 1.0 / math.sqrt(x.numel() * max(1, a.qmax))) if self.learn else s.detach()
        return fake_quant(x, s, a.zero_point, a.qmin, a.qmax)

    @torch.no_grad()
    def project(self) -> None:
        """Keep scales positive and inside removed Clips' bounds after an optimizer step."""
        for a, s0, r in zip(self.specs, self.init_scales.tolist(), self.ratios):
            r.clamp_(min=self.MIN_RATIO, max=a.max_scale / s0)

    def current(self) -> list[float]:
        return [float(self.scale(k).detach()) for k in range(len(self.specs))]


def weight_scale(w: torch.Tensor, axis: int | None) -> torch.Tensor:
    """ORT's symmetric int8 min-max weight scale, max |w| / 127 (per channel or tensor), computed
    like ORT (float64, then float32; 1.0 where the weights are all zero)."""
    w = w.detach()
    a = w.abs().amax() if axis is None else w.abs().amax(dim=[d for d in range(w.dim()) if d != axis % w.dim()])
    scale = (a.double() / 127.0).float()
    return torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)


def weight_fake_quant(w: torch.Tensor, scale: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Symmetric int8 fake-quant at ``scale``; straight-through gradient. Divides like ORT's
    quantize_nparray (torch's fake_quantize multiplies by 1/scale, which flips rare ties)."""
    if axis is not None:
        scale = scale.reshape([-1 if d == axis % w.dim() else 1 for d in range(w.dim())])
    q = torch.clamp(torch.round(w.detach() / scale), -127, 127)
    return w + (q * scale - w).detach()


def bias_fake_quant(b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """ORT CPU's int32 bias: round(b / (s_in * s_w)) in float64, clipped; straight-through."""
    q = torch.round(b.detach().double() / scale.double()).clamp(-2 ** 31, 2 ** 31 - 1)
    return b + (q.float() * scale - b).detach()


class GraphInterpreter(nn.Module):
    """Runs a list of ONNX nodes in torch; fake-quant at the placement's edges when enabled.

    Float initializers of ``trainable`` become parameters (looked up by ONNX name through
    ``param_names``); other initializers are constants."""

    def __init__(self, model: onnx.ModelProto, node_names: list[str], trainable: set[str] = frozenset(),
                 placement: Placement | None = None, learn_scales: bool = True):
        super().__init__()
        wanted = set(node_names)
        self.nodes = []
        for n in model.graph.node:
            if n.name in wanted:
                if n.op_type not in _OPS:
                    raise UadcError(f"qat: op {n.op_type} (node {n.name}) is not supported by the QAT "
                                    f"interpreter; supported: {', '.join(supported_ops())}")
                self.nodes.append(_Node(n.name, n.op_type, list(n.input), list(n.output), _attrs(n), _OPS[n.op_type]))
        used = {t for n in self.nodes for t in n.inputs}
        self.param_names: list[str] = []
        params, self.consts = [], {}
        for init in model.graph.initializer:
            if init.name not in used:
                continue
            value = torch.from_numpy(numpy_helper.to_array(init).copy())
            if init.name in trainable and value.is_floating_point():
                self.param_names.append(init.name)
                params.append(nn.Parameter(value))
            else:
                self.consts[init.name] = value
        self.params = nn.ParameterList(params)
        self._param_index = {name: i for i, name in enumerate(self.param_names)}
        self.placement = placement or Placement([], {}, {}, {})
        self.act_fq = ActFakeQuant(self.placement.acts, learn_scales)
        self.quantize = placement is not None

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in zip(self.param_names, self.params)}

    def _value(self, env: dict, name: str) -> torch.Tensor | None:
        if not name:
            return None
        if name in env:
            return env[name]
        if name in self._param_index:
            return self.params[self._param_index[name]]
        if name in self.consts:
            return self.consts[name]
        raise UadcError(f"qat: tensor {name!r} has no value (not fed, produced or an initializer)")

    def _inputs(self, env: dict, node: _Node) -> list[torch.Tensor | None]:
        """The node's inputs as the Q/DQ model feeds them (fake-quantized where it quantizes)."""
        vals = [self._value(env, t) for t in node.inputs]
        if not self.quantize:
            return vals
        pl, w_scales = self.placement, {}
        for i, x in enumerate(vals):
            key = (node.name, i)
            if x is None:
                continue
            if key in pl.act_edges:
                vals[i] = self.act_fq(pl.act_edges[key], x)
            elif key in pl.weight_edges:
                w_scales[i] = weight_scale(x, pl.weight_edges[key])
                vals[i] = weight_fake_quant(x, w_scales[i], pl.weight_edges[key])
        for i, x in enumerate(vals):
            src = pl.bias_edges.get((node.name, i))
            if x is not None and src is not None and (node.name, src[0]) in pl.act_edges and src[1] in w_scales:
                s_in = self.act_fq.scale(pl.act_edges[(node.name, src[0])]).detach()
                vals[i] = bias_fake_quant(x, s_in * w_scales[src[1]])  # float32 product, as ORT
        return vals

    def forward(self, feeds: dict[str, torch.Tensor], outputs: list[str]) -> dict[str, torch.Tensor]:
        env = dict(feeds)
        for node in self.nodes:
            res = node.fn(self._inputs(env, node), node.attrs)
            for name, value in zip(node.outputs, res if isinstance(res, (list, tuple)) else [res]):
                if name:
                    env[name] = value
        return {name: env[name] for name in outputs}


# ------------------------------------------------------------------------------- QAT network

@dataclass
class Split:
    """The FP32 graph cut for QAT: a frozen float prefix, the fake-quantized net, the head."""

    frozen: list[str]        # node names (teacher, when not quantized)
    net: list[str]           # node names run with fake-quant (student, + teacher if quantized)
    frozen_outputs: list[str]  # what the net and the loss read from the frozen part
    head_inputs: list[str]   # tensors the head reads, graph order
    teacher_tensors: list[str]  # teacher-produced tensors read outside the teacher
    student_tensors: list[str]  # student-produced tensors read by the head


def split_graph(model: onnx.ModelProto, quantize: list[str], image: str = INPUT_NAME) -> Split:
    part = {n.name: partition_of(n) for n in model.graph.node}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    in_net = {"student"} | (set(quantize) - {"head"})
    frozen = [n.name for n in model.graph.node if part[n.name] not in in_net | {"head"}]
    net = [n.name for n in model.graph.node if part[n.name] in in_net - {"head"}]
    graph_out = {o.name for o in model.graph.output}

    def read_by(names: set[str] | None, exclude: str | None = None) -> list[str]:
        out: dict[str, None] = {}
        for n in model.graph.node:
            if (names is None or n.name in names) and part[n.name] != exclude:
                out.update((t, None) for t in n.input if t in producer or t == image)
        return list(out)

    head = {n.name for n in model.graph.node if part[n.name] == "head"}
    head_inputs = [t for t in read_by(head) if t == image or part[producer.get(t, "")] != "head"] \
        if head else []
    teacher_tensors = [t for t in dict.fromkeys(read_by(None, exclude="teacher") + list(graph_out))
                       if t in producer and part[producer[t]] == "teacher"]
    student_tensors = [t for t in dict.fromkeys(head_inputs + list(graph_out))
                       if t in producer and part[producer[t]] == "student"]
    frozen_set = set(frozen)
    net_reads = [t for t in read_by(set(net)) if t != image and producer[t] in frozen_set]
    frozen_outputs = list(dict.fromkeys(
        net_reads + [t for t in head_inputs + teacher_tensors if producer.get(t) in frozen_set]))
    return Split(frozen, net, frozen_outputs, head_inputs, teacher_tensors, student_tensors)


class QatNet(nn.Module):
    """Frozen FP32 prefix + fake-quantized net, both interpreted from the FP32 ONNX graph."""

    def __init__(self, fp32: onnx.ModelProto, placement: Placement | None, quantize: list[str],
                 learn_scales: bool = True, image: str = INPUT_NAME):
        super().__init__()
        self.image = image
        self.split = split_graph(fp32, quantize, image)
        part = {n.name: partition_of(n) for n in fp32.graph.node}
        trainable = {t for n in fp32.graph.node if part[n.name] == "student" and n.op_type in TRAINABLE_OPS
                     for t in n.input[1:3] if t}
        self.frozen = GraphInterpreter(fp32, self.split.frozen)
        self.net = GraphInterpreter(fp32, self.split.net, trainable, placement, learn_scales)
        self.head_view = placement.head_view(fp32) if placement is not None else {}
        self._computed = {t for n in self.net.nodes for t in n.outputs}

    @property
    def quantize(self) -> bool:
        return self.net.quantize

    @quantize.setter
    def quantize(self, on: bool) -> None:
        self.net.quantize = on

    @torch.no_grad()
    def frozen_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.frozen({self.image: images}, self.split.frozen_outputs)

    def forward(self, images: torch.Tensor, outputs: list[str],
                frozen: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``outputs`` as the head reads them (through the PTQ model's Q/DQ where it has one)."""
        feeds = {self.image: images, **(frozen if frozen is not None else self.frozen_features(images))}
        env = self.net(feeds, [t for t in outputs if t in self._computed])
        out = {}
        for t in outputs:
            v = env[t] if t in env else feeds[t]
            if self.quantize and t in self.head_view:
                v = self.net.act_fq(self.head_view[t], v)
            out[t] = v
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- loss ordering

@dataclass
class LossOrder:
    """ONNX tensor names of the torch model's ``t_feats`` and ``s_feats``, in torch order."""

    teacher: list[str]
    student: list[str]


def _match(ref: list[torch.Tensor], cands: dict[str, torch.Tensor], what: str) -> list[str]:
    names = []
    for k, r in enumerate(ref):
        errs = {n: float((v - r).abs().max()) for n, v in cands.items() if tuple(v.shape) == tuple(r.shape)}
        best = min(errs, key=errs.get, default=None)
        tol = MATCH_RTOL * max(1.0, float(r.abs().max()))
        if best is None or errs[best] > tol:
            raise UadcError(f"qat: {what} feature {k} of the torch model (shape {tuple(r.shape)}) has no "
                            f"counterpart among the ONNX graph's partition outputs")
        names.append(best)
    return names


@torch.no_grad()
def loss_order(net: QatNet, model, probe: torch.Tensor) -> LossOrder:
    """Match the torch model's teacher/student features to ONNX tensors by value (FP32)."""
    was = net.quantize
    net.quantize = False
    try:
        names = net.split.teacher_tensors + net.split.student_tensors
        env = net(probe, names)
    finally:
        net.quantize = was
    t_ref = model.teacher_features(probe)
    s_ref = model.student_features(probe, t_ref)
    teacher = _match(t_ref, {n: env[n] for n in net.split.teacher_tensors}, "teacher")
    student = _match(s_ref, {n: env[n] for n in net.split.student_tensors}, "student")
    return LossOrder(teacher, student)


# -------------------------------------------------------------------------------- fine-tuning

@dataclass
class QatData:
    images: torch.Tensor
    frozen: dict[str, torch.Tensor] | None  # cached frozen-prefix outputs (None: recompute per batch)

    def batch(self, net: QatNet, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.images[idx]
        return x, ({k: v[idx] for k, v in self.frozen.items()} if self.frozen is not None
                   else net.frozen_features(x))


def prepare_qat_data(net: QatNet, images: torch.Tensor, cache: bool, batch_size: int = 32) -> QatData:
    """Cache the frozen prefix's outputs once (teacher frozen) when they are all per-image tensors."""
    if not cache or not images.shape[0]:
        return QatData(images, None)
    starts = range(0, len(images), batch_size)
    chunks = [net.frozen_features(images[i:i + batch_size]) for i in starts]
    per_image = all(v.is_floating_point() and v.dim() > 0 and v.shape[0] == len(images[i:i + batch_size])
                    for i, c in zip(starts, chunks) for v in c.values())
    if not per_image:  # shape helpers crossing the cut (batch-size dependent): recompute per batch
        return QatData(images, None)
    return QatData(images, {k: torch.cat([c[k] for c in chunks]) for k in net.split.frozen_outputs})


def _loss(net: QatNet, model, order: LossOrder, x: torch.Tensor, frozen: dict) -> torch.Tensor:
    out = net(x, order.teacher + order.student, frozen)
    return model.loss([out[t] for t in order.teacher], [out[s] for s in order.student])


@torch.no_grad()
def mean_loss(net: QatNet, model, order: LossOrder, data: QatData, batch_size: int) -> float:
    n = len(data.images)
    losses = [(_loss(net, model, order, *data.batch(net, torch.arange(i, min(i + batch_size, n)))).item(),
               min(batch_size, n - i)) for i in range(0, n, batch_size)]
    return sum(v * k for v, k in losses) / n


def fine_tune(net: QatNet, model, order: LossOrder, data: QatData, epochs: int, lr: float, batch_size: int,
              seed: int, log: Callable[[str], None] = print) -> list[dict]:
    """Adam on student weights (+ activation scales); per-epoch mean loss, like ``train.fit``."""
    n = len(data.images)
    bs = min(batch_size, n)
    steps = max(1, n // bs)  # ragged last batch dropped, as in train.fit
    params = net.trainable_parameters()
    if not params:
        raise UadcError("qat: the quantized partitions have no trainable Conv weights")
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(total=steps * epochs, desc="qat", unit="step", disable=None)
    for epoch in range(epochs):
        perm, losses, t0 = torch.randperm(n, generator=gen), [], time.time()
        for b in range(steps):
            loss = _loss(net, model, order, *data.batch(net, perm[b * bs:(b + 1) * bs]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            net.net.act_fq.project()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses):.4f}")
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.time() - t0, 2),
                        "lr": lr})
        log(f"qat epoch {epoch + 1}/{epochs}  loss {np.mean(losses):.4f}  ({time.time() - t0:.0f} s)")
    bar.close()
    return history


# ------------------------------------------------------------------------------------ export

def with_weights(fp32: onnx.ModelProto, weights: dict[str, torch.Tensor]) -> onnx.ModelProto:
    """A copy of ``fp32`` whose initializers named in ``weights`` hold the given values."""
    out = onnx.ModelProto()
    out.CopyFrom(fp32)
    for init in out.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].detach().numpy().astype(np.float32), init.name))
    return out


def qat_ranges(net: QatNet, calibrated: dict[str, tuple[float, float]], symmetric: bool) -> dict:
    """Calibrated ranges with every fake-quantized tensor's range replaced by its learned scale's."""
    ranges = dict(calibrated)
    fq = net.net.act_fq
    for a, s in zip(fq.specs, fq.current()):
        for t in a.tensors:
            ranges[t] = scale_to_range(a, s, symmetric)
    return ranges


def head_inputs_onnx(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` (FP32 or Q/DQ) with ORT and return ``names`` as the head reads them."""
    producer = {o: n for n in model.graph.node for o in n.output}

    def source(t: str) -> str:
        while t in producer and producer[t].op_type in QDQ_OPS:
            t = producer[t].input[0]
        return t

    view = {}
    for n in model.graph.node:
        if partition_of(n) == "head":
            for t in n.input:
                view.setdefault(source(t), t)
    exposed = [view.get(t, t) for t in names]
    from uadc.calibrate import _with_outputs
    values = run_ort(_with_outputs(model, exposed), feeds, exposed)
    return dict(zip(names, values))


def max_rel_diff(ref: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> float:
    """Worst max |diff| / max(1, max |ref|) over tensors."""
    return max(float(np.abs(ref[k] - new[k]).max()) / max(1.0, float(np.abs(ref[k]).max())) for k in ref)


def differing_fraction(ref: dict[str, np.ndarray], new: dict[str, np.ndarray], rtol: float = 1e-5) -> float:
    """Worst fraction of elements differing beyond float noise (|diff| > rtol * max(1, max |ref|))."""
    return max(float((np.abs(ref[k] - new[k]) > rtol * max(1.0, float(np.abs(ref[k]).max()))).mean())
               for k in ref)


# ---------------------------------------------------------------------------------- pipeline

@dataclass
class QatOptions:
    target: str
    epochs: int | None = None        # default: recipe qat.epochs
    lr: float | None = None          # default: recipe qat.lr
    batch_size: int | None = None    # default: recipe qat.batch_size
    calibrator: str | None = None    # PTQ initialisation, defaults as for `uadc compile`
    calib_data: str | None = None
    calib_samples: int | None = None
    quantize: list[str] | None = None
    per_channel: bool | None = None  # as CompileOptions.per_channel (None: the target's)
    learn_scales: bool = True
    out: Path | None = None          # default: <artifacts>/<recipe>/qat_<target>


@dataclass
class QatResult:
    model: onnx.ModelProto
    path: Path
    ptq_model: onnx.ModelProto
    net: QatNet
    placement: Placement
    order: LossOrder
    summary: dict
    quantize: list[str]
    compiler: object = field(repr=False, default=None)


def qat_dir(recipe: Recipe, target: str, artifacts: Path | None = None) -> Path:
    return recipe.artifact_dir(artifacts) / f"qat_{target}"


def ptq_init(compiler, target: Target, calibrator: str, calib_data: str, n: int, quantize: list[str],
             per_channel: bool | None = None) -> tuple[onnx.ModelProto, dict, PassContext]:
    """Calibrate and Q/DQ the FP32 model exactly as ``Compiler.compile`` does for PTQ."""
    fp32 = compiler.fp32_simplified[0]
    ranges, _ = compiler._calibrate(fp32, calibrator, calib_data, n, quantize, target)
    ctx = PassContext(target=target, ranges=ranges, quantize_partitions=quantize, per_channel=per_channel)
    ptq, _ = run_passes(fp32, ["qdq", "partition_check"], ctx)
    return ptq, ranges, ctx


def build_qat_net(fp32: onnx.ModelProto, ptq: onnx.ModelProto, quantize: list[str],
                  learn_scales: bool = True) -> tuple[QatNet, Placement]:
    placement = read_placement(ptq, fp32)
    _tie_activation_inputs(placement, fp32, quantize)
    _clip_bounds(placement, fp32, ptq)
    return QatNet(fp32, placement, quantize, learn_scales), placement


def _check_target(name: str) -> Target:
    target = get_target(name)
    if not target.quantized or target.scheme is None:
        raise UadcError(f"uadc qat needs an int8 target (ort-cpu-int8, trt-int8, jetson-int8); "
                        f"{name} is {target.precision}")
    return target


def _settings(recipe: Recipe, opts: QatOptions, target: Target) -> dict:
    """Options over recipe defaults; the PTQ initialisation resolved by ``uadc compile``'s own rule."""
    from uadc.compile import ptq_settings
    q = recipe["qat"]
    ptq = ptq_settings(recipe, target, opts.calibrator, opts.calib_data, opts.calib_samples, opts.quantize,
                       opts.per_channel)
    return {"epochs": opts.epochs or q["epochs"], "lr": q["lr"] if opts.lr is None else opts.lr,
            "batch_size": opts.batch_size or q["batch_size"], "seed": recipe["seed"],
            "quantize": ptq.quantize, "per_channel": ptq.per_channel, "learn_scales": opts.learn_scales,
            "init": {"calibrator": ptq.calibrator, "calib_data": ptq.calib_data, "samples": ptq.calib_samples}}


def run_qat(recipe: Recipe, opts: QatOptions, artifacts: Path | None = None, compiler=None,
            log: Callable[[str], None] = print) -> QatResult:
    """PTQ init -> fake-quant fine-tuning -> Q/DQ export; writes ``qat_model.onnx`` + ``qat.json``
    atomically into ``opts.out`` (default ``<artifacts>/<recipe>/qat_<target>``)."""
    from uadc.compile import Compiler
    from uadc.train import load_images, seed_everything, set_threads

    target = _check_target(opts.target)
    t_start = time.time()
    compiler = compiler or Compiler(recipe, artifacts, log=log)
    set_threads(recipe)
    st = _settings(recipe, opts, target)
    fp32 = compiler.fp32_simplified[0]
    init = st["init"]
    ptq, calibrated, ctx = ptq_init(compiler, target, init["calibrator"], init["calib_data"], init["samples"],
                                    st["quantize"], st["per_channel"])
    net, placement = build_qat_net(fp32, ptq, st["quantize"], opts.learn_scales)
    seed_everything(recipe["seed"])
    images = load_images(compiler.train_set, "loading images")
    model = compiler.model.eval()
    order = loss_order(net, model, images[:PROBE_IMAGES])
    data = prepare_qat_data(net, images, recipe["train"]["cache_teacher"])
    losses = {"ptq_loss": mean_loss(net, model, order, data, st["batch_size"])}
    log(f"qat: {len(placement.acts)} activation quantizers, {len(placement.weight_edges)} quantized weights; "
        f"PTQ loss {losses['ptq_loss']:.4f}")
    history = fine_tune(net, model, order, data, st["epochs"], st["lr"], st["batch_size"], recipe["seed"], log)
    losses["final_loss"] = mean_loss(net, model, order, data, st["batch_size"])
    ctx.ranges = qat_ranges(net, calibrated, target.scheme.activation_symmetric)
    qat_model, _ = run_passes(with_weights(fp32, net.net.weights()), ["qdq", "partition_check"], ctx)
    summary = _summary(recipe, compiler, target, st, losses, history, order, net, ctx.ranges, calibrated)
    summary["export_check"] = _export_check(net, qat_model, order, images[:PROBE_IMAGES])
    summary["seconds"] = round(time.time() - t_start, 2)
    out = opts.out or qat_dir(recipe, target.name, artifacts)
    _write(out, qat_model, summary)
    log(f"QAT model written: {out / QAT_FILE} (loss {losses['ptq_loss']:.4f} -> {losses['final_loss']:.4f})")
    return QatResult(qat_model, out / QAT_FILE, ptq, net, placement, order, summary, st["quantize"], compiler)


def _summary(recipe: Recipe, compiler, target: Target, settings: dict, losses: dict, history: list[dict],
             order: LossOrder, net: QatNet, ranges: dict, calibrated: dict) -> dict:
    from uadc.train import model_hash
    fq = net.net.act_fq
    return {
        "recipe": recipe.name, "recipe_hash": recipe.hash, "model_hash": model_hash(recipe),
        "checkpoint": str(compiler.ckpt_path), "target": target.name, "settings": settings, **losses,
        "history": history, "loss_order": {"teacher": order.teacher, "student": order.student},
        "quantizers": [{"tensors": a.tensors, "zero_point": a.zero_point, "ptq_scale": a.scale, "qat_scale": s}
                       for a, s in zip(fq.specs, fq.current())],
        "ranges": {t: list(r) for t, r in ranges.items()}, "ptq_ranges": {t: list(r) for t, r in calibrated.items()},
    }


def _write(out: Path, qat_model: onnx.ModelProto, summary: dict) -> None:
    from uadc.compile import _atomic_dir
    from uadc.evaluate import write_json_atomic
    with _atomic_dir(out) as tmp:
        onnx.save(qat_model, str(tmp / QAT_FILE))
        write_json_atomic(tmp / QAT_JSON, summary)


def onnx_frozen_features(model: onnx.ModelProto, net: QatNet, images: np.ndarray) -> dict[str, torch.Tensor]:
    """The frozen (float) prefix's outputs computed by ORT: feeding these instead of the torch
    interpreter's removes float noise (~1e-6) that would flip rare rounding ties downstream."""
    names = net.split.frozen_outputs
    if not names:
        return {}
    from uadc.calibrate import _with_outputs
    values = run_ort(_with_outputs(model, names), {net.image: images}, names)
    return {k: torch.from_numpy(v) for k, v in zip(names, values)}


def learned_scale_error(net: QatNet, qdq_model: onnx.ModelProto) -> float:
    """Worst relative difference between a learned scale and the exported Q node's scale (and
    an infinite one if a zero point moved): the range round trip must be exact."""
    inits = _inits(qdq_model)
    learned = {t: (s, a) for a, s in zip(net.net.act_fq.specs, net.net.act_fq.current()) for t in a.tensors}
    worst = 0.0
    for n in qdq_model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in learned:
            s, a = learned[n.input[0]]
            if int(numpy_helper.to_array(inits[n.input[2]])) != a.zero_point:
                return math.inf
            worst = max(worst, abs(float(numpy_helper.to_array(inits[n.input[1]])) - s) / s)
    return worst


@torch.no_grad()
def _export_check(net: QatNet, qat_model: onnx.ModelProto, order: LossOrder, probe: torch.Tensor) -> dict:
    """The exported Q/DQ model must compute what was trained: learned scales survive the export,
    and the head's inputs agree (ORT on the exported model vs the fake-quantized interpreter fed
    with ORT's teacher tensors)."""
    scale_err = learned_scale_error(net, qat_model)
    if scale_err > 1e-5:
        raise RuntimeError(f"qat export: learned scales did not survive the qdq pass (max rel diff {scale_err:.3g})")
    names = list(dict.fromkeys(order.teacher + order.student))
    x = probe.numpy()
    ours = {k: v.numpy() for k, v in net(probe, names, onnx_frozen_features(qat_model, net, x)).items()}
    ref = head_inputs_onnx(qat_model, names, {net.image: x})
    # Not always 0: float accumulation order (torch vs MLAS) can flip a rare rounding tie.
    return {"scale_max_rel_diff": scale_err, "head_inputs_max_rel_diff": max_rel_diff(ref, ours),
            "head_inputs_differing_fraction": differing_fraction(ref, ours)}


def load_qat_model(recipe: Recipe, target: str, artifacts: Path | None = None) -> onnx.ModelProto:
    """The Q/DQ model ``uadc qat`` wrote for ``target`` (UadcError if missing or stale)."""
    import json

    from uadc.train import model_hash
    d = qat_dir(recipe, target, artifacts)
    path = d / QAT_FILE
    if not path.is_file():
        raise UadcError(f"no QAT model for target {target} at {path}: run `uadc qat` first")
    meta = d / QAT_JSON
    if meta.is_file() and json.loads(meta.read_text()).get("model_hash") != model_hash(recipe):
        raise UadcError(f"QAT model {path} was made from a different checkpoint than recipe {recipe.name}'s: "
                        f"run `uadc qat` again")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise UadcError(f"cannot read QAT model {path}: {exc}") from None


__all__ = ["QatOptions", "QatResult", "run_qat", "load_qat_model", "QatNet", "GraphInterpreter", "read_placement",
           "Placement", "ActQuant", "supported_ops"]
