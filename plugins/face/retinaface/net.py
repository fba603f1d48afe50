"""RetinaFace network (MobileNet-0.25 and ResNet-50 bodies) with the official module tree.

The module names, layer order and hyper-parameters follow biubug6/Pytorch_Retinaface
(``models/net.py``, ``models/retinaface.py``, ``data/config.py``) so that the released
``mobilenet0.25_Final.pth`` / ``Resnet50_Final.pth`` state dicts load with a strict key check.

Input convention (official): BGR float image with the per-channel mean (104, 117, 123) subtracted,
no scaling, shape (B, 3, H, W). Output: ``loc`` (B, P, 4) raw box deltas, ``conf`` (B, P, 2)
softmax probabilities (column 1 = face), ``landms`` (B, P, 10) raw landmark deltas, with the priors
ordered level (stride 8, 16, 32) → row → column → anchor, see :func:`prior_boxes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CFG_MNET", "CFG_RE50", "RetinaFace", "RetinaFaceConfig", "prior_boxes"]


@dataclass(frozen=True)
class RetinaFaceConfig:
    """Static configuration of one RetinaFace variant (``data/config.py``)."""

    name: str
    min_sizes: tuple[tuple[int, int], ...] = ((16, 32), (64, 128), (256, 512))
    steps: tuple[int, ...] = (8, 16, 32)
    variance: tuple[float, float] = (0.1, 0.2)
    in_channel: int = 32
    out_channel: int = 64


CFG_MNET = RetinaFaceConfig(name="mobilenet0.25", in_channel=32, out_channel=64)
CFG_RE50 = RetinaFaceConfig(name="resnet50", in_channel=256, out_channel=256)
CONFIGS = {"mobilenet0.25": CFG_MNET, "resnet50": CFG_RE50}


# --- building blocks (``models/net.py``); every conv is bias-free, BN eps is PyTorch's 1e-5 ---


def conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    """3×3 conv (pad 1) + BN + LeakyReLU(leaky)."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


def conv_bn_no_relu(inp: int, oup: int, stride: int = 1) -> nn.Sequential:
    """3×3 conv (pad 1) + BN, no activation."""
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup))


