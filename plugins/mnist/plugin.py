"""The mnist plugin: ``kpt train mnist --test affnist``.

A shallow ViT is trained on MNIST digits centred in 40×40 frames (no affine augmentation) and tested on
the MNIST test set and on affNIST: the official ``.mat`` files when given (``data.affnist_path`` or the
data root), otherwise ``affnist-synth`` generated from the MNIST test digits (reported under that name).
Keypoints are the corners and centre of each image's tight digit box. Metrics, in percent:
``mnist_acc``, ``affnist_acc`` or ``affnist_synth_acc``, and with ``eval.subsets`` the one-factor
subsets ``affnist_synth_translation_acc`` and ``affnist_synth_rotation_acc``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from kpt_plugins.mnist.affnist import (
    center_pad,
    find_affnist_files,
    load_affnist,
    make_affnist_synth,
    synth_variant,
)
from kpt_plugins.mnist.data import (
    data_get_command,
    data_validate_command,
    load_mnist,
    synthetic_mnist,
)
from kpt_plugins.mnist.keypoints import box_keypoints_batched
from kpt_plugins.mnist.model import POS_VARIANTS, build_digit_vit
from torch import Tensor, nn
from torch.utils.data import Dataset

from kpt.engine.inference import predict
from kpt.errors import DataError
from kpt.plugin import Plugin, TaskData
from kpt.position import VARIANTS

logger = logging.getLogger(__name__)


class DigitDataset(Dataset):
    """Digits in 40×40 frames with their box keypoints.

    Items: ``{"image": (1, 40, 40) float in [0, 1], "keypoints": (5, 2), "label": ()}``. The background
    stays 0 (no mean shift) so that zero padding in the conv stem looks like background and gives the
    model no hint of where the frame ends.

    Args:
        images: (N, 40, 40) uint8.
        labels: (N,) int.
        placement: ``"centre"`` as given, or ``"random"``: each access shifts the digit by a random
            whole number of pixels that keeps its box inside the frame (CapsNet protocol); the
            keypoints move with it.
        keypoint_jitter: training only: shift the five keypoints together by a uniform random
            offset of up to this many pixels per axis (the image is not moved).
        jitter_seed: seed of the jitter's own generator. The jitter never draws from torch's
            global generator, so models that do not read keypoints train exactly as without it
            (same shuffles, same placements), and variants compare on the same data stream.
    """

    def __init__(self, images: Tensor, labels: Tensor, placement: str = "centre",
                 keypoint_jitter: float = 0.0, jitter_seed: int = 0):
        if placement not in ("centre", "random"):
            raise ValueError(f"data.placement={placement!r}: expected 'centre' or 'random'")
        if keypoint_jitter < 0:
            raise ValueError(f"data.keypoint_jitter={keypoint_jitter}: expected >= 0 (pixels)")
        self.keypoint_jitter = float(keypoint_jitter)
        self.images = images.contiguous()
        self.labels = labels.long()
        self.keypoints = box_keypoints_batched(self.images)
        self.placement = placement
        self.jitter_seed = int(jitter_seed)
        self._jitter_gen: torch.Generator | None = None
        self._jitter_worker: int | None = None

    def _jitter_generator(self) -> torch.Generator:
        """The jitter generator of this process (each DataLoader worker seeds its own)."""
        info = torch.utils.data.get_worker_info()
        worker = -1 if info is None else info.id
        if self._jitter_gen is None or self._jitter_worker != worker:
            self._jitter_gen = torch.Generator().manual_seed(self.jitter_seed * 1009 + worker + 1)
            self._jitter_worker = worker
        return self._jitter_gen

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image, kp = self.images[index], self.keypoints[index]
        if self.placement == "random":
            size = image.shape[-1]
            lo = (-kp[0] * size).round().long()               # (x, y): shift that touches 0
            hi = ((1 - kp[3]) * size).round().long()           # shift that touches the far edge
            shift = lo + (torch.rand(2) * (hi - lo + 1).float()).long().clamp(max=(hi - lo))
            image = torch.roll(image, (int(shift[1]), int(shift[0])), dims=(0, 1))
            kp = (kp + shift.float() / size).clamp(0, 1)
        if self.keypoint_jitter > 0:
            # one offset for all five points, uniform in ±jitter px: the keypoints move against the
            # patch grid while the digit does not (a test digit's phase relative to the grid varies)
            offset = ((torch.rand(2, generator=self._jitter_generator()) * 2 - 1)
                      * self.keypoint_jitter / image.shape[-1])
            kp = (kp + offset).clamp(0, 1)
        return {"image": image[None].float() / 255.0, "keypoints": kp, "label": self.labels[index]}


def _limit(x: Tensor, y: Tensor, n: int) -> tuple[Tensor, Tensor]:
    return (x[:n], y[:n]) if n > 0 else (x, y)


def build_data(cfg) -> TaskData:
    """MNIST (or the synthetic stand-in) for training; MNIST test + requested test sets for eval."""
    d = cfg.data
    if d.name == "synthetic":
        arrays = synthetic_mnist(d.synthetic_train, d.synthetic_test, seed=cfg.train.seed)
    elif d.name == "mnist":
        arrays = load_mnist(d.root, d.cache_dir, download=d.download)
    else:
        # `--data affnist` lands here: affNIST is a test set (--test affnist), not training data
        raise DataError(f"--data {d.name!r} (data.name): mnist trains on 'mnist' or 'synthetic'; "
                        f"{d.name!r} is not a training set and no path {d.name!r} exists "
                        f"(test sets go to --test, e.g. --test affnist)")
    x_train, y_train = _limit(center_pad(arrays["x_train"]), torch.as_tensor(arrays["y_train"]),
                              d.train_limit)
    x_test, y_test = _limit(torch.as_tensor(arrays["x_test"]), torch.as_tensor(arrays["y_test"]),
                            d.eval_limit)
    evals: dict[str, object] = {"mnist": DigitDataset(center_pad(x_test), y_test)}
    for name in cfg.eval.test:
        if name == "mnist":
            continue
        if name not in ("affnist", "affnist-synth"):
            raise ValueError(f"eval.test: unknown test set {name!r}; expected affnist, affnist-synth")
        files = []
        if name == "affnist":
            where = d.affnist_path or d.root
            files = find_affnist_files(where) if where else []
        if files:
            x, y = load_affnist(files, d.eval_limit)
            evals["affnist"] = DigitDataset(torch.as_tensor(x), torch.as_tensor(y))
            logger.info("affNIST: %d official test images from %s", len(x), files[0].parent)
            continue
        variants = ["affnist_synth"] + (["translation", "rotation"] if cfg.eval.subsets else [])
        for i, variant in enumerate(variants):
            x, y = make_affnist_synth(x_test, y_test, versions=d.affnist_versions,
                                      seed=d.affnist_seed + i, ranges=synth_variant(variant))
            key = "affnist_synth" if variant == "affnist_synth" else f"affnist_synth_{variant}"
            evals[key] = DigitDataset(x, y)
    info = {"num_classes": 10, "num_keypoints": 5, "img_size": 40,
            "train_size": len(x_train), "test_sets": sorted(evals)}
    train = DigitDataset(x_train, y_train, d.placement, cfg["data.keypoint_jitter"],
                         jitter_seed=cfg.train.seed)
    return TaskData(train=train, evals=evals, info=info)


def build_model(cfg, info: dict) -> nn.Module:
    """The digit ViT of ``cfg.model`` (see :mod:`kpt_plugins.mnist.model`)."""
    m = cfg.model
    return build_digit_vit(
        pos=m.pos, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
        num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, stem=m.stem, stem_channels=m.stem_channels,
        drawn_sigma=m.drawn_sigma, drop_path_rate=m.drop_path_rate, kprpe_variant=m.kprpe_variant,
        num_classes=int(info.get("num_classes", 10)))


def training_step(model: nn.Module, batch: dict, cfg) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy on (images, keypoints) → logits; logs the batch accuracy."""
    logits = model(batch["image"], batch["keypoints"])
    loss = F.cross_entropy(logits.float(), batch["label"],
                           label_smoothing=cfg["loss.label_smoothing"])
    acc = (logits.argmax(1) == batch["label"]).float().mean().item() * 100
    return loss, {"acc": acc}


