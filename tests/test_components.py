"""Every registered component, built tiny and checked against its kind's contract (timm's test_models).

The parameter list is what ``kpt.list()`` reports (built-in plugins and the core, plus the ``tiny`` test
plugin's own components), so a new component is tested from the moment it is registered: it needs a row
in :data:`TINY` below, and a registered name without one FAILS (it does not skip). A row whose name is no
longer registered fails too, so the table stays exact.

Contracts (DESIGN §4, kpt/registry.py docstrings):

* model: ``model(images (B,C,H,W), keypoints (B,K,2)) -> (B, num_classes)``; a model whose ``pos`` uses
  keypoints raises a clear error without them and its output depends on them; the others accept
  ``keypoints=None`` and ignore keypoints.
* head: ``head(embeddings (B,D), labels (B,)) -> logits (B, C)``, parameter ``weight`` (C, D); the
  non-target logits are ``s·cos(embedding, centre)``.
* keypoints: ``source(images) -> (keypoints (B,K,2) in [0,1], found (B,) bool)``, never NaN.
* dataset: items are dicts with ``image``, ``keypoints`` (K,2) in [0,1] and ``label`` in [0, classes).
* metric: a flat dict of named finite floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_plugin as tiny
import torch
import torch.nn.functional as F

import kpt
import kpt.plugin
from kpt import registry

torch.set_num_threads(1)

B = 2  # batch size of every forward below
FACE_TEMPLATE = (  # ArcFace 112×112 landmark template (insightface), as fractions of the side
    np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
              [70.7299, 92.2041]]) / 112.0)


def _face_folder(root: Path) -> dict[str, Any]:
    """Two identity folders of 16×16 PNGs: identity ``a`` pure red, identity ``b`` pure blue."""
    import cv2

    for name, bgr in (("a", (0, 0, 255)), ("b", (255, 0, 0))):
        (root / "faces" / name).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(root / "faces" / name / f"{i}.png"),
                        np.full((16, 16, 3), bgr, dtype=np.uint8))
    return {"source": str(root / "faces"), "keypoints": None}


_VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2,
        "num_classes": 6}
_SWIN = {"embed_dim": 8, "depths": (1, 1), "num_heads": (1, 2), "num_classes": 6,
         "drop_path_rate": 0.0}
_IRESNET = {"img_size": 16, "widths": (2, 2, 2, 4), "num_classes": 6}
_PAIR_A = torch.eye(4).repeat(5, 1)  # 20 pairs: genuine ones identical, impostors orthogonal
_SAME = torch.tensor([True, False]).repeat(10)
_PAIR_B = torch.where(_SAME[:, None], _PAIR_A, _PAIR_A.roll(1, dims=1))
_EMB = torch.tensor([[3.0, 0.0, 4.0, 0.0], [0.0, -1.0, 0.0, 1.0]])  # (B, D=4) raw embeddings

#: kind/name -> tiny keyword arguments (a callable gets tmp_path and returns them). Metrics: the inputs.
TINY: dict[str, dict[str, Any] | Callable[[Path], dict[str, Any]]] = {
    "model/vit": {**_VIT, "pos": "abs+kprpe", "num_keypoints": 5},
    "model/swin": {**_SWIN, "img_size": 16, "patch_size": 2, "window_size": 4, "pos": "kprpe"},
    "model/vit_small_kprpe": _VIT,
    "model/vit_base_kprpe": _VIT,
    "model/swin_v2_s_kprpe": {**_SWIN, "img_size": 30},  # 10×10 stem grid, 5×5 windows
    "model/iresnet18": _IRESNET,
    "model/iresnet50": _IRESNET,
    "model/iresnet100": _IRESNET,
    "head/adaface": {"embedding_size": 4, "num_classes": 3},
    "head/arcface": {"embedding_size": 4, "num_classes": 3},
    "head/cosface": {"embedding_size": 4, "num_classes": 3},
    "head/kappaface": {"embedding_size": 4, "num_classes": 3, "num_samples": 8},
    "keypoints/box": {},
    "keypoints/retinaface": {},
    "keypoints/brightest": {},
    "dataset/face-synthetic": {"num_identities": 3, "images_per_identity": 2, "size": 32},
    "dataset/face-data": _face_folder,
    "metric/accuracy": {"logits": torch.eye(3), "labels": torch.arange(3)},
    "metric/identification": {"probe": torch.eye(3), "probe_labels": torch.arange(3),
                              "gallery": torch.eye(3), "gallery_labels": torch.arange(3),
                              "ranks": (1,)},
    "metric/retrieval": {"query": torch.eye(3), "query_labels": torch.arange(3),
                         "gallery": torch.eye(3), "gallery_labels": torch.arange(3), "ranks": (1,)},
    "metric/tar_at_far": {"scores": torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3] * 4),
                          "labels": torch.tensor([1, 1, 1, 0, 0, 0] * 4), "fars": (0.1,)},
    "metric/verification": {"emb_a": _PAIR_A, "emb_b": _PAIR_B, "issame": _SAME, "folds": 2},
}
#: metric -> (key, value for the perfect inputs above): every input is separable, so each figure is its
#: maximum (fractions for verification, percent for the others, as kpt.metrics documents).
PERFECT = {"accuracy": ("top1", 100.0), "identification": ("rank1", 100.0),
           "retrieval": ("rank1", 100.0), "tar_at_far": ("tar@far=1e-1", 100.0),
           "verification": ("accuracy", 1.0)}


def _with_tiny_plugin() -> dict[str, list[str]]:
    """``kpt.list()`` with the tiny test plugin installed (as if through its entry point)."""
    with pytest.MonkeyPatch.context() as mp:
        tiny.register_in_process(mp)
        registry.reset()
        try:
            return kpt.list()
        finally:
            registry.reset()
    # the monkeypatch is undone here; the next lookup rediscovers the real plugins


def _registered() -> list[str]:
    listed = _with_tiny_plugin()
    kpt.plugin.discover_plugins(refresh=True)
    return sorted(f"{kind}/{name}" for kind, names in listed.items() for name in names)


REGISTERED = _registered()


@pytest.fixture
def tiny_components(monkeypatch):
    """Registries that hold the tiny plugin's components too; the real state is restored after."""
    tiny.register_in_process(monkeypatch)
    registry.reset()
    yield
    monkeypatch.undo()
    kpt.plugin.discover_plugins(refresh=True)
    registry.reset()


