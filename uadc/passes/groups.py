"""Fused groups: the units ``compile.precision: auto`` assigns a precision to.

A group is one node ONNX Runtime's Q/DQ quantizer handles (Conv, Add, Mul, Resize, ...) plus
the activation that follows it when that activation is its only reader (an activation is a group of its own
only behind an op the quantizer handles: after any other it stays float) (Conv -> Clip runs as
one fused kernel in FP32 and as one QLinearConv in INT8, the Clip folded into the Q range).
Depthwise convolutions are groups of their own, so they can stay FP32 where INT8 is slower.
``Boundaries`` counts the elements that cross between FP32 and INT8 nodes under an assignment:
each crossing costs a QuantizeLinear or DequantizeLinear (the Q/DQ islands of a mixed model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from uadc.export.partitions import GraphIndex, partition_of
from uadc.passes.qdq import quantized_op_types

ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid")
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


@dataclass(frozen=True)
class Group:
    name: str                 # the anchor node's name (the group's name in reports)
    partition: str
    op: str                   # e.g. "Conv 3x3 dw", "Conv 1x1 + Clip", "Add"
    nodes: tuple[str, ...]    # node names, graph order
    index: tuple[int, ...]    # node positions in the graph


def _conv_label(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str:
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    if w is None or len(w.dims) < 3:
        return node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    groups = int(attrs.get("group", 1))
    kernel = "x".join(str(d) for d in w.dims[2:])
    dw = groups > 1 and groups == w.dims[0] and w.dims[1] == 1
    return f"{node.op_type} {kernel}{' dw' if dw else ''}"


def _has_float_input(node: onnx.NodeProto, floats: set[str]) -> bool:
    return any(t in floats for t in node.input if t)


def float_tensors(model: onnx.ModelProto) -> set[str]:
    g = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    return {v.name for v in [*g.value_info, *g.input, *g.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type in _FLOATS}


def fused_groups(model: onnx.ModelProto, partitions: list[str] | tuple[str, ...]) -> list[Group]:
    """Groups of the nodes of ``partitions`` that ORT quantizes, in graph order."""
    ops = set(quantized_op_types())
    wanted = set(partitions)
    g = GraphIndex(model)
    inits = {i.name: i for i in model.graph.initializer}
    floats = float_tensors(model)
    taken: set[int] = set()
    groups = []
    for i, n in enumerate(g.nodes):
        if i in taken or n.op_type not in ops or partition_of(n) not in wanted or not _has_float_input(n, floats):
            continue
        if n.op_type in ACTIVATIONS and not any(g.nodes[p].op_type in ops for p in g.producers_of(i)):
            # ORT quantizes an activation only behind a quantized input: one after ReduceL2 (a norm's clamp) or
            # ReduceMin (the kNN's) stays float whatever the search chose, and the report called it INT8
            continue
        members = [i]
        label = _conv_label(n, inits) if n.op_type in ("Conv", "ConvTranspose") else n.op_type
        readers = g.consumers_of(i)
        if len(n.output) == 1 and len(readers) == 1 and n.op_type not in ACTIVATIONS:
            j = readers[0]
            nxt = g.nodes[j]
            if nxt.op_type in ACTIVATIONS and nxt.op_type in ops and partition_of(nxt) == partition_of(n):
                members.append(j)
                label += f" + {nxt.op_type}"
        taken.update(members)
        groups.append(Group(n.name, partition_of(n), label, tuple(g.nodes[k].name for k in members),
                            tuple(members)))
    return groups


def tensor_elements(model: onnx.ModelProto) -> dict[str, int]:
    """Elements of every tensor at batch 1 (symbolic dims count 1; unknown shapes count 0)."""
    g = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    out = {}
    for v in [*g.value_info, *g.input, *g.output]:
        t = v.type.tensor_type
        if v.type.HasField("tensor_type") and t.HasField("shape"):
            out[v.name] = int(np.prod([d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]))
    return out


class Boundaries:
    """FP32<->INT8 crossings of a model under an assignment of its groups."""

    def __init__(self, model: onnx.ModelProto, groups: list[Group], forked: bool = False):
        """``forked``: Q/DQ crossings (the qdq pass gives the image a pair per partition that reads it
        INT8); an FP16 stage's casts are shared by every reader."""
        self.g = GraphIndex(model)
        self.elements = tensor_elements(model)
        self.floats = float_tensors(model)
        self.group_of = {k: gi for gi, grp in enumerate(groups) for k in grp.index}
        self.part = [partition_of(n) for n in self.g.nodes]
        self.forked = forked
        self.outputs = {o.name for o in model.graph.output}
        # tensors touching a group: only those can cross (the rest is FP32 on both sides)
        self.tensors = sorted({t for grp in groups for k in grp.index
                               for t in [*self.g.nodes[k].input, *self.g.nodes[k].output]
                               if t and t in self.floats and t not in self.g.initializers})

    def _int8(self, node: int | None, int8: set[int]) -> bool:
        return node is not None and self.group_of.get(node) in int8

    def crossings(self, int8: set[int]) -> tuple[int, int]:
        """(Q/DQ nodes, elements they convert) when the groups ``int8`` (indices) run INT8: a
        tensor whose producer and some reader differ in precision crosses once per direction; with
        ``forked``, the image once into each partition with INT8 readers (one Q/DQ pair each)."""
        nodes = elements = 0
        for t in self.tensors:
            src = self._int8(self.g.producer.get(t), int8)
            users = self.g.consumers.get(t, [])
            readers = [self._int8(c, int8) for c in users]
            if t in self.outputs:
                readers.append(False)
            n = self.elements.get(t, 0)
            parts = {self.part[c] for c, q in zip(users, readers) if q}   # a Q before INT8 readers: the graph's
            into = 0 if src or not parts else len(parts) if self.forked and t not in self.g.producer else 1  # input
            out = int(src and not all(readers))                            # a DQ after
            nodes, elements = nodes + into + out, elements + n * (into + out)
        return nodes, elements
