"""PaSTe (Barusco et al., "Partially Shared Teacher-student"): the student re-uses the frozen
teacher's first stages up to a split point and only the later stages are trained. The shared
trunk is computed once (in the teacher partition), which cuts training memory and inference
MACs compared with STFPM's full second network."""

from __future__ import annotations

import torch
from torch import nn

from uadc.models.backbones import FeatureExtractor, build_backbone
from uadc.models.heads import distance_head
from uadc.models.stfpm import STFPM


class PasteStudent(nn.Module):
    """Student stages after the split; input is the teacher's split activation (t_feats[0])."""

    def __init__(self, features: FeatureExtractor):
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor, t_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.features(t_feats[0])


class PaSTe(STFPM):
    method = "paste"


def build_paste(m: dict, image_size: int) -> PaSTe:
    split, taps = m["split"], m["taps"]
    # The teacher also emits the split activation first; the head skips it.
    teacher = FeatureExtractor(build_backbone(m["backbone"], m["pretrained"], m["weights"]), [split] + taps)
    student = PasteStudent(FeatureExtractor(build_backbone(m["backbone"], pretrained=False), taps, start=split))
    head = distance_head(m, image_size, "l2", skip_teacher=1)
    return PaSTe(teacher, student, head)
