"""Quantization-aware training (``uadc qat``) that lands in exactly the artifact PTQ produces.

Design: QAT does not re-derive *where* to quantize. It starts from the same simplified, tagged
FP32 ONNX graph ``uadc compile`` quantizes (BN already folded into Conv), calibrates it and runs
the same ``qdq`` pass (ONNX Runtime's QDQ quantizer, the target's scheme) to get the PTQ model,
then reads the quantization *placement* off that model:

* every graph edge ``(consumer node, input index)`` that reads an activation through Q -> DQ,
  grouped by the Q node's scale initializer (ORT re-uses the input's scale for e.g. MaxPool or
  Reshape outputs; one tensor with a Q/DQ pair per consumer is one group) and, as ORT's
  ``adjust_tensor_ranges`` does, a quantized Relu/Clip's sole-reader input tied to its output;
  with scale, zero point and the zero-point dtype's clamp range;
* every edge that reads a weight through DQ (int8 initializer) or Q -> DQ (TensorRT's float
  weight pairs), per-channel axis or per-tensor, and every int32 bias DQ (ORT CPU scheme).

A small ONNX -> torch interpreter (:class:`GraphInterpreter`) then runs the FP32 graph's teacher
and student partitions with fake-quant at exactly those edges, computed the way ORT computes Q/DQ
(divide by the scale, round half to even, saturate; torch's own fake_quantize multiplies by 1/s
and flips ties): activations with an LSQ-style learnable scale (zero point fixed, initialised
from the PTQ scale), weights with ORT's symmetric int8 min-max scale recomputed from the current
weights every step, int32 biases at input scale x weight scale (their rounding alone flips a few
percent of the int8 outputs), all with straight-through gradients. With unchanged weights and
scales it reproduces the PTQ model up to rare float-accumulation ties (tests/test_qat.py). Where
ORT removed a Relu/Clip and lets the Q clamp instead, the learned scale is capped so the
quantized range stays inside the Clip's and both graphs still agree.

Student Conv/ConvTranspose weights and biases (BN folded) and the activation scales are trained
with Adam; the frozen teacher (when not quantized) runs once and is cached. The head is never
interpreted: the loss is the torch model's own ``loss(t_feats, s_feats)`` on the tensors the ONNX
head reads, as it reads them (through DQ where the PTQ model does). Their order (which head
input is tap k, not recorded in the ONNX graph) is derived by value matching against the torch
model's ``teacher_features`` / ``student_features`` on a probe batch.

Export writes the tuned weights back into the FP32 initializers (by name) and runs the ``qdq``
pass once more with ``ctx.ranges`` = the calibrated ranges overridden by the learned scales
turned back into ranges ORT maps to the same scale/zero point (asymmetric: ``lo = (qmin - z) s``,
``hi = (qmax - z) s``; symmetric: ``+-s (qmax_s - qmin_s) / 2`` with ORT's symmetric clamp range),
with no re-calibration. Same graph, same quantizer, same options -> same Q/DQ placement; only
weights and scales differ (checked after export: scales exact, head inputs as trained).
``uadc compile --from-qat`` then runs the remaining target passes, verification, metrics and
report exactly as for PTQ.

Not emulated: ORT's weight-scale enlargement when a bias would overflow int32 (only for biases
~1e9 input x weight steps); ops outside :func:`supported_ops` raise UadcError.

Modules: :mod:`~uadc.quant.qat.placement` (reading the PTQ placement), :mod:`~uadc.quant.qat.interpreter`
(ops, fake-quant, :class:`GraphInterpreter`), :mod:`~uadc.quant.qat.net` (graph split, :class:`QatNet`,
loss order), :mod:`~uadc.quant.qat.finetune`, :mod:`~uadc.quant.qat.export` (Q/DQ export and its
checks) and :mod:`~uadc.quant.qat.run` (options, ``run_qat``, ``load_qat_model``).
"""

from __future__ import annotations


from uadc.quant.qat.interpreter import GraphInterpreter, supported_ops  # noqa: E402
from uadc.quant.qat.net import QatNet  # noqa: E402
from uadc.quant.qat.placement import ActQuant, Placement, read_placement  # noqa: E402
from uadc.quant.qat.run import QatOptions, QatResult, load_qat_model, run_qat  # noqa: E402

__all__ = ["QatOptions", "QatResult", "run_qat", "load_qat_model", "QatNet", "GraphInterpreter", "supported_ops",
           "read_placement", "Placement", "ActQuant"]
