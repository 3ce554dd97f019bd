"""FP16 layers simulated in an FP32 graph, so ONNX Runtime on a CPU can judge the fidelity of a
TensorRT assignment that runs some layers in FP16 (``precision: auto`` on TensorRT targets).

For each chosen node, its float weights are rounded to FP16 and every float activation it reads
or writes passes through ``Cast(FLOAT16) -> Cast(FLOAT)``: the storage rounding of an FP16 layer
and of the reformat TensorRT inserts at an FP32 -> FP16 boundary. Accumulation stays FP32 (as in
TensorRT's FP16 convolution tactics that accumulate in FP32), so this is a lower bound of FP16's error
where a tactic accumulates in FP16. Not a pass of any target: the shipped model keeps FP32 types
and TensorRT's builder runs those layers in FP16.

``type_fp16`` builds the model that is shipped instead: the same nodes really FP16-typed (FP16
weights, ``Cast`` at each FP32 <-> FP16 boundary and none between two FP16 nodes), so a strongly
typed TensorRT network (10.x ``--stronglyTyped``, always on 11) runs exactly the chosen
assignment. It rounds where the simulation rounds; ONNX Runtime runs it on a CPU (casting back to
FP32 for ops without FP16 kernels), which is how compile checks the two agree.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from uadc.passes.groups import float_tensors
from uadc.passes.pipeline import bound_fp16_clips, opset_of


def _rounded(init: TensorProto, name: str) -> TensorProto:
    arr = numpy_helper.to_array(init)
    return numpy_helper.from_array(arr.astype(np.float16).astype(np.float32), name)


def simulate_fp16(model: onnx.ModelProto, nodes: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose nodes named in ``nodes`` round like FP16 layers (module docstring)."""
    chosen, out = set(nodes), _copy(model)
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
    return _rebuilt(out, new_nodes, new_inits)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _rebuilt(out: onnx.ModelProto, nodes: list[onnx.NodeProto], new_inits: dict[str, TensorProto]) -> onnx.ModelProto:
    """``out`` with ``nodes`` and the FP16 weights; an original weight only FP16 nodes read is dropped."""
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {t for n in nodes for t in n.input}
    kept = [i for i in out.graph.initializer if i.name in used or f"{i.name}__fp16w" not in new_inits]
    del out.graph.initializer[:]
    out.graph.initializer.extend([*kept, *new_inits.values()])
    return out


def _typed_positions(node: onnx.NodeProto, floats: set[str], opset: int) -> tuple[set[int], set[int]]:
    """Input and output positions of ``node`` bound to a type variable that its FP32 inputs bind:
    those turn FP16. Fixed-type positions (Resize's ``scales`` is always float) stay."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return set(), set()
    fixed = {c.type_param_str for c in schema.type_constraints}

    def formal(params, k):
        if k < len(params):
            return params[k].type_str
        variadic = params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic
        return params[-1].type_str if variadic else None
    bound = {formal(schema.inputs, k) for k, t in enumerate(node.input) if t in floats} & fixed
    ins = {k for k, t in enumerate(node.input) if t and formal(schema.inputs, k) in bound}
    outs = {k for k, t in enumerate(node.output) if t and formal(schema.outputs, k) in bound}
    return ins, outs


def type_fp16(model: onnx.ModelProto, nodes: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose nodes named in ``nodes`` are FP16-typed (module docstring); graph
    inputs, outputs and every other node keep their types."""
    chosen, out = set(nodes), _copy(model)
    if not chosen:
        return out
    fp32 = _fp32_tensors(model)
    inits = {i.name: i for i in out.graph.initializer}
    opset = opset_of(model)
    half: dict[str, str] = {}   # FP32 tensor -> its FP16 twin
    back: set[str] = set()      # outputs of the casts back to FP32 (dropped when nobody reads them)
    new_inits: dict[str, TensorProto] = {}
    new_nodes: list[onnx.NodeProto] = []

    def cast(src: str, dst: str, to: int, owner: onnx.NodeProto) -> None:
        c = helper.make_node("Cast", [src], [dst], name=f"{dst}_cast", to=to)
        c.metadata_props.extend(owner.metadata_props)  # the partition tag
        new_nodes.append(c)

    for node in out.graph.node:
        ins, outs = _typed_positions(node, fp32, opset) if node.name in chosen else (set(), set())
        for k in sorted(ins):
            t = node.input[k]
            if t in inits:
                name = f"{t}__fp16w"
                new_inits.setdefault(name, numpy_helper.from_array(
                    numpy_helper.to_array(inits[t]).astype(np.float16), name))
                node.input[k] = name
            else:
                if t not in half:
                    half[t] = f"{t}__fp16"
                    cast(t, half[t], TensorProto.FLOAT16, node)
                node.input[k] = half[t]
        renamed = []
        for k in sorted(outs):
            t = node.output[k]
            node.output[k] = half[t] = f"{t}__fp16"
            renamed.append(t)
        new_nodes.append(node)
        for t in renamed:  # FP32 readers and graph outputs keep the name; unread casts are dropped below
            cast(half[t], t, TensorProto.FLOAT, node)
            back.add(t)
    read = {t for n in new_nodes for t in n.input} | {o.name for o in out.graph.output}
    unread = back - read
    new_nodes = [n for n in new_nodes if not (n.op_type == "Cast" and n.output[0] in unread)]
    _rebuilt(out, new_nodes, new_inits)
    bound_fp16_clips(out)
    kept_info = [v for v in out.graph.value_info if v.name not in unread]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept_info)
    return out


def _fp32_tensors(model: onnx.ModelProto) -> set[str]:
    """FP32 activations (by shape inference), graph inputs and initializers of ``model``."""
    g = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    return {v.name for v in [*g.value_info, *g.input, *g.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type == TensorProto.FLOAT} | {
        i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
