"""insightface and AdaFace IResNet weights → kpt's :class:`~.iresnet.IResNet` (exact conversion).

``kpt eval face --weights backbone.pth`` and ``kpt predict face A B --weights adaface_ir50.ckpt``
read these files through :func:`load_iresnet_weights`; the depth, widths, embedding size and input
size are read from the tensor shapes, so IResNet-18/34/50/100/200 all load.

Two layouts are recognised (files are read with ``torch.load(weights_only=True)`` or safetensors):

* **insightface** ``recognition/arcface_torch`` ``backbone.pth``: a plain state dict whose names are
  kpt's (``conv1``, ``bn1``, ``prelu``, ``layer{1-4}.{j}.{bn1,conv1,bn2,prelu,conv2,bn3,
  downsample.0/1}``, ``bn2``, ``fc``, ``features``), optionally under ``module.`` / ``backbone.``.
  Input RGB, ``(x − 127.5) / 127.5`` like every kpt face model.
* **AdaFace** (``mk-minchul/AdaFace`` ``net.py``): a PyTorch-Lightning ``.ckpt`` whose
  ``state_dict`` holds the backbone under ``model.`` (the margin head under ``head.`` is dropped):
  ``input_layer.{0 conv, 1 BN, 2 PReLU}``, ``body.{k}.res_layer.{0 BN, 1 conv, 2 BN, 3 PReLU,
  4 conv, 5 BN}``, ``body.{k}.shortcut_layer.{0 conv, 1 BN}`` and ``output_layer.{0 BN2d, 3 Linear,
  4 BatchNorm1d(affine=False)}``. ``body`` is one flat list; a stage starts where the width
  changes. Two details differ from insightface and are converted exactly: AdaFace models take
  **BGR** images (its ``inference.py`` flips the channels), so the first convolution's input
  channels are reversed to take kpt's RGB; and the first block keeps the width while halving the
  resolution with a parameter-free ``MaxPool2d(1, 2)`` shortcut, which becomes a 1×1 stride-2
  identity convolution with an identity BatchNorm.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
from torch import Tensor

from kpt.convert import read_state_dict
from kpt.errors import UserError

from .iresnet import LAYERS, IResNet, iresnet18, iresnet50, iresnet100

__all__ = ["IResNetWeightsError", "convert_iresnet_state_dict", "load_iresnet_weights",
           "read_state_file"]

logger = logging.getLogger(__name__)

_BUILDERS = {"iresnet18": iresnet18, "iresnet50": iresnet50, "iresnet100": iresnet100}
_INSIGHTFACE_PREFIXES = ("", "module.", "backbone.", "model.")
_ADAFACE_PREFIXES = ("model.", "", "module.")
# AdaFace res_layer index → kpt IBasicBlock module
_RES_LAYER = {"0": "bn1", "1": "conv1", "2": "bn2", "3": "prelu", "4": "conv2", "5": "bn3"}
_EXPECTED = ("expected a kpt checkpoint / weights file, an insightface arcface_torch backbone.pth "
             "or an AdaFace .ckpt (IResNet)")


class IResNetWeightsError(UserError, ValueError):
    """A weights file that is neither a kpt file nor an insightface / AdaFace IResNet."""


def read_state_file(path: str | Path) -> dict[str, Tensor]:
    """The state dict in ``path``: ``.safetensors``, or a torch file read with
    ``weights_only=True`` (a dict holding it under ``state_dict`` is unwrapped).

    Raises:
        IResNetWeightsError: unreadable, or no dict of tensors inside (names the file).
    """
    return read_state_dict(path, expected=_EXPECTED, error=IResNetWeightsError)


def _under(state: dict[str, Tensor], prefixes: tuple[str, ...], probe: str
           ) -> dict[str, Tensor] | None:
    """The entries under the first prefix that holds ``probe``, without the prefix."""
    for prefix in prefixes:
        if prefix + probe in state:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return None


def _build(layers: list[int], widths: list[int], in_chans: int, fc: Tensor, source: str
           ) -> IResNet:
    """An IResNet for the stage sizes and the fc shape (embedding size, input side)."""
    num_classes, flat = fc.shape
    side = math.isqrt(flat // widths[-1])
    if side * side * widths[-1] != flat:
        raise IResNetWeightsError(f"{source}: fc weight {tuple(fc.shape)} is not (D, "
                                  f"{widths[-1]}·S²); {_EXPECTED}")
    name = next((n for n, v in LAYERS.items() if list(v) == layers), "iresnet50")
    logger.info("%s: IResNet-%d (layers %s, widths %s, %d-d embedding, %d×%d input)", source,
                2 + 2 * sum(layers), layers, widths, num_classes, side * 16, side * 16)
    return _BUILDERS[name](layers=tuple(layers), widths=tuple(widths), in_chans=in_chans,
                           num_classes=int(num_classes), img_size=side * 16)


def _insightface(state: dict[str, Tensor], source: str) -> tuple[IResNet, dict[str, Tensor]]:
    blocks: dict[int, set[int]] = {}
    for key in state:
        if m := re.match(r"layer([1-4])\.(\d+)\.", key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    if sorted(blocks) != [1, 2, 3, 4] or any(b != set(range(len(b))) for b in blocks.values()):
        raise IResNetWeightsError(f"{source}: insightface-style keys, but the blocks are not "
                                  f"layer1-4.0..n: {dict(sorted(blocks.items()))}")
    layers = [len(blocks[i]) for i in (1, 2, 3, 4)]
    widths = [int(state[f"layer{i}.0.conv1.weight"].shape[0]) for i in (1, 2, 3, 4)]
    model = _build(layers, widths, int(state["conv1.weight"].shape[1]), state["fc.weight"], source)
    return model, dict(state)


def _identity_bn(channels: int, eps: float) -> dict[str, Tensor]:
    # eval-mode BN computes (x − mean) / sqrt(var + eps) · w + b: var = 1 − eps makes it x
    return {"weight": torch.ones(channels), "bias": torch.zeros(channels),
            "running_mean": torch.zeros(channels), "running_var": torch.full((channels,), 1 - eps),
            "num_batches_tracked": torch.zeros((), dtype=torch.long)}


def _adaface(state: dict[str, Tensor], source: str) -> tuple[IResNet, dict[str, Tensor]]:
    ids = sorted({int(m[1]) for k in state if (m := re.match(r"body\.(\d+)\.", k))})
    if not ids or ids != list(range(len(ids))):
        raise IResNetWeightsError(f"{source}: AdaFace-style keys, but body blocks are not "
                                  f"numbered 0..n-1: {ids[:10]}")
    widths_per_block = [int(state[f"body.{k}.res_layer.1.weight"].shape[0]) for k in ids]
    stage_of, layers, widths = [], [], []
    for k, width in enumerate(widths_per_block):
        if k == 0 or width != widths_per_block[k - 1]:
            layers.append(0)
            widths.append(width)
        layers[-1] += 1
        stage_of.append((len(layers), layers[-1] - 1))
    if len(layers) != 4:
        raise IResNetWeightsError(f"{source}: AdaFace body has {len(layers)} width changes "
                                  f"(widths {widths}), expected the 4 stages of an IResNet")
    stem = state["input_layer.0.weight"]
    model = _build(layers, widths, int(stem.shape[1]), state["output_layer.3.weight"], source)
    out: dict[str, Tensor] = {"conv1.weight": stem.flip(1)}  # BGR → RGB input channels
    target = model.state_dict()
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("input_layer.1."):
            out["bn1." + parts[-1]] = value
        elif key.startswith("input_layer.2."):
            out["prelu." + parts[-1]] = value
        elif parts[0] == "body" and len(parts) >= 5:
            stage, j = stage_of[int(parts[1])]
            block = f"layer{stage}.{j}."
            if parts[2] == "res_layer" and parts[3] in _RES_LAYER:
                out[block + _RES_LAYER[parts[3]] + "." + ".".join(parts[4:])] = value
            elif parts[2] == "shortcut_layer":
                out[block + "downsample." + ".".join(parts[3:])] = value
            else:
                raise IResNetWeightsError(f"{source}: unexpected AdaFace key {key!r} (IR-SE "
                                          f"and other variants do not convert); {_EXPECTED}")
        elif key.startswith("output_layer.0."):
            out["bn2." + parts[-1]] = value
        elif key.startswith("output_layer.3."):
            out["fc." + parts[-1]] = value
        elif key.startswith("output_layer.4."):
            out["features." + parts[-1]] = value
        elif key != "input_layer.0.weight":
            raise IResNetWeightsError(f"{source}: unexpected AdaFace key {key!r}; {_EXPECTED}")
    # parameter-free MaxPool2d(1, 2) shortcuts: a 1×1 stride-2 identity conv + identity BN
    for name, module in model.named_modules():
        if name.endswith(".downsample") and f"{name}.0.weight" not in out:
            conv, bn = module[0], module[1]
            if conv.in_channels != conv.out_channels:
                raise IResNetWeightsError(f"{source}: {name} changes the width but the AdaFace "
                                          f"file has no shortcut convolution for it")
            out[f"{name}.0.weight"] = torch.eye(conv.out_channels)[:, :, None, None]
            out.update({f"{name}.1.{k}": v for k, v in _identity_bn(bn.num_features,
                                                                      bn.eps).items()})
    # AdaFace's last BatchNorm1d has no affine parameters: scale 1, shift 0
    out.setdefault("features.weight", torch.ones_like(target["features.weight"]))
    out.setdefault("features.bias", torch.zeros_like(target["features.bias"]))
    return model, out


def convert_iresnet_state_dict(state: dict[str, Tensor], source: str = "state dict") -> IResNet:
    """Build kpt's IResNet for an insightface or AdaFace state dict and load it strictly.

    Args:
        state: the file's tensors (prefixes such as ``module.`` / ``model.`` allowed).
        source: the file name for messages.

    Returns:
        The model (eval mode) taking RGB ``(x − 127.5) / 127.5`` images (B, 3, S, S) → (B, D).

    Raises:
        IResNetWeightsError: neither layout, or keys / shapes that do not fit (names the file).
    """
    inner = _under(state, _INSIGHTFACE_PREFIXES, "layer1.0.conv1.weight")
    if inner is not None and "conv1.weight" in inner and "fc.weight" in inner:
        model, mapped = _insightface(inner, source)
        layout = "insightface"
    else:
        inner = _under(state, _ADAFACE_PREFIXES, "body.0.res_layer.1.weight")
        if inner is None or "input_layer.0.weight" not in inner or \
                "output_layer.3.weight" not in inner:
            raise IResNetWeightsError(f"{source}: unknown weights layout (first keys "
                                      f"{list(state)[:4]}); {_EXPECTED}")
        dropped = len(state) - len(inner)
        if dropped:  # e.g. the AdaFace margin head ``head.kernel``
            logger.info("%s: ignoring %d entries outside the backbone", source, dropped)
        model, mapped = _adaface(inner, source)
        layout = "AdaFace"
    target = model.state_dict()
    for key in target:  # some exports leave out the BatchNorm step counters
        if key.endswith("num_batches_tracked"):
            mapped.setdefault(key, target[key])
    missing, unexpected = sorted(set(target) - set(mapped)), sorted(set(mapped) - set(target))
    if missing or unexpected:
        raise IResNetWeightsError(f"{source}: {layout} IResNet keys do not fit the inferred "
                                  f"model: missing {missing[:6]}, unexpected {unexpected[:6]}")
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise IResNetWeightsError(f"{source}: {key!r} has shape {tuple(value.shape)}, the "
                                      f"inferred model expects {tuple(target[key].shape)}")
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in mapped.items()})
    logger.info("%s: loaded as a %s IResNet", source, layout)
    return model.eval()


def load_iresnet_weights(path: str | Path) -> IResNet:
    """:func:`convert_iresnet_state_dict` of the state dict in ``path`` (see the module doc)."""
    return convert_iresnet_state_dict(read_state_file(path), str(path))
