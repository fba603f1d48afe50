"""Per-image face features for the benchmark protocols (IJB, TinyFace): embedders and a disk cache.

An **embedder** is anything callable as ``embedder(images, keypoints) -> features``:

* ``images``: (B, 3, H, W) uint8 RGB at the recogniser's input size;
* ``keypoints``: (B, 5, 2) float32 normalised (x, y) in the frame of ``images`` (KP-RPE's input;
  recognisers without keypoints ignore them);
* returns (B, D) **raw** features (not normalised: IJB keeps the norm as a quality weight).

It also carries a ``key`` string naming the weights, so cached features of one model are never read
for another. :class:`ModelEmbedder` wraps a kpt model (run through :func:`kpt.engine.inference.predict`,
the one inference loop); converted CVLface weights load as kpt models; an ONNX recogniser only
needs the same call signature and a ``key``.

:func:`extract_features` runs an embedder over a dataset of items ``{"image", "keypoints"}`` and
keeps the result on disk in chunks (``chunk_00000.npy`` …, each written atomically) beside a
``meta.json`` that names what was extracted: a run that is killed (IJB-C has 469k images) continues
with the first missing chunk when it is started again. Each chunk holds (n, V, D) float32, V = 2
(original, mirrored) with flip, else 1: the flip and norm variants are all computed from the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from kpt.data.keypoints import hflip_keypoints
from kpt.engine.atomic import atomic_write
from kpt.engine.inference import predict

from ..data.augment import FLIP_PERMUTATION, normalize_images

__all__ = ["Embedder", "ModelEmbedder", "cache_folder", "extract_features", "model_key"]

logger = logging.getLogger(__name__)


class Embedder(Protocol):
    """``(images (B, 3, H, W) uint8, keypoints (B, 5, 2)) -> (B, D)`` raw features, plus ``key``."""

    key: str

    def __call__(self, images: Tensor, keypoints: Tensor) -> Tensor: ...


def model_key(model: nn.Module) -> str:
    """Short SHA-1 of a model's parameters and buffers (names, shapes and values)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(str((tuple(data.shape), data.dtype)).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


