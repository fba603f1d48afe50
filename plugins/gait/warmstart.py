"""Warm start of SwinGait-2D's stem and head (``model.init_from=PATH``).

OpenGait's SwinGait Gait3D config starts from a trained DeepGaitV2-P3D checkpoint (reference
gait.md 4: ``restore_hint`` with ``restore_ckpt_strict: false``): the convolutional stem
(``layer0``-``layer2``), the part FCs and the BNNeck are loaded, the transformer starts from
scratch, and the loaded parts then train at 0.1 x lr. This module does the same for kpt's model.

Accepted files: a kpt run folder / checkpoint / ``weights.safetensors`` (kpt's names), an
OpenGait checkpoint (``{"model": state_dict, "optimizer": ..., "iteration": ...}``) or a bare state
dict (``.pt``/``.pth``/``.ckpt``, read with ``torch.load(weights_only=True)`` only). OpenGait's
DeepGaitV2 / SwinGait names are converted (OpenGait ``modeling/models/deepgaitv2.py``,
``swingait.py``, ``modules.py``):

=========================================================  =====================================
OpenGait                                                   kpt (:class:`SwinGait2D`)
=========================================================  =====================================
``layer0.forward_block.{0,1}.*`` (conv, BN)                ``layer0.{0,1}.*``
``layer1.forward_block.0.{conv1,bn1,conv2,bn2}.*``         ``layer1.*``
``layer2.forward_block.I.*`` (DeepGaitV2 '2d')             ``layer2.I.*``
``layer2.I.conv{1,2}.forward_block.0.weight`` (P3D)        ``layer2.I.conv{1,2}.weight``
``layer2.I.conv{1,2}.forward_block.1.*`` (P3D)             ``layer2.I.bn{1,2}.*``
``layer2.0.downsample.0.weight`` (Conv3d 1x1x1, P3D)       ``layer2.0.downsample.0.weight`` (2-D)
``layer2.0.downsample.1.*`` (BN3d)                         ``layer2.0.downsample.1.*`` (BN2d)
``FCs.fc_bin``, ``BNNecks.fc_bin``, ``BNNecks.bn1d.*``     ``fcs.fc_bin``, ``bnneck.fc_bin``, ...
=========================================================  =====================================

A P3D block's temporal branch (``shortcut3d``, ``sbn``) has no counterpart in the 2-D model and is
reported as unexpected, as are DeepGaitV2's ``layer3``/``layer4`` and SwinGait's ``transformer``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from kpt.engine.weights import (
    TORCH_SUFFIXES,
    CheckpointError,
    read_run_state,
    read_torch_file,
    resolve_run_weights,
)

logger = logging.getLogger(__name__)

#: What a warm start loads: the stem and the head (the parts OpenGait trains at 0.1 x lr).
STEM_HEAD_PREFIXES = ("layer0.", "layer1.", "layer2.", "fcs.", "bnneck.")

# OpenGait name -> kpt name, applied in order; kpt's own names match none of them.
_RENAMES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(a), b) for a, b in (
    (r"^FCs\.", "fcs."),
    (r"^BNNecks\.", "bnneck."),
    (r"^(layer2\.\d+)\.conv([12])\.forward_block\.0\.", r"\1.conv\2."),  # P3D block: conv
    (r"^(layer2\.\d+)\.conv([12])\.forward_block\.1\.", r"\1.bn\2."),  # P3D block: its BN2d
    (r"^layer1\.forward_block\.0\.", "layer1."),  # kpt's layer1 is the single block itself
    (r"^(layer[02])\.forward_block\.", r"\1."),  # SetBlockWrapper around a Sequential
))
_NO_COUNTERPART = re.compile(r"^layer2\.\d+\.(shortcut3d|sbn)\.")


@dataclass
class WarmStartReport:
    """What :func:`load_stem_head` did. Keys are the model's names unless said otherwise.

    Attributes:
        path: the file read.
        loaded: model keys that received a tensor.
        missing: stem/head keys of the model that the file does not provide (kept as initialised).
        unexpected: ``(file key, reason)`` for every tensor of the file that was not loaded.
        mismatched: ``(model key, file shape, model shape)``: a counterpart exists but the shapes
            differ (not loaded).
    """

    path: Path
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[tuple[str, str]] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        """Counts and the file, for the run's ``info`` (JSON-safe)."""
        return {"path": str(self.path), "loaded": len(self.loaded), "missing": len(self.missing),
                "unexpected": len(self.unexpected), "mismatched": len(self.mismatched)}

    def describe(self, examples: int = 4) -> str:
        """A few readable lines: counts, and examples of every kind of key not loaded."""
        def some(keys: list[str]) -> str:
            more = f", ... (+{len(keys) - examples})" if len(keys) > examples else ""
            return ", ".join(keys[:examples]) + more

        lines = [f"warm start from {self.path}: loaded {len(self.loaded)} stem/head tensors"]
        if self.missing:
            lines.append(f"  missing {len(self.missing)} (kept as initialised): "
                         f"{some(self.missing)}")
        if self.mismatched:
            lines.append(f"  shape mismatch {len(self.mismatched)} (not loaded): " + some(
                [f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]))
        reasons: dict[str, list[str]] = {}
        for key, reason in self.unexpected:
            reasons.setdefault(reason, []).append(key)
        for reason, keys in reasons.items():
            lines.append(f"  unexpected {len(keys)} ({reason}): {some(keys)}")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> tuple[Path, dict[str, Tensor]]:
    """The tensors of a kpt run/weights file, an OpenGait checkpoint or a bare state dict.

    Raises:
        CheckpointError: missing or unreadable file, or no dict of tensors in it (names the file).
    """
    path = resolve_run_weights(Path(path).expanduser())
    if path.suffix not in TORCH_SUFFIXES:  # kpt's weights.safetensors: the resolver reads it
        return path, dict(read_run_state(path, "gait", allow_bare=True)["model"])
    obj = read_torch_file(path)
    state = obj
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):  # kpt checkpoint / OpenGait: "model"; kpt .pt: ...
            if isinstance(obj.get(key), Mapping):
                state = obj[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path}: expected a state dict (or a checkpoint with a 'model' "
                              f"state dict) for model.init_from, found {type(obj).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: model.init_from needs tensors only; {bad[0]!r} holds a "
                              f"{type(state[bad[0]]).__name__}")
    return path, {str(k): v for k, v in state.items()}


