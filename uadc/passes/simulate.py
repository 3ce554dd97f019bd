"""FP16 layers simulated in an FP32 graph, so ONNX Runtime on a CPU can judge the fidelity of a
TensorRT assignment that runs some layers in FP16 (``precision: auto`` on TensorRT targets).

For each chosen node, its float weights are rounded to FP16 and every float activation it reads
or writes passes through ``Cast(FLOAT16) -> Cast(FLOAT)``: the storage rounding of an FP16 layer
and of the reformat TensorRT inserts at an FP32 -> FP16 boundary. Accumulation stays FP32 (as in
TensorRT's FP16 convolution tactics that accumulate in FP32), so this is a lower bound of FP16's error
where a tactic accumulates in FP16. Not a pass of any target: the shipped model keeps FP32 types
and TensorRT's builder runs those layers in FP16.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from uadc.passes.groups import float_tensors


def _rounded(init: TensorProto, name: str) -> TensorProto:
    arr = numpy_helper.to_array(init)
    return numpy_helper.from_array(arr.astype(np.float16).astype(np.float32), name)


def simulate_fp16(model: onnx.ModelProto, nodes: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose nodes named in ``nodes`` round like FP16 layers (module docstring)."""
    chosen = set(nodes)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not chosen:
        return out
    floats = float_tensors(model)
    inits = {i.name: i for i in out.graph.initializer}
    rounded: dict[str, str] = {}   # activation -> its FP16-rounded copy
    new_inits: dict[str, TensorProto] = {}
    new_nodes: list[onnx.NodeProto] = []

    def round_trip(src: str, dst: str) -> None:
        half = f"{dst}__fp16"
        new_nodes.append(helper.make_node("Cast", [src], [half], name=f"{half}_cast", to=TensorProto.FLOAT16))
        new_nodes.append(helper.make_node("Cast", [half], [dst], name=f"{dst}_cast", to=TensorProto.FLOAT))

    for node in out.graph.node:
        if node.name not in chosen:
            new_nodes.append(node)
            continue
        for k, t in enumerate(node.input):
            if t in inits and inits[t].data_type == TensorProto.FLOAT:
                name = f"{t}__fp16w"
                new_inits.setdefault(name, _rounded(inits[t], name))
                node.input[k] = name
            elif t in floats and t not in inits:
                if t not in rounded:
                    rounded[t] = f"{t}__fp16r"
                    round_trip(t, rounded[t])
                node.input[k] = rounded[t]
        renamed = []
        for k, t in enumerate(node.output):
            if t in floats:
                node.output[k] = f"{t}__fp32"
                renamed.append((node.output[k], t))
        new_nodes.append(node)
        for src, dst in renamed:
            round_trip(src, dst)
            rounded[dst] = dst  # already FP16-representable: later FP16 readers need no second cast
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    used = {t for n in new_nodes for t in n.input}
    kept = [i for i in out.graph.initializer if i.name in used or f"{i.name}__fp16w" not in new_inits]
    del out.graph.initializer[:]
    out.graph.initializer.extend([*kept, *new_inits.values()])  # weights only FP16 nodes read are replaced
    return out
