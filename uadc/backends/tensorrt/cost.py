"""A per-layer latency model of a TensorRT engine, for ``precision: auto`` on TensorRT targets
where no GPU is at hand (a roofline per fused kernel, not a measurement).

Each fused group (``uadc.passes.groups``) costs, in each precision (fp32, fp16, int8):
``max(compute, memory) + launch``, where
- compute: 2 x multiply-adds over the device's peak rate for that precision: tensor cores for
  dense convolutions and MatMul (fp16, int8; fp32 runs on CUDA cores, TF32 aside), CUDA cores for
  depthwise convolutions (fp16 as half2 at 2x, int8 as dp4a at 4x the fp32 rate), derated by
  ``COMPUTE_EFFICIENCY``;
- memory: activations read and written plus weights, at the precision's bytes, over the DRAM
  bandwidth derated by ``MEMORY_EFFICIENCY``;
- launch: one kernel per convolution or MatMul (with its activation); TensorRT's documented
  fusions put a following activation and an element-wise sum into the convolution's epilogue and
  merge chains of point-wise ops, so a point-wise group pays only for writing its output and no
  launch; other ops (Resize, TopK, Concat, reductions, ...) pay their own kernel.
A change of precision between neighbours is priced as a reformat kernel (``crossing_prices``), an
upper bound: TensorRT fuses many Q/DQ into the neighbouring convolution.

Device figures are the vendors' datasheet peaks (dense, no sparsity); the absolute times are only
a model, the decisions rest on their ratios (INT8 2x FP16 on tensor cores, FP32 far behind).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from uadc.core.errors import UadcError
from uadc.export.partitions import GraphIndex
from uadc.passes.groups import Group, tensor_elements

BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
COMPUTE_EFFICIENCY = 0.5
MEMORY_EFFICIENCY = 0.7
MATMUL_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
POINTWISE_OPS = ("Add", "Sub", "Mul", "Div", "Relu", "Clip", "Sigmoid", "HardSigmoid", "LeakyRelu", "Sqrt",
                 "Pow", "Neg", "Abs", "Exp", "Log", "Max", "Min", "Erf", "Tanh")


@dataclass(frozen=True)
class GpuSpec:
    name: str
    tensor_tops: dict[str, float]   # dense peak, tera-ops/s: tensor cores (fp16, int8), CUDA cores (fp32)
    fp32_cuda_tflops: float         # CUDA cores, fp32 (depthwise convolutions scale from it)
    bandwidth_gbs: float
    launch_us: float                # per kernel
    source: str

    def rate(self, precision: str, dense: bool) -> float:
        """Multiply-add pairs per µs (2 ops each) at ``precision``, after the efficiency derating."""
        tops = self.tensor_tops[precision] if dense else self.fp32_cuda_tflops * {"fp32": 1, "fp16": 2, "int8": 4}[
            precision]
        return tops * 1e6 * COMPUTE_EFFICIENCY / 2

    def bytes_per_us(self) -> float:
        return self.bandwidth_gbs * 1e3 * MEMORY_EFFICIENCY


GPUS: dict[str, GpuSpec] = {g.name: g for g in [
    GpuSpec("orin-nano-8gb", {"fp32": 1.28, "fp16": 10.0, "int8": 20.0}, 1.28, 68.0, 4.0,
            "Jetson Orin Nano 8GB: 1024 CUDA cores at 625 MHz, 40 sparse INT8 TOPS, 68 GB/s"),
    GpuSpec("agx-orin-64gb", {"fp32": 5.3, "fp16": 42.5, "int8": 85.0}, 5.3, 204.8, 3.0,
            "Jetson AGX Orin 64GB: 2048 CUDA cores at 1.3 GHz, 170 sparse INT8 TOPS (GPU), 204.8 GB/s"),
    GpuSpec("l4", {"fp32": 30.3, "fp16": 121.0, "int8": 242.0}, 30.3, 300.0, 2.0,
            "NVIDIA L4 datasheet: 30.3 FP32 TFLOPS, 242 / 485 (sparse) FP16, 485 / 970 INT8, 300 GB/s"),
    GpuSpec("h200", {"fp32": 67.0, "fp16": 989.0, "int8": 1979.0}, 67.0, 4800.0, 2.0,
            "NVIDIA H200 SXM datasheet: 67 FP32 TFLOPS, 1979 / 3958 (sparse) FP16 and INT8, 4.8 TB/s"),
]}
DEFAULT_GPU = {"jetson": "orin-nano-8gb", "gpu": "l4"}


def gpu_spec(name: str | None, device: str) -> GpuSpec:
    """The spec ``name`` (``compile.auto.gpu``), else the target device's default."""
    key = name or DEFAULT_GPU.get(device)
    if key not in GPUS:
        raise UadcError(f"compile.auto.gpu: {key!r} is not one of {', '.join(GPUS)}")
    return GPUS[key]


