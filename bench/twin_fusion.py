"""``python -m bench.twin_fusion``: would fusing STFPM's teacher / student twin layers pay on ORT CPU?

STFPM's student has the teacher's architecture, so every layer has a twin: both stems read the same
image, and every later pair of convolutions could run as one grouped convolution on the two streams
stacked along channels (``groups`` doubled, BN folded), halving the node count. This builds that
fused network from a trained EfficientNet-Lite checkpoint, exports both forms (teacher + student
features only, static batch, onnxsim), checks they give the same features, and times them paired in
one process (alternating blocks of runs, median of per-cycle ratios). An experiment, not a pass:
the answer decides whether a fusion pass is worth writing.

    python -m bench.twin_fusion --batches 1,8 --cycles 10
"""

from __future__ import annotations

from bench import as_script, out_file, positive, positives, summary

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from uadc.core.io import atomic_write_json


def _fold(conv, bn):
    import torch
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight.detach() * scale[:, None, None, None], bn.bias.detach() - bn.running_mean * scale


def twin_conv(ct, bt, cs, bs, shared_input: bool = False):
    """One SAME-padded conv computing teacher conv ``ct`` and student conv ``cs`` side by side."""
    import torch

    from uadc.models.backbones.efficientnet_lite import SameConv2d
    (wt, bt_), (ws, bs_) = _fold(ct, bt), _fold(cs, bs)
    groups = ct.groups if shared_input else 2 * ct.groups
    cin = ct.in_channels if shared_input else 2 * ct.in_channels
    conv = SameConv2d(cin, 2 * ct.out_channels, ct.kernel_size, stride=ct.stride, groups=groups, bias=True)
    conv.weight.data, conv.bias.data = torch.cat([wt, ws]), torch.cat([bt_, bs_])
    return conv


def build(model):
    """(separate, fused) torch modules returning teacher then student tap features."""
    import torch.nn.functional as F
    from torch import nn

    from uadc.models.backbones.efficientnet_lite import MBConv, _Stem
    teacher, student = model.teacher, model.student.features

    class TwinBlock(nn.Module):
        def __init__(self, t: MBConv, s: MBConv):
            super().__init__()
            self.expand = twin_conv(t._expand_conv, t._bn0, s._expand_conv, s._bn0) if t.has_expand else None
            self.dw = twin_conv(t._depthwise_conv, t._bn1, s._depthwise_conv, s._bn1)
            self.project = twin_conv(t._project_conv, t._bn2, s._project_conv, s._bn2)
            self.skip = t.skip

        def forward(self, x):
            y = F.relu6(self.expand(x)) if self.expand is not None else x
            y = self.project(F.relu6(self.dw(y)))
            return y + x if self.skip else y

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.names, self.taps = teacher.stage_names, teacher.taps
            self.stages = nn.ModuleList([
                nn.Sequential(twin_conv(t.conv, t.bn, s.conv, s.bn, shared_input=True), nn.ReLU6())
                if isinstance(t, _Stem) else TwinBlock(t, s) for t, s in zip(teacher.stages, student.stages)])

        def forward(self, x):
            t_feats, s_feats = [], []
            for name, stage in zip(self.names, self.stages):
                x = stage(x)
                if name in self.taps:
                    c = x.shape[1] // 2
                    t_feats.append(x[:, :c])
                    s_feats.append(x[:, c:])
            return t_feats + s_feats

    class Separate(nn.Module):
        def __init__(self):
            super().__init__()
            self.teacher, self.student = teacher, student   # submodules: traced as weights, not constants

        def forward(self, x):
            return list(self.teacher(x)) + list(self.student(x))

    return Separate().eval(), Twin().eval()


def export(module, batch: int, size: int, path: Path) -> None:
    import onnx
    import onnxsim
    import torch
    x = torch.zeros(batch, 3, size, size)
    torch.onnx.export(module, (x,), str(path), input_names=["x"], opset_version=18, dynamo=False)
    simplified, ok = onnxsim.simplify(onnx.load(str(path)))
    if not ok:
        raise RuntimeError("onnxsim check failed")
    onnx.save(simplified, str(path))


def paired(sessions: dict, x: np.ndarray, cycles: int, runs: int) -> dict:
    times = {n: [] for n in sessions}
    ratios = []
    for cycle in range(cycles):
        order = list(sessions) if cycle % 2 == 0 else list(sessions)[::-1]
        p50 = {}
        for name in order:
            sess = sessions[name]
            for _ in range(10):
                sess.run(None, {"x": x})
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter()
                sess.run(None, {"x": x})
                ts.append(time.perf_counter() - t0)
            p50[name] = float(np.median(ts)) * 1e3
            times[name].append(p50[name])
        ratios.append(p50["fused"] / p50["separate"])
    return {"separate_ms": float(np.median(times["separate"])), "fused_ms": float(np.median(times["fused"])),
            "ratio": float(np.median(ratios)), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=summary(__doc__))
    ap.add_argument("--recipe", default="recipes/stfpm_effnet_lite0.yaml")
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--batches", type=positives, default=[1, 8])
    ap.add_argument("--cycles", type=positive, default=10)
    ap.add_argument("--runs", type=positive, default=60)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--json", type=out_file, default=None)
    a = ap.parse_args(argv)
    import onnx
    import torch

    from uadc.config.recipe import load_recipe
    from uadc.core.errors import UadcError
    from uadc.core.ort_session import make_session
    from uadc.training.checkpoint import checkpoint_path, load_checkpoint
    try:
        recipe = load_recipe(a.recipe)
        if recipe.cfg["model"]["method"] != "stfpm" or not recipe.cfg["model"]["backbone"].startswith("efficientnet"):
            raise UadcError("twin fusion is built for STFPM with an EfficientNet-Lite backbone")
        model, _ = load_checkpoint(checkpoint_path(recipe, a.artifacts), recipe)
    except UadcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = recipe.data.image_size
    separate, fused = build(model)
    out = {"recipe": recipe.name, "threads": a.threads, "batches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in a.batches:
            paths = {n: Path(tmp) / f"{n}{batch}.onnx" for n in ("separate", "fused")}
            with torch.no_grad():
                export(separate, batch, size, paths["separate"])
                export(fused, batch, size, paths["fused"])
            sessions = {n: make_session(str(p), a.threads) for n, p in paths.items()}
            x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
            ref, new = (sessions[n].run(None, {"x": x}) for n in ("separate", "fused"))
            diff = max(float(np.abs(r - f).max()) for r, f in zip(ref, new))
            nodes = {n: len(onnx.load(str(p)).graph.node) for n, p in paths.items()}
            row = {"max_abs_diff": diff, "nodes": nodes, **paired(sessions, x, a.cycles, a.runs)}
            out["batches"][batch] = row
            print(f"batch {batch}: nodes {nodes['separate']} -> {nodes['fused']}, max |diff| {diff:.2g}, "
                  f"p50 {row['separate_ms']:.2f} -> {row['fused_ms']:.2f} ms, fused / separate {row['ratio']:.3f} "
                  f"({row['ratio_min']:.3f}-{row['ratio_max']:.3f})", flush=True)
    if a.json:
        atomic_write_json(a.json, out)
    return 0


if __name__ == "__main__":
    as_script(main)
