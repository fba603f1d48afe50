"""Silhouette pretreatment (OpenGait ``imgs2pickle``) and the matching map of 2D joints.

OpenGait crops each raw silhouette PNG to its foreground rows, resizes it to height 64 and cuts
64 columns around the horizontal median of the foreground. KP-RPE needs the joints in exactly
that frame, so :func:`crop_silhouette` returns the crop parameters along with the 64x64 image
and :func:`map_joints` applies the same affine to joint pixel coordinates (reference gait.md 6.3):

    x64 = (u + 0.5) * W1 / W0 - 0.5 - (x_center - 32)
    y64 = (v - y_top + 0.5) * 64 / h - 0.5

with h = y_btm - y_top + 1 the foreground height, W1 = int(64 * W0 / h) the resized width and
x_center the median column on the resized image (pixel-centre convention, as cv2.resize).

Gait3D pose files (``2D_Poses/<id>/<type>/<view>/human_crop_f<frame>.txt``): one comma separated
line, two leading numbers of undocumented meaning, then 17 COCO joints as (x, y, score); x, y are
read as pixels of the person crop the silhouette PNG of the same frame shows.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from kpt_plugins.gait.data import NUM_JOINTS, GaitDataError

logger = logging.getLogger(__name__)

IMG_SIZE = 64
MIN_PIXEL_SUM = 10000  # OpenGait drops frames whose pixel sum is <= this
_FRAME_NUMBER = re.compile(r"(\d+)(?!.*\d)")


@dataclass(frozen=True)
class CropParams:
    """How one raw frame was turned into the 64x64 silhouette."""

    src_height: int  # H0 of the raw PNG
    src_width: int  # W0
    y_top: int  # first foreground row
    y_btm: int  # last foreground row
    resized_width: int  # W1 = int(64 * W0 / h)
    x_center: int  # median column on the resized image

    @property
    def crop_height(self) -> int:
        return self.y_btm - self.y_top + 1


def frame_number(path: str | Path) -> int:
    """The frame number of ``human_crop_f<frame>.png|txt`` (the last digit run of the stem)."""
    match = _FRAME_NUMBER.search(Path(path).stem)
    if match is None:
        raise GaitDataError(f"{path}: no frame number in the file name")
    return int(match.group(1))


def crop_silhouette(img: np.ndarray, size: int = IMG_SIZE) -> tuple[np.ndarray, CropParams] | None:
    """OpenGait ``imgs2pickle`` for one grayscale frame.

    Args:
        img: uint8 (H0, W0) raw silhouette.
        size: output side (64).

    Returns:
        (uint8 (size, size) silhouette, crop parameters), or ``None`` where OpenGait drops the frame
        (pixel sum <= 10000, or a median column at index 0).
    """
    if img.ndim != 2:
        raise ValueError(f"expected a grayscale (H, W) image, got shape {img.shape}")
    if int(img.sum(dtype=np.int64)) <= MIN_PIXEL_SUM:
        return None
    rows = img.sum(axis=1) != 0
    y_top = int(rows.argmax())
    y_btm = int(rows.cumsum().argmax())
    cropped = img[y_top:y_btm + 1, :]
    ratio = cropped.shape[1] / cropped.shape[0]
    resized_width = int(size * ratio)
    cropped = cv2.resize(cropped, (resized_width, size), interpolation=cv2.INTER_CUBIC)
    col_csum = cropped.sum(axis=0, dtype=np.int64).cumsum()
    above = np.nonzero(col_csum > cropped.sum(dtype=np.int64) / 2)[0]
    if len(above) == 0 or above[0] == 0:
        return None
    x_center = int(above[0])
    half = size // 2
    left, right = x_center - half, x_center + half
    if left <= 0 or right >= cropped.shape[1]:
        # OpenGait pads half a window of zeros on both sides; the affine is unchanged by it.
        pad = np.zeros((cropped.shape[0], half), dtype=cropped.dtype)
        cropped = np.concatenate([pad, cropped, pad], axis=1)
        left, right = left + half, right + half
    params = CropParams(img.shape[0], img.shape[1], y_top, y_btm, resized_width, x_center)
    return np.ascontiguousarray(cropped[:, left:right]).astype(np.uint8), params


def map_joints(uv: np.ndarray, params: CropParams, size: int = IMG_SIZE) -> np.ndarray:
    """Maps raw-frame joint pixels into the 64x64 silhouette frame.

    Args:
        uv: (..., 2) joint (x, y) in pixels of the raw PNG.
        params: the frame's :class:`CropParams`.

    Returns:
        (..., 2) float32 joint (x, y) in pixels of the 64x64 silhouette.
    """
    out = np.empty(uv.shape, dtype=np.float32)
    sx = params.resized_width / params.src_width
    sy = size / params.crop_height
    out[..., 0] = (uv[..., 0] + 0.5) * sx - 0.5 - (params.x_center - size // 2)
    out[..., 1] = (uv[..., 1] - params.y_top + 0.5) * sy - 0.5
    return out


def read_pose_txt(path: str | Path) -> np.ndarray:
    """Reads one Gait3D pose file.

    Returns:
        float32 (17, 3): x, y (pixels of the person crop), score.
    """
    path = Path(path)
    try:
        values = [float(v) for v in path.read_text().replace("\n", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise GaitDataError(f"{path}: not a comma separated list of numbers ({exc})") from exc
    expected = 2 + NUM_JOINTS * 3
    if len(values) != expected:
        raise GaitDataError(f"{path}: expected {expected} numbers (2 + 17 x (x, y, score)), "
                            f"found {len(values)}")
    return np.asarray(values[2:], dtype=np.float32).reshape(NUM_JOINTS, 3)


def pretreat_sequence(pngs: list[Path], txts: dict[int, Path]) -> tuple[np.ndarray, np.ndarray,
                                                                         dict[str, int]]:
    """Turns one raw sequence into silhouettes and joints of equal length.

    Frames are ordered by frame number; silhouette frames OpenGait drops are dropped; each kept
    frame takes the pose file with the same frame number. A kept frame without a pose file takes
    the nearest frame's joints with score 0 (counted in the report), never NaN.

    Args:
        pngs: the sequence's silhouette PNGs.
        txts: frame number -> pose txt.

    Returns:
        sils uint8 (T, 64, 64), poses float32 (T, 17, 3) in the silhouette frame, and counts
        {"frames", "dropped", "missing_pose"}.
    """
    sils, poses, have = [], [], []
    dropped = 0
    for png in sorted(pngs, key=frame_number):
        img = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise GaitDataError(f"{png}: cannot be read as an image")
        result = crop_silhouette(img)
        if result is None:
            dropped += 1
            continue
        sil, params = result
        sils.append(sil)
        txt = txts.get(frame_number(png))
        if txt is None:
            poses.append(np.zeros((NUM_JOINTS, 3), np.float32))
            have.append(False)
            continue
        raw = read_pose_txt(txt)
        pose = np.concatenate([map_joints(raw[:, :2], params), raw[:, 2:]], axis=1)
        poses.append(pose)
        have.append(True)
    report = {"frames": len(sils), "dropped": dropped, "missing_pose": have.count(False)}
    if not sils:
        return np.zeros((0, IMG_SIZE, IMG_SIZE), np.uint8), np.zeros((0, NUM_JOINTS, 3)), report
    poses_arr = np.stack(poses).astype(np.float32)
    have_arr = np.asarray(have)
    if have_arr.any() and not have_arr.all():
        src = np.nonzero(have_arr)[0]
        for t in np.nonzero(~have_arr)[0]:
            nearest = src[np.abs(src - t).argmin()]
            poses_arr[t, :, :2] = poses_arr[nearest, :, :2]
            poses_arr[t, :, 2] = 0.0
    return np.stack(sils), poses_arr, report
