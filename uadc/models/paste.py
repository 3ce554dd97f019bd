"""PaSTe (Barusco et al., "Partially Shared Teacher-student"): the student re-uses the frozen
teacher's first stages up to a split point and only the later stages are trained. The shared
trunk is computed once (in the teacher partition), which cuts training memory and inference
MACs compared with STFPM's full second network."""

from __future__ import annotations

import torch
from torch import nn

from uadc.core.errors import UadcError
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
    student_net = build_backbone(m["backbone"], pretrained=False)
    _check_split([n for n, _ in student_net.stages()], split, taps)
    student = PasteStudent(FeatureExtractor(student_net, taps, start=split))
    # The teacher also emits the split activation first; the head skips it.
    teacher = FeatureExtractor(build_backbone(m["backbone"], m["pretrained"], m["weights"]), [split] + taps)
    head = distance_head(m, image_size, "l2", skip_teacher=1)
    return PaSTe(teacher, student, head)


def _check_split(names: list[str], split: str, taps: list[str]) -> None:
    """Name the split or the tap that is wrong (the checks on ``[split] + taps`` blamed the taps' order)."""
    if split not in names:
        raise UadcError(f"model.split: unknown stage {split!r}; stages are: {', '.join(names)}")
    early = [t for t in taps if t in names and names.index(t) <= names.index(split)]
    if early:
        raise UadcError(f"model.taps: {early[0]!r} is not after model.split {split!r} (the PaSTe student's "
                        f"stages start after the split): tap later stages, or split earlier")
