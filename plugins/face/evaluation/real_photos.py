"""The unaligned protocol on real photos, and held-out identities of a training folder.

The synthetic ``unaligned`` set places a face drawn on the ArcFace template with a random
similarity + shear (``synthetic/params.py``, split ``unaligned``). Real photos get **the same
distribution**: a photo is first mapped onto the template by its alignment matrix A (RetinaFace
landmarks, as for the aligned crop) and then by a placement P drawn exactly as the synthetic
renderer draws it; the 112×112 result is warp(photo, P·A), black outside the photo. RetinaFace
then runs on that image (no padding: the face no longer fills the frame), and its keypoints are
what the backbone receives; images where it finds no face get the template and are counted
(``found``). The detection crop (``-unaligned-crop``) is the square crop around RetinaFace's box,
as for the synthetic set.

Two sources use it:

* ``--test orl`` (:func:`photo_pair_sets`): the photos and pairs of ``orl_pairs.json``, beside
  ``orl.bin`` (whose aligned crops are the aligned protocol, read like any ``.bin``);
* ``data.holdout_identities=N`` (:func:`split_identities`, :func:`holdout_pair_sets`): N people
  of an image folder of aligned crops are kept out of training; pairs among them form the
  ``holdout-aligned`` / ``holdout-unaligned`` / ``holdout-unaligned-crop`` sets (A = identity,
  the crops are already on the template).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..align import warp_affine
from ..data.orl import make_pairs
from ..synthetic.params import image_params
from .verification import (
    PairSet,
    detect_faces,
    detect_keypoints,
    detection_crops,
    template_keypoints,
)

__all__ = [
    "IdentitySplit",
    "holdout_pair_sets",
    "photo_pair_sets",
    "placement_matrices",
    "split_identities",
    "unaligned_sets",
]

logger = logging.getLogger(__name__)

_PLACEMENT_IDENTITY = 7_000_000  # keys of the placement draws, far from any synthetic identity


def placement_matrices(n: int, seed: int = 0) -> Tensor:
    """(n, 2, 3) canonical-112 → image matrices of the synthetic ``unaligned`` split."""
    p = image_params(np.full(n, _PLACEMENT_IDENTITY), np.arange(n), seed, "unaligned")
    return torch.from_numpy(p["matrix"]).float()


def _compose(outer: Tensor, inner: Tensor) -> Tensor:
    """(N, 2, 3) matrices of ``outer ∘ inner`` (apply ``inner`` first)."""
    lin = outer[:, :, :2] @ inner[:, :, :2]
    t = outer[:, :, :2] @ inner[:, :, 2:] + outer[:, :, 2:]
    return torch.cat([lin, t], 2)


def unaligned_sets(name: str, images: Tensor, to_template: Tensor, issame: Tensor,
                   seed: int = 0, detector_weights: str = "") -> dict[str, PairSet]:
    """``<name>-unaligned`` and ``<name>-unaligned-crop`` pair sets of real photos.

    Args:
        images: (2P, 3, H, W) uint8 RGB, pair i = rows 2i, 2i+1.
        to_template: (2P, 2, 3) image-pixel → aligned-112 matrices (identity for aligned crops).
        issame: (P,) bool.
        seed: of the placements (image k always gets the same placement for a seed).

    Returns:
        ``{"<name>-unaligned": …, "<name>-unaligned-crop": …}`` with RetinaFace keypoints, the
        ``found`` flags and the boxes.
    """
    m = _compose(placement_matrices(len(images), seed), to_template.float())
    warped = warp_affine(images.float(), m, (112, 112)).round().clamp(0, 255).to(torch.uint8)
    boxes, kp, found = detect_faces(warped, weights=detector_weights)
    raw = PairSet(f"{name}-unaligned", warped, issame, kp, found, "retinaface", boxes)
    crop = detection_crops(raw, boxes, name=f"{name}-unaligned-crop")
    logger.info("%s: RetinaFace found a face in %d/%d placed photos", raw.name, int(found.sum()),
                len(found))
    return {raw.name: raw, crop.name: crop}


def photo_pair_sets(meta: dict, name: str = "orl", limit: int | None = None, seed: int = 0,
                    detector_weights: str = "") -> dict[str, PairSet]:
    """The unaligned sets of ``--test orl`` from ``orl_pairs.json`` (see :func:`unaligned_sets`).

    Args:
        meta: :func:`~kpt_plugins.face.data.orl.read_photo_pairs` of the ``.bin``.
        name: the ``.bin``'s name (the sets are ``<name>-unaligned``, ``<name>-unaligned-crop``).
        limit: first ``limit`` pairs only (``eval.bin_limit``), as for the aligned ``.bin``.
    """
    from ..data.recordio import decode_image

    root = meta["root"]
    pairs = np.asarray(meta["pairs"], dtype=np.int64)[:limit]
    slots = pairs[:, :2].reshape(-1)
    photos = {}
    for i in np.unique(slots):
        path = root / meta["photos"][i]
        photos[int(i)] = decode_image(path.read_bytes(), str(path))
    images = torch.from_numpy(np.stack([photos[int(i)] for i in slots])).permute(0, 3, 1, 2)
    matrices = torch.as_tensor(meta["alignment"], dtype=torch.float32)[slots]
    issame = torch.from_numpy(pairs[:, 2].astype(bool))
    return unaligned_sets(name, images.contiguous(), matrices, issame, seed, detector_weights)


class IdentitySplit(torch.utils.data.Dataset):
    """The items of a face dataset whose identity is not held out, labels renumbered 0..C−1.

    Attributes:
        labels: (M,) renumbered labels of the kept items (for samplers).
        heldout: indices (into the base dataset) of the held-out people's items.
        heldout_classes: the held-out original labels.
    """

    def __init__(self, dataset: Any, labels: np.ndarray, heldout_classes: np.ndarray) -> None:
        self.dataset = dataset
        keep = ~np.isin(labels, heldout_classes)
        self.indices = np.flatnonzero(keep)
        self.heldout = np.flatnonzero(~keep)
        self.heldout_classes = np.sort(heldout_classes)
        kept_classes = np.unique(labels[keep])
        self.labels = np.searchsorted(kept_classes, labels[keep]).astype(np.int64)
        self.num_classes = len(kept_classes)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[int(self.indices[index])])
        item["label"] = torch.tensor(int(self.labels[index]), dtype=torch.int64)
        item["index"] = torch.tensor(int(index), dtype=torch.int64)  # kappaface: 0..M−1
        return item


def split_identities(dataset: Any, labels: np.ndarray, count: int, seed: int = 0
                     ) -> IdentitySplit:
    """Keep ``count`` identities (a seeded choice) out of training.

    Raises:
        ValueError: ``count`` leaves fewer than 2 people on either side.
    """
    classes = np.unique(labels)
    if not 2 <= count <= len(classes) - 2:
        raise ValueError(f"data.holdout_identities={count}: the data has {len(classes)} "
                         f"identities; hold out between 2 and {len(classes) - 2}")
    chosen = np.random.default_rng([seed, count]).choice(classes, count, replace=False)
    return IdentitySplit(dataset, np.asarray(labels), chosen)


def holdout_pair_sets(split: IdentitySplit, pairs_per_fold: int = 30, seed: int = 0,
                      keypoints: str = "retinaface", detector_weights: str = ""
                      ) -> dict[str, PairSet]:
    """``holdout-aligned`` (the crops with ``keypoints``: RetinaFace on the crop or the template)
    and ``holdout-unaligned`` / ``-unaligned-crop`` sets of the held-out people (10 folds)."""
    base = split.dataset
    items = [base[int(i)] for i in split.heldout]
    labels = np.array([int(item["label"]) for item in items])
    pairs = make_pairs(labels, 10, pairs_per_fold, seed)
    slots = pairs[:, :2].reshape(-1)
    crops = torch.stack([items[int(i)]["image"] for i in slots])
    issame = torch.from_numpy(pairs[:, 2].astype(bool))
    n = len(crops)
    if keypoints == "retinaface":
        kp, found = detect_keypoints(crops, crop=True, weights=detector_weights)
    else:
        kp, found = template_keypoints(n), torch.ones(n, dtype=torch.bool)
    sets = {"holdout-aligned": PairSet("holdout-aligned", crops, issame, kp, found, keypoints)}
    scale = torch.tensor([[112.0 / crops.shape[-1], 0, 0], [0, 112.0 / crops.shape[-2], 0]])
    sets.update(unaligned_sets("holdout", crops, scale.expand(n, 2, 3), issame, seed,
                               detector_weights))
    logger.info("held-out identities %s: %d images, %d pairs", split.heldout_classes.tolist(),
                len(items), len(pairs))
    return sets
