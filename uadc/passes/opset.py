"""The ``opset`` pass: bring a model to its target's opset (``Target.opset``).

uadc exports at opset 18; TensorRT 8.5 (JetPack 5) parses up to opset 17. onnx's version
converter has no 18 -> 17 adapter for Pad (and onnxscript's converter starts at 18), so the few
operators whose opset-18 definitions differ are rewritten here when the model uses them within
their opset-17 meaning; anything else is refused by name. Numerics are checked by the caller's
pipeline (``check_numerics`` against the input model)."""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from uadc.core.errors import UadcError
from uadc.passes.pipeline import (NUMERIC_RTOL, PassContext, check_numerics, copy_model, default_feeds, opset_of,
                                  register_pass)

# Reduce ops that took ``axes`` from an attribute before 18 and from an input since (ReduceSum: 13).
_AXES_TO_ATTRIBUTE = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                      "ReduceMin", "ReduceProd", "ReduceSumSquare"}
# Attributes opset 18 added to Resize, with the value that means "as in opset 13".
_RESIZE_DEFAULTS = {"antialias": 0, "keep_aspect_ratio_policy": b"stretch"}


@register_pass("opset")
def convert_opset(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Down-convert the default domain to ``ctx.target.opset`` (only 18 -> 17 is needed today)."""
    want, have = ctx.target.opset, opset_of(model)
    if have == want:
        return model
    if have < want:
        return onnx.version_converter.convert_version(model, want)  # up-conversion has adapters
    if (have, want) != (18, 17):
        raise UadcError(f"opset pass: cannot convert opset {have} to {want} (only 18 -> 17 is supported)")
    out = copy_model(model)
    consts = {i.name: i for i in out.graph.initializer}
    for node in out.graph.node:
        if node.domain in ("", "ai.onnx"):
            _downgrade(node, consts)
    for imp in out.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = want
    onnx.checker.check_model(out, full_check=False)
    feeds = ctx.sample_feeds if ctx.sample_feeds is not None else default_feeds(model)
    # an FP16-typed model (the fp16 pass runs first): ONNX Runtime's FP16 ReduceL2 and Resize kernels differ by
    # an FP16 step between opsets 18 and 17, and every RD compile to trt-fp16 was refused at the float32 gate
    check_numerics(model, out, feeds, what="opset", rtol=FP16_RTOL if _half_typed(model) else NUMERIC_RTOL)
    return out


FP16_RTOL = 2e-3   # two FP16 steps (2^-10) of the output's scale


def _half_typed(model: onnx.ModelProto) -> bool:
    return any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)
        for n in model.graph.node)


def _downgrade(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> None:
    op = node.op_type
    if onnx.defs.get_schema(op, 17).since_version == onnx.defs.get_schema(op, 18).since_version:
        return  # unchanged between 17 and 18
    if op in _AXES_TO_ATTRIBUTE:
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in consts:
                raise UadcError(f"opset pass: {node.name} ({op}) has computed axes; opset 17 needs constants")
            axes = numpy_helper.to_array(consts[node.input[1]]).astype(int).tolist()
            node.attribute.append(helper.make_attribute("axes", axes))
        del node.input[1:]
        for attr in list(node.attribute):
            if attr.name == "noop_with_empty_axes":  # new in 18; 0 = reduce all, as in 17
                if helper.get_attribute_value(attr):
                    raise UadcError(f"opset pass: {node.name} ({op}) uses noop_with_empty_axes, new in opset 18")
                node.attribute.remove(attr)
        return
    if op == "Pad" and (len(node.input) < 4 or not node.input[3]):
        del node.input[3:]
        return
    if op == "Resize":
        for attr in list(node.attribute):
            if attr.name in _RESIZE_DEFAULTS:
                if helper.get_attribute_value(attr) != _RESIZE_DEFAULTS[attr.name]:
                    raise UadcError(f"opset pass: {node.name} (Resize) uses {attr.name}, new in opset 18")
                node.attribute.remove(attr)
            elif attr.name == "axes":
                raise UadcError(f"opset pass: {node.name} (Resize) uses axes, new in opset 18")
        return
    raise UadcError(f"opset pass: {node.name} ({op}) uses an opset-18 definition with no opset-17 form")
