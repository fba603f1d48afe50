"""Where a trained digit model loses accuracy on translated digits, and what its keypoints do.

For each run folder (a ``kpt train mnist`` run or a ``bench/mnist_affnist.py`` sub-folder), on the
affnist-synth translation-only set (seed 1, as the run's own evaluation):

* accuracy by how far the digit moved (the largest of |dx|, |dy| of its box centre, pixels) and by
  the sub-patch phase of the move (shift mod patch, x = y);
* accuracy with the keypoints replaced, for models that take keypoints:
  ``snapped``: the untransformed digit's keypoints moved by the shift rounded to whole patches
  (the bias then sees only patch-multiple moves), ``untransformed shape``: the untransformed box
  shape centred on the moved box, ``fixed``: the mean training keypoints for every digit (the
  keypoints carry no information).

    python bench/mnist_translation_probe.py runs/bench/centre_kprpe runs/bench/centre_rpe

Prints one block per run; numbers in docs/mnist.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from itertools import pairwise
from pathlib import Path

import torch

SHIFT_BINS = (0.0, 2.5, 5.0, 7.5, 10.0, 15.0, 25.0)


def accuracy(model: torch.nn.Module, images: torch.Tensor, keypoints: torch.Tensor,
             labels: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Per-digit correctness (N,) float of uint8 images (N, 40, 40) with keypoints (N, 5, 2)."""
    from kpt.engine.inference import predict

    batches = ((images[i:i + batch, None].float() / 255, keypoints[i:i + batch])
               for i in range(0, len(images), batch))
    predicted = predict(model, batches, lambda m, b: m(*b).argmax(1))
    return (predicted == labels).float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with weights.safetensors")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from kpt_plugins.mnist.affnist import center_pad, make_affnist_synth, synth_variant
    from kpt_plugins.mnist.data import load_mnist
    from kpt_plugins.mnist.keypoints import box_keypoints

    import kpt

    arrays = load_mnist()
    digits, labels = torch.as_tensor(arrays["x_test"]), torch.as_tensor(arrays["y_test"]).long()
    centred_kp = box_keypoints(center_pad(digits))
    train_kp_mean = box_keypoints(center_pad(torch.as_tensor(arrays["x_train"][:20000]))).mean(0)
    # seed 1 = the translation subset of a run's evaluation (affnist_seed 0 + index 1)
    images, y = make_affnist_synth(digits, labels, seed=1, ranges=synth_variant("translation"))
    keypoints = box_keypoints(images)
    shift_px = (keypoints[:, 4] - centred_kp[:, 4]) * 40  # (N, 2) box-centre move in pixels
    biggest = shift_px.abs().amax(1)
    print(f"translation set: {len(y)} digits; per shift bin: " + ", ".join(
        f"{lo:g}-{hi:g} px {int(((biggest >= lo) & (biggest < hi)).sum())}"
        for lo, hi in pairwise(SHIFT_BINS)))

    for run in args.runs:
        model = kpt.load_model(str(run / "weights.safetensors"))
        grid = getattr(model, "backbone", model).grid_size  # drawn variants wrap the ViT
        patch = 40 // int(grid[1])  # pixels per token
        hit = accuracy(model, images, keypoints, y)
        phase = torch.round(shift_px) % patch
        by_shift = {f"{lo:g}-{hi:g}": 100 * hit[(biggest >= lo) & (biggest < hi)].mean().item()
                    for lo, hi in pairwise(SHIFT_BINS)}
        by_phase = {int(p): 100 * hit[(phase[:, 0] == p) & (phase[:, 1] == p)].mean().item()
                    for p in range(patch)}
        print(f"\n{run}: translation accuracy {100 * hit.mean().item():.2f} %")
        print("  by largest shift (px): " + ", ".join(f"{k} {v:.1f}" for k, v in by_shift.items()))
        print("  by phase (px, x = y):  " + ", ".join(f"{k} {v:.1f}" for k, v in by_phase.items()))
        if not getattr(model, "uses_keypoints", True):
            continue
        snapped = centred_kp + torch.round(shift_px / patch)[:, None] * patch / 40
        reshaped = keypoints[:, 4:5] + (centred_kp - centred_kp[:, 4:5])
        fixed = train_kp_mean.expand_as(keypoints)
        for name, kp in (("snapped", snapped), ("untransformed shape", reshaped), ("fixed", fixed)):
            print(f"  keypoints {name}: {100 * accuracy(model, images, kp, y).mean().item():.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
