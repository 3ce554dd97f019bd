"""Export of the tuned QAT network to Q/DQ (tuned weights, learned scales as ranges) and the checks
that the exported model computes what was trained."""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from uadc.core.constants import QDQ_OPS
from uadc.export.partitions import partition_of
from uadc.passes.pipeline import run_ort
from uadc.quant.calibrate import with_outputs
from uadc.quant.qat.net import LossOrder, QatNet
from uadc.quant.qat.placement import initializers


def with_weights(fp32: onnx.ModelProto, weights: dict[str, torch.Tensor]) -> onnx.ModelProto:
    """A copy of ``fp32`` whose initializers named in ``weights`` hold the given values."""
    out = onnx.ModelProto()
    out.CopyFrom(fp32)
    for init in out.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].detach().numpy().astype(np.float32), init.name))
    return out


def learned_params(net: QatNet) -> dict[str, tuple[float, int]]:
    """Every fake-quantized tensor's learned (scale, zero point), for the qdq pass to use as-is."""
    fq = net.net.act_fq
    return {t: (float(s), int(a.zero_point)) for a, s in zip(fq.specs, fq.current()) for t in a.tensors}


def head_inputs_onnx(model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` (FP32 or Q/DQ) with ORT and return ``names`` as the head reads them."""
    producer = {o: n for n in model.graph.node for o in n.output}

    def source(t: str) -> str:
        while t in producer and producer[t].op_type in QDQ_OPS:
            t = producer[t].input[0]
        return t

    view = {}
    for n in model.graph.node:
        if partition_of(n) == "head":
            for t in n.input:
                view.setdefault(source(t), t)
    exposed = [view.get(t, t) for t in names]
    values = run_ort(with_outputs(model, exposed), feeds, exposed)
    return dict(zip(names, values))


def max_rel_diff(ref: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> float:
    """Worst max |diff| / max(1, max |ref|) over tensors."""
    return max(float(np.abs(ref[k] - new[k]).max()) / max(1.0, float(np.abs(ref[k]).max())) for k in ref)


def differing_fraction(ref: dict[str, np.ndarray], new: dict[str, np.ndarray], rtol: float = 1e-5) -> float:
    """Worst fraction of elements differing beyond float noise (|diff| > rtol * max(1, max |ref|))."""
    return max(float((np.abs(ref[k] - new[k]) > rtol * max(1.0, float(np.abs(ref[k]).max()))).mean())
               for k in ref)


def onnx_frozen_features(model: onnx.ModelProto, net: QatNet, images: np.ndarray) -> dict[str, torch.Tensor]:
    """The frozen (float) prefix's outputs computed by ORT: feeding these instead of the torch
    interpreter's removes float noise (~1e-6) that would flip rare rounding ties downstream."""
    names = net.split.frozen_outputs
    if not names:
        return {}
    values = run_ort(with_outputs(model, names), {net.image: images}, names)
    return {k: torch.from_numpy(v) for k, v in zip(names, values)}


def learned_scale_error(net: QatNet, qdq_model: onnx.ModelProto) -> float:
    """Worst relative difference between a learned scale and the exported Q node's scale (and
    an infinite one if a zero point moved): the range round trip must be exact."""
    inits = initializers(qdq_model)
    learned = {t: (s, a) for a, s in zip(net.net.act_fq.specs, net.net.act_fq.current()) for t in a.tensors}
    worst = 0.0
    for n in qdq_model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in learned:
            s, a = learned[n.input[0]]
            if int(numpy_helper.to_array(inits[n.input[2]])) != a.zero_point:
                return math.inf
            worst = max(worst, abs(float(numpy_helper.to_array(inits[n.input[1]])) - s) / s)
    return worst


#: head inputs the export may compute differently from the fine-tuned net: a rare rounding tie (below)
EXPORT_TOLERANCE = 5e-3


@torch.no_grad()
def export_check(net: QatNet, qat_model: onnx.ModelProto, order: LossOrder, probe: torch.Tensor) -> dict:
    """The exported Q/DQ model must compute what was trained: learned scales survive the export,
    and the head's inputs agree (ORT on the exported model vs the fake-quantized interpreter fed
    with ORT's teacher tensors)."""
    scale_err = learned_scale_error(net, qat_model)
    if scale_err > 1e-5:
        raise RuntimeError(f"qat export: learned scales did not survive the qdq pass (max rel diff {scale_err:.3g})")
    names = list(dict.fromkeys(order.teacher + order.student))
    x = probe.numpy()
    ours = {k: v.numpy() for k, v in net(probe, names, onnx_frozen_features(qat_model, net, x)).items()}
    ref = head_inputs_onnx(qat_model, names, {net.image: x})
    # Not always 0: float accumulation order (torch vs MLAS) can flip a rare rounding tie.
    return {"scale_max_rel_diff": scale_err, "head_inputs_max_rel_diff": max_rel_diff(ref, ours),
            "head_inputs_differing_fraction": differing_fraction(ref, ours)}
