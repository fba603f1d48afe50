"""Face image folders: one folder per identity, and TinyFace-style probe/gallery/distractor folders.

Identity folders (AdaFace / insightface ``ImageFolder`` layout, ``<root>/<identity>/<image>``):
labels are the positions of the folder names sorted **as strings** ('0', '1', '10', '100', '2', …),
exactly like ``torchvision.datasets.ImageFolder``, so a folder tree unpacked from a ``.rec`` gets
the same permuted labels as the official training. Files inside a folder are sorted by name.

TinyFace (AdaFace ``validation_lq/tinyface_helper.py``): ``Probe/``, ``Gallery_Match/`` and
``Gallery_Distractor/`` (under ``aligned_pad_0.1_pad_high/`` when that aligned copy exists). The
identity is ``int(basename.split('_')[0])``; distractors get label −100; the gallery is the match
images followed by the distractors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kpt.errors import DataError

from .recordio import decode_image

__all__ = [
    "DISTRACTOR_LABEL",
    "IMAGE_EXTENSIONS",
    "ImageFolderFaces",
    "TinyFaceProtocol",
    "list_images",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DISTRACTOR_LABEL = -100


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files (by extension, case-insensitive) in ``folder``, sorted by relative path."""
    folder = Path(folder)
    if recursive:
        found = [
            Path(d) / f
            for d, _, files in os.walk(folder)
            for f in files
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    else:
        found = [
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found, key=lambda p: str(p.relative_to(folder)))


class ImageFolderFaces:
    """``<root>/<identity>/<image>`` as (image, label) items.

    Attributes:
        classes: identity folder names in label order (sorted as strings).
        paths: image paths in item order (class by class, files sorted by name).
        labels: (N,) int64 labels.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise DataError(
                f"{self.root}: no identity folders; expected <root>/<identity>/<image>.jpg"
            )
        paths: list[Path] = []
        labels: list[int] = []
        for label, name in enumerate(self.classes):
            files = list_images(self.root / name)
            paths += files
            labels += [label] * len(files)
        if not paths:
            raise DataError(
                f"{self.root}: the identity folders contain no images {IMAGE_EXTENSIONS}"
            )
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def read_item(self, index: int) -> tuple[bytes, int]:
        """(encoded image bytes, label) of item ``index``."""
        return self.paths[index].read_bytes(), int(self.labels[index])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        """(H, W, 3) uint8 RGB image and its label."""
        data, label = self.read_item(index)
        return decode_image(data, str(self.paths[index])), label

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for i in range(len(self)):
            yield self[i]


def _tinyface_label(path: Path) -> int:
    head = path.stem.split("_")[0]
    try:
        return int(head)
    except ValueError:
        raise ValueError(
            f"{path}: TinyFace file names start with the identity number ('<id>_<n>.jpg')"
        ) from None


@dataclass
class TinyFaceProtocol:
    """TinyFace rank-k identification sets.

    Attributes:
        root: the folder holding ``Probe``, ``Gallery_Match``, ``Gallery_Distractor``.
        probe_paths, probe_labels: probes and their identities.
        gallery_paths, gallery_labels: match images then distractors (label −100).
    """

    root: Path
    probe_paths: list[Path]
    probe_labels: np.ndarray
    gallery_paths: list[Path]
    gallery_labels: np.ndarray

    @classmethod
    def from_folder(cls, root: str | Path, prefer_aligned: bool = True) -> TinyFaceProtocol:
        """Find the three folders under ``root`` (also under ``Testing_Set/`` and the aligned copy).

        Args:
            root: the TinyFace folder (or its ``Testing_Set`` / aligned sub-folder).
            prefer_aligned: use ``aligned_pad_0.1_pad_high`` when it exists.
        """
        base = Path(root)
        candidates = []
        for sub in ("", "Testing_Set", "tinyface/Testing_Set"):
            d = base / sub if sub else base
            if prefer_aligned:
                candidates.append(d / "aligned_pad_0.1_pad_high")
            candidates.append(d)
        folder = next((d for d in candidates if (d / "Probe").is_dir()), None)
        if folder is None:
            raise FileNotFoundError(
                f"{base}: no TinyFace layout found (expected Probe/, Gallery_Match/ and "
                f"Gallery_Distractor/, possibly under Testing_Set/ or aligned_pad_0.1_pad_high/)"
            )
        for name in ("Gallery_Match", "Gallery_Distractor"):
            if not (folder / name).is_dir():
                raise FileNotFoundError(f"{folder}: missing the {name}/ folder")
        probes = list_images(folder / "Probe", recursive=True)
        matches = list_images(folder / "Gallery_Match", recursive=True)
        distractors = list_images(folder / "Gallery_Distractor", recursive=True)
        probe_labels = np.array([_tinyface_label(p) for p in probes], dtype=np.int64)
        gallery_labels = np.array(
            [_tinyface_label(p) for p in matches] + [DISTRACTOR_LABEL] * len(distractors),
            dtype=np.int64,
        )
        log.info(
            "TinyFace %s: %d probes, %d gallery matches, %d distractors",
            folder,
            len(probes),
            len(matches),
            len(distractors),
        )
        return cls(folder, probes, probe_labels, matches + distractors, gallery_labels)

    @property
    def all_paths(self) -> list[Path]:
        """Probe paths followed by gallery paths (one feature pass covers both)."""
        return self.probe_paths + self.gallery_paths

    def read_image(self, path: Path) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        return decode_image(Path(path).read_bytes(), str(path))
