"""Model cost figures: parameters (all / trainable) and multiply-accumulates per partition, and
the process's peak resident memory (what PaSTe's training-RAM claim is about)."""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

PARTS = ("teacher", "student", "head")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    out = {}
    for part in PARTS:
        params = list(getattr(model, part).parameters())
        out[part] = {"total": sum(p.numel() for p in params),
                     "trainable": sum(p.numel() for p in params if p.requires_grad)}
    return out


def _conv_macs(module: nn.Module, output: torch.Tensor) -> int:
    w = module.weight
    per_output = w.shape[1] * w[0, 0].numel()  # (in / groups) * kernel area
    return int(output.numel() // output.shape[0] * per_output)


@torch.no_grad()
def macs_per_partition(model: nn.Module, image_size: int) -> dict[str, int]:
    """Multiply-accumulates of conv / transposed-conv / linear layers for one image."""
    totals = dict.fromkeys(PARTS, 0)
    hooks = []
    for part in PARTS:
        for m in getattr(model, part).modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                cin = m.in_channels if isinstance(m, nn.ConvTranspose2d) else None

                def hook(mod, inp, out, part=part, cin=cin):
                    if cin is None:
                        totals[part] += _conv_macs(mod, out)
                    else:  # transposed conv: every input pixel scatters a full kernel
                        totals[part] += int(inp[0].numel() // inp[0].shape[0] * mod.weight[0].numel())
                hooks.append(m.register_forward_hook(hook))
            elif isinstance(m, nn.Linear):
                hooks.append(m.register_forward_hook(
                    lambda mod, inp, out, part=part: totals.__setitem__(
                        part, totals[part] + int(out.numel() // out.shape[0] * mod.in_features))))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return totals


def model_stats(model: nn.Module, image_size: int) -> dict:
    return {"params": parameter_counts(model), "macs": macs_per_partition(model, image_size)}
