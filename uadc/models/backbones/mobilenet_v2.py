"""MobileNetV2 (width 1.0) with torchvision's module names (``features.0`` … ``features.18``,
``classifier.1``), so a torchvision state dict file loads strictly.
"""

from __future__ import annotations

import torch
from torch import nn

from uadc.models.backbones import register

# (expand ratio t, out channels c, repeats n, first stride s) per bottleneck group.
_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
_STEM, _LAST = 32, 1280


class ConvBNReLU(nn.Sequential):
    """Laid out like torchvision's Conv2dNormActivation: ``0`` conv, ``1`` BN, ``2`` ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = int(round(cin * expand))
        # t == 1 has no expansion conv, which shifts the indices inside ``conv``.
        layers: list[nn.Module] = [ConvBNReLU(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, cout, 1, bias=False),  # linear bottleneck: no activation
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        features: list[nn.Module] = [ConvBNReLU(3, _STEM, stride=2)]
        cin = _STEM
        for t, c, n, s in _SETTING:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(ConvBNReLU(cin, _LAST, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(_LAST, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's scheme, so a random init (pretrained: false) trains comparably.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """features.0 … features.18; strides 2 (0-1), 4 (2-3), 8 (4-6), 16 (7-13), 32 (14-18)."""
        return [(f"features.{i}", m) for i, m in enumerate(self.features)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(x)


def mobilenet_v2() -> MobileNetV2:
    return MobileNetV2()


# No bundled weights: the user points model.weights at a torchvision state dict file.
register("mobilenet_v2", default_weights=None)(mobilenet_v2)
