"""The ResNet family of He et al. 2015, from one builder and a stage table per depth.

Plain nets are the same blocks with the addition switched off (paper §4.1), not new
classes. Parameter names follow torchvision's `models/resnet.py` (`conv1`, `bn1`,
`layerN.M.convK`, `downsample.0/1`, `fc`), so with option B and variant "v1.5" a
torchvision state dict loads with `strict=True`.
"""

from __future__ import annotations

import torch
from torch import nn

from raysnet.models.family import SHORTCUTS, VARIANTS, Arch, check, get_arch


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: identity, subsampled by the stride, extra channels zero-padded. No parameters."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.extra, self.stride = c_out - c_in, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads dimensions from the last backwards: (W, W, H, H, C, C).
        return nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra))


def make_shortcut(kind: str, c_in: int, c_out: int, stride: int) -> nn.Module | None:
    """The paper's Table 3 in one place. None means the identity shortcut."""
    same_shape = c_in == c_out and stride == 1
    if kind == "A":
        return None if same_shape else ZeroPadShortcut(c_in, c_out, stride)
    if kind == "B" and same_shape:
        return None
    # B where the shape changes, C everywhere: 1x1 projection + BN.
    return nn.Sequential(conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convs (Fig. 2 left). The stride sits on the first."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int, residual: bool, shortcut: str):
        super().__init__()
        self.conv1 = conv3x3(c_in, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.downsample = make_shortcut(shortcut, c_in, width, stride) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out += x if self.downsample is None else self.downsample(x)  # in place, as torchvision: one tensor fewer
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand x4 (Fig. 5 right).

    variant "v1" (the paper) strides the first 1x1; "v1.5" (torchvision) strides the 3x3.
    """

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, residual: bool, shortcut: str, variant: str):
        super().__init__()
        c_out = width * self.expansion
        s1, s3 = (stride, 1) if variant == "v1" else (1, stride)
        self.conv1 = conv1x1(c_in, width, s1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, s3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, c_out)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.downsample = make_shortcut(shortcut, c_in, c_out, stride) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out += x if self.downsample is None else self.downsample(x)  # in place, as torchvision: one tensor fewer
        return self.relu(out)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """Stem, stages from the stage table, global average pool, FC."""

    def __init__(self, arch: Arch, num_classes: int, shortcut: str, variant: str):
        super().__init__()
        block = BLOCKS[arch.block]
        # Only the bottleneck has a choice of where the stride goes (v1 or v1.5).
        variant_arg = {"variant": variant} if block is Bottleneck else {}
        if arch.family == "imagenet":
            stem_width, widths = 64, (64, 128, 256, 512)
            self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)  # 224 -> 112
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)  # 112 -> 56
        else:
            stem_width, widths = 16, (16, 32, 64)
            self.conv1 = conv3x3(3, stem_width)  # 32 -> 32
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)

        c_in = stem_width
        for i, (width, n) in enumerate(zip(widths, arch.blocks)):
            stride = 1 if i == 0 else 2  # each later stage halves the feature map
            layer = []
            for j in range(n):
                layer.append(block(c_in, width, stride if j == 0 else 1, arch.residual, shortcut, **variant_arg))
                c_in = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.stages = len(arch.blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He et al. 2015 ("Delving deep into rectifiers") init for every conv; BN starts as identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (N, C, H, W) -> (N, classes)


def build_model(name: str, num_classes: int | None = None, shortcut: str | None = None,
                variant: str | None = None) -> nn.Module:
    """Build a named network. `shortcut` defaults to the paper's choice, `variant` to "v1"."""
    arch = get_arch(name)
    shortcut = arch.default_shortcut if shortcut is None else shortcut
    variant = "v1" if variant is None else variant
    check("shortcut", shortcut, SHORTCUTS)
    check("variant", variant, VARIANTS)
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return ResNet(arch, arch.default_classes if num_classes is None else num_classes, shortcut, variant)
