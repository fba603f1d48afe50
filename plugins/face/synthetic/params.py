"""Random parameters of the synthetic faces: identity appearance and per-image variation.

Every value is a pure function of integer keys, (seed, identity) for an identity and
(seed, identity, sample) for an image, through a counter-based hash (splitmix64): no generator
state, no dependence on what else is in a batch, and cheap enough to draw per image (creating a
``numpy.random.Generator`` per image cost more than rendering it).

Geometry is in the canonical 112×112 frame, whose mean face puts the five landmarks on the ArcFace
template; colours are RGB in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["NOISE_BANK", "NUM_MOLES", "NUM_WAVES", "SPLITS", "identity_params", "image_params"]

_ID_STREAM, _IMG_STREAM = 11, 23  # separate random streams for identities and images

_SKIN = np.array(
    [
        [0.98, 0.84, 0.74],
        [0.90, 0.70, 0.56],
        [0.76, 0.55, 0.40],
        [0.55, 0.38, 0.26],
        [0.36, 0.24, 0.16],
    ],
    np.float32,
)
_HAIR = np.array(
    [
        [0.08, 0.07, 0.06],
        [0.30, 0.19, 0.10],
        [0.55, 0.38, 0.20],
        [0.85, 0.70, 0.42],
        [0.60, 0.25, 0.10],
        [0.70, 0.70, 0.70],
    ],
    np.float32,
)
_IRIS = np.array(
    [[0.30, 0.18, 0.08], [0.20, 0.35, 0.60], [0.25, 0.45, 0.30], [0.45, 0.45, 0.45]], np.float32
)
NUM_WAVES = 6
NUM_MOLES = 3
NOISE_BANK = 64

# Identity parameters: uniform (low, high), canonical 112-px frame unless stated.
_ID_RANGES = {
    "face_cy": (64, 72),
    "face_rx": (33, 41),
    "face_ry": (44, 53),
    "jaw": (1.7, 2.6),
    "eye_dist": (31, 41),
    "eye_y": (48, 55),
    "eye_rx": (4.5, 7.5),
    "eye_ry": (2.2, 3.6),
    "iris_r": (1.9, 3.2),
    "brow_dy": (7, 12),
    "brow_rx": (6.5, 10),
    "brow_ry": (1.2, 3.0),
    "brow_tilt": (-0.25, 0.25),
    "nose_y": (68, 76),
    "nose_w": (7, 14),
    "mouth_y": (89.5, 97.5),
    "mouth_w": (22, 35),
    "lip_h": (1.8, 4.5),
    "hair_vol": (2, 10),
    "hairline": (22, 38),
    "hair_long": (10, 40),
    "hair_wave": (0, 4),
    "hair_freq": (0.1, 0.4),
    "ear_ry": (7, 11),
    "beard": (0.5, 0.9),
    "glasses": (1, 1),
    "tex_amp": (0.02, 0.07),
}
# probability that an optional feature is present (else its value is 0)
_ID_PRESENT = {"hair_long": 0.4, "beard": 0.2, "glasses": 0.15}
# Image parameters (expression, pose, lighting, rendering).
_IMG_RANGES = {
    "smile": (-0.3, 1.0),
    "open": (-0.6, 1.0),
    "eye_open": (0.45, 1.3),
    "brow_up": (-1.5, 3.0),
    "gaze_x": (-1.2, 1.2),
    "gaze_y": (-0.6, 0.6),
    "yaw": (-0.35, 0.35),
    "pitch": (-0.2, 0.2),
    "ambient": (0.55, 1.05),
    "light": (0.0, 0.45),
    "light_dir": (0, 2 * np.pi),
    "noise": (0.0, 0.035),
    "soft": (0.6, 1.6),
    "glasses_on": (1, 1),
    "bg_grad": (-0.4, 0.4),
    "bg_dir": (0, 2 * np.pi),
}
_IMG_PRESENT = {"glasses_on": 0.85}
# placement (scale, angle, shift x, shift y, shear, anisotropy) per split
_PLACEMENT = {
    "aligned": ((0.97, 1.03), (-0.05, 0.05), (-2.0, 2.0), (-2.0, 2.0), (0, 0), (0, 0)),
    "unaligned": ((0.55, 1.15), (-0.6, 0.6), (-28, 28), (-28, 28), (-0.1, 0.1), (-0.08, 0.08)),
}
# Diagnostic splits: one factor of the unaligned placement at its full range, the others as
# aligned, to see which misalignment an encoding copes with. They reuse the unaligned split's
# random draws, so e.g. image k of ``unaligned_shift`` has image k of ``unaligned``'s shift.
_PLACEMENT.update({
    f"unaligned_{name}": tuple(_PLACEMENT["unaligned" if i in factor else "aligned"][i]
                               for i in range(6))
    for name, factor in (("shift", (2, 3)), ("rotate", (1,)), ("scale", (0,)))
})
# Keypoint-only splits: the face stays centred (no shift, shear or anisotropy; rotation and
# scale are about the face centre), so a translation-invariant model cannot undo the misalignment
# and only the keypoints say where the face's parts are. Rotation and scale lie beyond the
# training range (aligned split + augmentation: scale 0.8-1.2, rotation within ±20°), drawn as
# bands |ln scale| in (lo, hi) and |angle| in (lo, hi) radians with a random sign. ``_interp``
# is the paper's Fig. 5 path: every face is moved t ~ U(0, 1) of the way (in log-scale and angle)
# from the aligned placement to a strong similarity (scale 1.42 or 0.70, ±46°), so its
# misalignment is exactly what its keypoints measure.
_BANDS = {
    "unaligned_centred_rotate": ((0.0, 0.0), (0.45, 0.9)),
    "unaligned_centred_scale": ((0.25, 0.4), (0.0, 0.0)),
    "unaligned_centred_interp": ((0.35, 0.35), (0.8, 0.8)),
}
_PLACEMENT.update({name: ((1, 1), (0, 0), (0, 0), (0, 0), (0, 0), (0, 0)) for name in _BANDS})
SPLITS = tuple(_PLACEMENT)  # aligned, unaligned, unaligned_{shift,rotate,scale}, unaligned_centred_*
_FACE_CENTRE = np.array([56.0, 66.0])  # placement rotates and scales about this point


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (a counter-based hash, wraps modulo 2^64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniforms(keys: Sequence[Sequence[int]], n: int) -> np.ndarray:
    """(B, n) float64 uniforms in [0, 1), a pure function of each row's integer key.

    A counter-based hash instead of one ``np.random.Generator`` per image: creating generators
    cost more than rendering. Row b depends only on ``keys[b]``, never on the rest of the batch.
    """
    with np.errstate(over="ignore"):
        h = np.zeros(len(keys), np.uint64)
        for col in np.asarray(keys, dtype=np.int64).T:
            h = _mix(h ^ col.astype(np.uint64))
        bits = _mix(h[:, None] ^ _mix(np.arange(n, dtype=np.uint64))[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _draw(u: np.ndarray, ranges: dict, present: dict) -> dict[str, np.ndarray]:
    """Map uniforms (B, ≥ 2·len(ranges)) to named (B,) float32 parameters."""
    out = {}
    for j, (name, (lo, hi)) in enumerate(ranges.items()):
        v = lo + (hi - lo) * u[:, j]
        if name in present:
            v = v * (u[:, len(ranges) + j] < present[name])
        out[name] = v.astype(np.float32)
    return out


def _palette(t: np.ndarray, jitter: np.ndarray, palette: np.ndarray, amount: float) -> np.ndarray:
    """Colours (B, 3) between neighbouring palette entries at t ∈ [0, 1) plus a jitter."""
    t = t * (len(palette) - 1)
    i = np.minimum(t.astype(int), len(palette) - 2)
    f = (t - i)[:, None]
    c = palette[i] * (1 - f) + palette[i + 1] * f + (jitter - 0.5) * 2 * amount
    return np.clip(c, 0, 1).astype(np.float32)


def identity_params(identities: Sequence[int], seed: int = 0) -> dict[str, np.ndarray]:
    """The fixed appearance of identities: named float32 arrays with leading dimension B."""
    n_named = 2 * len(_ID_RANGES)
    u = _uniforms([(seed, _ID_STREAM, int(i)) for i in identities], n_named + 64)
    p = _draw(u, _ID_RANGES, _ID_PRESENT)
    extra = u[:, n_named:]
    p["skin"] = _palette(extra[:, 0], extra[:, 1:4], _SKIN, 0.03)
    p["hair"] = _palette(extra[:, 4], extra[:, 5:8], _HAIR, 0.04)
    p["iris"] = _palette(extra[:, 8], extra[:, 9:12], _IRIS, 0.05)
    lips = p["skin"] * np.array([0.85, 0.55, 0.55]) + (extra[:, 12:15] - 0.5) * 0.1
    p["lips"] = np.clip(lips, 0, 1).astype(np.float32)
    w = NUM_WAVES
    p["tex_freq"] = (0.08 + 0.37 * extra[:, 15 : 15 + w]).astype(np.float32)
    p["tex_dir"] = (np.pi * extra[:, 15 + w : 15 + 2 * w]).astype(np.float32)
    p["tex_phase"] = (2 * np.pi * extra[:, 15 + 2 * w : 15 + 3 * w]).astype(np.float32)
    m = extra[:, 15 + 3 * w : 15 + 3 * w + 4 * NUM_MOLES].reshape(-1, NUM_MOLES, 4)
    p["moles"] = np.stack(  # x offset from the face centre, y, radius (0 = no mole)
        [-25 + 50 * m[..., 0], 55 + 50 * m[..., 1], (0.8 + m[..., 2]) * (m[..., 3] < 0.5)], -1
    ).astype(np.float32)
    return p


def image_params(
    identities: Sequence[int], samples: Sequence[int], seed: int = 0, split: str = "aligned"
) -> dict[str, np.ndarray]:
    """Per-image variation and the canonical → output placement matrices (B, 2, 3)."""
    if split not in SPLITS:
        raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")
    n_named = 2 * len(_IMG_RANGES)
    keys = [(seed, _IMG_STREAM, int(i), int(s)) for i, s in zip(identities, samples)]
    u = _uniforms(keys, n_named + 16)
    p = _draw(u, _IMG_RANGES, _IMG_PRESENT)
    p["open"] = np.maximum(p["open"], 0)  # closed more often than open
    p["eye_open"] = np.minimum(p["eye_open"], 1)  # sometimes half-closed, never wider
    extra = u[:, n_named:]
    p["gain"] = (1 + (extra[:, 0:3] - 0.5) * 0.2).astype(np.float32)
    p["bg"] = (0.05 + 0.9 * extra[:, 3:6]).astype(np.float32)
    ranges = np.array(_PLACEMENT[split])
    scale, angle, sx, sy, shear, aniso = (
        ranges[:, 0] + (ranges[:, 1] - ranges[:, 0]) * extra[:, 6:12]
    ).T
    if split in _BANDS:
        (ls_lo, ls_hi), (a_lo, a_hi) = _BANDS[split]
        sign = np.where(extra[:, 13:15] < 0.5, -1.0, 1.0)  # columns 13-15 are unused above
        t = extra[:, 15] if split.endswith("_interp") else 1.0
        scale = np.exp(sign[:, 0] * (ls_lo + (ls_hi - ls_lo) * extra[:, 6]) * t)
        angle = sign[:, 1] * (a_lo + (a_hi - a_lo) * extra[:, 7]) * t
    c, s = np.cos(angle), np.sin(angle)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2) * scale[:, None, None]
    affine = np.stack(
        [np.stack([1 + aniso, shear], -1), np.stack([np.zeros_like(s), 1 - aniso], -1)], -2
    )
    lin = rot @ affine
    t = _FACE_CENTRE + np.stack([sx, sy], -1) - lin @ _FACE_CENTRE
    p["matrix"] = np.concatenate([lin, t[:, :, None]], 2).astype(np.float32)
    p["noise_index"] = (extra[:, 12] * NOISE_BANK).astype(np.int64)
    return p