class ModelEmbedder:
    """A kpt model (or plugin model with ``backbone``) as an :data:`Embedder`.

    Args:
        model: ``(images [−1, 1], keypoints) -> (B, D)``; a ``FaceRecognizer``'s backbone is used.
        device: where the forward runs.
        amp: the run's ``train.amp`` (none | bf16 | fp16).
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu",
                 amp: str = "none") -> None:
        self.net = getattr(model, "backbone", model)
        self.device, self.amp = device, amp
        self.key = model_key(self.net)

    def __call__(self, images: Tensor, keypoints: Tensor) -> Tensor:
        batch = [(normalize_images(images), keypoints.float())]

        def forward(net: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
            return net(*b).float()

        return predict(self.net, batch, forward, device=self.device, amp=self.amp)


def cache_folder(root: str | Path, embedder_key: str, what: str) -> Path:
    """``<root>/<embedder key>/<what>`` (``root`` empty: ``$XDG_CACHE_HOME/kpt/features``)."""
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME",
                                                       Path.home() / ".cache")) / "kpt" / "features"
    return base / embedder_key / what


def _collate(items: list[dict]) -> dict[str, Tensor]:
    return {"image": torch.stack([torch.as_tensor(i["image"]) for i in items]),
            "keypoints": torch.stack([torch.as_tensor(i["keypoints"]).float() for i in items])}


def flip_detector(keypoint_fn: Callable[[Tensor], Tensor] | None, flip_keypoints: str,
                  describe: dict[str, Any]) -> Callable[[Tensor], Tensor] | None:
    """The ``flip_keypoint_fn`` of :func:`extract_features` for a set whose keypoints come from
    ``keypoint_fn`` (a detector): itself for ``detect``, None (mirror) for ``mirror`` or when the
    keypoints are fixed. ``detect`` is recorded in ``describe`` so that a feature cache made
    with mirrored flip keypoints is not mixed with it (older caches stay valid for ``mirror``)."""
    if flip_keypoints not in ("detect", "mirror"):
        raise ValueError(f"flip keypoints must be detect or mirror, got {flip_keypoints!r}")
    if keypoint_fn is None or flip_keypoints == "mirror":
        return None
    describe["flip_keypoints"] = "detect"
    return keypoint_fn


def extract_features(embedder: Embedder | Callable[[Tensor, Tensor], Tensor], dataset: Dataset,
                     cache_dir: str | Path | None = None, *, flip: bool = True,
                     chunk_size: int = 8192, batch_size: int = 64, workers: int = 0,
                     describe: dict[str, Any] | None = None,
                     keypoint_fn: Callable[[Tensor], Tensor] | None = None,
                     flip_keypoint_fn: Callable[[Tensor], Tensor] | None = None) -> np.ndarray:
    """Raw features of every dataset item (original and mirrored), cached in chunks.

    Args:
        embedder: see the module docstring.
        dataset: items ``{"image": (3, H, W) uint8, "keypoints": (5, 2)}``, all the same size.
        cache_dir: folder for the chunks (None: no cache, everything in memory).
        flip: also embed the mirrored image (mirrored keypoints, left/right points swapped).
        chunk_size: images per cache file (what a killed run loses at most).
        batch_size: images per embedder call.
        workers: DataLoader worker processes that read and align the images.
        describe: what the features are (set, protocol, input size...): stored in ``meta.json``;
            a cache whose description differs is an error rather than silently mixed.
        keypoint_fn: replaces the items' keypoints, ``(B, 3, H, W) uint8 -> (B, 5, 2)`` (a
            detector on the images the recogniser sees).
        flip_keypoint_fn: keypoints of the mirrored images, ``(B, 3, H, W) uint8 -> (B, 5, 2)``
            called on the mirrored batch (CVLface reruns its aligner on the flip, kprpe.md §7);
            None: the keypoints mirrored (left/right points swapped).

    Returns:
        (N, V, D) float32, V = 2 (original, mirrored) with ``flip``, else 1.
    """
    n = len(dataset)  # type: ignore[arg-type]
    meta = {"format": 1, "num_items": n, "chunk_size": int(chunk_size), "flip": bool(flip),
            "embedder": getattr(embedder, "key", ""), **(describe or {})}
    folder = Path(cache_dir) if cache_dir is not None else None
    if folder is not None:
        meta_path = folder / "meta.json"
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            if old != json.loads(json.dumps(meta)):
                from kpt.errors import UserError

                raise UserError(f"{meta_path}: this feature cache holds other features ({old}); "
                                f"expected {meta}; delete the folder or set eval.cache_dir")
        else:
            text = json.dumps(meta, indent=1).encode()
            atomic_write(meta_path, lambda fh: fh.write(text))
    if n == 0:
        return np.zeros((0, 2 if flip else 1, 0), np.float32)
    chunks = []
    num_chunks = -(-n // chunk_size)
    for c in range(num_chunks):
        lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
        path = folder / f"chunk_{c:05d}.npy" if folder is not None else None
        if path is not None and path.is_file():
            feats = np.load(path, allow_pickle=False)
            if feats.shape[0] == hi - lo:
                chunks.append(feats)
                continue
            logger.warning("%s: %d rows, expected %d; extracting again", path, len(feats), hi - lo)
        loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size, shuffle=False,
                            num_workers=workers, collate_fn=_collate)
        parts = []
        for batch in loader:
            images, keypoints = batch["image"], batch["keypoints"]
            if keypoint_fn is not None:
                keypoints = keypoint_fn(images).float()
            views = [embedder(images, keypoints).float()]
            if flip:
                mirrored = images.flip(-1)
                flip_kp = (flip_keypoint_fn(mirrored).float() if flip_keypoint_fn is not None
                           else hflip_keypoints(keypoints, FLIP_PERMUTATION))
                views.append(embedder(mirrored, flip_kp).float())
            parts.append(torch.stack(views, dim=1).cpu().numpy())
        feats = np.concatenate(parts).astype(np.float32)
        if path is not None:
            atomic_write(path, lambda fh, f=feats: np.save(fh, f, allow_pickle=False))
        chunks.append(feats)
        logger.info("features: chunk %d/%d (%d images)%s", c + 1, num_chunks, hi - lo,
                    f" -> {path}" if path else "")
    return np.concatenate(chunks)
