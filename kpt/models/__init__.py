"""Backbones taking ``(images, keypoints)``: ViT and Swin with any position encoding (KP-RPE too).

Registered in :data:`kpt.registry.MODELS` (``kpt.create_model(name, **kwargs)``):

* ``vit``: :class:`~kpt.models.vit.VisionTransformer`, any size, ``pos`` in none / abs / rpe /
  irpe / kprpe / abs+rpe / abs+irpe / abs+kprpe;
* ``swin``: :class:`~kpt.models.swin.SwinTransformer`, V1 or V2 style, KP-RPE per stage;
* ``vit_small_kprpe`` / ``vit_base_kprpe``: the official CVLface face models (exact architecture);
* ``swin_v2_s_kprpe``: the official CVLface Swin-V2-S KP-RPE face model layout.

Bare-model files: :func:`~kpt.engine.weights.save_model` / ``load_model`` (re-exported here).
"""

from kpt.models.presets import FACTORIES, PRESETS, build
from kpt.models.serialization import load_model, save_model
from kpt.models.swin import PatchMerging, SwinBlock, SwinStage, SwinTransformer
from kpt.models.vit import VisionTransformer
from kpt.registry import MODELS

for _name, _factory in FACTORIES.items():
    MODELS.register(_name)(_factory)

__all__ = [
    "PRESETS",
    "PatchMerging",
    "SwinBlock",
    "SwinStage",
    "SwinTransformer",
    "VisionTransformer",
    "build",
    "load_model",
    "save_model",
]
