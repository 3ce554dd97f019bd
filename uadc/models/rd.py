"""Reverse Distillation (Deng & Li, CVPR 2022, "Anomaly Detection via Reverse Distillation from
One-Class Embedding").

The frozen pretrained encoder (teacher) is tapped at three stages. The student does not see the
image: it reads the teacher's features, squeezes them through a one-class bottleneck embedding
(OCBE) and a decoder rebuilds the teacher features from that embedding in reverse order (deep to
shallow). Anomalous patterns do not survive the compact embedding, so the decoder fails to
restore them and the per-position cosine distance grows there.

Student layout, with teacher taps of channels ``c1, c2, c3`` at strides ``s1 < s2 <= s3`` and
width multiplier ``w`` (``student_width``):

* MFF (multi-scale feature fusion): each shallower tap is brought to the last tap's resolution by
  strided 3x3 conv+BN+ReLU steps (channels follow the encoder's growth, times ``w``), then the
  three maps are concatenated.
* OCE (one-class embedding): one bottleneck residual block with stride 2 gives an embedding of
  ``2*c3*w`` channels at stride ``2*s3``.
* Decoder: per tap, deepest first: ConvTranspose (kernel = stride = the resolution ratio)+BN+ReLU,
  a bottleneck residual block, and a 1x1 read-out conv to the teacher's ``c_i`` channels (no
  activation, so it can match signed teacher features). The next stage continues from the
  hidden (pre-read-out) map, which decouples the student's width from the teacher's channels.
  Outputs are returned in teacher order so ``head`` / ``loss`` zip them with the taps.

Loss: sum over taps of the mean over positions of ``1 - cos`` over channels (paper eq. 2-3).
Head: ``DistanceHead(image_size, "cosine", combine, sigma)`` (the paper sums the upsampled maps,
i.e. ``combine: sum``; the recipe decides).

Measured (``student_width`` 1, 256x256 input, batch 1; conv/deconv MACs by forward hooks;
forward = whole model incl. head, best of 7, 1 intra-op thread on the shared 2-core machine):

==================  ============  ============  ===============  =======
backbone            teacher par.  student par.  MACs T + S       forward
==================  ============  ============  ===============  =======
efficientnet_lite0  0.70 M        0.40 M        0.32 G + 0.12 G  28 ms
mobilenet_v2        0.54 M        0.30 M        0.27 G + 0.11 G  19 ms
resnet18            2.78 M        2.25 M        1.83 G + 0.53 G  44 ms
wide_resnet50_2     24.9 M        35.8 M        12.0 G + 7.9 G   325 ms
==================  ============  ============  ===============  =======

A student step (batch 16, 256x256, cached teacher features, efficientnet_lite0) takes ~0.15 s
with 1 thread: ~5 s per epoch of 500 images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from uadc.core.errors import UadcError
from uadc.models.backbones import FeatureExtractor, build_backbone
from uadc.models.base import KDModel
from uadc.models.heads import cosine_distance, distance_head, mean_layer_distance

PROBE_SIZE = 64  # a small input is enough to read each tap's channels and stride


@torch.no_grad()
def tap_shapes(features: nn.Module) -> list[tuple[int, int]]:
    """(channels, stride) of every tapped stage, read off one forward pass at PROBE_SIZE."""
    was_training = features.training
    out = features.eval()(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE))
    features.train(was_training)
    shapes = []
    for f in out:
        stride = PROBE_SIZE // f.shape[-1]
        if stride < 1 or stride & (stride - 1):
            raise UadcError(f"feature tap stride {stride} is not a power of two")
        shapes.append((int(f.shape[1]), stride))
    return shapes


def scaled(c: int, width: float) -> int:
    return max(8, int(round(c * width)))


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class ResBottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand, with a projected shortcut when shapes change.
    The thin middle keeps wide teachers (wide_resnet50_2) affordable."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        mid = max(cout // 4, 32)
        self.body = nn.Sequential(
            conv_bn_relu(cin, mid, 1), conv_bn_relu(mid, mid, 3, stride),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if cin == cout and stride == 1 else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def downsampler(chans: list[int], strides: list[int], i: int, width: float) -> nn.Module:
    """Tap i -> the last tap's resolution: one stride-2 conv per octave (stride-1 conv if none)."""
    steps = int(math.log2(strides[-1] // strides[i]))
    if steps == 0:
        return conv_bn_relu(chans[i], scaled(chans[-1], width))
    # Channels grow like the encoder's: the next taps' counts, ending at the last tap's.
    targets = [scaled(chans[min(i + 1 + k, len(chans) - 1)], width) for k in range(steps)]
    targets[-1] = scaled(chans[-1], width)
    layers, cin = [], chans[i]
    for cout in targets:
        layers.append(conv_bn_relu(cin, cout, 3, 2))
        cin = cout
    return nn.Sequential(*layers)


class DecoderStage(nn.Module):
    """Upsample by ``ratio`` (transposed conv), refine, read out the teacher's channel count."""

    def __init__(self, cin: int, hidden: int, cout: int, ratio: int):
        super().__init__()
        up = nn.ConvTranspose2d(cin, hidden, ratio, ratio, bias=False) if ratio > 1 \
            else nn.Conv2d(cin, hidden, 3, 1, 1, bias=False)
        self.up = nn.Sequential(up, nn.BatchNorm2d(hidden), nn.ReLU())
        self.block = ResBottleneck(hidden, hidden)
        self.readout = nn.Conv2d(hidden, cout, 1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.up(x)
        if h.shape[-2:] != size:  # odd input sizes: strided convs rounded up; static at export
            h = F.interpolate(h, size=size, mode="bilinear", align_corners=False)
        h = self.block(h)
        return h, self.readout(h)


class RDStudent(nn.Module):
    """OCBE + mirrored decoder; consumes teacher features, not the image."""

    def __init__(self, shapes: list[tuple[int, int]], width: float = 1.0):
        super().__init__()
        chans, strides = [c for c, _ in shapes], [s for _, s in shapes]
        if any(b < a for a, b in zip(strides, strides[1:])):
            raise UadcError("rd: feature taps must not decrease in stride")
        self.fuse = nn.ModuleList([downsampler(chans, strides, i, width) for i in range(len(chans) - 1)])
        fused = sum(scaled(chans[-1], width) for _ in self.fuse) + chans[-1]
        embed = scaled(2 * chans[-1], width)
        self.embed = ResBottleneck(fused, embed, stride=2)
        # Deepest stage first; each upsamples by the stride ratio to the previous (deeper) map.
        stages, cin, prev_stride = [], embed, 2 * strides[-1]
        for c, s in reversed(shapes):
            hidden = scaled(c, width)
            stages.append(DecoderStage(cin, hidden, c, prev_stride // s))
            cin, prev_stride = hidden, s
        self.decoder = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor, t_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        last = t_feats[-1]
        fused = [down(f) for down, f in zip(self.fuse, t_feats[:-1])]
        fused = [f if f.shape[-2:] == last.shape[-2:]
                 else F.interpolate(f, size=last.shape[-2:], mode="bilinear", align_corners=False)
                 for f in fused]
        h = self.embed(torch.cat(fused + [last], dim=1))
        outs = []
        for stage, t in zip(self.decoder, reversed(t_feats)):
            h, out = stage(h, t.shape[-2:])
            outs.append(out)
        return outs[::-1]


class ReverseDistillation(KDModel):
    method = "rd"
    below_taps = 2   # the one-class embedding: a stride-2 block below the deepest tap

    def loss(self, t_feats, s_feats) -> torch.Tensor:
        return sum(cosine_distance(t, s).mean() for t, s in zip(t_feats, s_feats))

    def discrepancy(self, t_feats, s_feats) -> list[float]:
        return mean_layer_distance(self.head, t_feats, s_feats)


def build_rd(m: dict, image_size: int) -> ReverseDistillation:
    teacher = FeatureExtractor(build_backbone(m["backbone"], m["pretrained"], m["weights"]), m["taps"])
    student = RDStudent(tap_shapes(teacher), float(m.get("student_width", 1.0)))
    head = distance_head(m, image_size, "cosine")
    return ReverseDistillation(teacher, student, head)