def _kwargs(key: str, tmp_path: Path) -> dict[str, Any]:
    if key not in TINY:
        pytest.fail(f"{key} is registered but has no row in tests/test_components.py TINY: add tiny "
                    f"keyword arguments for it so that its contract is tested")
    row = TINY[key]
    return dict(row(tmp_path) if callable(row) else row)


def test_table_lists_only_registered_components():
    assert "keypoints/brightest" in REGISTERED  # the third-party path is really exercised
    stale = sorted(set(TINY) - set(REGISTERED))
    assert not stale, f"TINY rows for names that are not registered: {stale}"


def _perturb(model: torch.nn.Module) -> None:
    """Give every parameter noise, so that zero-initialised tables (KP-RPE's linear) act."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _check_model(name: str, kwargs: dict[str, Any]) -> None:
    model = kpt.create_model(name, **kwargs).eval()
    _perturb(model)
    size = kwargs["img_size"]
    g = torch.Generator().manual_seed(1)
    images = torch.rand(B, 3, size, size, generator=g) * 2 - 1
    k = getattr(model, "num_keypoints", 5)
    keypoints = torch.rand(B, k, 2, generator=g) * 0.8 + 0.1
    with torch.no_grad():
        out = model(images, keypoints)
        assert out.shape == (B, kwargs["num_classes"]) and torch.isfinite(out).all()
        moved = model(images, keypoints.flip(1))
        if getattr(model, "uses_keypoints", False):
            with pytest.raises(ValueError, match="without"):
                model(images, None)
            assert not torch.allclose(out, moved), f"{name}: the output ignores the keypoints"
        else:
            assert torch.equal(out, model(images, None)) and torch.equal(out, moved)


def _check_head(name: str, kwargs: dict[str, Any]) -> None:
    head = kpt.create("head", name, **kwargs).eval()
    c, d = kwargs["num_classes"], kwargs["embedding_size"]
    assert head.weight.shape == (c, d)
    labels = torch.tensor([0, 2])
    logits = head(_EMB, labels)
    assert logits.shape == (B, c) and torch.isfinite(logits).all()
    # non-target logits: s·cos with the default scale s = 64 of every official head (DESIGN §4)
    cos = F.normalize(_EMB, dim=1) @ F.normalize(head.weight.detach(), dim=1).T
    other = torch.ones(B, c, dtype=torch.bool)
    other[torch.arange(B), labels] = False
    torch.testing.assert_close(logits.detach()[other], 64.0 * cos[other], rtol=1e-5, atol=1e-4)


def _keypoint_images(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images for a keypoint source and, where known, the keypoints it must return."""
    if name == "box":  # a digit-like block on columns 4..9, rows 6..13 of a 20×20 image
        images = torch.zeros(B, 1, 20, 20)
        images[0, 0, 6:14, 4:10] = 1.0
        box = [[4 / 20, 6 / 20], [10 / 20, 6 / 20], [4 / 20, 14 / 20], [10 / 20, 14 / 20],
               [7 / 20, 10 / 20]]
        frame = [[0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5]]  # a blank image: the frame
        return images, torch.tensor([box, frame])
    if name == "brightest":
        images = torch.zeros(B, 1, 8, 8)
        images[0, 0, 1, 6] = 1.0
        return images, torch.tensor([[[6.5 / 8, 1.5 / 8], [0.5, 0.5]],
                                     [[0.5 / 8, 0.5 / 8], [0.5, 0.5]]])
    if name == "retinaface":  # a synthetic face, and a flat grey image without one
        from kpt_plugins.face.synthetic.dataset import SyntheticFaces

        item = SyntheticFaces(num_identities=1, images_per_identity=1, split="unaligned",
                              size=112)[0]
        images = torch.stack([item["image"], torch.full_like(item["image"], 128)])
        return images, item["keypoints"][None]
    return torch.rand(B, 3, 32, 32), None


