"""``knn_bank``: the image kNN's bank described by the compiled graph itself.

The bank (``model.image_knn``) holds the training images' pooled teacher descriptors as the FP32
model computed them. Once the teacher runs in INT8, every query descriptor carries the
quantization's systematic error while the bank does not, and the distances (a small spread on
normal images) drift by more than the noise they should rank. Describing the bank with the same
quantized teacher cancels the common part, as a memory bank is built with the network deployed.
The teacher's sub-graph up to the descriptor is extracted and run by ONNX Runtime on the training
images (``ctx.bank_images``); nothing changes when that sub-graph holds no Q/DQ (an FP32 teacher)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from uadc.core.constants import QDQ_OPS
from uadc.core.errors import UadcError
from uadc.core.ort_session import make_session
from uadc.models.heads import BANK_INITIALIZER
from uadc.passes.pipeline import PassContext, copy_model, register_pass

log = logging.getLogger(__name__)
BATCH = 32


def bank_query(model: onnx.ModelProto) -> str | None:
    """The descriptor tensor the bank is matched against (the MatMul's other input), or None."""
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] == BANK_INITIALIZER:
            return node.input[0]
    return None


@register_pass("knn_bank")
def knn_bank(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Re-describe the image kNN bank with the compiled teacher (no-op without a bank or Q/DQ)."""
    query = bank_query(model)
    if query is None or ctx.bank_images is None:
        return model
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    sub = onnx.utils.Extractor(model).extract_model(inputs[:1], [query])
    if not any(n.op_type in QDQ_OPS for n in sub.graph.node):
        return model
    images = ctx.bank_images()
    init = next(t for t in model.graph.initializer if t.name == BANK_INITIALIZER)
    dims, size = tuple(init.dims), init.dims[1]
    if len(images) != size:
        raise UadcError(f"knn_bank: the image kNN bank holds {size} images but the recipe's training data gives "
                        f"{len(images)}; retrain with `uadc train`")
    sess = make_session(sub)
    desc = np.concatenate([sess.run([query], {inputs[0]: images[i:i + BATCH]})[0]
                           for i in range(0, len(images), BATCH)])
    out = copy_model(model)
    new = numpy_helper.from_array(np.ascontiguousarray(desc.T.astype(np.float32)), BANK_INITIALIZER)
    if tuple(new.dims) != dims:
        raise UadcError(f"knn_bank: descriptors of shape {desc.shape} do not fit the bank {dims}")
    target = next(t for t in out.graph.initializer if t.name == BANK_INITIALIZER)
    target.CopyFrom(new)
    log.debug("knn_bank: %d bank descriptors re-described by the compiled teacher", size)
    return out
