"""DCAM (Jena et al. 2024, "Attend, Distill, Detect: Attention-aware Entropy Distillation for
Anomaly Detection"): convolutional attention blocks distributed over the student's tapped feature
maps modulate the student features *during training only*, so that a unified student can learn to
mask what is irrelevant to the current product (less cross-class interference). The distillation
loss is a KL divergence over the spatial dimension (softmax over H*W per channel, teacher -> student)
plus a channel-wise cosine distance (each channel's H*W vector, teacher vs student).

The blocks live outside the ``KDModel``: ``DcamLoss`` owns them, ``fit`` optimises them with the
student and drops them afterwards, so the checkpoint and the exported graph are the plain model's
(same nodes, same latency). The anomaly map at inference compares the *raw* student features with
the teacher's, so the method's own loss on those raw features is kept with weight
``feature_weight`` (0 gives the paper's loss alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uadc.config.recipe import DcamConfig
from uadc.core.errors import UadcError
from uadc.models.base import KDModel

DCAM_METHODS = ("stfpm", "paste", "rd")  # feature-matching students: one student map per teacher tap


class ChannelAttention(nn.Module):
    """CBAM channel attention: a shared bottleneck MLP on average- and max-pooled descriptors."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.mlp(x.mean(dim=(2, 3), keepdim=True)) + self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * torch.sigmoid(w)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: a 7x7 convolution over the channel-mean and channel-max maps."""

    def __init__(self, kernel: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


def attention_block(channels: int, kind: str, reduction: int) -> nn.Module:
    parts = []
    if kind in ("channel", "cbam"):
        parts.append(ChannelAttention(channels, reduction))
    if kind in ("spatial", "cbam"):
        parts.append(SpatialAttention())
    return nn.Sequential(*parts)


def spatial_kl(t: torch.Tensor, s: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(P_t || P_s) with P = softmax over the H*W positions of each channel; mean over N and C.

    Scaled by temperature**2 (Hinton) so its gradient size does not shrink with the temperature."""
    log_pt = F.log_softmax(t.flatten(2) / temperature, dim=2)
    log_ps = F.log_softmax(s.flatten(2) / temperature, dim=2)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=2)
    return kl.mean() * temperature ** 2


def channel_cosine(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """1 - cos(t_c, s_c) between each channel's H*W vectors; mean over N and C."""
    return (1.0 - F.cosine_similarity(t.flatten(2), s.flatten(2), dim=2, eps=1e-6)).mean()


def compared_teacher(model: KDModel, t_feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """The teacher maps that the student's maps are matched against (PaSTe skips its split output)."""
    return list(t_feats[getattr(model.head, "skip_teacher", 0):])


class DcamLoss(nn.Module):
    """Training-time attention blocks (one per student map) and the DCAM loss."""

    def __init__(self, channels: list[int], cfg: DcamConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(attention_block(c, cfg.attention, cfg.reduction) for c in channels)

    def attend(self, s_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [block(s) for block, s in zip(self.blocks, s_feats)]

    def forward(self, model: KDModel, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> torch.Tensor:
        c = self.cfg
        loss = model.loss(t_feats, s_feats) * c.feature_weight if c.feature_weight else 0.0
        for t, a in zip(compared_teacher(model, t_feats), self.attend(s_feats)):
            if c.kl_weight:
                loss = loss + c.kl_weight * spatial_kl(t, a, c.temperature)
            if c.cos_weight:
                loss = loss + c.cos_weight * channel_cosine(t, a)
        return loss


@torch.no_grad()
def build_dcam(model: KDModel, cfg: DcamConfig, sample: torch.Tensor) -> DcamLoss:
    """Blocks sized from the student's maps on ``sample`` (a batch of one or two training images)."""
    method = getattr(model, "method", "kd")
    if method not in DCAM_METHODS:
        raise UadcError(f"train.dcam: method {method!r} has no per-tap student feature maps; DCAM applies to "
                        f"{', '.join(DCAM_METHODS)}")
    was_training = model.training
    model.eval()
    try:
        t_feats = model.teacher_features(sample)
        s_feats = model.student_features(sample, t_feats)
    finally:
        model.train(was_training)
    teacher = compared_teacher(model, t_feats)
    if len(teacher) != len(s_feats) or any(t.shape != s.shape for t, s in zip(teacher, s_feats)):
        raise UadcError(f"train.dcam: student maps {[tuple(s.shape[1:]) for s in s_feats]} do not match the "
                        f"teacher maps {[tuple(t.shape[1:]) for t in teacher]}")
    return DcamLoss([s.shape[1] for s in s_feats], cfg)
