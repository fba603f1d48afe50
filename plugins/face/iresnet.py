"""IResNet-18/50/100: the CNN face backbones of ArcFace / AdaFace (insightface ``iresnet.py``).

Architecture as insightface ``recognition/arcface_torch/backbones/iresnet.py`` (module names
match, so its state dicts load key by key): a 3×3 stem (64 channels, stride 1, BN, PReLU), four
stages of improved basic blocks (BN → conv3×3 → BN → PReLU → conv3×3 (stride) → BN, plus a 1×1
projection shortcut when the shape changes), each stage halving the resolution (112 → 7), then
BN2d → flatten (512·7·7) → dropout → Linear → BatchNorm1d whose scale is frozen at 1.

The models take ``(images, keypoints=None)`` like every kpt backbone and ignore the keypoints, so
they drop into the face plugin as position-free baselines (``model.name=iresnet50``).
Registered as ``iresnet18``, ``iresnet50`` and ``iresnet100`` (registry.yaml, face section).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["IResNet", "iresnet18", "iresnet50", "iresnet100"]

logger = logging.getLogger(__name__)

_BN_EPS = 1e-5
LAYERS = {"iresnet18": (2, 2, 2, 2), "iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}


def _conv3x3(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Improved residual block: BN → conv → BN → PReLU → conv(stride) → BN, + shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=_BN_EPS),
            )

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C_in, H, W) → (B, C_out, H/stride, W/stride)."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """insightface IResNet.

    Args:
        layers: blocks per stage, e.g. (3, 4, 14, 3) for IResNet-50.
        num_classes: embedding size (insightface ``num_features``, 512).
        img_size: input side; must be a multiple of 16 (the four stages halve it).
        widths: channels of the four stages.
        dropout: dropout before the final Linear (insightface 0).
        in_chans: input channels.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 14, 3), num_classes: int = 512,
                 img_size: int = 112, widths: Sequence[int] = (64, 128, 256, 512),
                 dropout: float = 0.0, in_chans: int = 3) -> None:
        super().__init__()
        if img_size % 16:
            raise ValueError(f"iresnet: img_size must be a multiple of 16, got {img_size}")
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError("iresnet: layers and widths need four stages")
        self.img_size, self.num_classes = img_size, num_classes
        self.conv1 = _conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=_BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        inplanes = widths[0]
        for i, (blocks, planes) in enumerate(zip(layers, widths)):
            stage = [IBasicBlock(inplanes, planes, stride=2)]
            stage += [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes
        side = img_size // 16
        self.bn2 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(inplanes * side * side, num_classes)
        self.features = nn.BatchNorm1d(num_classes, eps=_BN_EPS)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # insightface freezes the scale of the last BatchNorm at 1 (only its shift is learned)
        self.features.weight.requires_grad_(False)

    @property
    def uses_keypoints(self) -> bool:
        """IResNet ignores keypoints."""
        return False

    def forward(self, images: Tensor, keypoints: Tensor | None = None) -> Tensor:
        """images (B, C, S, S) normalised to [−1, 1] (keypoints ignored) → (B, num_classes)."""
        x = self.prelu(self.bn1(self.conv1(images)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x.float()))


def _build(name: str, **kwargs: Any) -> IResNet:
    kwargs.setdefault("layers", LAYERS[name])
    model = IResNet(**kwargs)
    # the same spec kpt factories record, so kpt.models.save_model / kpt.load_model rebuild it
    model.kpt_spec = {"name": name, "kwargs": {k: list(v) if isinstance(v, tuple) else v
                                               for k, v in kwargs.items()}, "preset": name}
    return model


def iresnet18(**kwargs: Any) -> IResNet:
    """IResNet-18 (layers 2-2-2-2)."""
    return _build("iresnet18", **kwargs)


def iresnet50(**kwargs: Any) -> IResNet:
    """IResNet-50 (layers 3-4-14-3), the ArcFace/AdaFace R50 baseline."""
    return _build("iresnet50", **kwargs)


def iresnet100(**kwargs: Any) -> IResNet:
    """IResNet-100 (layers 3-13-30-3), the ArcFace/AdaFace R100 baseline."""
    return _build("iresnet100", **kwargs)
