"""Data sets built on the synthetic face renderer: training identities, verification pairs, export.

Everything here is labelled *synthetic* (``info["synthetic"] = True``, names ``synthetic-…``) so a
number measured on it is never mistaken for a real benchmark.

* :class:`SyntheticFaces`: ``num_identities × images_per_identity`` images rendered on the fly
  (deterministic per index; ``__getitems__`` renders a whole DataLoader batch at once).
* :func:`synthetic_pairs`: a verification set in the shape of the ``.bin`` sets (half same,
  half different pairs) from identities disjoint from the training ones.
* :func:`export_synthetic_rec`: writes a synthetic set in insightface's RecordIO layout with its
  ground-truth landmark cache, to exercise the real-format path end to end.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.bin_pairs import VerificationPairs
from ..data.landmarks_cache import cache_path, write_landmarks
from ..data.recordio import encode_image, write_insightface_rec
from .render import SPLITS, render_faces

__all__ = ["EVAL_IDENTITY_OFFSET", "SyntheticFaces", "export_synthetic_rec", "synthetic_pairs"]

log = logging.getLogger(__name__)

#: Evaluation identities start here, far from any training identity range.
EVAL_IDENTITY_OFFSET = 1_000_000
_PAIR_STREAM = 7


class SyntheticFaces(Dataset):
    """Synthetic identities rendered on demand.

    Args:
        num_identities: classes; labels are 0..num_identities − 1.
        images_per_identity: images per class; item i is (identity i // n, sample i % n).
        split: ``"aligned"`` (faces on the ArcFace template) or ``"unaligned"``.
        seed: data-set seed (identity appearance and image variation).
        identity_offset: first identity id rendered (labels still start at 0).
        size: image side in pixels.

    Items:
        ``image`` (3, size, size) uint8 RGB, ``keypoints`` (5, 2) float32 ground truth in [0, 1]
        (x, y), ``label`` int64, ``index`` int64.
    """

    def __init__(
        self,
        num_identities: int = 100,
        images_per_identity: int = 20,
        split: str = "aligned",
        seed: int = 0,
        identity_offset: int = 0,
        size: int = 112,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")
        if num_identities < 1 or images_per_identity < 1:
            raise ValueError("synthetic faces need at least one identity and one image each")
        self.num_identities, self.images_per_identity = num_identities, images_per_identity
        self.split, self.seed, self.identity_offset, self.size = split, seed, identity_offset, size
        self.labels = np.repeat(np.arange(num_identities), images_per_identity)

    @property
    def name(self) -> str:
        return f"synthetic-{self.split}"

    @property
    def info(self) -> dict:
        return {
            "name": self.name,
            "synthetic": True,
            "num_classes": self.num_identities,
            "num_images": len(self),
            "image_size": self.size,
            "seed": self.seed,
        }

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """Render a batch at once (``torch.utils.data`` calls this when it exists)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"{self.name}: index out of range 0..{len(self) - 1}")
        identity, sample = np.divmod(idx, self.images_per_identity)
        images, keypoints = render_faces(
            identity + self.identity_offset, sample, self.seed, self.split, self.size
        )
        return [
            {
                "image": images[j],
                "keypoints": keypoints[j],
                "label": torch.tensor(identity[j]),
                "index": torch.tensor(idx[j]),
            }
            for j in range(len(idx))
        ]


def synthetic_pairs(
    num_pairs: int = 600,
    split: str = "aligned",
    seed: int = 0,
    identity_offset: int = EVAL_IDENTITY_OFFSET,
    size: int = 112,
) -> tuple[VerificationPairs, torch.Tensor]:
    """A verification set like the ``.bin`` files: pairs alternate same / different.

    Same pairs show two samples of one identity; different pairs two identities. Identities come
    from ``identity_offset`` on (disjoint from training identities by default).

    Returns:
        pairs (images (2P, 3, size, size) uint8, issame (P,) bool, name ``synthetic-<split>``)
        and keypoints (2P, 5, 2) float32 ground truth.
    """
    rng = np.random.default_rng([seed, _PAIR_STREAM, num_pairs])
    issame = np.arange(num_pairs) % 2 == 0
    pool = max(4, num_pairs)  # identities drawn from a pool the size of the set
    first = rng.integers(0, pool, num_pairs)
    other = (first + rng.integers(1, pool, num_pairs)) % pool
    second = np.where(issame, first, other)
    samples = rng.integers(0, 1000, (num_pairs, 2))
    samples[:, 1] = np.where(
        issame & (samples[:, 1] == samples[:, 0]), samples[:, 0] + 1, samples[:, 1]
    )
    ids = np.stack([first, second], 1).reshape(-1) + identity_offset
    images, keypoints = render_faces(ids, samples.reshape(-1), seed, split, size)
    pairs = VerificationPairs(f"synthetic-{split}", images, torch.from_numpy(issame))
    return pairs, keypoints


def export_synthetic_rec(
    root: str | Path,
    num_identities: int,
    images_per_identity: int,
    split: str = "aligned",
    seed: int = 0,
    batch: int = 256,
) -> int:
    """Write a synthetic set as ``train.rec``/``train.idx``/``property`` + ``ldmk_5points.csv``.

    The landmark cache holds the ground-truth points (score 1). Returns the number of images.
    """
    ds = SyntheticFaces(num_identities, images_per_identity, split, seed)
    keypoints = np.zeros((len(ds), 5, 2), np.float32)

    def items():
        for start in range(0, len(ds), batch):
            chunk = ds.__getitems__(list(range(start, min(start + batch, len(ds)))))
            for item in chunk:
                keypoints[int(item["index"])] = item["keypoints"].numpy()
                image = item["image"].permute(1, 2, 0).numpy()
                yield int(item["label"]), encode_image(np.ascontiguousarray(image))

    n = write_insightface_rec(root, items(), (ds.size, ds.size))
    write_landmarks(cache_path(Path(root)), keypoints, np.ones(len(ds), np.float32))
    log.info("wrote %d synthetic %s images of %d identities to %s", n, split, num_identities, root)
    return n
