"""The paper's Fig. 5: verification accuracy while unaligned faces are moved onto the template.

:func:`alignment_sweep`: each unaligned image is moved towards its aligned version in N steps
(the similarity from its keypoints to the ArcFace template, interpolated in log-scale, angle and
translation), the keypoints follow, and accuracy is measured at every step.
:func:`write_sweep` writes the rows of one or more models as CSV and a PNG plot.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kpt.data.keypoints import affine_keypoints

from ..align import alignment_matrix, transform_points, warp_affine
from .verification import PairSet, evaluate_pairs

__all__ = ["alignment_sweep", "interpolate_similarity", "sweep_images", "write_sweep"]

logger = logging.getLogger(__name__)


def _similarity_params(m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(log scale (B,), angle (B,), translation (B, 2)) of similarity matrices (B, 2, 3)."""
    a, b = m[:, 0, 0], m[:, 1, 0]
    return torch.log(torch.sqrt(a * a + b * b)), torch.atan2(b, a), m[:, :, 2]


def interpolate_similarity(m: Tensor, t: float, centre: Tensor) -> Tensor:
    """Similarity ``t`` of the way from the identity (t=0) to ``m`` (t=1), (B, 2, 3).

    Scale and angle are interpolated geometrically about ``centre`` (pixels) so the face does not
    swing out of the picture on the way; the translation makes ``centre``'s image move linearly.
    """
    log_s, angle, _ = _similarity_params(m)
    s, a = torch.exp(t * log_s), t * angle
    lin = torch.stack([torch.stack([s * torch.cos(a), -s * torch.sin(a)], -1),
                       torch.stack([s * torch.sin(a), s * torch.cos(a)], -1)], -2)
    target = transform_points(centre.unsqueeze(1), m)[:, 0]  # where m sends the centre
    moved = centre + t * (target - centre)
    trans = moved - (lin @ centre.unsqueeze(-1))[..., 0]
    return torch.cat([lin, trans.unsqueeze(-1)], -1)


def sweep_images(pairs: PairSet, t: float) -> tuple[Tensor, Tensor]:
    """Images and keypoints of ``pairs`` moved ``t`` of the way to the aligned crop."""
    h, w = pairs.images.shape[-2:]
    m = alignment_matrix(pairs.keypoints.float(), (h, w), 112)
    size = torch.tensor([w, h], dtype=torch.float32)
    centre = (pairs.keypoints.float() * size).mean(1)  # the face centre (mean keypoint)
    m_t = interpolate_similarity(m, t, centre)
    images = warp_affine(pairs.images.float(), m_t, (h, w)).round().clamp(0, 255).to(torch.uint8)
    keypoints = affine_keypoints(pairs.keypoints.float(), m_t, (h, w))
    return images, keypoints


def alignment_sweep(model: nn.Module, pairs: PairSet, steps: int = 5, batch_size: int = 64,
                    device: torch.device | str = "cpu", flip: bool = True) -> list[dict[str, float]]:
    """Fig. 5: accuracy while each unaligned image is interpolated towards its aligned version.

    Args:
        pairs: an unaligned set whose keypoints define the alignment (detected or ground truth).
        steps: number of interpolation points from 0 (raw) to 1 (aligned), inclusive (≥ 2).

    Returns:
        One row per step: ``{"t", "accuracy", "accuracy_std", "threshold"}``.
    """
    if steps < 2:
        raise ValueError(f"alignment_sweep needs at least 2 steps, got {steps}")
    rows = []
    for t in np.linspace(0.0, 1.0, steps):
        images, keypoints = sweep_images(pairs, float(t))
        moved = PairSet(pairs.name, images, pairs.issame, keypoints, pairs.found, pairs.source)
        res = evaluate_pairs(model, moved, batch_size, device, flip)
        rows.append({"t": float(t), "accuracy": res["accuracy"],
                     "accuracy_std": res["accuracy_std"], "threshold": res["threshold"]})
        logger.info("sweep t=%.2f accuracy %.4f", t, res["accuracy"])
    return rows


def write_sweep(rows: dict[str, list[dict[str, float]]], out: str | Path,
                title: str = "accuracy vs alignment (synthetic)") -> tuple[Path, Path | None]:
    """Write sweep rows of one or more models as ``<out>.csv`` and a ``<out>.png`` plot.

    Args:
        rows: {model label: rows of :func:`alignment_sweep`}.
        out: path without suffix.

    Returns:
        (csv path, png path or None when matplotlib is missing).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = out.with_suffix(".csv")
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "t", "accuracy", "accuracy_std", "threshold"])
        for label, series in rows.items():
            for r in series:
                writer.writerow([label, f"{r['t']:.4f}", f"{r['accuracy']:.4f}",
                                 f"{r['accuracy_std']:.4f}", f"{r['threshold']:.3f}"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional
        logger.warning("matplotlib is not installed: wrote %s only", csv_path)
        return csv_path, None
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    for label, series in rows.items():
        ax.plot([r["t"] for r in series], [100 * r["accuracy"] for r in series], marker="o",
                label=label)
    ax.set_xlabel("alignment (0 = start, e.g. detection crop; 1 = aligned)")
    ax.set_ylabel("verification accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png_path = out.with_suffix(".png")
    fig.savefig(png_path)
    plt.close(fig)
    return csv_path, png_path
