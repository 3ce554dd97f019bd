"""STFPM (Wang et al. 2021, "Student-Teacher Feature Pyramid Matching"): a student with the
teacher's architecture, trained from scratch to match channel-normalised teacher features at
several taps; the anomaly map combines the per-tap discrepancies."""

from __future__ import annotations

import torch
from torch import nn

from uadc.models.backbones import FeatureExtractor, build_backbone
from uadc.models.base import KDModel
from uadc.models.heads import distance_head, l2_normalized_distance, mean_layer_distance


class Student(nn.Module):
    """Wraps a feature extractor so it has the student signature ``(x, t_feats)``."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor, t_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.features(x)


class STFPM(KDModel):
    method = "stfpm"

    def loss(self, t_feats, s_feats) -> torch.Tensor:
        # Per-tap mean over positions of the summed channel distance, summed over taps.
        k = getattr(self.head, "skip_teacher", 0)
        return sum(l2_normalized_distance(t, s).mean() * 2.0 for t, s in zip(t_feats[k:], s_feats))

    def discrepancy(self, t_feats, s_feats) -> list[float]:
        return mean_layer_distance(self.head, t_feats, s_feats)


def build_stfpm(m: dict, image_size: int) -> STFPM:
    teacher = FeatureExtractor(build_backbone(m["backbone"], m["pretrained"], m["weights"]), m["taps"])
    student = Student(FeatureExtractor(build_backbone(m["backbone"], pretrained=False), m["taps"]))
    head = distance_head(m, image_size, "l2")
    return STFPM(teacher, student, head)
