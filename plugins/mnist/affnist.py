"""affNIST: the official ``.mat`` files, or ``affnist-synth`` generated from the MNIST test digits.

Official files (Tieleman, https://www.cs.toronto.edu/~tijmen/affNIST/): ``loadmat(f)["affNISTdata"]``
is a 1×1 struct; ``image`` is 1600×N uint8 with one column per image, so ``image.T.reshape(N, 40, 40)``
gives row-major digits in MNIST orientation; ``label_int`` is 1×N. Fields are read by name.

``affnist-synth`` follows the affNIST protocol on the 10,000 MNIST test digits, centred in 40×40 (the
"just centered" variant): per digit, rotation ±20°, horizontal shear ±0.2 and a scale of 0.8–1.2 per
axis about the image centre, then a random translation that keeps the transformed digit's tight box
inside the 40×40 frame. ``versions`` transformed copies per digit (32 gives the size of the real test
set). Everything is drawn from one seeded generator, so the set is identical on every machine. The
real ranges are not retrievable offline (reference mnist.md §1c); these are the commonly quoted ones.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from kpt_plugins.mnist.keypoints import tight_boxes
from torch import Tensor

from kpt.errors import DataError

logger = logging.getLogger(__name__)

SIZE = 40
PAD = 6  # 28 + 2·6 = 40: affNIST's "just centered" digits


class AffnistDataError(DataError, RuntimeError):
    """An affNIST ``.mat`` file is missing or malformed."""


# ---------------------------------------------------------------------------------------------
# official .mat files
# ---------------------------------------------------------------------------------------------
def read_affnist_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One affNIST ``.mat`` file → images (N, 40, 40) uint8 and labels (N,) uint8."""
    from scipy.io import loadmat  # scipy is heavy to import; only users with real files need it

    path = Path(path)
    try:
        mat = loadmat(str(path))
    except (OSError, ValueError, NotImplementedError) as exc:
        raise AffnistDataError(f"{path}: not a readable MATLAB file ({exc})") from exc
    if "affNISTdata" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise AffnistDataError(f"{path}: no 'affNISTdata' struct (variables: {keys})")
    struct = mat["affNISTdata"]
    names = struct.dtype.names or ()
    for field in ("image", "label_int"):
        if field not in names:
            raise AffnistDataError(f"{path}: affNISTdata has no field {field!r} (fields: {names})")
    image = np.asarray(struct["image"][0, 0])
    labels = np.asarray(struct["label_int"][0, 0]).reshape(-1)
    if image.ndim != 2 or image.shape[0] != SIZE * SIZE:
        raise AffnistDataError(f"{path}: affNISTdata.image has shape {image.shape}, expected "
                               f"(1600, N)")
    if image.shape[1] != labels.size:
        raise AffnistDataError(f"{path}: {image.shape[1]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise AffnistDataError(f"{path}: affNISTdata.label_int holds values outside 0..9")
    images = np.ascontiguousarray(image.T.reshape(-1, SIZE, SIZE)).astype(np.uint8)
    return images, labels.astype(np.uint8)


def find_affnist_files(location: str | Path) -> list[Path]:
    """The official test files under ``location``: a ``.mat`` file itself, ``test.mat``, or
    ``test_batches/{1..32}.mat`` (numeric order); empty when there are none."""
    location = Path(location).expanduser()
    if location.is_file() and location.suffix == ".mat":
        return [location]
    for folder in (location, location / "affnist", location / "affNIST"):
        if (folder / "test.mat").is_file():
            return [folder / "test.mat"]
        batches = folder / "test_batches"
        if batches.is_dir():
            files = [p for p in batches.glob("*.mat") if p.stem.isdigit()]
            if files:
                return sorted(files, key=lambda p: int(p.stem))
    return []


def load_affnist(files: list[Path], limit: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate official files (optionally only the first ``limit`` images)."""
    xs, ys, total = [], [], 0
    for path in files:
        x, y = read_affnist_mat(path)
        xs.append(x)
        ys.append(y)
        total += len(x)
        if limit and total >= limit:
            break
    x, y = np.concatenate(xs), np.concatenate(ys)
    return (x[:limit], y[:limit]) if limit else (x, y)


# ---------------------------------------------------------------------------------------------
# affnist-synth
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AffineRanges:
    """Ranges of the random affine transform (degrees, shear factor, per-axis scale)."""

    rotation: float = 20.0
    shear: float = 0.2
    scale: tuple[float, float] = (0.8, 1.2)
    translate: bool = True  # random translation keeping the digit's box inside the frame


#: The named test sets a run reports: the full protocol and its one-factor subsets.
SYNTH_VARIANTS: dict[str, AffineRanges] = {
    "affnist_synth": AffineRanges(),
    "translation": AffineRanges(rotation=0.0, shear=0.0, scale=(1.0, 1.0), translate=True),
    "rotation": AffineRanges(rotation=20.0, shear=0.0, scale=(1.0, 1.0), translate=False),
}


def center_pad(digits: np.ndarray | Tensor) -> Tensor:
    """(N, 28, 28) uint8 → (N, 40, 40) uint8 with a 6-pixel background border."""
    x = torch.as_tensor(digits)
    return F.pad(x, (PAD, PAD, PAD, PAD))


def _linear_parts(n: int, ranges: AffineRanges, gen: torch.Generator) -> Tensor:
    """(n, 2, 2) forward matrices R(θ)·Shear(s)·Scale(sx, sy) in (x, y) pixel coordinates."""
    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    theta = uniform(-ranges.rotation, ranges.rotation) * math.pi / 180
    shear = uniform(-ranges.shear, ranges.shear)
    sx, sy = uniform(*ranges.scale), uniform(*ranges.scale)
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    shr = torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)
    shr[:, 0, 1] = shear
    scl = torch.diag_embed(torch.stack([sx, sy], -1))
    return rot @ shr @ scl


def warp(images: Tensor, matrices: Tensor, shifts: Tensor) -> Tensor:
    """Apply ``p' = A (p − c) + c + t`` about the image centre c, bilinear.

    Args:
        images: (N, H, W) float.
        matrices: (N, 2, 2) forward linear parts A in (x, y) pixel units.
        shifts: (N, 2) translations t in pixels (x, y).

    Returns:
        (N, H, W) float, zeros outside the source.
    """
    n, h, w = images.shape
    inv = torch.linalg.inv(matrices)
    # affine_grid works in normalised coordinates (x, y ∈ [-1, 1]): the output→input map is
    # A⁻¹ (p' − t); anisotropic frames would need rescaling of A, ours are square.
    if h != w:
        raise ValueError(f"warp: square images expected, got {h}x{w}")
    t_norm = shifts * 2.0 / w
    theta = torch.cat([inv, -(inv @ t_norm.unsqueeze(-1))], dim=-1).float()
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    return F.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0]


def random_affine(images: Tensor, ranges: AffineRanges, gen: torch.Generator) -> Tensor:
    """One random affNIST-style transform per image.

    Args:
        images: (N, 40, 40) float in [0, 1], digits centred.
        ranges: transform ranges.
        gen: the generator all draws come from (determinism).

    Returns:
        (N, 40, 40) float in [0, 1].
    """
    n, h, w = images.shape
    mats = _linear_parts(n, ranges, gen)
    zero = torch.zeros(n, 2, dtype=torch.float64)
    moved = warp(images, mats, zero)
    if not ranges.translate:
        torch.rand(n, 2, generator=gen)  # keep the stream aligned with the translated variants
        return moved.clamp(0, 1)
    boxes, _ = tight_boxes(moved)
    lo = torch.stack([-boxes[:, 0], -boxes[:, 1]], 1).double()        # shift that touches 0
    hi = torch.stack([w - boxes[:, 2], h - boxes[:, 3]], 1).double()  # shift that touches W
    u = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    shifts = lo + u * (hi - lo).clamp(min=0)
    # One resampling from the centred digit (not two in a row) keeps the strokes as sharp as the
    # linear-only version.
    return warp(images, mats, shifts).clamp(0, 1)


def make_affnist_synth(digits: np.ndarray | Tensor, labels: np.ndarray | Tensor, versions: int = 1,
                       seed: int = 0, ranges: AffineRanges | None = None, chunk: int = 5000
                       ) -> tuple[Tensor, Tensor]:
    """Generate ``affnist-synth`` from MNIST test digits.

    Args:
        digits: (N, 28, 28) or (N, 40, 40) uint8 digits (28×28 are centre-padded to 40×40).
        labels: (N,) labels.
        versions: transformed copies per digit; output order is version-major
            (all digits of version 0, then version 1, ...), as affNIST's test batches.
        seed: generator seed; the same seed gives the same bytes.
        ranges: transform ranges (default :class:`AffineRanges`).
        chunk: digits warped at once (bounded memory).

    Returns:
        images (versions·N, 40, 40) uint8 and labels (versions·N,) int64.
    """
    ranges = ranges or AffineRanges()
    x = torch.as_tensor(digits)
    if x.shape[-2:] == (28, 28):
        x = center_pad(x)
    if x.shape[-2:] != (SIZE, SIZE):
        raise ValueError(f"make_affnist_synth: digits of shape {tuple(x.shape)}, expected "
                         f"(N, 28, 28) or (N, 40, 40)")
    y = torch.as_tensor(labels).long()
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for _ in range(versions):
        for i in range(0, len(x), chunk):
            part = random_affine(x[i:i + chunk].float() / 255.0, ranges, gen)
            out.append((part * 255.0).round().to(torch.uint8))
    logger.info("affnist-synth: %d images (%d per digit, seed %d, %s)", versions * len(x), versions,
                seed, asdict(ranges))
    return torch.cat(out), y.repeat(versions)


def synth_variant(name: str, **overrides: object) -> AffineRanges:
    """The ranges of a named variant (``affnist_synth``, ``translation``, ``rotation``)."""
    if name not in SYNTH_VARIANTS:
        raise KeyError(f"unknown affnist-synth variant {name!r}; known: {', '.join(SYNTH_VARIANTS)}")
    return replace(SYNTH_VARIANTS[name], **overrides) if overrides else SYNTH_VARIANTS[name]
