"""Partition tags: every node of a uadc graph belongs to ``teacher``, ``student`` or ``head``.

A tag is written twice: as the node-name prefix (``student/node_Conv_3``) and as node metadata
``uadc.partition``. Tools that rebuild nodes (onnxsim, onnxslim, ORT's quantizer, the float16
converter) drop the metadata or add untagged nodes; ``assign_partitions`` restores tags by
name and derives the rest from the graph (producers, else consumers). Q/DQ nodes go to the
quantized partition they serve.
"""

from __future__ import annotations

import logging

import onnx
import onnx.utils

from uadc.core.constants import PARTITION_KEY, PARTITIONS, QDQ_OPS
from uadc.core.errors import UadcError

log = logging.getLogger(__name__)


def meta_partition(node: onnx.NodeProto) -> str | None:
    for p in node.metadata_props:
        if p.key == PARTITION_KEY:
            return p.value or None
    return None


def prefix_partition(node: onnx.NodeProto) -> str | None:
    head = node.name.split("/", 1)[0]
    return head if "/" in node.name and head in PARTITIONS else None


def partition_of(node: onnx.NodeProto) -> str | None:
    """The node's partition: ``uadc.partition`` metadata, else the name prefix, else None."""
    return meta_partition(node) or prefix_partition(node)


