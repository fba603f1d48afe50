"""``synthetic`` faces: a deterministic, CPU-fast face generator with ground-truth landmarks.

kpt's embedded default face data (always reported as *synthetic*). Every identity is a set of
parameters that are a pure function of (seed, identity) (see :mod:`.synthetic_params`): face
outline (ellipse size and a narrowing jaw), eye spacing / height / size / iris colour, eyebrows, nose length and width, mouth
width / height / lips, skin tone and a skin texture (sinusoids and moles), hair colour / style /
hairline, ears, and sometimes a beard or glasses. Every image of an identity adds, keyed by
(seed, identity, sample): expression (smile, open mouth, eye openness, brow raise, gaze), head pose
(yaw / pitch shifts of the inner features), lighting (ambient, direction, colour temperature),
background, pixel noise and the in-plane placement:

* ``aligned``: the face sits on the ArcFace template up to a small jitter (like aligned
  112×112 training crops);
* ``unaligned``: a random similarity plus mild shear/anisotropy around the face box (scale
  0.55–1.15, rotation ±35°, shifts of a quarter image), like raw versus aligned CFP-FP.

For speed, the large smooth layers (background, hair, head, texture, lighting, noise) are rendered
at half resolution and upsampled; the small features (eyes, brows, nose, mouth, moles, glasses)
are drawn at full resolution inside per-image windows around them.

Shapes are evaluated analytically on the grid of canonical coordinates seen by each output pixel
(output pixel p shows canonical point A⁻¹p), all images of a batch at once in torch, so the
landmarks are exact: they are the canonical feature points mapped by A. The canonical mean face
puts the five points on the ArcFace 112×112 template. Landmark order is the template's (subject's
right eye first, i.e. image-left in an upright face).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from ..align import ARCFACE_TEMPLATE_112
from .params import NOISE_BANK, NUM_WAVES, SPLITS, identity_params, image_params

__all__ = ["SPLITS", "identity_params", "image_params", "landmarks_canonical", "render_faces"]

log = logging.getLogger(__name__)


def _noise_bank(size: int, seed: int) -> torch.Tensor:
    """(NOISE_BANK, 3, size, size) standard normal noise, generated once per (size, seed)."""
    key = (size, seed)
    if key not in _NOISE_CACHE:
        g = torch.Generator().manual_seed(seed * 1_000_003 + size)
        _NOISE_CACHE[key] = torch.randn(NOISE_BANK, 3, size, size, generator=g)
    return _NOISE_CACHE[key]


_NOISE_CACHE: dict[tuple[int, int], torch.Tensor] = {}


def _to_torch(p: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in p.items()}


def _col(t: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, 1) for broadcasting over the pixel grid."""
    return t.view(-1, 1, 1)


def _ellipse(x, y, cx, cy, rx, ry, soft, angle=None):
    """Soft mask of a filled ellipse at canonical coordinates ``x``, ``y`` (B, h, w).

    The edge ramp uses 1 − d² (no square root), about ``soft`` canonical px wide.
    """
    dx, dy = x - cx, y - cy
    if angle is not None:
        c, s = torch.cos(angle), torch.sin(angle)
        dx, dy = c * dx + s * dy, c * dy - s * dx
    d2 = (dx / rx).square_() + (dy / ry).square_()
    return d2.neg_().add_(1).mul_(torch.minimum(rx, ry) / (2 * soft)).add_(0.5).clamp_(0, 1)


def _paint(img, mask, colour):
    """Blend ``colour`` (B, 3) or (B, 3, h, w) into img (B, 3, h, w) in place where mask (B, h, w)
    is set."""
    if colour.ndim == 2:
        colour = colour[:, :, None, None]
    return img.lerp_(colour.expand_as(img), mask.unsqueeze(1))


