"""OpenGait's pkl layout, the Gait3D split json, and the datasets built on them.

Layout (OpenGait ``datasets/pretreatment.py``; Gait3D-Benchmark ``docs/pretreatment.md``)::

    <root>/<id>/<type>/<view>/<view>.pkl        uint8 silhouettes (T, 64, 64), 0..255
    <root>/<id>/<type>/<view>/<view>-pose.pkl   float32 joints (T, 17, 3): x, y in the pixels of the
                                                64x64 silhouette frame, confidence score

For Gait3D, ``<type>`` is ``camidX_videoidY`` and ``<view>`` is ``seqZ``. Both files of a sequence
have the same number of frames (frame t of the poses belongs to frame t of the silhouettes), so
OpenGait's own loader, which loads every pkl of a folder as a parallel modality, reads it too.
Pkl files are only ever read with kpt's restricted unpickler (numpy arrays, nothing else).
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kpt.errors import DataError

logger = logging.getLogger(__name__)

POSE_SUFFIX = "-pose.pkl"
NUM_JOINTS = 17
# COCO-17 left/right swap used when a sequence is mirrored (OpenGait modules.Graph 'coco').
COCO_FLIP_INDEX = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)

# The (module, name) globals a pickled numpy array may reference (numpy 1.x and 2.x names;
# protocol 5 reduces through _frombuffer). Anything else in a pkl is refused.
NUMPY_PICKLE_GLOBALS: set[tuple[str, str]] = {
    (mod, name)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class GaitDataError(DataError, ValueError):
    """A gait data file or folder does not have the expected content (names the file)."""


# --------------------------------------------------------------------------------------------
# pkl files
# --------------------------------------------------------------------------------------------
def read_array_pkl(path: str | Path) -> np.ndarray:
    """Reads one pickled numpy array with the restricted unpickler.

    Args:
        path: a ``.pkl`` file written by OpenGait's pretreatment or by :func:`write_array_pkl`.

    Returns:
        The array, as stored.

    Raises:
        GaitDataError: the file is missing, truncated, or does not hold a numpy array.
    """
    from kpt.data.safe_pickle import restricted_load

    path = Path(path)
    if not path.is_file():
        raise GaitDataError(f"{path}: file not found")
    try:
        with path.open("rb") as f:
            obj = restricted_load(f, NUMPY_PICKLE_GLOBALS, what=str(path))
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        if type(exc).__name__ == "UnsafePickleError":
            raise
        raise GaitDataError(f"{path}: corrupt pkl ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, np.ndarray):
        raise GaitDataError(f"{path}: expected a pickled numpy array, found {type(obj).__name__}")
    return obj


def write_array_pkl(path: str | Path, array: np.ndarray) -> None:
    """Writes ``array`` as a pickled numpy array (protocol 4, what OpenGait writes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as f:
        pickle.dump(np.ascontiguousarray(array), f, protocol=4)
    tmp.replace(path)


def check_silhouettes(sils: np.ndarray, path: Path | str) -> np.ndarray:
    """Checks a silhouette array: uint8 (T, H, W) with T >= 1."""
    if sils.ndim != 3 or sils.shape[0] == 0:
        raise GaitDataError(f"{path}: expected silhouettes (T, H, W) with T >= 1, got {sils.shape}")
    if sils.dtype != np.uint8:
        raise GaitDataError(f"{path}: expected uint8 silhouettes, got {sils.dtype}")
    return sils


def check_poses(poses: np.ndarray, num_frames: int, path: Path | str) -> np.ndarray:
    """Checks a pose array: float (T, 17, 3) with the silhouettes' T and no NaN."""
    if poses.ndim != 3 or poses.shape[1:] != (NUM_JOINTS, 3):
        raise GaitDataError(f"{path}: expected poses (T, {NUM_JOINTS}, 3), got {poses.shape}")
    if poses.shape[0] != num_frames:
        raise GaitDataError(
            f"{path}: {poses.shape[0]} pose frames but {num_frames} silhouette frames "
            "(poses must be matched to the kept silhouette frames by frame number)")
    if not np.isfinite(poses).all():
        raise GaitDataError(f"{path}: poses contain NaN or inf")
    return poses.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# layout and split
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SequenceRecord:
    """One sequence folder ``<root>/<label>/<type>/<view>``."""

    label: str
    type: str
    view: str
    folder: Path

    @property
    def key(self) -> str:
        """OpenGait's probe-set key ``id-type-view``."""
        return f"{self.label}-{self.type}-{self.view}"

    @property
    def sil_path(self) -> Path:
        return self.folder / f"{self.view}.pkl"

    @property
    def pose_path(self) -> Path:
        return self.folder / f"{self.view}{POSE_SUFFIX}"

    def load(self, need_pose: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Loads the sequence.

        Returns:
            silhouettes uint8 (T, H, W) and poses float32 (T, 17, 3) (``None`` when not needed).
        """
        sils = check_silhouettes(read_array_pkl(self.sil_path), self.sil_path)
        if not need_pose:
            return sils, None
        if not self.pose_path.is_file():
            raise GaitDataError(f"{self.pose_path}: pose file missing (run `kpt data validate gait`)")
        poses = check_poses(read_array_pkl(self.pose_path), len(sils), self.pose_path)
        return sils, poses


def scan_layout(root: str | Path, labels: Sequence[str] | None = None) -> list[SequenceRecord]:
    """Lists the sequences of an OpenGait tree, sorted id -> type -> view (OpenGait's order).

    Args:
        root: the data root.
        labels: keep only these ids (all when ``None``).
    """
    root = Path(root)
    if not root.is_dir():
        raise GaitDataError(f"{root}: data root not found")
    wanted = None if labels is None else set(labels)
    records = []
    for id_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if wanted is not None and id_dir.name not in wanted:
            continue
        for type_dir in sorted(p for p in id_dir.iterdir() if p.is_dir()):
            for view_dir in sorted(p for p in type_dir.iterdir() if p.is_dir()):
                records.append(SequenceRecord(id_dir.name, type_dir.name, view_dir.name, view_dir))
    return records


@dataclass
class GaitSplit:
    """Gait3D.json: ``TRAIN_SET`` / ``TEST_SET`` id lists and ``PROBE_SET`` ``id-type-view`` keys."""

    train_ids: list[str]
    test_ids: list[str]
    probe_set: set[str] = field(default_factory=set)


def split_problems(path: str | Path) -> list[str]:
    """Every problem of a split json (Gait3D.json format), one line each; empty when it is fine.

    An empty ``TRAIN_SET``, ``TEST_SET`` or ``PROBE_SET`` is a problem: training would have no
    identity, or evaluation no gallery or no probe.
    """
    path = Path(path)
    if not path.is_file():
        return [f"{path}: split json not found"]
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"{path}: not valid json ({exc})"]
    except OSError as exc:
        return [f"{path}: unreadable ({exc})"]
    if not isinstance(raw, dict):
        return [f"{path}: expected a json object with TRAIN_SET, TEST_SET and PROBE_SET"]
    problems = [f"{path}: field {key!r} must be a list of strings"
                for key in ("TRAIN_SET", "TEST_SET", "PROBE_SET")
                if not isinstance(raw.get(key), list)]
    if problems:
        return problems
    problems = [f"{path}: split {key} is empty" for key in ("TRAIN_SET", "TEST_SET", "PROBE_SET")
                if not raw[key]]
    train, test = [str(x) for x in raw["TRAIN_SET"]], [str(x) for x in raw["TEST_SET"]]
    overlap = set(train) & set(test)
    if overlap:
        problems.append(f"{path}: ids in both TRAIN_SET and TEST_SET: {sorted(overlap)[:5]}")
    bad = [p for p in map(str, raw["PROBE_SET"]) if p.split("-")[0] not in set(test)]
    if bad:
        problems.append(f"{path}: PROBE_SET entries whose id is not in TEST_SET: {bad[:5]}")
    return problems


def read_split(path: str | Path) -> GaitSplit:
    """Reads and checks a split json (Gait3D.json format).

    Raises:
        GaitDataError: naming the file and every problem of :func:`split_problems`.
    """
    path = Path(path)
    problems = split_problems(path)
    if problems:
        raise GaitDataError("; ".join(problems))
    raw = json.loads(path.read_text())
    return GaitSplit([str(x) for x in raw["TRAIN_SET"]], [str(x) for x in raw["TEST_SET"]],
                     {str(x) for x in raw["PROBE_SET"]})


def write_split(path: str | Path, split: GaitSplit) -> None:
    """Writes a split json in Gait3D.json format."""
    payload = {"TRAIN_SET": list(split.train_ids), "TEST_SET": list(split.test_ids),
               "PROBE_SET": sorted(split.probe_set)}
    Path(path).write_text(json.dumps(payload, indent=1))


# --------------------------------------------------------------------------------------------
# keypoints in the network's frame
# --------------------------------------------------------------------------------------------
def normalise_joints(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixel joints -> the [0, 1] convention of kpt (pixel-centre aware, clamped).

    Args:
        xy: (..., 2) joint (x, y) in the pixels of the image the network sees (H x W).

    Returns:
        (..., 2) float32 ((x + 0.5) / W, (y + 0.5) / H), clamped to [0, 1] (joints that leave the
        cut image, e.g. a swinging hand, stay at its border rather than leaving kpt's range).
    """
    out = np.empty_like(xy, dtype=np.float32)
    out[..., 0] = (xy[..., 0] + 0.5) / width
    out[..., 1] = (xy[..., 1] + 0.5) / height
    return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------
def ordered_clip_indices(num_frames: int, frames: int, skip: int, rng: np.random.Generator
                         ) -> np.ndarray:
    """OpenGait's ``fixed_ordered`` sampling: a sorted random subset of a random window.

    A window of ``frames + skip`` consecutive indices (the index list tiled when the sequence is
    shorter) is chosen at random, and ``frames`` of its indices are kept in order.

    Returns:
        (frames,) int64 frame indices into the sequence.
    """
    window = frames + skip
    indices = np.arange(num_frames)
    if num_frames < window:
        indices = np.tile(indices, math.ceil(window / num_frames))
    start = int(rng.integers(0, len(indices) - window + 1))
    keep = np.sort(rng.choice(window, size=frames, replace=False))
    return indices[start + keep]


SequenceTransform = Callable[[np.ndarray, np.ndarray, np.random.Generator],
                             tuple[np.ndarray, np.ndarray]]


class GaitClipDataset(Dataset):
    """Training clips: one ordered clip of ``frames`` frames per item, freshly sampled.

    Items: ``image`` float (T, H, W) in [0, 1], ``keypoints`` float (T, 17, 2) in [0, 1],
    ``label`` int64 (index into the sorted training ids).

    Args:
        records: training sequences.
        transform: ``(sils uint8 (T,64,64), joints (T,17,2) pixels, rng) -> (float (T,H,W) in
            [0,1], normalised joints (T,17,2))``; see :mod:`kpt_plugins.gait.transforms`.
        frames, skip: clip length and spare frames (OpenGait: 30 and 4).
        seed: base seed; item ``i`` of epoch-call ``n`` draws from its own generator.
        cache: keep decoded sequences in memory (fine for the synthetic set).
    """

    def __init__(self, records: Sequence[SequenceRecord], transform: SequenceTransform,
                 frames: int = 30, skip: int = 4, seed: int = 0, cache: bool = False) -> None:
        if not records:
            raise GaitDataError("no training sequences found")
        self.records = list(records)
        self.label_names = sorted({r.label for r in self.records})
        index = {name: i for i, name in enumerate(self.label_names)}
        self.labels = [index[r.label] for r in self.records]
        self.transform, self.frames, self.skip = transform, frames, skip
        self.seed, self._calls = seed, 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        sils, poses = self.records[i].load(need_pose=True)
        if self._cache is not None:
            self._cache[i] = (sils, poses)
        return sils, poses

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sils, poses = self._load(i)
        self._calls += 1
        rng = np.random.default_rng([self.seed, i, self._calls, torch.initial_seed() % 2**31])
        idx = ordered_clip_indices(len(sils), self.frames, self.skip, rng)
        image, keypoints = self.transform(sils[idx], poses[idx, :, :2], rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "keypoints": torch.from_numpy(np.ascontiguousarray(keypoints, dtype=np.float32)),
                "label": torch.tensor(self.labels[i], dtype=torch.long)}


class GaitSequenceDataset(Dataset):
    """Evaluation sequences: all frames in order (at most ``max_frames``), one item each.

    Items: ``image`` float (T, H, W), ``keypoints`` float (T, 17, 2), ``label`` (the id string),
    ``key`` (``id-type-view``) and ``probe`` (bool, from the split's probe set).
    """

    def __init__(self, records: Sequence[SequenceRecord], transform: SequenceTransform,
                 probe_set: set[str], max_frames: int = 720) -> None:
        self.records = list(records)
        self.transform, self.probe_set, self.max_frames = transform, probe_set, max_frames

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        sils, poses = rec.load(need_pose=True)
        sils, poses = sils[: self.max_frames], poses[: self.max_frames]
        image, keypoints = self.transform(sils, poses[:, :, :2], np.random.default_rng(0))
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "keypoints": torch.from_numpy(np.ascontiguousarray(keypoints, dtype=np.float32)),
                "label": rec.label, "key": rec.key, "probe": rec.key in self.probe_set}