def partition_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes per partition (every partition listed; ``untagged`` only when there are some)."""
    counts = dict.fromkeys(PARTITIONS, 0)
    for n in model.graph.node:
        p = partition_of(n) or "untagged"
        counts[p] = counts.get(p, 0) + 1
    return counts


def partition_models(model: onnx.ModelProto) -> dict[str, onnx.ModelProto]:
    """One model per partition, in ``PARTITIONS`` order (a partition without nodes is left out); its
    inputs and outputs are the tensors crossing partition borders (the graph's inputs count as inputs: the
    image, and post-processing's ``category``, which became a constant at its default otherwise)."""
    producers = {o: partition_of(n) for n in model.graph.node for o in n.output}
    graph_inputs = {i.name for i in model.graph.input}
    graph_outputs = [o.name for o in model.graph.output]   # in the graph's order: a set's differed from run to run
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    subs = {}
    for p in PARTITIONS:
        ins, outs = [], []
        for n in model.graph.node:
            if partition_of(n) == p:
                ins += [i for i in n.input if i and (i in graph_inputs or (i in producers and producers[i] != p))]
            else:
                outs += [i for i in n.input if producers.get(i) == p]
        outs += [o for o in graph_outputs if producers.get(o) == p]
        ins, outs = list(dict.fromkeys(ins)), list(dict.fromkeys(outs))
        if outs:
            subs[p] = extractor.extract_model(ins, outs)
            subs[p].metadata_props.extend(model.metadata_props)
    return subs


def branch_models(model: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto, onnx.ModelProto] | None:
    """(teacher, student, join): the teacher's and the student's nodes (with whatever they need) from the
    graph's input to the tensors the rest reads, and the rest (head, post-processing) from those to the
    graph's outputs. None when one branch needs the other's tensors (PaSTe's student reads the teacher)."""
    graph_input = model.graph.input[0].name
    side = {o: partition_of(n) for n in model.graph.node for o in n.output}
    crossing: dict[str, list[str]] = {"teacher": [], "student": []}
    for n in model.graph.node:
        here = partition_of(n)
        for i in n.input:
            if side.get(i) in crossing and side[i] != here:
                crossing[side[i]].append(i)
    for o in model.graph.output:
        if side.get(o.name) in crossing:
            crossing[side[o.name]].append(o.name)
    if not all(crossing.values()):
        return None
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    branches = []
    for p, other in (("teacher", "student"), ("student", "teacher")):
        sub = extractor.extract_model([graph_input], list(dict.fromkeys(crossing[p])))
        if any(partition_of(n) == other for n in sub.graph.node):
            return None
        branches.append(sub)
    inputs = [i.name for i in model.graph.input]  # the image, and e.g. post-processing's category
    join = extractor.extract_model(inputs + list(dict.fromkeys(crossing["teacher"] + crossing["student"])),
                                   [o.name for o in model.graph.output])
    return branches[0], branches[1], join


def nodes_in(model: onnx.ModelProto, partitions: list[str] | tuple[str, ...]) -> list[str]:
    """Names of the nodes in ``partitions`` (graph order)."""
    wanted = set(partitions)
    return [n.name for n in model.graph.node if partition_of(n) in wanted]


def _base_name(name: str) -> str:
    head, _, rest = name.partition("/")
    return rest if rest and head in PARTITIONS else name


def set_partition(node: onnx.NodeProto, partition: str) -> None:
    """Write ``partition`` as both the name prefix and the metadata entry."""
    node.name = f"{partition}/{_base_name(node.name)}"
    for p in node.metadata_props:
        if p.key == PARTITION_KEY:
            p.value = partition
            return
    node.metadata_props.add(key=PARTITION_KEY, value=partition)


def clear_partition(node: onnx.NodeProto) -> None:
    keep = [(p.key, p.value) for p in node.metadata_props if p.key != PARTITION_KEY]
    del node.metadata_props[:]
    for k, v in keep:
        node.metadata_props.add(key=k, value=v)
    node.name = _base_name(node.name)


class GraphIndex:
    """Producer/consumer index of a graph's nodes (by position)."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.initializers = {i.name for i in model.graph.initializer}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i
            for t in n.input:
                if t:
                    self.consumers.setdefault(t, []).append(i)

    def producers_of(self, i: int) -> list[int]:
        return [self.producer[t] for t in self.nodes[i].input
                if t and t not in self.initializers and t in self.producer]

    def consumers_of(self, i: int) -> list[int]:
        return [c for o in self.nodes[i].output for c in self.consumers.get(o, [])]


def _one(parts: list[str | None]) -> str | None:
    """The common partition of ``parts`` if they are all tagged and agree."""
    s = set(parts)
    return parts[0] if parts and len(s) == 1 and None not in s else None


def _earliest(parts: list[str | None]) -> str | None:
    tagged = [p for p in parts if p]
    return min(tagged, key=PARTITIONS.index) if tagged else None


def _qdq_partition(g: GraphIndex, part: list[str | None], i: int, quantized: set[str]) -> str | None:
    """Partition of an untagged Q/DQ node: the quantized partition it serves.

    Walk up the Q/DQ chain to the float producer and down to the float consumers. Output
    quantization belongs to the producer (student Conv -> Q -> DQ -> head), input quantization to
    the consumers (teacher output or image -> Q -> DQ -> student Conv)."""
    j = i
    while g.nodes[j].op_type in QDQ_OPS:
        src = g.nodes[j].input[0]
        if src not in g.producer or src in g.initializers:
            j = -1
            break
        j = g.producer[src]
    up = part[j] if j >= 0 else None
    if up in quantized:
        return up
    down, stack, seen = [], [i], {i}
    while stack:
        for c in g.consumers_of(stack.pop()):
            if c in seen:
                continue
            seen.add(c)
            (stack if g.nodes[c].op_type in QDQ_OPS else down).append(c)
    served = [part[c] for c in down if part[c] in quantized]
    return _earliest(served)


def _derive(g: GraphIndex, part: list[str | None], i: int, quantized: set[str], fallback: bool) -> str | None:
    if g.nodes[i].op_type in QDQ_OPS:
        p = _qdq_partition(g, part, i, quantized)
        if p or not fallback:  # wait for the nodes it serves before guessing from neighbours
            return p
    prods = g.producers_of(i)
    if prods and (p := _one([part[j] for j in prods])):
        return p
    return _earliest([part[c] for c in g.consumers_of(i)])


def assign_partitions(model: onnx.ModelProto, quantize_partitions: list[str] | tuple[str, ...] = ("student",),
                      strict: bool = True) -> int:
    """Give every node a partition in place; return how many were derived (not already tagged).

    Metadata wins over a disagreeing name prefix (tools rename, they do not re-tag). With
    ``strict`` a node left without a partition raises UadcError; otherwise it stays untagged."""
    g = GraphIndex(model)
    part: list[str | None] = []
    for n in g.nodes:
        meta, prefix = meta_partition(n), prefix_partition(n)
        if meta and prefix and meta != prefix:
            log.warning("node %s: metadata says %s, name prefix says %s; using %s", n.name, meta, prefix, meta)
        part.append(meta or prefix)
    unknown = {p for p in part if p and p not in PARTITIONS}
    if unknown:
        raise UadcError(f"unknown partition tag(s) {sorted(unknown)}; expected {', '.join(PARTITIONS)}")
    quantized = set(quantize_partitions)
    todo = [i for i, p in enumerate(part) if p is None]
    derived = len(todo)
    fallback = False
    while todo:  # propagate until nothing changes
        left = []
        for i in todo:
            part[i] = _derive(g, part, i, quantized, fallback)
            if part[i] is None:
                left.append(i)
        if len(left) == len(todo):
            if fallback:
                break
            fallback = True  # stuck: let Q/DQ nodes take a neighbour's partition
        else:
            fallback = False
        todo = left
    orphans = [g.nodes[i].name or g.nodes[i].op_type for i in todo]
    if orphans and strict:
        raise UadcError(f"{len(orphans)} node(s) belong to no partition (cannot derive from name, "
                        f"producers or consumers): {', '.join(orphans[:5])}")
    used: set[str] = set()
    for i, n in enumerate(g.nodes):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
        if part[i]:
            set_partition(n, part[i])
        name, k = n.name, 1
        while n.name in used:  # keep names unique after re-prefixing
            n.name, k = f"{name}_{k}", k + 1
        used.add(n.name)
    return derived - len(orphans)


def float_tail(model: onnx.ModelProto, keep: str = "anomaly_map") -> tuple[onnx.ModelProto, onnx.ModelProto] | None:
    """(body, tail): the graph cut where it stops feeding the ``keep`` output. The tail holds every node
    outside the teacher and student that ``keep`` does not need: the score's top-k reduction and the
    image kNN (whose distance subtracts near-equal numbers, so it needs FP32), or a descriptor
    sub-graph's pooling. The body computes ``keep`` (when the graph has it) and the tensors the tail
    reads; the tail reads those (and the image, when it does) and computes the other outputs. None
    when no node is in the tail."""
    g = GraphIndex(model)
    outputs = [o.name for o in model.graph.output]
    needed: set[int] = set()
    stack = [g.producer[keep]] if keep in g.producer and keep in outputs else []
    while stack:
        i = stack.pop()
        if i not in needed:
            needed.add(i)
            stack += g.producers_of(i)
    tail = [i for i, n in enumerate(g.nodes) if i not in needed and partition_of(n) not in ("teacher", "student")]
    if not tail:
        return None
    made = {o for i in tail for o in g.nodes[i].output}
    graph_inputs = [i.name for i in model.graph.input if i.name not in g.initializers]
    reads = [t for i in tail for t in g.nodes[i].input if t and t not in made and t not in g.initializers]
    crossing = list(dict.fromkeys(t for t in reads if t not in graph_inputs))
    tail_inputs = [t for t in graph_inputs if t in reads] + crossing
    body_outputs = list(dict.fromkeys([o for o in outputs if o not in made] + crossing))
    tail_outputs = [o for o in outputs if o in made]
    if not body_outputs or not tail_outputs:
        return None
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    for t in crossing:  # a quantized tensor is a DequantizeLinear output that Q/DQ insertion left untyped
        extractor.value_infos.setdefault(t, onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    return extractor.extract_model(graph_inputs, body_outputs), extractor.extract_model(tail_inputs, tail_outputs)
