"""ResNet-18 and Wide-ResNet-50-2 with torchvision's module names, so a torchvision state dict
(``torch.save(torchvision.models.resnet18(weights=...).state_dict(), path)``) loads strictly.

Bottlenecks stride on the 3x3 conv (torchvision's "ResNet v1.5"), not on the first 1x1.
"""

from __future__ import annotations

import torch
from torch import nn

from uadc.models.backbones import register


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """Projection for the residual path when shape changes; keys ``downsample.0`` / ``.1``."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, width_per_group: int = 64):
        super().__init__()
        if width_per_group != 64:
            raise ValueError("BasicBlock has no width multiplier")
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, width_per_group: int = 64):
        super().__init__()
        # Wide variants only widen the inner 3x3; the block's output stays planes * 4.
        width = planes * width_per_group // 64
        cout = planes * self.expansion
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class _Stem(nn.Module):
    """conv1-bn1-relu-maxpool as one stage; holds the network's own submodules (shared weights)."""

    def __init__(self, conv1: nn.Module, bn1: nn.Module, relu: nn.Module, maxpool: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = conv1, bn1, relu, maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int],
                 width_per_group: int = 64, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (planes, repeats) in enumerate(zip((64, 128, 256, 512), layers)):
            layer, cin = self._make_layer(block, cin, planes, repeats, 1 if i == 0 else 2, width_per_group)
            setattr(self, f"layer{i + 1}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights()

    @staticmethod
    def _make_layer(block, cin: int, planes: int, repeats: int, stride: int,
                    width_per_group: int) -> tuple[nn.Sequential, int]:
        cout = planes * block.expansion
        blocks = [block(cin, planes, stride, width_per_group)]
        blocks += [block(cout, planes, 1, width_per_group) for _ in range(repeats - 1)]
        return nn.Sequential(*blocks), cout

    def _init_weights(self) -> None:
        # Same scheme as torchvision, so a random init (pretrained: false) trains comparably.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stages(self) -> list[tuple[str, nn.Module]]:
        """stem (stride 4), layer1 (4), layer2 (8), layer3 (16), layer4 (32)."""
        stem = _Stem(self.conv1, self.bn1, self.relu, self.maxpool)
        return [("stem", stem)] + [(f"layer{i}", getattr(self, f"layer{i}")) for i in range(1, 5)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, stage in self.stages():
            x = stage(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18() -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2])


def wide_resnet50_2() -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], width_per_group=128)


# No bundled weights: the user points model.weights at a torchvision state dict file.
register("resnet18", default_weights=None)(resnet18)
register("wide_resnet50_2", default_weights=None)(wide_resnet50_2)
