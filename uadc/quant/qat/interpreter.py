"""A small ONNX -> torch interpreter with ORT-exact fake-quant at a :class:`Placement`'s edges.

The op table (:func:`supported_ops`), the fake-quant functions (activations with LSQ-style
learnable scales, ORT's symmetric int8 weights, ORT CPU's int32 biases; all straight-through)
and :class:`GraphInterpreter`, which runs a list of the FP32 graph's nodes in torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from uadc.core.errors import UadcError
from uadc.quant.qat.placement import ActQuant, Placement


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


def weight_scale(w: torch.Tensor, axis: int | None, qmax: int = 127) -> torch.Tensor:
    """ORT's symmetric int8 min-max weight scale, max |w| / qmax (127; 64 with 7-bit weights) per
    channel or tensor, computed like ORT (float64, then float32; 1.0 where the weights are all zero)."""
    w = w.detach()
    a = w.abs().amax() if axis is None else w.abs().amax(dim=[d for d in range(w.dim()) if d != axis % w.dim()])
    scale = (a.double() / float(qmax)).float()
    return torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)


def weight_fake_quant(w: torch.Tensor, scale: torch.Tensor, axis: int | None, qmax: int = 127) -> torch.Tensor:
    """Symmetric int8 fake-quant at ``scale`` in [-qmax, qmax]; straight-through gradient. Divides like ORT's
    quantize_nparray (torch's fake_quantize multiplies by 1/scale, which flips rare ties)."""
    if axis is not None:
        scale = scale.reshape([-1 if d == axis % w.dim() else 1 for d in range(w.dim())])
    q = torch.clamp(torch.round(w.detach() / scale), -qmax, qmax)
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
                w_scales[i] = weight_scale(x, pl.weight_edges[key], pl.weight_qmax)
                vals[i] = weight_fake_quant(x, w_scales[i], pl.weight_edges[key], pl.weight_qmax)
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
