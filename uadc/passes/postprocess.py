"""Optional in-graph post-processing: ``pred_score``, ``pred_label`` and ``pred_mask`` outputs,
so ONNX Runtime or TensorRT alone (no uadc, no numpy glue) turns an image into a decision.

The category is an *input*, not one graph per category: a unified model serves every category
with one set of weights, and copying the graph per category would multiply the artifact's size
by the number of categories for four numbers each. ``category`` is an int64 ``(N,)`` or ``(1,)``
index into the manifest's categories; index ``len(categories)`` selects the global thresholds.
It is declared with a default initializer ``[len(categories)]`` (IR >= 4: an input with an
initializer is optional), so a runtime that feeds only ``image`` gets the global decision, and
Polygraphy's ``run --onnxrt`` works on the file as is.

- ``pred_score`` (N,) float32: ``clip((score - t) / span + 0.5, 0, 1)`` (threshold -> 0.5; span: high - low,
  ``Threshold.scale()``)
- ``pred_label`` (N,) bool: ``score >= t``
- ``pred_mask`` (N,1,H,W) bool: ``anomaly_map >= t_pixel``
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from uadc.core.constants import CATEGORY_INPUT, OUTPUT_NAMES, PRED_OUTPUTS
from uadc.core.manifest import Thresholds
from uadc.export.partitions import set_partition

_P = "postprocess/"


def _table(thr: Thresholds, categories: list[str]) -> dict[str, np.ndarray]:
    rows = [thr.get(c) for c in categories] + [thr.global_]
    f = lambda xs: np.asarray(xs, np.float32)  # noqa: E731
    return {"img_thr": f([r.image.value for r in rows]),
            "img_span": f([r.image.scale() for r in rows]),
            "pix_thr": f([r.pixel.value for r in rows])}


def append_postprocess(model: onnx.ModelProto, thresholds: Thresholds, categories: list[str]) -> tuple[
        onnx.ModelProto, dict]:
    """A copy of ``model`` with the three decision outputs; returns it and the manifest's
    ``postprocess`` entry (how to select the category)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    amap, score = OUTPUT_NAMES
    tables = _table(thresholds, categories)
    for name, arr in tables.items():
        g.initializer.append(numpy_helper.from_array(arr, _P + name))
    consts = {"half": np.float32(0.5), "zero": np.float32(0.0), "one": np.float32(1.0),
              "mask_shape": np.asarray([-1, 1, 1, 1], np.int64)}
    for name, v in consts.items():
        g.initializer.append(numpy_helper.from_array(np.asarray(v), _P + name))
    default = np.asarray([len(categories)], np.int64)
    g.initializer.append(numpy_helper.from_array(default, CATEGORY_INPUT))
    g.input.append(helper.make_tensor_value_info(CATEGORY_INPUT, TensorProto.INT64, ["category_batch"]))

    def node(op: str, ins: list[str], name: str, **attrs) -> str:
        n = helper.make_node(op, ins, [name], name=_P + name.split("/")[-1], **attrs)
        set_partition(n, "head")
        g.node.append(n)
        return name

    t = node("Gather", [_P + "img_thr", CATEGORY_INPUT], _P + "t")
    span = node("Gather", [_P + "img_span", CATEGORY_INPUT], _P + "span")
    tp = node("Gather", [_P + "pix_thr", CATEGORY_INPUT], _P + "tp")
    diff = node("Sub", [score, t], _P + "diff")
    scaled = node("Div", [diff, span], _P + "scaled")
    shifted = node("Add", [scaled, _P + "half"], _P + "shifted")
    pred_score, pred_label, pred_mask = PRED_OUTPUTS
    node("Clip", [shifted, _P + "zero", _P + "one"], pred_score)
    node("GreaterOrEqual", [score, t], pred_label)
    tp4 = node("Reshape", [tp, _P + "mask_shape"], _P + "tp4")
    node("GreaterOrEqual", [amap, tp4], pred_mask)
    size = [d.dim_param or d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
    g.output.extend([helper.make_tensor_value_info(pred_score, TensorProto.FLOAT, [size[0]]),
                     helper.make_tensor_value_info(pred_label, TensorProto.BOOL, [size[0]]),
                     helper.make_tensor_value_info(pred_mask, TensorProto.BOOL, size)])
    if out.ir_version < 4:
        out.ir_version = 4
    onnx.checker.check_model(out)
    info = {"outputs": list(PRED_OUTPUTS), "category_input": CATEGORY_INPUT,
            "category_index": {**{c: i for i, c in enumerate(categories)}, "global": len(categories)},
            "default": "global"}
    return out, info
