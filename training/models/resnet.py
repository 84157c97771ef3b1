"""ResNet-18/50 in plain PyTorch with torchvision's parameter names (torchvision itself is not needed).

``resnet(depth).state_dict()`` loads into ``torchvision.models.resnet18/50()`` with
``load_state_dict(sd, strict=False)`` missing only ``fc.*`` when built without a classifier
(``num_classes=None``, the SimCLR encoder), and with nothing missing when built with one. The
``cifar_stem`` option (3x3 stride-1 first conv, no max-pool) keeps 32 px inputs from being
down-sampled 4x before the first block, as in SimCLR's CIFAR-10 experiments; its ``conv1.weight``
is then (64, 3, 3, 3) instead of (64, 3, 7, 7).
"""

from __future__ import annotations

import torch
from torch import nn

from data_pipeline.errors import UserError

# Blocks per stage of each supported depth, and whether it uses bottleneck blocks.
_LAYOUTS: dict[int, tuple[tuple[int, int, int, int], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
}
_STAGE_WIDTHS = (64, 128, 256, 512)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "ResNet v1.5"), 1x1 expand (ResNet-50+)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet whose ``forward`` returns class logits, or pooled features when built without ``fc``.

    Args:
        depth: 18, 34, 50 or 101.
        num_classes: Width of the ``fc`` classifier; None builds no classifier and ``forward``
            returns the (batch, feature_dim) pooled features. Defaults to None.
        cifar_stem: 3x3 stride-1 ``conv1`` and no max-pool (for 32 px images). Defaults to False.
        zero_init_residual: Start the last BatchNorm scale of every block at zero, so each block
            begins as the identity. Defaults to False (torchvision's default).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int | None = None,
        cifar_stem: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if depth not in _LAYOUTS:
            raise UserError(f"ResNet depth {depth!r} is not one of {sorted(_LAYOUTS)}")
        blocks, bottleneck = _LAYOUTS[depth]
        block = Bottleneck if bottleneck else BasicBlock
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        # Identity has no parameters, so the state dict is the same either way.
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        for stage, (count, width) in enumerate(zip(blocks, _STAGE_WIDTHS)):
            layer, channels = _make_stage(block, channels, width, count, stride=1 if stage == 0 else 2)
            self.add_module(f"layer{stage + 1}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels
        self.fc = nn.Linear(channels, num_classes) if num_classes is not None else None
        _init_weights(self, zero_init_residual)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) float images -> (batch, feature_dim) globally pooled features."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.features(images)
        return pooled if self.fc is None else self.fc(pooled)


def _make_stage(
    block: type[BasicBlock | Bottleneck], in_channels: int, width: int, count: int, stride: int
) -> tuple[nn.Sequential, int]:
    out_channels = width * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        # torchvision names these downsample.0 (conv) and downsample.1 (norm).
        downsample = nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
    layers = [block(in_channels, width, stride, downsample)]
    layers += [block(out_channels, width, 1, None) for _ in range(count - 1)]
    return nn.Sequential(*layers), out_channels


def _init_weights(model: ResNet, zero_init_residual: bool) -> None:
    """torchvision's initialisation: He (fan-out) convolutions, unit-scale BatchNorm."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                nn.init.zeros_(module.last_norm().weight)


def resnet(
    depth: int = 50,
    num_classes: int | None = None,
    cifar_stem: bool = False,
    zero_init_residual: bool = False,
) -> ResNet:
    """Build a :class:`ResNet` (see its arguments). Defaults to a ResNet-50 encoder without ``fc``."""
    return ResNet(depth, num_classes, cifar_stem, zero_init_residual)
