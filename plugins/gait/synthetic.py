"""Synthetic walkers: seeded identities rendered as silhouette sequences with their 17 joints.

Each identity is a stick-and-capsule body with its own proportions (leg, torso, arm lengths,
shoulder and hip width, limb and torso thickness, head size), gait (cadence, stride and arm
swing amplitudes, knee flexion, torso lean, vertical bob). A sequence renders one identity
walking at a view angle (rotation about the vertical axis, orthographic camera) and a speed,
from a random phase. Frames are drawn as raw "person crops" with the joints in raw pixels (like
Gait3D's PNG + pose txt), then go through the same OpenGait pretreatment and joint map as the
real data (:mod:`kpt_plugins.gait.poses`), and are written in the same layout with a split json.
Joint positions get a little Gaussian noise, as a pose estimator would give.

Everything is a function of ``seed``: the same arguments always give the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from kpt_plugins.gait.data import GaitSplit, write_array_pkl, write_split
from kpt_plugins.gait.poses import crop_silhouette, map_joints

logger = logging.getLogger(__name__)

RAW_H, RAW_W = 128, 96  # raw person-crop canvas
_SHIFT = 4  # cv2 sub-pixel bits
_LIMBS = ((5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16))


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. ``num_train + num_test`` identities, ``seqs_per_id`` sequences each."""

    num_train: int = 48
    num_test: int = 24
    seqs_per_id: int = 6
    frames: int = 40
    seed: int = 0
    joint_noise: float = 0.8  # raw-pixel std of the joint noise

    def digest(self) -> str:
        """Short hash naming the generated folder (changes when any field changes)."""
        text = json.dumps(asdict(self), sort_keys=True) + "walkers-v1"
        return hashlib.sha1(text.encode()).hexdigest()[:10]


def sample_identity(rng: np.random.Generator) -> dict[str, float]:
    """Body and gait parameters of one identity (lengths in units of a ~1.0 tall body)."""
    u = rng.uniform
    return {
        "thigh": u(0.22, 0.28), "shank": u(0.21, 0.27), "torso": u(0.27, 0.34),
        "neck": u(0.04, 0.07), "head_r": u(0.050, 0.068), "upper_arm": u(0.15, 0.19),
        "forearm": u(0.13, 0.17), "shoulder_w": u(0.17, 0.25), "hip_w": u(0.10, 0.16),
        "limb_r": u(0.020, 0.034), "leg_r": u(0.026, 0.045), "torso_depth": u(0.05, 0.085),
        "cadence": u(18.0, 30.0),  # frames per gait cycle
        "stride": u(0.30, 0.55),  # hip flexion amplitude (rad)
        "knee": u(0.35, 0.85),  # peak knee flexion (rad)
        "arm_swing": u(0.10, 0.60), "elbow": u(0.05, 0.5), "lean": u(-0.08, 0.18),
        "bob": u(0.005, 0.025), "head_fwd": u(0.0, 0.04),
    }


def body_joints(p: dict[str, float], phase: np.ndarray) -> np.ndarray:
    """3D COCO-17 joints of the identity over a walk (x forward, y up, z to the body's right).

    Args:
        p: identity parameters (:func:`sample_identity`).
        phase: (T,) gait phase in radians.

    Returns:
        (T, 17, 3) joints.
    """
    t_len = len(phase)
    joints = np.zeros((t_len, 17, 3))
    hip_y = p["thigh"] + p["shank"] + 0.03 + p["bob"] * np.cos(2 * phase)
    for side, sign, offset in (("L", -1.0, 0.0), ("R", 1.0, np.pi)):
        ph = phase + offset
        hip = np.stack([np.zeros(t_len), hip_y, np.full(t_len, sign * p["hip_w"] / 2)], -1)
        flex = p["stride"] * np.sin(ph)
        knee_flex = p["knee"] * np.clip(np.sin(ph - 0.6 * np.pi), 0, None) + 0.05
        knee = hip + p["thigh"] * np.stack([np.sin(flex), -np.cos(flex), 0 * flex], -1)
        shin = flex - knee_flex
        ankle = knee + p["shank"] * np.stack([np.sin(shin), -np.cos(shin), 0 * shin], -1)
        lean = p["lean"]
        sh = hip + np.stack([np.full(t_len, p["torso"] * np.sin(lean)),
                             np.full(t_len, p["torso"] * np.cos(lean)),
                             np.full(t_len, sign * (p["shoulder_w"] - p["hip_w"]) / 2)], -1)
        swing = -p["arm_swing"] * np.sin(ph)
        elbow = sh + p["upper_arm"] * np.stack([np.sin(swing), -np.cos(swing), 0 * swing], -1)
        fore = swing + p["elbow"]
        wrist = elbow + p["forearm"] * np.stack([np.sin(fore), -np.cos(fore), 0 * fore], -1)
        i = 0 if side == "L" else 1
        joints[:, 11 + i], joints[:, 13 + i], joints[:, 15 + i] = hip, knee, ankle
        joints[:, 5 + i], joints[:, 7 + i], joints[:, 9 + i] = sh, elbow, wrist
    neck = (joints[:, 5] + joints[:, 6]) / 2
    head = neck + np.array([p["head_fwd"], p["neck"] + p["head_r"], 0.0])
    r = p["head_r"]
    joints[:, 0] = head + [r * 0.9, -0.1 * r, 0]
    joints[:, 1], joints[:, 2] = head + [0.7 * r, 0.2 * r, -0.35 * r], head + [0.7 * r, 0.2 * r, 0.35 * r]
    joints[:, 3], joints[:, 4] = head + [0, 0.1 * r, -0.9 * r], head + [0, 0.1 * r, 0.9 * r]
    return joints