def predict_labels(model: nn.Module, dataset: DigitDataset, device: torch.device, batch_size: int,
                   amp: str = "none") -> Tensor:
    """Predicted labels (N,) for a :class:`DigitDataset` (its stored frames, centred as given)."""
    if len(dataset) == 0:
        return torch.zeros(0, dtype=torch.long)
    batches = ((dataset.images[i:i + batch_size, None].float().div(255),
                dataset.keypoints[i:i + batch_size]) for i in range(0, len(dataset), batch_size))
    return predict(model, batches, lambda m, b: m(*b).argmax(1), device=device, amp=amp)


def evaluate(model: nn.Module, data: TaskData, cfg, device: torch.device) -> dict[str, float]:
    """Top-1 accuracy in percent on every evaluation set: ``{<set>_acc: float}``."""
    out = {}
    for name, dataset in data.evals.items():
        pred = predict_labels(model, dataset, device, cfg.eval.batch_size, cfg.train.amp)
        out[f"{name}_acc"] = (pred == dataset.labels).float().mean().item() * 100
    return out


PLUGIN = Plugin(
    name="mnist",
    description="MNIST -> affNIST: shallow ViT, position encodings incl. KP-RPE (digit-box keypoints)",
    default_config=str(Path(__file__).with_name("config.yaml").name),
    build_data=build_data,
    build_model=build_model,
    training_step=training_step,
    evaluate=evaluate,
    datasets=("mnist", "synthetic", "affnist", "affnist-synth"),
    keypoint_sources={"box": "kpt_plugins.mnist.keypoints:BoxKeypoints"},
    commands={"data get": data_get_command, "data validate": data_validate_command},
    primary_metric="mnist_acc",
    check_config={"data.name": "synthetic", "data.synthetic_train": 64, "data.synthetic_test": 32,
                  "eval.test": ["affnist-synth"], "eval.subsets": False, "model.depth": 1,
                  "model.embed_dim": 16, "train.batch_size": 16, "train.max_steps": 2},
    choices={"model.pos": tuple(POS_VARIANTS), "model.stem": ("conv", "patch"),
             "model.kprpe_variant": VARIANTS, "data.name": ("mnist", "synthetic"),
             "data.placement": ("centre", "random")},
)
