"""Checkpoint -> one ONNX graph whose every node belongs to a partition: ``teacher``,
``student`` or ``head``.

The torch dynamo exporter records each node's module path (``pkg.torch.onnx.name_scopes``);
the first module under the root is the partition. Nodes without a module (shape helpers) take
their partition from the graph (uadc.export.partitions). Tags live in the node-name prefix (``student/node_Conv_3``)
and in node metadata ``uadc.partition``; the model's ``metadata_props`` carry the method,
backbone, image size, normalisation, categories, recipe hash, uadc version and node counts.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import onnx
import torch

from uadc import __version__
from uadc.core.constants import INPUT_NAME, OUTPUT_NAMES, PARTITIONS
from uadc.core.errors import UadcError, raise_interrupt_behind
from uadc.core.io import parse_json
from uadc.core.scoped import (environment_kept, eval_mode, float32_default, quiet_third_party, start_method_kept,
                              tqdm_monitor_off)
from uadc.export.partitions import (assign_partitions, partition_counts, partition_models, partition_of,
                                    set_partition)
from uadc.models import KDModel


def export_model(model: KDModel, image_size: int, meta: dict, opset: int = 18) -> onnx.ModelProto:
    """Export with a dynamic batch; returns the tagged model (not yet simplified)."""
    x = torch.zeros(2, 3, image_size, image_size, dtype=torch.float32)
    # The exporter narrates every step and warns about torchvision ops we never use (shown
    # with `uadc --verbose`).
    # torch.export sets TORCHINDUCTOR_CACHE_DIR as it traces, and multiprocessing's start method; a caller's
    # float64 default dtype made the traced constants float64 beside float32 weights (ORT refused the model)
    with quiet_third_party(), environment_kept(), tqdm_monitor_off(), start_method_kept(), eval_mode(model), \
            float32_default():
        batch = torch.export.Dim("batch", min=1, max=4096)   # imports sympy, which adds a warning filter
        try:
            program = torch.onnx.export(
                model, (x,), dynamo=True, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch},), opset_version=opset, verbose=False, optimize=True)
        except Exception as exc:  # a model the exporter cannot trace is a bug to report plainly
            raise_interrupt_behind(exc)
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()[0]   # the exporter colours its text
            raise UadcError(f"ONNX export failed: {type(exc).__name__}: {first}") from None
    proto = program.model_proto
    tag_partitions(proto)
    set_metadata(proto, {**meta, "uadc_version": __version__, "partitions": partition_counts(proto)})
    return proto


def _scope_partition(node: onnx.NodeProto) -> str | None:
    """The first module under the root in the exporter's recorded module path."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(p.value)
            if len(scopes) > 1 and scopes[0] == "" and scopes[1] in PARTITIONS:
                return scopes[1]
    return None


def tag_partitions(model: onnx.ModelProto) -> None:
    """Tag nodes by their module scope, then let the graph decide for the scope-less rest."""
    for n in model.graph.node:
        p = _scope_partition(n)
        if p:
            set_partition(n, p)
    try:
        assign_partitions(model, quantize_partitions=(), strict=True)
    except UadcError as exc:
        raise UadcError(f"export: {exc}") from None


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
                out[p.key[5:]] = parse_json(p.value)
            except ValueError:
                out[p.key[5:]] = p.value
    return out


def partition_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Initializer bytes per partition (an initializer counts for its first consumer's partition)."""
    owner: dict[str, str] = {}
    for n in model.graph.node:
        for i in n.input:
            owner.setdefault(i, partition_of(n) or "head")
    sizes = dict.fromkeys(PARTITIONS, 0)
    for init in model.graph.initializer:
        if init.name in owner:
            sizes[owner[init.name]] += len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    return sizes


def split_partitions(model: onnx.ModelProto, out_dir: Path) -> dict[str, Path]:
    """One ONNX per partition (``partition_models``) written to ``out_dir``."""
    paths = {}
    for p, sub in partition_models(model).items():
        paths[p] = out_dir / f"{p}.onnx"
        onnx.save(sub, paths[p])
    return paths


MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit


def _has_external_data(graph: onnx.GraphProto) -> bool:
    """Initializers kept beside the file, in the graph or its If/Loop bodies."""
    subs = [a.g for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    subs += [g for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
    external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in graph.initializer)
    return external or any(map(_has_external_data, subs))


def load_onnx(path: Path) -> onnx.ModelProto:
    """Parse an ONNX file written by anyone: size-checked, no external data followed (a path
    inside the file cannot make uadc read elsewhere), nothing executed; checked by onnx.checker."""
    path = Path(path)
    if not path.is_file():
        raise UadcError(f"model not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise UadcError(f"{path}: empty file, not an ONNX model")
    if size > MAX_ONNX_BYTES:
        raise UadcError(f"{path}: {size} bytes is over the 2 GiB ONNX limit")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UadcError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    if not model.graph.node:
        raise UadcError(f"{path}: not an ONNX model (no graph nodes)")
    external = _has_external_data(model.graph)
    try:   # external data: checked beside the file (as a proto, in the working folder) and kept inside its folder
        onnx.checker.check_model(str(path) if external else model)
    except Exception as exc:
        raise UadcError(f"{path}: invalid ONNX model: {str(exc).splitlines()[0][:200]}") from None
    return model


def check_whole_model(model: onnx.ModelProto, path: Path) -> None:
    """A whole uadc detector: the image input (other inputs only with a default) and the anomaly map
    and score outputs. A partition of a ``--split`` compile or another model is one line here, not a
    runtime's traceback about a feed or an output it lacks."""
    defaults = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in defaults]
    outputs = {o.name for o in model.graph.output}
    if inputs != [INPUT_NAME] or not set(OUTPUT_NAMES) <= outputs:
        named = lambda xs: ", ".join(xs[:5]) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "") or "nothing"  # noqa: E731
        raise UadcError(f"{path}: not a whole uadc model (input {INPUT_NAME!r}, outputs {', '.join(OUTPUT_NAMES)}); it "
                        f"takes {named(inputs)} and gives {named(sorted(outputs))} (a --split compile's partitions are "
                        f"not judged alone)")
