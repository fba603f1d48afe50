"""One face-data interface over every on-disk format, and the torch Dataset built on it.

A *source* is an indexable collection of (RGB image, integer label). :func:`open_face_source`
recognises the format of a path:

* ``rec``: a folder with ``train.rec`` + ``train.idx`` (+ ``property``); items in image-key order.
* ``bin``: a validation ``*.bin`` pair file; items in bins order (2·P images).
* ``tinyface``: ``Probe/``, ``Gallery_Match/``, ``Gallery_Distractor/``; probes, then the gallery.
* ``folder``: ``<root>/<identity>/<image>``; identities sorted as strings, files by name.

:class:`FaceDataset` turns a source into kpt training items ``{"image", "keypoints", "label"}``
with the five keypoints from the dataset's landmark cache (``kpt data prepare face``) or, for data
without a cache, the ArcFace template (the right answer for already aligned 112×112 crops).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from kpt.errors import DataError

from ..align import ARCFACE_TEMPLATE_112
from .bin_pairs import load_bin
from .folders import ImageFolderFaces, TinyFaceProtocol
from .recordio import InsightFaceRec

__all__ = ["FaceDataset", "FaceSource", "describe_missing", "detect_kind", "item_name",
           "open_face_source"]

log = logging.getLogger(__name__)


class FaceSource(Protocol):
    """What every source offers."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        """(H, W, 3) uint8 RGB image and its integer label."""
        ...


class _BinSource:
    """The 2·P images of a ``.bin`` file; label = pair index (both images of a pair share it)."""

    def __init__(self, path: Path) -> None:
        self.pairs = load_bin(path)

    def __len__(self) -> int:
        return int(self.pairs.images.shape[0])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.pairs.images[index].permute(1, 2, 0).numpy(), index // 2


class _TinyFaceSource:
    """Probes followed by the gallery (matches, then distractors labelled −100)."""

    def __init__(self, root: Path) -> None:
        self.protocol = TinyFaceProtocol.from_folder(root)
        self.paths = self.protocol.all_paths
        self.labels = np.concatenate([self.protocol.probe_labels, self.protocol.gallery_labels])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.protocol.read_image(self.paths[index]), int(self.labels[index])


def detect_kind(path: str | Path) -> str:
    """``"rec"``, ``"bin"``, ``"tinyface"`` or ``"folder"`` for a data path (error otherwise)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".bin":
            return "bin"
        if path.suffix in (".rec", ".idx"):
            return "rec"
        raise DataError(f"{path}: unknown face data file (expected a .bin pair file or a .rec)")
    if not path.is_dir():
        from .checks import MissingDataError

        raise MissingDataError(f"face data not found: {path} does not exist")
    if (path / "train.rec").is_file():
        return "rec"
    try:
        TinyFaceProtocol.from_folder(path)
        return "tinyface"
    except FileNotFoundError:
        pass
    if any(p.is_dir() for p in path.iterdir()):
        return "folder"
    raise DataError(
        f"{path}: not a face data set (expected train.rec/train.idx, a .bin file, TinyFace "
        f"Probe/Gallery_Match/Gallery_Distractor folders, or <root>/<identity>/<image> folders)"
    )


def open_face_source(path: str | Path) -> tuple[str, FaceSource]:
    """(kind, source) for a data path; see the module table."""
    path = Path(path)
    kind = detect_kind(path)
    if kind == "rec":
        root = path if path.is_dir() else path.parent
        prefix = "train" if path.is_dir() else path.stem
        return kind, InsightFaceRec(root, prefix)
    if kind == "bin":
        return kind, _BinSource(path)
    if kind == "tinyface":
        return kind, _TinyFaceSource(path)
    return kind, ImageFolderFaces(path)


def item_name(source: FaceSource, index: int) -> str:
    """How a user finds item ``index`` of a source: the image's file name (relative to the data
    folder), ``record key K`` for RecordIO, ``image I (pair P)`` for a ``.bin`` file."""
    if isinstance(source, InsightFaceRec):
        return f"record key {source.image_keys[index]}"
    if isinstance(source, _BinSource):
        return f"image {index} (pair {index // 2})"
    if isinstance(source, _TinyFaceSource):
        path, root = source.paths[index], source.protocol.root
    elif isinstance(source, ImageFolderFaces):
        path, root = source.paths[index], source.root
    else:
        return f"item {index}"
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def describe_missing(source: FaceSource, found: np.ndarray, limit: int = 5) -> str:
    """``"no face in 3: a/1.jpg, b/2.jpg, c/7.jpg"`` for the items where ``found`` (N,) bool is
    False, naming at most ``limit`` of them; ``""`` when every item has a face."""
    missing = np.flatnonzero(~np.asarray(found, dtype=bool))
    if not len(missing):
        return ""
    names = ", ".join(item_name(source, int(i)) for i in missing[:limit])
    more = f", ... ({len(missing) - limit} more)" if len(missing) > limit else ""
    return f"no face in {len(missing)}: {names}{more}"


class FaceDataset(Dataset):
    """kpt training items from a face source.

    Args:
        source: a :class:`FaceSource` (or a path, opened with :func:`open_face_source`).
        keypoints: (N, 5, 2) normalised keypoints per item; ``"auto"`` reads the landmark cache
            beside the data when there is one, else uses the ArcFace template; ``None`` = template.
        transform: optional callable on the item dict (e.g. augmentation).

    Items:
        ``image`` (3, H, W) uint8 RGB, ``keypoints`` (5, 2) float32 in [0, 1] (x, y),
        ``label`` int64 scalar, ``index`` int64 scalar.
    """

    def __init__(self, source, keypoints: np.ndarray | str | None = "auto", transform=None):
        data_path = None
        if isinstance(source, (str, Path)):
            data_path = Path(source)
            _, source = open_face_source(data_path)
        self.source = source
        self.transform = transform
        # where the keypoints come from, for the run header: "given", "landmark cache PATH (...)"
        # or "template"
        self.keypoint_source = "given"
        if isinstance(keypoints, str):
            if keypoints != "auto":
                raise ValueError(f"keypoints must be an array, None or 'auto', got {keypoints!r}")
            keypoints = None
            if data_path is not None:
                from .landmarks_cache import cache_path, read_landmarks

                if cache_path(data_path).is_file():
                    keypoints, scores = read_landmarks(cache_path(data_path), expected=len(source))
                    log.info("%s: keypoints from %s", data_path, cache_path(data_path))
                    found = (f"face found in {int((scores > 0).sum())} of {len(scores)} images"
                             if scores is not None else "no detection scores")
                    if scores is not None and (scores <= 0).any():
                        # by name: an index into the sorted file list helps nobody find the image
                        found += f"; template used, {describe_missing(source, scores > 0)}"
                    self.keypoint_source = f"landmark cache {cache_path(data_path)} ({found})"
        if keypoints is None:
            self.keypoint_source = ("template (ArcFace five points; no landmark cache: run "
                                    "`kpt data prepare face` to detect them)")
            keypoints = np.broadcast_to(ARCFACE_TEMPLATE_112 / 112.0, (len(source), 5, 2))
        keypoints = np.asarray(keypoints, dtype=np.float32)
        if keypoints.shape != (len(source), 5, 2):
            raise ValueError(
                f"keypoints have shape {keypoints.shape}, expected ({len(source)}, 5, 2)"
            )
        self.keypoints = keypoints

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = self.source[index]
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "keypoints": torch.from_numpy(self.keypoints[index].copy()),
            "label": torch.tensor(label, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }
        return self.transform(item) if self.transform is not None else item
