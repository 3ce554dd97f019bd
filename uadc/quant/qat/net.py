"""The QAT network: the FP32 graph cut into a frozen float prefix, the fake-quantized net and the
head (:func:`split_graph`, :class:`QatNet`), and the order in which the torch model's loss reads
the head's inputs (:func:`loss_order`, matched by value)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import torch
from torch import nn

from uadc.core.constants import INPUT_NAME
from uadc.core.errors import UadcError
from uadc.export.partitions import partition_of
from uadc.quant.qat.interpreter import GraphInterpreter
from uadc.quant.qat.placement import Placement

TRAINABLE_OPS = ("Conv", "ConvTranspose")
MATCH_RTOL = 1e-3  # value matching torch features <-> ONNX tensors (float noise is ~1e-6)


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