def kpt_name(key: str) -> str:
    """kpt's name for an OpenGait DeepGaitV2/SwinGait parameter name (kpt names pass unchanged)."""
    key = key.removeprefix("module.")  # saved from a DDP wrapper
    for pattern, repl in _RENAMES:
        key, n = pattern.subn(repl, key)
        if n:
            break
    return key


def load_stem_head(model: nn.Module, path: str | Path) -> WarmStartReport:
    """Copy the stem and head tensors of ``path`` into ``model`` (in place).

    Args:
        model: a :class:`~kpt_plugins.gait.model.SwinGait2D` (its stem/head names).
        path: see :func:`read_state_dict`.

    Returns:
        the report (also logged).

    Raises:
        CheckpointError: unreadable file, or not a single stem/head tensor in it fits the model.
    """
    path, source = read_state_dict(path)
    target = model.state_dict()
    report = WarmStartReport(path)
    taken: dict[str, Tensor] = {}
    for key, value in source.items():
        name = kpt_name(key)
        if _NO_COUNTERPART.match(name):
            report.unexpected.append((key, "P3D temporal branch, no 2-D counterpart"))
        elif not name.startswith(STEM_HEAD_PREFIXES):
            report.unexpected.append((key, "outside the stem and head"))
        elif name not in target:
            report.unexpected.append((key, "no such stem/head tensor in the model"))
        else:
            want = target[name]
            if value.ndim == 5 and want.ndim == 4 and value.shape[2] == 1:
                value = value[:, :, 0]  # a 1x1x1 Conv3d (P3D shortcut) is a 1x1 Conv2d
            if tuple(value.shape) != tuple(want.shape):
                report.mismatched.append((name, tuple(value.shape), tuple(want.shape)))
            else:
                taken[name] = value
    if not taken:
        sample = ", ".join(list(source)[:5])
        raise CheckpointError(
            f"{path}: model.init_from found no stem or head tensor that fits the model (expected "
            f"kpt names such as layer0.0.weight, or OpenGait DeepGaitV2/SwinGait names such as "
            f"layer0.forward_block.0.weight, FCs.fc_bin); the file holds {sample}"
            + (f"; {len(report.mismatched)} had the wrong shape (model.preset?)"
               if report.mismatched else ""))
    with torch.no_grad():
        for name, value in taken.items():
            target[name].copy_(value.to(target[name].dtype))
    report.loaded = sorted(taken)
    wrong_shape = {k for k, _, _ in report.mismatched}
    report.missing = [k for k in target if k.startswith(STEM_HEAD_PREFIXES)
                      and k not in taken and k not in wrong_shape]
    log = logger.warning if report.missing or report.mismatched else logger.info
    log("%s", report.describe())
    return report
