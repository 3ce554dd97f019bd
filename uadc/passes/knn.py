"""``knn_bank``: the image kNN's bank described by the compiled graph itself.

The bank (``model.image_knn``) holds the training images' pooled teacher descriptors as the FP32
model computed them. Once the teacher runs in INT8, every query descriptor carries the
quantization's systematic error while the bank does not, and the distances (a small spread on
normal images) drift by more than the noise they should rank. Describing the bank with the same
quantized teacher cancels the common part, as a memory bank is built with the network deployed.
The teacher's sub-graph up to the descriptor is extracted and run on the training images
(``ctx.bank_images``) by the target's runtime at its float precision (``ctx.bank_runner``:
OpenVINO bf16 moves the descriptors as INT8 does), else by ONNX Runtime; nothing changes when that
sub-graph holds no Q/DQ and the float layers run in FP32."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from uadc.core.constants import QDQ_OPS
from uadc.core.errors import UadcError
from uadc.core.ort_session import make_session
from uadc.models.heads import BANK_INITIALIZER, BANK_SQ_INITIALIZER, CENTER_INITIALIZER
from uadc.passes.pipeline import PassContext, copy_model, register_pass

log = logging.getLogger(__name__)
BATCH = 32


def bank_query(model: onnx.ModelProto) -> str | None:
    """The descriptor tensor matched against the bank (the input the bank's centre is taken from), or
    None when the graph has no image kNN."""
    inits = {t.name for t in model.graph.initializer}
    if not {BANK_INITIALIZER, CENTER_INITIALIZER, BANK_SQ_INITIALIZER} <= inits:
        return None
    for node in model.graph.node:
        if node.op_type == "Sub" and len(node.input) == 2 and node.input[1] == CENTER_INITIALIZER:
            return node.input[0]
    return None


def _descriptor_graph(model: onnx.ModelProto, query: str) -> tuple[onnx.ModelProto, str]:
    """The sub-graph from the image input to the descriptor ``query``, and that input's name."""
    inits = {t.name for t in model.graph.initializer}
    image = next(i.name for i in model.graph.input if i.name not in inits)
    ex = onnx.utils.Extractor(model)
    # a quantized descriptor is a DequantizeLinear output that Q/DQ insertion left without value_info
    ex.value_infos.setdefault(query, onnx.helper.make_tensor_value_info(query, onnx.TensorProto.FLOAT, None))
    return ex.extract_model([image], [query]), image


def _describe(sub: onnx.ModelProto, image: str, query: str, images: np.ndarray, run=None) -> np.ndarray:
    if run is None:
        sess = make_session(sub)
        run = lambda _sub, feeds: sess.run([query], feeds)[0]  # noqa: E731
    return np.concatenate([run(sub, {image: images[i:i + BATCH]}) for i in range(0, len(images), BATCH)])


def bank_neighbours(model: onnx.ModelProto, images: np.ndarray, k: int) -> np.ndarray | None:
    """Indices (sorted) of the bank descriptors among the ``k`` nearest to any of ``images``, as
    ``model`` describes both; None when it has no image kNN. A candidate whose teacher moves the
    descriptors a little finds each image's nearest among them: the precision search describes only
    these for its probes (``PassContext.bank_subset``) instead of every training image."""
    query = bank_query(model)
    if query is None:
        return None
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
              if t.name in (BANK_INITIALIZER, CENTER_INITIALIZER, BANK_SQ_INITIALIZER)}
    sub, image = _descriptor_graph(model, query)
    q = _describe(sub, image, query, images).astype(np.float64) - arrays[CENTER_INITIALIZER]
    d = (q * q).sum(1, keepdims=True) + arrays[BANK_SQ_INITIALIZER] - 2.0 * q @ arrays[BANK_INITIALIZER]
    k = min(k, d.shape[1])
    return np.unique(np.argsort(d, axis=1, kind="stable")[:, :k])


@register_pass("knn_bank")
def knn_bank(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
    """Re-describe the image kNN bank with the compiled teacher (no-op without a bank, or with an
    FP32 teacher on an FP32 runtime); with ``ctx.bank_subset`` the bank shrinks to those images."""
    query = bank_query(model)
    if query is None or ctx.bank_images is None:
        return model
    sub, image = _descriptor_graph(model, query)
    exact = ctx.target.float_precision == "fp32"  # bf16 float layers move the descriptors too
    if exact and not any(n.op_type in QDQ_OPS for n in sub.graph.node):
        return model
    images = ctx.bank_images()
    init = next(t for t in model.graph.initializer if t.name == BANK_INITIALIZER)
    if len(images) != init.dims[1]:
        raise UadcError(f"knn_bank: the image kNN bank holds {init.dims[1]} images but the recipe's training data "
                        f"gives {len(images)}; retrain with `uadc train`")
    subset = ctx.bank_subset
    if subset is not None:
        images = images[subset]
    desc = _describe(sub, image, query, images, ctx.bank_runner)
    if desc.shape != (len(images), init.dims[0]):
        raise UadcError(f"knn_bank: descriptors of shape {desc.shape} do not fit the bank {tuple(init.dims)}")
    desc = desc.astype(np.float64)
    center = desc.mean(axis=0)
    centred = desc - center           # as ImageKNN.set_bank: the centre, the centred bank, its norms
    arrays = {BANK_INITIALIZER: centred.T, CENTER_INITIALIZER: center, BANK_SQ_INITIALIZER: (centred ** 2).sum(1)}
    out = copy_model(model)
    for t in out.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arrays[t.name], np.float32), t.name))
    if subset is not None:  # the distances' stored shapes name the full bank: let the runtime infer them
        del out.graph.value_info[:]
    log.debug("knn_bank: %d bank descriptors re-described by the compiled teacher", len(images))
    return out