def conv_bn1x1(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    """1×1 conv + BN + LeakyReLU(leaky)."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, 1, stride, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


def conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    """Depthwise-separable block; parameters sit at indices .0/.1 (dw) and .3/.4 (pw)."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNetV1 ×0.25 body; returns the stride 8/16/32 maps with 64/128/256 channels.

    The official class also has ``avg``/``fc``; they are dropped by the official
    ``IntermediateLayerGetter`` and are not in the released checkpoint, so they are omitted here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 2, leaky=0.1),
            conv_dw(8, 16, 1),
            conv_dw(16, 32, 2),
            conv_dw(32, 32, 1),
            conv_dw(32, 64, 2),
            conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(conv_dw(64, 128, 2), *[conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(conv_dw(128, 256, 2), conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) → [(B, 64, H/8, W/8), (B, 128, H/16, W/16), (B, 256, H/32, W/32)]."""
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class ResNet50Body(nn.Module):
    """torchvision ResNet-50 up to layer4 (the official code wraps ``resnet50`` the same way).

    Built without downloading anything: the detector weights replace every parameter.
    Returns layer2/3/4 outputs (strides 8/16/32, 512/1024/2048 channels).
    """

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) → three feature maps at strides 8, 16, 32."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class SSH(nn.Module):
    """Single-stage headless context module: concat of 3×3, 5×5 and 7×7 receptive fields."""

    def __init__(self, in_channel: int, out_channel: int) -> None:
        super().__init__()
        if out_channel % 4:
            raise ValueError(f"SSH out_channel must be a multiple of 4, got {out_channel}")
        leaky = 0.1 if out_channel <= 64 else 0.0
        self.conv3X3 = conv_bn_no_relu(in_channel, out_channel // 2)
        self.conv5X5_1 = conv_bn(in_channel, out_channel // 4, leaky=leaky)
        self.conv5X5_2 = conv_bn_no_relu(out_channel // 4, out_channel // 4)
        self.conv7X7_2 = conv_bn(out_channel // 4, out_channel // 4, leaky=leaky)
        self.conv7x7_3 = conv_bn_no_relu(
            out_channel // 4, out_channel // 4
        )  # lowercase x: official

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, C, h, w)."""
        c5_1 = self.conv5X5_1(x)
        out = torch.cat(
            [self.conv3X3(x), self.conv5X5_2(c5_1), self.conv7x7_3(self.conv7X7_2(c5_1))], dim=1
        )
        return F.relu(out)


class FPN(nn.Module):
    """Top-down feature pyramid; the coarsest level (output3) is not merged, as officially."""

    def __init__(self, in_channels: list[int], out_channel: int) -> None:
        super().__init__()
        leaky = 0.1 if out_channel <= 64 else 0.0
        self.output1 = conv_bn1x1(in_channels[0], out_channel, leaky=leaky)
        self.output2 = conv_bn1x1(in_channels[1], out_channel, leaky=leaky)
        self.output3 = conv_bn1x1(in_channels[2], out_channel, leaky=leaky)
        self.merge1 = conv_bn(out_channel, out_channel, leaky=leaky)
        self.merge2 = conv_bn(out_channel, out_channel, leaky=leaky)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Three maps (B, C_i, h_i, w_i) → three maps (B, out_channel, h_i, w_i)."""
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return [o1, o2, o3]


class _Head(nn.Module):
    """1×1 conv with bias predicting ``k`` values per anchor; output (B, h·w·anchors, k)."""

    def __init__(self, channels: int, num_anchors: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.conv1x1 = nn.Conv2d(channels, num_anchors * k, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)  # (B, h, w, anchors·k): order (y, x, anchor)
        return out.reshape(out.shape[0], -1, self.k)


class RetinaFace(nn.Module):
    """RetinaFace detector network (test phase: ``conf`` is softmax-ed).

    Args:
        cfg: a :class:`RetinaFaceConfig` or its name (``"mobilenet0.25"`` / ``"resnet50"``).
    """

    def __init__(self, cfg: RetinaFaceConfig | str = CFG_MNET) -> None:
        super().__init__()
        if isinstance(cfg, str):
            if cfg not in CONFIGS:
                raise ValueError(
                    f"unknown RetinaFace network {cfg!r}; choose one of {list(CONFIGS)}"
                )
            cfg = CONFIGS[cfg]
        self.cfg = cfg
        if cfg.name == "mobilenet0.25":
            self.body: nn.Module = MobileNetV1()
        else:
            self.body = ResNet50Body()
        c = cfg.in_channel
        out = cfg.out_channel
        self.fpn = FPN([c * 2, c * 4, c * 8], out)
        self.ssh1, self.ssh2, self.ssh3 = SSH(out, out), SSH(out, out), SSH(out, out)
        anchors = len(cfg.min_sizes[0])
        self.ClassHead = nn.ModuleList([_Head(out, anchors, 2) for _ in range(3)])
        self.BboxHead = nn.ModuleList([_Head(out, anchors, 4) for _ in range(3)])
        self.LandmarkHead = nn.ModuleList([_Head(out, anchors, 10) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the network.

        Args:
            x: (B, 3, H, W) BGR float, mean-subtracted (see module docstring).

        Returns:
            loc (B, P, 4), conf (B, P, 2) softmax probabilities, landms (B, P, 10).
        """
        feats = self.fpn(self.body(x))
        feats = [self.ssh1(feats[0]), self.ssh2(feats[1]), self.ssh3(feats[2])]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], dim=1)
        conf = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], dim=1)
        landms = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], dim=1)
        return loc, conf.softmax(dim=-1), landms


def prior_boxes(
    cfg: RetinaFaceConfig, height: int, width: int, device: torch.device | None = None
) -> torch.Tensor:
    """Anchors of ``layers/functions/prior_box.py`` (``clip=False``).

    Args:
        cfg: network configuration (min sizes and steps).
        height, width: input image size in pixels.

    Returns:
        (P, 4) float32 normalised (cx, cy, w, h), P = Σ_k anchors·ceil(H/s_k)·ceil(W/s_k), in the
        loop order level → row i → column j → min size (the network's output order).
    """
    out = []
    for sizes, step in zip(cfg.min_sizes, cfg.steps):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        ii, jj = torch.meshgrid(
            torch.arange(fh, device=device, dtype=torch.float32),
            torch.arange(fw, device=device, dtype=torch.float32),
            indexing="ij",
        )
        cx = ((jj + 0.5) * step / width).reshape(-1, 1).expand(-1, len(sizes))
        cy = ((ii + 0.5) * step / height).reshape(-1, 1).expand(-1, len(sizes))
        ms = torch.tensor(sizes, device=device, dtype=torch.float32)
        w = (ms / width).expand(fh * fw, -1)
        h = (ms / height).expand(fh * fw, -1)
        out.append(torch.stack([cx, cy, w, h], dim=-1).reshape(-1, 4))
    return torch.cat(out, dim=0)
