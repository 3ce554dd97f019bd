"""Fake-quant fine-tuning: the frozen prefix's outputs cached once, the torch model's own loss on
the head's inputs, Adam on student weights (+ activation scales)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from uadc.core.errors import UadcError
from uadc.core.progress import progress
from uadc.quant.qat.net import LossOrder, QatNet

log = logging.getLogger(__name__)


@dataclass
class QatData:
    images: torch.Tensor
    frozen: dict[str, torch.Tensor] | None  # cached frozen-prefix outputs (None: recompute per batch)

    def batch(self, net: QatNet, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.images[idx]
        return x, ({k: v[idx] for k, v in self.frozen.items()} if self.frozen is not None
                   else net.frozen_features(x))


def prepare_qat_data(net: QatNet, images: torch.Tensor, cache: bool, batch_size: int = 32) -> QatData:
    """Cache the frozen prefix's outputs once (teacher frozen) when they are all per-image tensors."""
    if not cache or not images.shape[0]:
        return QatData(images, None)
    starts = range(0, len(images), batch_size)
    chunks = [net.frozen_features(images[i:i + batch_size]) for i in starts]
    per_image = all(v.is_floating_point() and v.dim() > 0 and v.shape[0] == len(images[i:i + batch_size])
                    for i, c in zip(starts, chunks) for v in c.values())
    if not per_image:  # shape helpers crossing the cut (batch-size dependent): recompute per batch
        return QatData(images, None)
    return QatData(images, {k: torch.cat([c[k] for c in chunks]) for k in net.split.frozen_outputs})


def _loss(net: QatNet, model, order: LossOrder, x: torch.Tensor, frozen: dict) -> torch.Tensor:
    out = net(x, order.teacher + order.student, frozen)
    return model.loss([out[t] for t in order.teacher], [out[s] for s in order.student])


@torch.no_grad()
def mean_loss(net: QatNet, model, order: LossOrder, data: QatData, batch_size: int) -> float:
    n = len(data.images)
    losses = [(_loss(net, model, order, *data.batch(net, torch.arange(i, min(i + batch_size, n)))).item(),
               min(batch_size, n - i)) for i in range(0, n, batch_size)]
    return sum(v * k for v, k in losses) / n


def fine_tune(net: QatNet, model, order: LossOrder, data: QatData, epochs: int, lr: float, batch_size: int,
              seed: int) -> list[dict]:
    """Adam on student weights (+ activation scales); per-epoch mean loss, like ``train.fit``."""
    n = len(data.images)
    bs = min(batch_size, n)
    steps = max(1, n // bs)  # ragged last batch dropped, as in train.fit
    params = net.trainable_parameters()
    if not params:
        raise UadcError("qat: the quantized partitions have no trainable Conv weights")
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = progress(total=steps * epochs, desc="qat", unit="step")
    for epoch in range(epochs):
        perm, losses, t0 = torch.randperm(n, generator=gen), [], time.time()
        for b in range(steps):
            loss = _loss(net, model, order, *data.batch(net, perm[b * bs:(b + 1) * bs]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            net.net.act_fq.project()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses):.4f}")
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.time() - t0, 2),
                        "lr": lr})
        log.info("qat epoch %d/%d  loss %.4f  (%.0f s)", epoch + 1, epochs, np.mean(losses), time.time() - t0)
    bar.close()
    return history
