"""The shape every uadc detector shares: a frozen ``teacher``, a trainable ``student`` and a
scoring ``head``. Export tags graph nodes by these three attribute names, so each method keeps
its computation inside them (nothing learnable or scoring-related in ``forward`` itself)."""

from __future__ import annotations

import torch
from torch import nn


class KDModel(nn.Module):
    """Knowledge-distillation anomaly detector.

    ``teacher(x) -> list[Tensor]`` (frozen), ``student(x, t_feats) -> list[Tensor]``,
    ``head(t_feats, s_feats) -> (anomaly_map (N,1,H,W), score (N,))``.
    """

    method = "kd"
    discrepancy_per = "tap"   # what each value of ``discrepancy`` is for (the training log names it)
    below_taps = 1   # how much further than the deepest tap the model downsamples (RD's embedding: 2)

    def __init__(self, teacher: nn.Module, student: nn.Module, head: nn.Module):
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.head = head
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "KDModel":
        super().train(mode)
        self.teacher.eval()  # frozen BN statistics, always
        return self

    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.teacher(x))

    def student_features(self, x: torch.Tensor, t_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.student(x, t_feats))

    def loss(self, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def discrepancy(self, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> list[float]:
        """Mean per-tap teacher/student distance on a batch (a convergence signal on normal data)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.teacher(x)
        s = self.student(x, t)
        return self.head(t, s)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
