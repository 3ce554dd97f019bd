"""Checkpoint -> one ONNX graph whose every node belongs to a partition: ``teacher``,
``student`` or ``head``.

The torch dynamo exporter records each node's module path (``pkg.torch.onnx.name_scopes``);
the first module under the root is the partition. Nodes without a module (shape helpers) take
the partition of their consumers. Tags live in the node-name prefix (``student/node_Conv_3``)
and in node metadata ``uadc.partition``; the model's ``metadata_props`` carry the method,
backbone, image size, normalisation, categories, recipe hash, uadc version and node counts.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch

from uadc import __version__
from uadc.errors import UadcError
from uadc.models import KDModel

PARTITIONS = ("teacher", "student", "head")
PARTITION_KEY = "uadc.partition"
INPUT_NAME, OUTPUT_NAMES = "image", ("anomaly_map", "score")


def export_model(model: KDModel, image_size: int, meta: dict, opset: int = 18) -> onnx.ModelProto:
    """Export with a dynamic batch; returns the tagged model (not yet simplified)."""
    model = model.eval()
    x = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter narrates every step and warns about torchvision ops we never use.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model, (x,), dynamo=True, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch},), opset_version=opset, verbose=False, optimize=True)
        except Exception as exc:  # a model the exporter cannot trace is a bug to report plainly
            raise UadcError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    proto = program.model_proto
    tag_partitions(proto)
    set_metadata(proto, {**meta, "uadc_version": __version__, "partitions": partition_counts(proto)})
    return proto


def _scope_partition(node: onnx.NodeProto) -> str | None:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(p.value)
            if len(scopes) > 1 and scopes[0] == "" and scopes[1] in PARTITIONS:
                return scopes[1]
    return None


def node_partition(node: onnx.NodeProto) -> str | None:
    for p in node.metadata_props:
        if p.key == PARTITION_KEY:
            return p.value
    head = node.name.split("/", 1)[0]
    return head if head in PARTITIONS else None


def tag_partitions(model: onnx.ModelProto) -> None:
    """Assign every node a partition (module scope, else consumers', else producers')."""
    nodes = list(model.graph.node)
    part = {id(n): node_partition(n) or _scope_partition(n) for n in nodes}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        for o in n.output:
            producer[o] = n
    for _ in range(len(nodes)):  # propagate until nothing changes (graphs here are shallow)
        changed = False
        for n in nodes:
            if part[id(n)]:
                continue
            cands = [part[id(c)] for o in n.output for c in consumers.get(o, []) if part[id(c)]]
            cands = cands or [part[id(producer[i])] for i in n.input if i in producer and part[id(producer[i])]]
            if cands:
                # Shape helpers feeding several partitions go to the earliest one in data flow.
                part[id(n)] = min(cands, key=PARTITIONS.index)
                changed = True
        if not changed:
            break
    missing = [n.name for n in nodes if not part[id(n)]]
    if missing:
        raise UadcError(f"export: {len(missing)} nodes belong to no partition (first: {missing[0]})")
    for n in nodes:
        set_node_partition(n, part[id(n)])


def set_node_partition(node: onnx.NodeProto, partition: str) -> None:
    base = node.name.split("/", 1)[1] if node.name.split("/", 1)[0] in PARTITIONS else node.name
    node.name = f"{partition}/{base}"
    for p in node.metadata_props:
        if p.key == PARTITION_KEY:
            p.value = partition
            return
    node.metadata_props.add(key=PARTITION_KEY, value=partition)


def partition_counts(model: onnx.ModelProto) -> dict[str, int]:
    c = Counter(node_partition(n) for n in model.graph.node)
    return {p: c.get(p, 0) for p in PARTITIONS}


def set_metadata(model: onnx.ModelProto, meta: dict) -> None:
    """Model-level metadata as ``uadc.<key>`` entries (JSON for non-strings)."""
    existing = {p.key: p for p in model.metadata_props}
    for k, v in meta.items():
        key = f"uadc.{k}"
        value = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)


def get_metadata(model: onnx.ModelProto) -> dict:
    out = {}
    for p in model.metadata_props:
        if p.key.startswith("uadc."):
            try:
                out[p.key[5:]] = json.loads(p.value)
            except json.JSONDecodeError:
                out[p.key[5:]] = p.value
    return out


def partition_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Initializer bytes per partition (an initializer counts for its first consumer's partition)."""
    owner: dict[str, str] = {}
    for n in model.graph.node:
        for i in n.input:
            owner.setdefault(i, node_partition(n) or "head")
    sizes = dict.fromkeys(PARTITIONS, 0)
    for init in model.graph.initializer:
        if init.name in owner:
            sizes[owner[init.name]] += len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    return sizes


def split_partitions(model: onnx.ModelProto, out_dir: Path) -> dict[str, Path]:
    """One ONNX per partition; inputs/outputs are the tensors crossing partition borders."""
    producers = {o: node_partition(n) for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    paths = {}
    with_shapes = onnx.shape_inference.infer_shapes(model)
    for p in PARTITIONS:
        ins, outs = [], []
        for n in model.graph.node:
            if node_partition(n) == p:
                ins += [i for i in n.input if i and (i == INPUT_NAME or (i in producers and producers[i] != p))]
            else:
                outs += [i for i in n.input if producers.get(i) == p]
        outs += [o for o in graph_outputs if producers.get(o) == p]
        ins, outs = list(dict.fromkeys(ins)), list(dict.fromkeys(outs))
        if not outs:
            continue
        sub = onnx.utils.Extractor(with_shapes).extract_model(ins, outs)
        sub.metadata_props.extend(model.metadata_props)
        path = out_dir / f"{p}.onnx"
        onnx.save(sub, path)
        paths[p] = path
    return paths
