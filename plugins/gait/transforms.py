"""OpenGait's silhouette transforms, applied to the 17 joints with the same geometry.

Train (OpenGait SwinGait/DeepGaitV2 configs; one random draw per *sequence*, applied to every
frame): RandomPerspective(p) -> BaseSil(Cutting)Transform -> RandomHorizontalFlip(p) ->
RandomRotate(p, +-10 deg). Test: the normalisation transform only.

KP-RPE reads joint coordinates, so every geometric op that moves silhouette pixels moves the
joints with the same matrix (reference gait.md 6.3): perspective and rotation through their
3x3 / 2x3 matrices, the flip as x -> W - 1 - x *and* a left/right swap of the COCO indices (the
keypoint linear layer is index specific). Joints are in pixel-centre coordinates of the image
(x = column index of the pixel whose centre they sit on), which is cv2's convention as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from kpt_plugins.gait.data import COCO_FLIP_INDEX, normalise_joints


def cutting_width(width: int) -> int:
    """OpenGait's ``BaseSilCuttingTransform`` margin: int(W // 64) * 10 (10 for 64-wide)."""
    return int(width // 64) * 10


def random_perspective(sils: np.ndarray, joints: np.ndarray, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray]:
    """OpenGait ``RandomPerspective`` body (the probability is drawn by the caller).

    The quad with top/bottom-left x in [0, c) and top/bottom-right x in [W - c, W), y = 0 / H,
    c = int(W // 44) * 10, is warped onto the whole canvas.

    Args:
        sils: (T, H, W) silhouettes (uint8 or float).
        joints: (T, K, 2) pixel (x, y).

    Returns:
        The warped silhouettes (same dtype/shape) and joints.
    """
    h, w = sils.shape[-2:]
    c = int(w // 44) * 10
    tl, bl = rng.integers(0, c, size=2)
    tr, br = rng.integers(w - c, w, size=2)
    src = np.float32([[tl, 0], [tr, 0], [br, h], [bl, h]])
    dst = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    matrix = cv2.getPerspectiveTransform(src, dst)
    out = np.stack([cv2.warpPerspective(frame, matrix, (w, h)) for frame in sils])
    moved = cv2.perspectiveTransform(joints.reshape(-1, 1, 2).astype(np.float64), matrix)
    return out, moved.reshape(joints.shape).astype(np.float32)


def horizontal_flip(sils: np.ndarray, joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirrors the W axis; joints x -> W - 1 - x and left/right COCO joints swapped."""
    w = sils.shape[-1]
    flipped = joints[:, list(COCO_FLIP_INDEX)].copy()
    flipped[..., 0] = (w - 1) - flipped[..., 0]
    return sils[..., ::-1].copy(), flipped


def random_rotate(sils: np.ndarray, joints: np.ndarray, degree: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """OpenGait ``RandomRotate`` body for a given angle.

    Kept quirk: OpenGait passes the centre as (x=H//2, y=W//2) -- (32, 22) on 64x44, not the image
    centre. We keep it so that augmented inputs match OpenGait's.
    """
    h, w = sils.shape[-2:]
    matrix = cv2.getRotationMatrix2D((h // 2, w // 2), float(degree), 1.0)
    out = np.stack([cv2.warpAffine(frame, matrix, (w, h)) for frame in sils])
    moved = joints @ matrix[:, :2].T.astype(np.float32) + matrix[:, 2].astype(np.float32)
    return out, moved.astype(np.float32)


@dataclass
class GaitTransform:
    """Sequence transform ``(sils, joints, rng) -> (image, keypoints)``.

    Args:
        train: apply the random augmentations.
        cut: drop int(W // 64) * 10 columns on both sides (64x64 -> 64x44,
            ``BaseSilCuttingTransform``); ``False`` keeps 64x64 (``BaseSilTransform``, what
            OpenGait's SwinGait Gait3D config uses).
        p_perspective, p_flip, p_rotate: probabilities (OpenGait configs: 0.2 each).
        degree: rotation range in degrees.
        downsample: integer factor of a final block-mean downsampling (1: none; 2 gives the
            32x22 frames of the CPU preset). Normalised joints are unchanged by it (the pixel-centre
            convention is scale invariant).

    Call:
        sils: uint8 (T, 64, 64) silhouettes; joints: (T, 17, 2) pixel (x, y) in that frame;
        rng: numpy generator for the random draws.

    Returns:
        image float32 (T, H, W) in [0, 1]; keypoints float32 (T, 17, 2) in [0, 1] for that image.
    """

    train: bool = False
    cut: bool = True
    p_perspective: float = 0.2
    p_flip: float = 0.2
    p_rotate: float = 0.2
    degree: float = 10.0
    downsample: int = 1

    def __call__(self, sils: np.ndarray, joints: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        if sils.ndim != 3 or joints.shape[:1] != sils.shape[:1] or joints.shape[-1] != 2:
            raise ValueError(f"expected sils (T,H,W) and joints (T,K,2), got {sils.shape} and "
                             f"{joints.shape}")
        joints = joints.astype(np.float32, copy=True)
        if self.train and rng.random() < self.p_perspective:
            sils, joints = random_perspective(sils, joints, rng)
        image = sils.astype(np.float32) / 255.0
        if self.cut:
            c = cutting_width(image.shape[-1])
            if c:
                image = image[..., c:-c]
                joints[..., 0] -= c
        if self.train and rng.random() < self.p_flip:
            image, joints = horizontal_flip(image, joints)
        if self.train and rng.random() < self.p_rotate:
            image, joints = random_rotate(image, joints, rng.uniform(-self.degree, self.degree))
        h, w = image.shape[-2:]
        keypoints = normalise_joints(joints, h, w)
        f = self.downsample
        if f > 1:
            t = image.shape[0]
            image = image[:, : h - h % f, : w - w % f].reshape(t, h // f, f, w // f, f).mean((2, 4))
        return np.ascontiguousarray(image, dtype=np.float32), keypoints