@dataclass(frozen=True)
class NodeWork:
    op: str
    macs: int          # multiply-adds at batch 1
    dense: bool        # tensor-core work (not depthwise)
    activations: int   # activation elements read and written
    weights: int       # weight elements


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def node_work(node: onnx.NodeProto, elements: dict[str, int], inits: dict[str, onnx.TensorProto]) -> NodeWork:
    """What one node computes and moves at batch 1 (shapes from ``elements``, weights from ``inits``)."""
    acts = sum(elements.get(t, 0) for t in [*node.input, *node.output] if t and t not in inits)
    weights = sum(int(np.prod(inits[t].dims)) for t in node.input if t in inits)
    out = elements.get(node.output[0], 0) if node.output else 0
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    if node.op_type in ("Conv", "ConvTranspose") and w is not None and len(w.dims) >= 3:
        group = int(_attrs(node).get("group", 1))
        per_out = int(np.prod(w.dims[1:]))
        depthwise = group > 1 and group == w.dims[0] and w.dims[1] == 1
        return NodeWork(node.op_type, out * per_out, not depthwise, acts, weights)
    if node.op_type in ("MatMul", "Gemm") and w is not None and len(w.dims) == 2:
        k = w.dims[0] if node.op_type == "MatMul" or not _attrs(node).get("transB", 0) else w.dims[1]
        return NodeWork(node.op_type, out * int(k), True, acts, weights)
    return NodeWork(node.op_type, 0, False, acts, weights)


def group_time_us(work: list[NodeWork], precision: str, spec: GpuSpec) -> float:
    """Modelled time of one fused group (see the module docstring)."""
    kernels = any(w.op not in POINTWISE_OPS for w in work)
    nbytes = BYTES[precision]
    compute = sum(w.macs / spec.rate(precision, w.dense) for w in work)
    if kernels:
        moved = sum(w.activations + w.weights for w in work if w.op not in POINTWISE_OPS)
    else:  # fused into its producer's epilogue: writes its output (and reads the other operand)
        moved = sum(w.activations for w in work) // 2
    return max(compute, moved * nbytes / spec.bytes_per_us()) + (spec.launch_us if kernels else 0.0)


def group_times(model: onnx.ModelProto, groups: list[Group], spec: GpuSpec,
                precisions: tuple[str, ...] = ("fp32", "fp16", "int8")) -> dict[str, np.ndarray]:
    """Per precision, each group's modelled µs at batch 1."""
    g = GraphIndex(model)
    elements = tensor_elements(model)
    inits = {i.name: i for i in model.graph.initializer}
    work = [[node_work(g.nodes[k], elements, inits) for k in grp.index] for grp in groups]
    return {p: np.array([group_time_us(w, p, spec) for w in work]) for p in precisions}


def crossing_prices(spec: GpuSpec, low: str, high: str) -> tuple[float, float]:
    """(µs per crossing, µs per element) of a reformat between ``low`` and ``high`` precision."""
    return spec.launch_us, (BYTES[low] + BYTES[high]) / spec.bytes_per_us()
