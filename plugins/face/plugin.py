"""The face plugin: ``kpt train face``, ``kpt eval face``, ``kpt predict face``.

Default run: synthetic faces (aligned crops with ground-truth landmarks, official geometric
augmentation, repeated augmentation), a small ViT with KP-RPE (``abs+kprpe``, the paper's face
combination) and an AdaFace head; evaluation on synthetic aligned and unaligned verification
pairs (keypoints from RetinaFace on the unaligned set), reported as ``aligned_accuracy`` and
``unaligned_accuracy``. ``--data PATH`` trains on insightface RecordIO or image folders with the
landmark cache of ``kpt data prepare face``; ``--test lfw.bin cfp_fp.bin`` adds ``.bin`` sets.

The trained module is :class:`FaceRecognizer` (backbone + margin head); embeddings come from its
``backbone``. Models whose ``pos`` does not use keypoints (``abs``, ``iresnet50``) are trained the
same way and simply ignore them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

import kpt
from kpt.config import Config, ConfigError
from kpt.errors import DataError
from kpt.plugin import Plugin, TaskData
from kpt.position import POS_CHOICES

from .data.augment import AppearanceAugment, FaceAugment, FaceCollate, RepeatedAugmentSampler
from .evaluation.board import BOARD_TESTS
from .evaluation.verification import (
    PairSet,
    evaluate_pairs,
    fraction_found,
    load_bin_set,
    synthetic_pair_set,
)
from .synthetic.params import SPLITS

logger = logging.getLogger(__name__)

#: Names ``--test`` accepts (looked up as ``<eval.bin_root or data.root>/<name>.bin``, then in the
#: current folder, then as ``$KPT_CACHE/<name>/<name>.bin`` where ``kpt data get orl`` writes ``orl.bin``).
BIN_NAMES = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp", "orl")
DATASETS = ("synthetic", *BIN_NAMES, *BOARD_TESTS)


# ------------------------------------------------------------------------------------------ model
class FaceRecognizer(nn.Module):
    """Backbone + margin head (or PartialFC): what ``kpt train face`` trains and saves.

    ``forward(images, keypoints)`` returns embeddings (B, D); with ``labels`` it returns the
    training loss (cross-entropy on the margin logits, or PartialFC's distributed loss).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, head_name: str) -> None:
        super().__init__()
        self.backbone, self.head, self.head_name = backbone, head, head_name

    def forward(self, images: Tensor, keypoints: Tensor | None = None,
                labels: Tensor | None = None, indices: Tensor | None = None) -> Tensor:
        """images (B, 3, H, W) in [−1, 1], keypoints (B, 5, 2) → embeddings (B, D) or loss."""
        emb = self.backbone(images, keypoints)
        if labels is None:
            return emb
        if self.head_name == "partial_fc":
            return self.head(emb, labels)
        if self.head_name == "kappaface":
            logits = self.head(emb, labels, indices)
        else:
            logits = self.head(emb, labels)
        return F.cross_entropy(logits.float(), labels)


def backbone_kwargs(cfg: Config) -> tuple[str, dict[str, Any]]:
    """(registered model name, constructor kwargs) from ``cfg.model``."""
    m = cfg.model
    kwargs: dict[str, Any] = {"num_classes": m.embedding_size}
    if m.name.startswith("iresnet"):
        kwargs["img_size"] = m.img_size
    else:
        kwargs.update(pos=m.pos, drop_path_rate=m.drop_path_rate)
        if m.name == "vit":  # the small face ViT: official design (flatten-BN head, ReLU6, no qkv bias)
            kwargs.update(img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim,
                          depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                          head="flatten_bn", act_layer="relu6", qkv_bias=False, num_keypoints=5)
    kwargs.update(m.args.to_dict() if isinstance(m.args, Config) else dict(m.args or {}))
    return m.name, kwargs


def build_model(cfg: Config, info: dict) -> nn.Module:
    """Backbone from the model registry + margin head for ``info["num_classes"]`` identities."""
    name, kwargs = backbone_kwargs(cfg)
    backbone = kpt.create_model(name, **kwargs)
    m = cfg.model
    num_classes = int(info["num_classes"])
    margins: dict[str, float] = {"s": m.margin_s}
    if m.head in ("adaface", "arcface", "cosface", "kappaface"):
        margins["m"] = m.margin_m
    if m.head == "adaface":
        margins.update(h=m.margin_h, t_alpha=m.t_alpha)
    if m.classifier == "partial_fc":
        from .heads.partial_fc import PartialFC

        head: nn.Module = PartialFC(m.embedding_size, num_classes, head=m.head,
                                    sample_rate=m.sample_rate, **margins)
        return FaceRecognizer(backbone, head, "partial_fc")
    if m.classifier != "fc":
        raise ValueError(f"model.classifier must be fc or partial_fc, got {m.classifier!r}")
    if m.head == "kappaface":
        margins["num_samples"] = int(info.get("num_images", 0))
    head = kpt.create("head", m.head, embedding_size=m.embedding_size, num_classes=num_classes,
                      **margins)
    return FaceRecognizer(backbone, head, m.head)


def training_step(model: nn.Module, batch: dict, cfg: Config) -> Tensor:
    """Loss of one batch (images already augmented and normalised by the collate function)."""
    return model(batch["image"], batch["keypoints"], batch["label"], batch.get("index"))


# ------------------------------------------------------------------------------------------ data
def _augment(cfg: Config) -> FaceAugment:
    d = cfg.data
    return FaceAugment(d.scale_min, d.scale_max, d.rot_prob, d.max_rot, d.hflip_prob,
                       d.extra_offset, enabled=d.augment)


def _appearance(cfg: Config) -> AppearanceAugment:
    d = cfg.data
    return AppearanceAugment(d.cutout_prob, d.blur_prob, d.blur_magnitude, d.photometric_num_ops,
                             d.photometric_magnitude, d.photometric_magnitude_offset,
                             d.photometric_num_bins)


def _labels_of(dataset: Any) -> Any:
    """Per-item identity labels without decoding images (None when the source cannot tell)."""
    for obj in (dataset, getattr(dataset, "source", None)):
        labels = getattr(obj, "labels", None)
        if labels is not None:
            return labels
    return None


def build_train_set(cfg: Config) -> tuple[Any, dict]:
    """(dataset, info) for ``cfg.data``: synthetic faces or a RecordIO / image-folder path."""
    d = cfg.data
    if d.root:
        from .data.checks import check_training_labels, source_labels
        from .data.datasets import FaceDataset
        from .data.recordio import InsightFaceRec

        keypoints = "auto" if d.keypoints == "auto" else None
        dataset = FaceDataset(d.root, keypoints=keypoints)
        source = dataset.source
        # the labels are checked before the class count is taken from them: one stray label must
        # not size the head (see data/checks.py for the rules)
        label_set = source_labels(source)
        if label_set is None:
            raise DataError(f"{d.root}: cannot tell the identity labels of this data")
        num_classes, count_from = None, "the largest label + 1"
        if isinstance(source, InsightFaceRec):
            if source.property is not None:
                num_classes, count_from = source.property[0], f"{source.root / 'property'}"
            elif source._identity_keys:
                num_classes = len(source._identity_keys)
                count_from = f"the identity records of {source.reader.rec_path}"
        elif getattr(source, "num_classes", None) is not None:
            num_classes, count_from = int(source.num_classes), f"the folders of {d.root}"
        num_classes = check_training_labels(label_set, num_classes, count_from, str(d.root),
                                            allow_sparse=bool(d.allow_sparse_labels))
        keypoint_source = dataset.keypoint_source  # said of the whole folder, before any split
        if d.holdout_identities > 0:  # people kept out of training for the verification sets
            from .evaluation.real_photos import split_identities

            dataset = split_identities(dataset, label_set.labels.astype(np.int64),
                                       d.holdout_identities, d.holdout_seed)
            num_classes = dataset.num_classes
        info = {"name": Path(d.root).name, "synthetic": False, "num_classes": int(num_classes),
                "num_images": len(dataset)}
        logger.info("training data %s: %d images, %d identities; keypoints: %s", d.root,
                    len(dataset), int(num_classes), keypoint_source)
        return dataset, info
    if d.holdout_identities > 0:
        raise DataError("data.holdout_identities needs real training data (--data PATH); the "
                        "synthetic faces already test on identities they never train on")
    if d.name != "synthetic":  # e.g. --data lfw: a verification set, not training data
        raise DataError(f"--data {d.name!r} (data.name): face trains on 'synthetic' or on a path "
                        f"(RecordIO folder, image folders), and no file or folder "
                        f"{str(Path(d.name).absolute())!r} exists; verification sets "
                        f"({', '.join(BIN_NAMES)}) go to --test")
    from .synthetic.dataset import SyntheticFaces

    dataset = SyntheticFaces(d.num_identities, d.images_per_identity, "aligned", d.seed)
    info = dict(dataset.info)
    logger.info("training data: synthetic faces, %d images, %d identities; keypoints: ground "
                "truth of the renderer", len(dataset), d.num_identities)
    return (RenderCache(dataset) if d.cache else dataset), info


class RenderCache(Dataset):
    """Keeps every rendered synthetic face (uint8) after its first use.

    The renderer is deterministic per index and the augmentation runs later (collate), so later
    epochs can reuse the pixels: rendering is about a third of a CPU training step otherwise.
    112×112 RGB costs 37.6 kB per image (the default 2,400 images: 90 MB).
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.labels = dataset.labels
        self._items: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        missing = sorted({int(i) for i in indices if int(i) not in self._items})
        if missing:
            for i, item in zip(missing, self.dataset.__getitems__(missing)):
                self._items[i] = item
        return [self._items[int(i)] for i in indices]


def resolve_bin(name: str, cfg: Config) -> Path:
    """A ``--test`` entry → the ``.bin`` file: a path, or ``<name>.bin`` in ``eval.bin_root``,
    ``data.root``, the current folder or ``$KPT_CACHE/<name>/`` (in that order)."""
    path = Path(name)
    if path.suffix == ".bin" or path.exists():
        return path
    from .data.orl import default_orl_dir

    cache = default_orl_dir().parent / name  # `kpt data get orl` writes $KPT_CACHE/orl/orl.bin
    for root in (cfg.eval.bin_root, cfg.data.root, ".", cache):
        if root and (Path(root) / f"{name}.bin").is_file():
            return Path(root) / f"{name}.bin"
    from .data.checks import MissingDataError

    looked = [str(Path(r) / f"{name}.bin") for r in (cfg.eval.bin_root, cfg.data.root, ".", cache)
              if r]
    hint = "; run `kpt data get orl` first" if name == "orl" else ""
    raise MissingDataError(f"--test {name}: no {name}.bin (looked for {', '.join(looked)}); pass "
                           f"the .bin path or set eval.bin_root=FOLDER{hint}")


def wants_synthetic_sets(cfg: Config) -> bool:
    """The synthetic protocols are evaluated for synthetic training data, or when asked
    (``--test synthetic``); a run on real data (``--data PATH``) does not select ``best.pt`` on
    them. ``eval.synthetic_pairs=0`` turns them off in every case."""
    return cfg.eval.synthetic_pairs > 0 and (not cfg.data.root or "synthetic" in cfg.eval.test)


def build_eval_sets(cfg: Config) -> dict[str, PairSet]:
    """Synthetic aligned / unaligned pair sets (see :func:`wants_synthetic_sets`) and ``.bin``
    sets."""
    e = cfg.eval
    sets: dict[str, PairSet] = {}
    if cfg.data.root and e.synthetic_pairs > 0 and "synthetic" not in e.test:
        logger.info("real training data: the synthetic verification sets are skipped (add "
                    "--test synthetic to evaluate them too)")
    if wants_synthetic_sets(cfg):
        for protocol in e.protocols:
            kp = e.aligned_keypoints if protocol == "aligned" else e.unaligned_keypoints
            pairs = synthetic_pair_set(protocol, e.synthetic_pairs, e.seed, kp)
            sets[protocol] = pairs
            logger.info("eval set %s: %d pairs, keypoints %s (face found in %.0f%%)", pairs.name,
                        len(pairs), kp, 100 * fraction_found(pairs))
    for name in e.test:
        if name == "synthetic":
            continue
        if name in BOARD_TESTS:  # IJB / TinyFace: run by evaluate (evaluation/board.py)
            if name == "full":  # plus every board .bin found under the board root
                from .evaluation.board import board_roots, find_bins

                for path in find_bins(board_roots(cfg)).values():
                    if path.stem not in sets:
                        sets[path.stem] = load_bin_set(
                            path, e.bin_keypoints, e.bin_limit or None, padding=e.bin_padding,
                            flip_keypoints=e.bin_flip_keypoints)
            continue
        path = resolve_bin(name, cfg)
        pairs = load_bin_set(path, e.bin_keypoints, e.bin_limit or None,
                             padding=e.bin_padding, flip_keypoints=e.bin_flip_keypoints)
        sets[pairs.name] = pairs
        sets.update(_photo_sets(path, pairs.name, cfg))
        logger.info("eval set %s: %d pairs, keypoints %s (face found in %d of %d images)",
                    pairs.name, len(pairs), e.bin_keypoints, int(pairs.found.sum()),
                    int(pairs.found.numel()))
    if not sets:
        logger.warning("no verification set: nothing is evaluated and best.pt is not written; "
                       "pass --test lfw cfp_fp ... (.bin files) or --test synthetic")
    return sets


def _photo_sets(path: Path, name: str, cfg: Config) -> dict[str, PairSet]:
    """Unaligned / detection-crop sets of a ``.bin`` that comes with its photos (``orl.bin``)."""
    from .data.orl import read_photo_pairs

    meta = read_photo_pairs(path)
    if meta is None or "unaligned" not in cfg.eval.protocols:
        return {}
    from .evaluation.real_photos import photo_pair_sets

    return photo_pair_sets(meta, name, cfg.eval.bin_limit or None, cfg.eval.seed)


def build_data(cfg: Config) -> TaskData:
    """Training faces (augmented in the collate function) and the verification sets."""
    dataset, info = build_train_set(cfg)
    labels = _labels_of(dataset)
    prob = cfg.data.repeated_augment_prob
    sampler = None
    if prob > 0 and labels is not None:
        def sampler(ds: Any, batch_size: int, seed: int, rank: int, world_size: int
                    ) -> RepeatedAugmentSampler:
            return RepeatedAugmentSampler(labels, batch_size, seed, rank, world_size, prob)
    elif prob > 0:
        logger.info("repeated augmentation off: the training source has no label table")
    evals = build_eval_sets(cfg)
    if cfg.data.holdout_identities > 0:
        from .evaluation.real_photos import holdout_pair_sets

        evals.update(holdout_pair_sets(dataset, cfg.eval.holdout_pairs_per_fold, cfg.eval.seed,
                                       cfg.eval.bin_keypoints))
    if not cfg.data.keypoint_jitter >= 0:
        raise ConfigError(f"data.keypoint_jitter={cfg.data.keypoint_jitter}: expected >= 0 (pixels)")
    return TaskData(train=dataset, evals=evals, info=info, batch_sampler=sampler,
                    collate_fn=FaceCollate(_augment(cfg), _appearance(cfg),
                                           cfg.data.keypoint_jitter, cfg.data.keypoint_blind))


# ------------------------------------------------------------------------------------------ eval
#: the FAR at which kpt.metrics.verification reports VAL (insightface: 1e-3)
VAL_FAR = 1e-3
#: rates reported in percent (kpt's unit for accuracy-like metrics); threshold and far stay raw
PERCENT_FIELDS = ("accuracy", "accuracy_std", "val", "val_std")


def val_computable(pairs: PairSet, folds: int = 10, far: float = VAL_FAR) -> bool:
    """VAL@FAR needs at least 1/far impostor pairs in every training fold: with fewer, the FAR
    target lies below one false accept and the "VAL" is that of another operating point."""
    impostors = int((~pairs.issame.bool()).sum())
    folds = min(folds, len(pairs))
    return folds > 1 and impostors * (folds - 1) / folds * far >= 1


def evaluate_sets(model: nn.Module, sets: dict[str, PairSet], cfg: Config,
                  device: torch.device) -> dict[str, float]:
    """Flat metrics: ``<set>/accuracy|accuracy_std|threshold|val|far``, ``aligned_accuracy``,
    ``unaligned_accuracy`` (synthetic protocols) and ``accuracy`` (mean over sets; absent without
    sets, so that no ``best.pt`` is chosen on nothing). Accuracies and VAL are in percent; VAL is NaN
    (``n/a`` in tables, ``null`` in JSON) where :func:`val_computable` says it cannot be measured."""
    metrics: dict[str, float] = {}
    accs = []
    for key, pairs in sets.items():
        res = evaluate_pairs(model, pairs, cfg.eval.batch_size, device, cfg.eval.flip,
                             amp=cfg.train.amp)
        res = {k: 100.0 * v if k in PERCENT_FIELDS else v for k, v in res.items()}
        if not val_computable(pairs):
            res["val"] = float("nan")
        for field in ("accuracy", "accuracy_std", "threshold", "val", "far"):
            metrics[f"{pairs.name}/{field}"] = res[field]
        if pairs.source == "retinaface":  # detection rate: missed faces got the template
            metrics[f"{pairs.name}/face_found"] = 100.0 * fraction_found(pairs)  # percent
        if key in ("aligned", "unaligned", "unaligned_crop"):
            metrics[f"{key}_accuracy"] = res["accuracy"]
        accs.append(res["accuracy"])
    if accs:
        metrics["accuracy"] = float(sum(accs) / len(accs))
    return metrics


def evaluate(model: nn.Module, data: TaskData, cfg: Config, device: torch.device
             ) -> dict[str, float]:
    """Verification accuracy on every evaluation set (see :func:`evaluate_sets`), and the Fig. 5
    sweep when ``eval.sweep_steps`` > 0 (see :func:`sweep_metrics`)."""
    metrics = evaluate_sets(model, data.evals, cfg, device)
    if any(name in BOARD_TESTS for name in cfg.eval.test):
        from .evaluation.board import board_metrics

        metrics.update(board_metrics(model, cfg, device, metrics))
    if cfg.eval.sweep_steps > 0:
        metrics.update(sweep_metrics(model, data.evals, cfg, device))
    return metrics


def sweep_metrics(model: nn.Module, sets: dict[str, PairSet], cfg: Config, device: torch.device
                  ) -> dict[str, float]:
    """Fig. 5: ``sweep/t=<t>`` accuracy from the synthetic detection crop (t=0) to the aligned
    crop (t=1) in ``eval.sweep_steps`` steps; also written as CSV + PNG to ``eval.sweep_out``."""
    from .evaluation.sweep import alignment_sweep, write_sweep

    e = cfg.eval
    start = sets.get("unaligned_crop")
    if start is None:  # the synthetic protocols are off: build the sweep's own start set
        start = synthetic_pair_set("unaligned_crop", e.synthetic_pairs or 400, e.seed,
                                   e.unaligned_keypoints)
    rows = alignment_sweep(model, start, e.sweep_steps, e.batch_size, device, e.flip)
    if e.sweep_out:
        csv_path, png_path = write_sweep({"model": rows}, e.sweep_out)
        logger.info("wrote %s%s", csv_path, f" and {png_path}" if png_path else "")
    return {f"sweep/t={r['t']:.2f}": 100.0 * r["accuracy"] for r in rows}  # percent


def load_foreign(path: str | Path, input_mean: float = 127.5, input_std: float = 127.5
                 ) -> nn.Module:
    """A face backbone from weights that are not kpt files.

    ``.onnx``: any ONNX recogniser (:class:`~.onnx_recognizer.OnnxRecognizer`, fed
    ``(pixels − input_mean) / input_std``); otherwise an insightface ``backbone.pth`` or AdaFace
    ``.ckpt`` IResNet (:func:`~.iresnet_weights.load_iresnet_weights`; an unknown layout is an
    error naming the file).
    """
    if Path(path).suffix.lower() == ".onnx":
        from .onnx_recognizer import OnnxRecognizer

        return OnnxRecognizer(path, input_mean, input_std)
    from .iresnet_weights import load_iresnet_weights

    return load_iresnet_weights(path)


def load_weights(path: Path, cfg: Config) -> nn.Module:
    """``Plugin.load_weights``: :func:`load_foreign` with ``eval.input_mean`` / ``eval.input_std``."""
    return load_foreign(path, cfg.eval.input_mean, cfg.eval.input_std)


def _predict_command(argv: list[str]) -> int:
    from .predict import predict_main

    return predict_main(argv)


def _embed_command(argv: list[str]) -> int:
    from .embed import embed_main

    return embed_main(argv)


def _data_get(argv: list[str]) -> int:
    from .data.orl import data_get_command

    return data_get_command(argv)


def _data_prepare(argv: list[str]) -> int:
    from .data_commands import prepare

    return prepare(argv)


def _data_validate(argv: list[str]) -> int:
    from .data_commands import validate

    return validate(argv)


PLUGIN = Plugin(
    name="face",
    description="face recognition: ViT + KP-RPE (or IResNet), AdaFace/ArcFace/CosFace, "
                "aligned + unaligned verification",
    default_config="config.yaml",
    build_data=build_data,
    build_model=build_model,
    training_step=training_step,
    evaluate=evaluate,
    datasets=DATASETS,
    keypoint_sources={"retinaface": "kpt_plugins.face.retinaface.detector:RetinaFaceKeypoints"},
    commands={"predict": _predict_command, "embed": _embed_command, "data get": _data_get,
              "data prepare": _data_prepare, "data validate": _data_validate},
    primary_metric="accuracy",
    check_config={"data.num_identities": 4, "data.images_per_identity": 4,
                  "train.batch_size": 8, "model.depth": 1, "model.embed_dim": 32,
                  "model.num_heads": 2, "model.embedding_size": 16,
                  "eval.synthetic_pairs": 20, "eval.unaligned_keypoints": "ground_truth"},
    choices={"model.pos": POS_CHOICES,
             "model.classifier": ("fc", "partial_fc"), "data.keypoints": ("auto", "template"),
             "eval.bin_keypoints": ("retinaface", "template"),
             "eval.ijb_unaligned_keypoints": ("provided", "retinaface"),
             "eval.tinyface_keypoints": ("template", "retinaface"),
             "eval.cfp_resize": ("stretch", "pad"),
             "eval.bin_flip_keypoints": ("detect", "mirror"),
             "eval.protocols": (*SPLITS, "unaligned_crop"),
             "eval.aligned_keypoints": ("ground_truth", "retinaface", "template"),
             "eval.unaligned_keypoints": ("retinaface", "ground_truth", "template")},
    load_weights=load_weights,
)
