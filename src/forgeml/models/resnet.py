"""The ImageNet ResNets (He et al. 2016) in plain PyTorch, with torchvision's weight names.

torchvision's `resnet18` ... `resnet152` and timm's plain `resnet18` ... `resnet152` share one state-dict
layout (conv1, bn1, layer1.0.conv1, ..., layer4.2.downsample.1, fc), so their checkpoints load into these
modules without either library installed: a pre-trained checkpoint folder of one of these networks works on any
torch build (models/vision.py). Stride sits on the 3 x 3 convolution of a bottleneck ("ResNet v1.5"), as in
both libraries.
"""

from __future__ import annotations

from torch import Tensor, nn

EXPANSION = {"basic": 1, "bottleneck": 4}  # output channels of a block / its width
# name -> (block kind, blocks per stage)
LAYOUTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def _conv_bn(channels_in: int, channels_out: int, kernel: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(channels_in, channels_out, kernel, stride, kernel // 2, bias=False)
    return conv, nn.BatchNorm2d(channels_out)


class Block(nn.Module):
    """A basic block (two 3 x 3 convolutions) or a bottleneck (1 x 1, 3 x 3 with the stride, 1 x 1 widening
    4x), with a projection shortcut (`downsample`: 1 x 1 convolution + batch norm) where the shape changes."""

    def __init__(self, kind: str, channels_in: int, width: int, stride: int):
        super().__init__()
        channels_out = width * EXPANSION[kind]
        if kind == "basic":
            self.conv1, self.bn1 = _conv_bn(channels_in, width, 3, stride)
            self.conv2, self.bn2 = _conv_bn(width, channels_out, 3)
        else:
            self.conv1, self.bn1 = _conv_bn(channels_in, width, 1)
            self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
            self.conv3, self.bn3 = _conv_bn(width, channels_out, 1)
        self.kind = kind
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or channels_in != channels_out:
            self.downsample = nn.Sequential(*_conv_bn(channels_in, channels_out, 1, stride))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.kind == "bottleneck":
            out = self.bn3(self.conv3(self.relu(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """`name` one of LAYOUTS; 7 x 7 stem with stride 2 and max pooling, four stages (64, 128, 256, 512 wide),
    global average pooling, `fc` to `num_classes`. Takes normalised images N x C x H x W."""

    def __init__(self, name: str, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        kind, depths = LAYOUTS[name]
        self.conv1, self.bn1 = _conv_bn(in_channels, 64, 7, 2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = 64
        for stage, depth in enumerate(depths):
            width = 64 * 2**stage
            blocks = []
            for index in range(depth):
                blocks.append(Block(kind, channels, width, 2 if stage > 0 and index == 0 else 1))
                channels = width * EXPANSION[kind]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():  # torchvision's initialisation, for a head (or a network) trained anew
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))
