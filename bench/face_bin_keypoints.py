"""Keypoints of ``.bin``-style aligned crops: detector padding and flip-fusion keypoints.

CVLface's evaluation runs its aligner on the aligned 112×112 crop resized to 160 px with no padding
and reruns it on the mirrored crop; its training-label script pads the crop by 21.5 % per side.
This bench renders synthetic aligned faces (ground-truth landmarks known) and reports, for each
padding, the share of crops where RetinaFace finds a face and the mean landmark error (normalised
by the inter-ocular distance) of the detection, of the detection rerun on the mirrored crop, and of
the mirrored detection (both against the mirrored ground truth).

Example::

    python bench/face_bin_keypoints.py --pairs 300 --paddings 0.215 0
"""

from __future__ import annotations

import argparse
import time

import torch
from kpt_plugins.face.data.augment import FLIP_PERMUTATION
from kpt_plugins.face.evaluation.verification import get_detector
from kpt_plugins.face.synthetic.dataset import synthetic_pairs

from kpt.data.keypoints import hflip_keypoints


def measure(images: torch.Tensor, truth: torch.Tensor, padding: float) -> dict[str, float]:
    """Found rate and landmark errors of RetinaFace on uint8 crops (N, 3, 112, 112)."""
    detector = get_detector(padding, 160)
    start = time.perf_counter()
    _, kp, found, _ = detector.best_detection(images)
    _, kp_flip, found_flip, _ = detector.best_detection(images.flip(-1))
    mirrored = hflip_keypoints(kp, FLIP_PERMUTATION)
    truth_flip = hflip_keypoints(truth, FLIP_PERMUTATION)
    iod = (truth[:, 0] - truth[:, 1]).norm(dim=-1)

    def nme(points: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return (points - ref).norm(dim=-1).mean(1) / iod

    both = found & found_flip
    return {"padding": padding, "found": float(found.float().mean()),
            "found_mirror": float(found_flip.float().mean()),
            "nme": float(nme(kp, truth)[found].mean()),
            "nme_flip_detect": float(nme(kp_flip, truth_flip)[both].mean()),
            "nme_flip_mirror": float(nme(mirrored, truth_flip)[both].mean()),
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300, help="synthetic pairs (2 images each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paddings", type=float, nargs="+", default=[0.215, 0.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    pairs, truth = synthetic_pairs(args.pairs, "aligned", args.seed)
    print(f"{len(pairs.images)} synthetic aligned crops (seed {args.seed})")
    for padding in args.paddings:
        r = measure(pairs.images, truth, padding)
        print(f"padding {r['padding']:.3f}: found {r['found']:.3f} (mirrored crop "
              f"{r['found_mirror']:.3f}); NME/IOD {r['nme']:.4f}; flip keypoints: rerun "
              f"{r['nme_flip_detect']:.4f}, mirrored {r['nme_flip_mirror']:.4f} "
              f"({r['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