def _check_keypoints(name: str, kwargs: dict[str, Any]) -> None:
    source = kpt.create("keypoints", name, **kwargs)
    images, expected = _keypoint_images(name)
    with torch.no_grad():
        out = source(images)
    keypoints, found = out if isinstance(out, tuple) else (out, None)
    assert keypoints.ndim == 3 and keypoints.shape[0] == B and keypoints.shape[2] == 2
    assert torch.isfinite(keypoints).all()
    assert keypoints.min() >= 0 and keypoints.max() <= 1
    if found is not None:
        assert found.dtype == torch.bool and found.shape == (B,)
    if name == "retinaface":
        assert found.tolist() == [True, False]
        # the rendered face's landmarks (eyes, nose, mouth corners in the official order) within a
        # few % of the side (the small detector is imprecise on synthetic faces); no face: the template
        assert (keypoints[0] - expected[0]).abs().mean() < 0.04
        (lx, ly), (rx, ry), (_, ny), (mlx, mly), (mrx, mry) = keypoints[0].tolist()
        assert lx < rx and mlx < mrx and max(ly, ry) < ny < min(mly, mry)
        torch.testing.assert_close(keypoints[1], torch.tensor(FACE_TEMPLATE, dtype=torch.float32),
                                   atol=1e-4, rtol=0)
    elif expected is not None:
        torch.testing.assert_close(keypoints, expected.to(keypoints.dtype), atol=1e-6, rtol=0)
        if found is not None:
            assert found.tolist() == [True, False]


#: dataset -> labels of its items for the TINY arguments (identity folders sorted as strings; synthetic
#: item i is identity i // images_per_identity).
LABELS = {"face-data": [0, 0, 1, 1], "face-synthetic": [0, 0, 1, 1, 2, 2]}


def _check_dataset(name: str, kwargs: dict[str, Any]) -> None:
    dataset = kpt.create("dataset", name, **kwargs)
    assert len(dataset) > 0
    labels = []
    for i in range(len(dataset)):
        item = dataset[i]
        assert {"image", "keypoints", "label"} <= set(item)
        image, keypoints = item["image"], item["keypoints"]
        assert image.ndim == 3 and image.shape[0] in (1, 3)
        assert keypoints.ndim == 2 and keypoints.shape[1] == 2 and torch.isfinite(keypoints).all()
        assert keypoints.min() >= 0 and keypoints.max() <= 1
        labels.append(int(item["label"]))
    num_classes = getattr(dataset, "num_classes", None) or getattr(dataset, "info", {}).get(
        "num_classes")
    assert min(labels) >= 0 and (num_classes is None or max(labels) < num_classes)
    if name in LABELS:
        assert labels == LABELS[name]
    if name == "face-data":  # RGB order kept from the files; no landmark cache: the template
        assert dataset[0]["image"][:, 0, 0].tolist() == [255, 0, 0]  # a: red
        assert dataset[2]["image"][:, 0, 0].tolist() == [0, 0, 255]  # b: blue
        torch.testing.assert_close(dataset[0]["keypoints"],
                                   torch.tensor(FACE_TEMPLATE, dtype=torch.float32))


def _check_metric(name: str, kwargs: dict[str, Any]) -> None:
    result = kpt.create("metric", name, **kwargs)
    assert isinstance(result, dict) and result
    for key, value in result.items():
        assert isinstance(key, str) and isinstance(value, float), (key, value)
    if name in PERFECT:
        key, best = PERFECT[name]
        assert math.isclose(result[key], best, rel_tol=1e-6), (name, result)


CHECKS = {"model": _check_model, "head": _check_head, "keypoints": _check_keypoints,
          "dataset": _check_dataset, "metric": _check_metric}


@pytest.mark.parametrize("key", REGISTERED)
def test_component_contract(key, tiny_components, tmp_path):
    kind, name = key.split("/", 1)
    kwargs = _kwargs(key, tmp_path)
    if kind not in CHECKS:
        pytest.fail(f"component kind {kind!r} ({key}) has no contract check in test_components.py")
    CHECKS[kind](name, kwargs)
