"""``precision: auto`` on TensorRT targets (``--precision auto`` with ``trt-int8`` / ``jetson-int8``):
per fused group INT8, FP16 or FP32, with no GPU at hand.

Speed is TensorRT's modelled latency (``uadc.backends.tensorrt.cost``: a roofline per fused
kernel on the chosen GPU, ``compile.auto.gpu``), fidelity is measured as for the CPU targets
(``uadc.pipeline.precision_search``) on ONNX Runtime, with the FP16 layers simulated
(``uadc.passes.simulate``). Two stages:

1. Float stage: which groups of every partition run FP16. The model prices each group in FP32
   and FP16 and a precision change as a reformat; the fastest assignment (FP16 wherever it saves
   ``min_saving``) is measured, and when it breaks the budget the same sensitivity ordering and
   bisection as for INT8 return the fewest groups to FP32.
2. INT8 stage: the candidate partitions' convolution, MatMul and Add groups (TensorRT runs other
   ops in float between Q/DQ), each priced against its float-stage precision, searched as on the
   CPU targets with the FP16 layers simulated in every candidate.

The compiled model carries Q/DQ for the INT8 groups and types the chosen FP16 layers FP16
(``uadc.passes.simulate.type_fp16``), so a strongly typed build (TensorRT 10.x, 11) runs exactly the
assignment. For weakly typed builds (8.x, DLA) ``fp32_layers`` names the layers TensorRT must keep
in FP32 (everything neither INT8 nor chosen FP16), applied as layer precisions with the FP16 flag
and obeyed precision constraints (``uadc.backends.tensorrt``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from uadc.backends.tensorrt.cost import GpuSpec, crossing_prices, gpu_spec, group_times
from uadc.core.constants import PARTITIONS, QDQ_OPS
from uadc.passes.groups import Boundaries, Group, float_tensors, fused_groups
from uadc.passes.simulate import simulate_fp16
from uadc.pipeline.precision_search import BUDGET, Candidates, CostModel, Fidelity, bisect, revert_order, step

__all__ = ["FloatStage", "fp16_stage", "fp32_layers", "gpu_spec", "trt_cost_model", "trt_int8_groups"]

TRT_INT8_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Add")
FLOOR_US = 0.01  # modelled times carry no noise: any saving above rounding counts


def trt_int8_groups(groups: list[Group]) -> list[Group]:
    """The groups TensorRT runs as INT8 kernels between Q/DQ (the rest it runs in float anyway)."""
    return [g for g in groups if g.op.split()[0] in TRT_INT8_OPS]


@dataclass(frozen=True)
class FloatStage:
    nodes: frozenset[str]   # nodes that run FP16
    record: dict            # report.json precision_search.float_stage


class _Fp16(Candidates):
    """FP16 assignments of ``groups``: the FP32 model with those groups simulated in FP16."""
    low_key = "fp16_groups"

    def __init__(self, fp32: onnx.ModelProto, groups: list[Group], fid: Fidelity):
        self.fp32, self.groups, self.fid = fp32, groups, fid
        self.models: dict[frozenset[int], onnx.ModelProto] = {}
        self.figs: dict[frozenset[int], dict] = {frozenset(): {k: 1.0 for k in BUDGET}}

    def model(self, low: frozenset[int]) -> onnx.ModelProto:
        return simulate_fp16(self.fp32, self.nodes(low))


def fp16_stage(fp32: onnx.ModelProto, fid: Fidelity, spec: GpuSpec, min_saving: float) -> FloatStage:
    """Stage 1 (module docstring): the FP16 groups over every partition."""
    groups = fused_groups(fp32, list(PARTITIONS))
    t = group_times(fp32, groups, spec, ("fp32", "fp16"))
    cm = CostModel(t["fp32"], t["fp16"], 0.0, 0.0, Boundaries(fp32, groups), min_saving,
                   prices=crossing_prices(spec, "fp16", "fp32"), floor_us=FLOOR_US)
    c = _Fp16(fp32, groups, fid)
    fastest = cm.fastest([g.partition for g in groups])
    steps = [step("fp16 fastest", fastest, cm, c.fidelity(fastest), c.low_key)]
    final, sens = fastest, {}
    if not fid.passes(c.figs[fastest]):
        order, sens = revert_order(c, fastest)
        final = bisect(c, cm, fastest, order, steps)
    record = {"groups": len(groups), "fp16_groups": len(final), "steps": steps,
              "fp32_us": round(cm.cost(frozenset()), 1), "predicted_us": round(cm.cost(final), 1),
              "kept_fp32": [{"name": g.name, "op": g.op, "partition": g.partition,
                             "reason": "fidelity budget" if gi in fastest else "not faster with its reformats",
                             "fidelity_cost": sens.get(gi)}
                            for gi, g in enumerate(groups) if gi not in final]}
    return FloatStage(frozenset(c.nodes(final)), record)


def trt_cost_model(fp32: onnx.ModelProto, groups: list[Group], spec: GpuSpec, stage: FloatStage,
                   min_saving: float) -> tuple[CostModel, dict, list[dict]]:
    """Stage 2's cost model: each INT8 candidate against its float-stage precision."""
    t = group_times(fp32, groups, spec)
    floats = ["fp16" if set(g.nodes) <= stage.nodes else "fp32" for g in groups]
    t_float = np.array([t[p][gi] for gi, p in enumerate(floats)])
    cm = CostModel(t_float, t["int8"], 0.0, 0.0, Boundaries(fp32, groups, forked=True), min_saving,
                   prices=crossing_prices(spec, "int8", "fp16"), floor_us=FLOOR_US)
    profile = {"model": "TensorRT roofline (uadc.backends.tensorrt.cost), batch 1", "gpu": spec.name,
               "gpu_source": spec.source, "min_saving": min_saving,
               "crossing_us": round(cm.per_node, 2), "crossing_ns_per_element": round(1000 * cm.per_element, 4),
               "float_us": round(cm.cost(frozenset()), 1), "all_int8_us": round(cm.cost(cm.all), 1),
               "covers": "the INT8 candidate groups and their crossings"}
    extra = [{"float": p, "fp32_us": round(float(t["fp32"][gi]), 2), "fp16_us": round(float(t["fp16"][gi]), 2)}
             for gi, p in enumerate(floats)]
    return cm, profile, extra


def fp32_layers(compiled: onnx.ModelProto, int8_nodes: list[str], fp16_nodes: frozenset[str]) -> list[str]:
    """Float nodes of the compiled model TensorRT must keep FP32: neither quantized nor chosen FP16
    (nodes the passes added count as FP32, the safe side; shape arithmetic is not float; a Cast's
    type is its ``to``)."""
    skip = set(int8_nodes) | fp16_nodes
    floats = float_tensors(compiled)
    return [n.name for n in compiled.graph.node if n.op_type not in (*QDQ_OPS, "Cast") and n.name
            and n.name not in skip and any(o in floats for o in n.output)]