class _Canvas:
    """Output-pixel grid of a batch and its canonical coordinates.

    Small features are drawn in per-image windows around them (only those pixels are evaluated):
    the window's canonical coordinates are affine in its pixel indices, and the window is read
    with ``gather`` and written back with ``scatter``.
    """

    def __init__(self, matrix: torch.Tensor, size: int) -> None:
        self.size = size
        self.m = matrix * (size / 112.0)  # canonical 112 frame → output pixels, (B, 2, 3)
        self.inv = torch.linalg.inv(self.m[:, :, :2])
        self.t_inv = -(self.inv @ self.m[:, :, 2:])[..., 0]  # (B, 2)
        self.scale = torch.sqrt(torch.linalg.det(self.m[:, :, :2]).abs())  # output px / canon px

    def coords(self, px: torch.Tensor, py: torch.Tensor):
        """Canonical (x, y) of output pixels with columns px (B, 1, w) and rows py (B, h, 1)."""
        inv, t = self.inv, self.t_inv
        x = _col(inv[:, 0, 0]) * px + _col(inv[:, 0, 1]) * py + _col(t[:, 0])
        y = _col(inv[:, 1, 0]) * px + _col(inv[:, 1, 1]) * py + _col(t[:, 1])
        return x, y

    def full(self, stride: int = 1):
        """Pixel coordinate vectors and canonical coordinates of the whole image.

        With ``stride`` 2 the grid has size/2 pixels per side placed where bilinear
        upsampling (``align_corners=False``) puts them: full-resolution coordinate 2i + 0.5.
        """
        b = self.m.shape[0]
        g = torch.arange(self.size // stride, dtype=torch.float32, device=self.m.device)
        g = g * stride + (stride - 1) / 2
        px, py = g.view(1, 1, -1).expand(b, 1, -1), g.view(1, -1, 1).expand(b, -1, 1)
        return px, py, *self.coords(px, py)

    def window(self, centre: torch.Tensor, radius: float):
        """A square window per image covering ``radius`` canonical px around ``centre`` (B, 2).

        Returns:
            flat pixel indices (B, 1, h·w), canonical x and y (B, h, w).
        """
        half = math.ceil(radius * float(self.scale.max())) + 2
        side = min(2 * half, self.size)
        out = (self.m[:, :, :2] @ centre.unsqueeze(-1))[..., 0] + self.m[:, :, 2]
        origin = (out.round() - side // 2).clamp(0, self.size - side)
        steps = torch.arange(side, dtype=torch.float32, device=self.m.device)
        px = origin[:, 0, None, None] + steps.view(1, 1, -1)
        py = origin[:, 1, None, None] + steps.view(1, -1, 1)
        flat = (py * self.size + px).long().view(len(centre), 1, -1)
        return flat, *self.coords(px, py)


def _gather(img: torch.Tensor, flat: torch.Tensor, side: int) -> torch.Tensor:
    b, c = img.shape[:2]
    return img.view(b, c, -1).gather(2, flat.expand(-1, c, -1)).view(b, c, side, side)


def _scatter(img: torch.Tensor, flat: torch.Tensor, patch: torch.Tensor) -> None:
    b, c = img.shape[:2]
    img.view(b, c, -1).scatter_(2, flat.expand(-1, c, -1), patch.reshape(b, c, -1))


def landmarks_canonical(ids: dict[str, torch.Tensor], ims: dict[str, torch.Tensor]):
    """The five feature points (B, 5, 2) in the canonical frame, after pose and expression."""
    yaw, pitch = ims["yaw"], ims["pitch"]
    half_eye = ids["eye_dist"] / 2 * (1 - 0.15 * yaw.abs())
    eye_y = ids["eye_y"] + 3 * pitch
    eye_x = 56 + 7 * yaw
    nose = torch.stack([56 + 12 * yaw, ids["nose_y"] + 6 * pitch], -1)
    mouth_half = ids["mouth_w"] / 2 * (1 - 0.15 * yaw.abs()) + 1.5 * ims["smile"]
    mouth_y = ids["mouth_y"] + 2 * pitch - 2.5 * ims["smile"]
    mouth_x = 56 + 8 * yaw
    return torch.stack(
        [
            torch.stack([eye_x - half_eye, eye_y], -1),
            torch.stack([eye_x + half_eye, eye_y], -1),
            nose,
            torch.stack([mouth_x - mouth_half, mouth_y], -1),
            torch.stack([mouth_x + mouth_half, mouth_y], -1),
        ],
        1,
    )


def render_faces(
    identities: Sequence[int],
    samples: Sequence[int],
    seed: int = 0,
    split: str = "aligned",
    size: int = 112,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render one image per (identity, sample) pair.

    Args:
        identities, samples: equal-length integer sequences; the image of (identity, sample) is
            the same whatever else is in the batch.
        seed: data-set seed.
        split: one of :data:`SPLITS` (``"aligned"``, ``"unaligned"`` or a one-factor diagnostic split).
        size: output side in pixels (the canonical frame is 112 px and is scaled to it).

    Returns:
        images (B, 3, size, size) uint8 RGB and keypoints (B, 5, 2) float32 normalised to [0, 1]
        by ``size`` (x, y), template order.
    """
    if len(identities) != len(samples):
        raise ValueError("render_faces: identities and samples must have the same length")
    ids = _to_torch(identity_params(identities, seed), device)
    ims = _to_torch(image_params(identities, samples, seed, split), device)
    canvas = _Canvas(ims["matrix"], size)
    soft = _col(ims["soft"] / canvas.scale)  # edge width in canonical px (≈ soft output px)
    lm = landmarks_canonical(ids, ims)
    g = {k: _col(v) for k, v in {**ids, **ims}.items() if v.ndim == 1}
    g["soft"] = soft

    # Smooth, large layers at half resolution, lit and noised there, then upsampled; small
    # features at full resolution in windows, their colours lit at the window centre (the
    # lighting is an affine ramp, nearly constant over a feature).
    stride = 2 if size % 2 == 0 else 1
    cos_l, sin_l = torch.cos(ims["light_dir"]), torch.sin(ims["light_dir"])
    to_255 = 255 * ims["gain"]  # (B, 3) colour temperature and 8-bit scale

    def shade(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
        """Lighting factor at output coordinates px, py (broadcastable with (B, 1, 1))."""
        ramp = _col(cos_l) * (2 * px / size - 1) + _col(sin_l) * (2 * py / size - 1)
        return g["ambient"] + g["light"] * ramp

    def lit(colour: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        """(B, 3) colour → 0–255 lit colour at canonical points (B, 2)."""
        out = (canvas.m[:, :, :2] @ centre.unsqueeze(-1))[..., 0] + canvas.m[:, :, 2]
        return colour * to_255 * shade(_col(out[:, 0]), _col(out[:, 1])).view(-1, 1)

    px, py, x, y = canvas.full(stride)
    g["soft"] = soft * stride
    img = _head(_background(px, py, ims, size), x, y, lm, ids, g)
    img.mul_(shade(px, py).unsqueeze(1) * to_255[:, :, None, None])
    noise = _noise_bank(size // stride, seed).to(device)[ims["noise_index"]]
    img = torch.addcmul(img, noise, 255 * ims["noise"][:, None, None, None])
    if stride > 1:
        # channels-last makes torch's CPU bilinear kernel several times faster
        img = torch.nn.functional.interpolate(
            img.contiguous(memory_format=torch.channels_last),
            scale_factor=stride,
            mode="bilinear",
        ).contiguous()
    g["soft"] = soft
    img = _features(img, canvas, lm, ids, ims, g, lit)
    images = img.add_(0.5).clamp_(0, 255).to(torch.uint8)
    keypoints = (lm @ ims["matrix"][:, :, :2].transpose(1, 2) + ims["matrix"][:, None, :, 2]) / 112
    return images, keypoints.float()


def _background(px, py, ims, size):
    """Plain colour with a linear ramp: (B, 3, S, S)."""
    c, s = torch.cos(ims["bg_dir"]), torch.sin(ims["bg_dir"])
    ramp = (_col(c) * px + _col(s) * py) / size - 0.5
    ramp = 1 + _col(ims["bg_grad"]) * ramp
    return ims["bg"][:, :, None, None] * ramp.unsqueeze(1)


def _head(img, x, y, lm, ids, g):
    """Hair behind the head, neck, ears, textured face, fringe and beard on the full grid."""
    soft = g["soft"]
    face_cx = 56 + 3 * g["yaw"]
    hair = _ellipse(
        x,
        y,
        face_cx,
        g["face_cy"] - 3,
        g["face_rx"] + g["hair_vol"],
        g["face_ry"] + g["hair_vol"],
        soft,
    )
    hair.mul_(((g["face_cy"] + g["hair_long"] - y) / soft).clamp_(0, 1))
    img = _paint(img, hair, ids["hair"])
    neck = ((g["face_rx"] * 0.55 - (x - face_cx).abs()) / soft).clamp_(0, 1)
    neck.mul_(((y - g["face_cy"]) / soft).clamp_(0, 1))
    img = _paint(img, neck, ids["skin"] * 0.8)
    for side in (-1, 1):
        ear = _ellipse(
            x,
            y,
            face_cx + side * (g["face_rx"] - 1 - 4 * side * g["yaw"]),
            g["eye_y"] + 8,
            torch.full_like(g["yaw"], 5.0),
            g["ear_ry"],
            soft,
        )
        img = _paint(img, ear, ids["skin"] * 0.88)
    # the jaw narrows the lower half: rx shrinks with the squared depth below the centre
    below = ((y - g["face_cy"]) / g["face_ry"]).clamp_(min=0).square_()
    rx = g["face_rx"] * (1 - (g["jaw"] - 1.7) * 0.35 * below)
    face = _ellipse(x, y, face_cx, g["face_cy"], rx, g["face_ry"], soft)
    skin = ids["skin"][:, :, None, None] * (1 + _texture(x, y, ids, g)).unsqueeze(1)
    img = _paint(img, face, skin)
    wave = g["hair_wave"] * torch.sin(g["hair_freq"] * x)
    fringe = face * ((g["hairline"] + wave - y) / soft).clamp_(0, 1)
    img = _paint(img, fringe, ids["hair"])
    beard = face * g["beard"] * ((y - (_col(lm[:, 3, 1]) - 4)) / (3 * soft)).clamp_(0, 1)
    return _paint(img, beard, ids["hair"] * 0.9)


def _texture(x, y, ids, g):
    """Identity skin texture (B, S, S): a few oriented sinusoids."""
    tex = torch.zeros_like(x)
    for k in range(NUM_WAVES):
        f, a, ph = ids["tex_freq"][:, k], ids["tex_dir"][:, k], ids["tex_phase"][:, k]
        tex.add_(torch.sin(_col(f * torch.cos(a)) * x + _col(f * torch.sin(a)) * y + _col(ph)))
    return tex.mul_(g["tex_amp"] / math.sqrt(NUM_WAVES))


def _features(img, canvas, lm, ids, ims, g, lit):
    """Moles, eyebrows, eyes, glasses, nose and mouth, each drawn in a window around it.

    ``img`` is (B, 3, S, S) in 0–255; ``lit(colour, centre)`` gives a feature's 0–255 colour.
    """
    soft = g["soft"]
    ones = torch.ones_like(g["yaw"])
    grey = torch.ones_like(ids["skin"])
    for k in range(ids["moles"].shape[1]):
        centre = torch.stack([56 + ids["moles"][:, k, 0], ids["moles"][:, k, 1]], -1)
        flat, x, y = canvas.window(centre, 3.0)
        patch = _gather(img, flat, x.shape[-1])
        r = _col(ids["moles"][:, k, 2]).clamp(min=1e-3)
        mole = _ellipse(x, y, _col(centre[:, 0]), _col(centre[:, 1]), r, r, soft)
        mole = mole * (0.6 * (r > 1e-2))
        _scatter(img, flat, _paint(patch, mole, lit(ids["skin"] * 0.4, centre)))
    for side, k in ((-1, 0), (1, 1)):
        ex, ey = _col(lm[:, k, 0]), _col(lm[:, k, 1])
        centre = lm[:, k] - torch.stack(
            [torch.zeros_like(g["yaw"][:, 0, 0]), ids["brow_dy"] + ims["brow_up"]], -1
        )
        flat, x, y = canvas.window(centre, 12.0)
        patch = _gather(img, flat, x.shape[-1])
        brow = _ellipse(
            x,
            y,
            _col(centre[:, 0]),
            _col(centre[:, 1]),
            g["brow_rx"],
            g["brow_ry"],
            soft,
            angle=-side * g["brow_tilt"],
        )
        _scatter(img, flat, _paint(patch, brow, lit(ids["hair"] * 0.6, centre)))
        flat, x, y = canvas.window(lm[:, k], 11.5)
        patch = _gather(img, flat, x.shape[-1])
        sclera = _ellipse(x, y, ex, ey, g["eye_rx"], g["eye_ry"] * g["eye_open"] + 0.3, soft)
        patch = _paint(patch, sclera, lit(grey * 0.93, lm[:, k]))
        ix, iy = ex + g["gaze_x"], ey + g["gaze_y"]
        iris = _ellipse(x, y, ix, iy, g["iris_r"], g["iris_r"], soft).mul_(sclera)
        patch = _paint(patch, iris, lit(ids["iris"], lm[:, k]))
        pupil = _ellipse(x, y, ix, iy, g["iris_r"] * 0.45, g["iris_r"] * 0.45, soft).mul_(sclera)
        patch = _paint(patch, pupil, lit(grey * 0.05, lm[:, k]))
        rim = _ellipse(x, y, ex, ey, g["eye_rx"] + 3.5, g["eye_rx"] + 2.5, soft)
        rim -= _ellipse(x, y, ex, ey, g["eye_rx"] + 2.2, g["eye_rx"] + 1.2, soft)
        rim = rim.clamp_(0, 1).mul_(g["glasses"] * g["glasses_on"])
        _scatter(img, flat, _paint(patch, rim, lit(grey * 0.1, lm[:, k])))
    nx, ny = _col(lm[:, 2, 0]), _col(lm[:, 2, 1])
    flat, x, y = canvas.window(lm[:, 2] - torch.tensor([0.0, 7.0], device=lm.device), 13.0)
    patch = _gather(img, flat, x.shape[-1])
    bridge = _ellipse(x, y, nx - 2 - g["yaw"] * 4, ny - 9, 1.6 * ones, 9 * ones, soft)
    patch = _paint(patch, bridge.mul_(0.35), lit(ids["skin"] * 0.7, lm[:, 2]))
    for side in (-1, 1):
        nostril = _ellipse(
            x, y, nx + side * g["nose_w"] * 0.3, ny + 1.5, 1.8 * ones, 1.1 * ones, soft
        )
        patch = _paint(patch, nostril.mul_(0.8), lit(ids["skin"] * 0.45, lm[:, 2]))
    tip = _ellipse(x, y, nx, ny - 1.5, g["nose_w"] * 0.35, 2.5 * ones, soft)
    patch = _paint(patch, tip.mul_(0.3), lit(torch.clamp(ids["skin"] * 1.12, 0, 1), lm[:, 2]))
    _scatter(img, flat, patch)
    # mouth: lips bent upwards at the corners by the smile; an open mouth shows a dark inside
    mx = (lm[:, 3, 0] + lm[:, 4, 0]) / 2
    half = (lm[:, 4, 0] - lm[:, 3, 0]) / 2
    my = lm[:, 3, 1] + 2.5 * ims["smile"]  # mouth centre line before the corners were lifted
    centre = torch.stack([mx, my], -1)
    flat, x, y = canvas.window(centre, 22.0)
    patch = _gather(img, flat, x.shape[-1])
    u = (x - _col(mx)) / _col(half)
    yb = y + _col(2.5 * ims["smile"]) * u.square_()  # corners (|u| = 1) rise by 2.5·smile
    lips = _ellipse(x, yb, _col(mx), _col(my), _col(half), g["lip_h"] + 2 * g["open"], soft)
    patch = _paint(patch, lips, lit(ids["lips"], centre))
    inner = _ellipse(x, yb, _col(mx), _col(my), _col(half) * 0.8, 0.4 + 3 * g["open"], soft)
    _scatter(img, flat, _paint(patch, inner, lit(grey * 0.12, centre)))
    return img


def template_is_mean_face(n: int = 256, seed: int = 0) -> float:
    """Largest distance (px) between the mean canonical landmarks and the ArcFace template."""
    ids = _to_torch(identity_params(range(n), seed), "cpu")
    ims = _to_torch(image_params(range(n), [0] * n, seed), "cpu")
    mean = landmarks_canonical(ids, ims).mean(0).numpy()
    return float(np.abs(mean - ARCFACE_TEMPLATE_112).max())