def _capsule(img: np.ndarray, a: np.ndarray, b: np.ndarray, r: float) -> None:
    """Fills the capsule of radius r (pixels) between points a and b (sub-pixel exact)."""
    scale = 1 << _SHIFT
    d = b - a
    n = np.array([-d[1], d[0]]) / max(np.hypot(*d), 1e-6) * r
    quad = np.array([a + n, b + n, b - n, a - n]) * scale
    cv2.fillConvexPoly(img, np.round(quad).astype(np.int32), 255, cv2.LINE_8, _SHIFT)
    for c in (a, b):
        centre = tuple(int(v) for v in np.round(c * scale))
        cv2.circle(img, centre, round(r * scale), 255, -1, cv2.LINE_8, _SHIFT)


def render_sequence(p: dict[str, float], view: float, speed: float, phase0: float, frames: int,
                    scale: float, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renders raw person-crop frames.

    Args:
        p: identity; view: yaw in radians (0 = side view walking right); speed: cadence factor;
        phase0: starting phase; frames: T; scale: pixels per body unit; offset: (2,) raw-pixel
        position of the body origin.

    Returns:
        uint8 (T, RAW_H, RAW_W) silhouettes and float (T, 17, 2) raw-pixel joints (x, y).
    """
    phase = phase0 + 2 * np.pi * speed * np.arange(frames) / p["cadence"]
    joints3d = body_joints(p, phase)
    c, s = np.cos(view), np.sin(view)
    xy = np.stack([joints3d[..., 0] * c + joints3d[..., 2] * s, -joints3d[..., 1]], -1)
    xy = xy * scale + offset
    # projected torso half width: the torso is an elliptic cylinder seen from angle `view`
    torso_r = np.hypot(p["torso_depth"] * c, p["shoulder_w"] / 2 * s) * scale
    sils = np.zeros((frames, RAW_H, RAW_W), np.uint8)
    for t in range(frames):
        img, j = sils[t], xy[t]
        mid_sh, mid_hip = (j[5] + j[6]) / 2, (j[11] + j[12]) / 2
        _capsule(img, mid_sh, mid_hip, torso_r)
        _capsule(img, j[11], j[12], p["leg_r"] * scale)
        for a, b in _LIMBS:
            radius = p["leg_r"] if a >= 11 else p["limb_r"]
            _capsule(img, j[a], j[b], radius * scale)
        head = (j[3] + j[4]) / 2
        _capsule(img, head, head, p["head_r"] * scale)
        _capsule(img, mid_sh, head, p["limb_r"] * scale)
        foot = np.array([c, 0.0]) * 0.05 * scale  # feet point forward
        for ankle in (j[15], j[16]):
            _capsule(img, ankle, ankle + foot, p["leg_r"] * scale * 0.8)
    return sils, xy


def generate(root: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Writes the synthetic walkers under ``root`` in the OpenGait layout + ``Gait3D.json``.

    Ids ``0000..`` are training ids, the rest test ids; the probe set holds each test id's first
    sequence. Types are ``camid<k>_videoid0``, views ``seq0``; the yaw differs per sequence.

    Returns:
        ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(spec.seed)
    ids = [f"{i:04d}" for i in range(spec.num_train + spec.num_test)]
    probes = set()
    for n, sid in enumerate(ids):
        ident = sample_identity(rng)
        for k in range(spec.seqs_per_id):
            view = rng.uniform(0, np.pi)
            speed = rng.uniform(0.85, 1.15)
            scale = rng.uniform(92, 108)
            offset = np.array([RAW_W / 2 + rng.uniform(-6, 6), RAW_H - 8 + rng.uniform(-3, 3)])
            raw, uv = render_sequence(ident, view, speed, rng.uniform(0, 2 * np.pi), spec.frames,
                                      scale, offset)
            uv = uv + rng.normal(0, spec.joint_noise, uv.shape)
            sils, poses = [], []
            for frame, joints in zip(raw, uv):
                result = crop_silhouette(frame)
                if result is None:
                    continue
                sil, params = result
                sils.append(sil)
                score = np.ones((17, 1), np.float32)
                poses.append(np.concatenate([map_joints(joints, params), score], 1))
            typ, view_name = f"camid{k}_videoid0", "seq0"
            folder = root / sid / typ / view_name
            write_array_pkl(folder / f"{view_name}.pkl", np.stack(sils))
            write_array_pkl(folder / f"{view_name}-pose.pkl", np.stack(poses).astype(np.float32))
            if n >= spec.num_train and k == 0:
                probes.add(f"{sid}-{typ}-{view_name}")
    write_split(root / "Gait3D.json",
                GaitSplit(ids[: spec.num_train], ids[spec.num_train:], probes))
    (root / "SPEC.json").write_text(json.dumps(asdict(spec), indent=1))
    logger.info("wrote %d synthetic walkers (%d sequences) to %s", len(ids),
                len(ids) * spec.seqs_per_id, root)
    return root


def ensure_synthetic(cache_dir: str | Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Returns the folder of ``spec``'s walkers under ``cache_dir``, generating it once.

    Safe when several processes (DDP ranks) ask at once: each writes its own temporary folder and
    the first to finish publishes it with an atomic rename; the others discard theirs.
    """
    import os
    import shutil

    root = Path(cache_dir) / f"gait-synthetic-{spec.digest()}"
    if (root / "SPEC.json").is_file():
        return root
    tmp = root.with_name(f"{root.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    generate(tmp, spec)
    try:
        tmp.rename(root)
    except OSError:  # another process published the same walkers first
        if not (root / "SPEC.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return root
