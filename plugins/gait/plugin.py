"""The gait plugin: SwinGait-2D (+ KP-RPE) on Gait3D or the synthetic walkers.

``kpt train gait`` trains the reduced (CPU) model on the synthetic walkers;
``kpt train gait --data gait3d --data-root DIR`` the paper's model and schedule on a tree made by
``kpt data prepare gait3d``. Evaluation is OpenGait's Gait3D protocol through
:func:`kpt.metrics.retrieval` (probe set from the split json, mean of per-part Euclidean
distances, probes without a gallery match skipped): rank1, rank5, rank10, mAP, mINP in percent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from kpt_plugins.gait.data import (
    GaitClipDataset,
    GaitDataError,
    GaitSequenceDataset,
    read_split,
    scan_layout,
)
from kpt_plugins.gait.gait3d_prepare import prepare_main, validate_main
from kpt_plugins.gait.losses import GaitLoss
from kpt_plugins.gait.model import SwinGait2D
from kpt_plugins.gait.synthetic import SyntheticSpec, ensure_synthetic, generate
from kpt_plugins.gait.transforms import GaitTransform
from kpt_plugins.gait.warmstart import STEM_HEAD_PREFIXES, load_stem_head
from torch import Tensor, nn

from kpt.data.samplers import pk_batch_sampler
from kpt.engine.distributed import convert_sync_batchnorm
from kpt.engine.inference import predict
from kpt.plugin import Plugin, TaskData

logger = logging.getLogger(__name__)

PLUGIN_DATASETS = ("synthetic", "gait3d")
# one line for error messages (the CLI shows a UserError as one line); PREPARE_HELP has the details
PREPARE_COMMAND = ("`kpt data prepare gait3d --src RAW --dst DIR` (see `kpt data prepare gait3d "
                   "--help`)")

#: Model presets. ``paper``: reference gait.md 1.2 (OpenGait sizes). ``cpu``: the same design,
#: narrow and shallow, for the offline synthetic run on a laptop CPU.
PRESETS: dict[str, dict] = {
    "paper": {"channels": (64, 128), "embed_dim": 256, "depths": (4, 2),
              "num_heads": (16, 32), "embedding_dim": 256, "parts": 16},
    "cpu": {"channels": (8, 16), "embed_dim": 32, "depths": (2, 1), "num_heads": (2, 4),
            "embedding_dim": 32, "parts": 15},
}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def _data_root(cfg) -> Path:
    """The prepared tree for ``cfg.data``; generates the synthetic walkers when needed.

    A data root (``--data DIR``, ``--data-root DIR``, ``data.root``) is only ever read: it must
    hold a prepared tree with its split file. Synthetic walkers are generated only when no root
    is given, into ``data.cache_dir``; a typo'd path must not silently become synthetic data.
    """
    name, root = cfg.data.name, str(cfg.data.root)
    if name not in PLUGIN_DATASETS:
        raise GaitDataError(f"--data {name!r} (data.name): gait datasets are "
                            f"{', '.join(PLUGIN_DATASETS)}, and no path {name!r} exists; give "
                            f"one of them or the path of a prepared tree")
    if root:
        path = Path(root).expanduser()
        split = path / cfg.data.split
        if not path.is_dir():
            raise GaitDataError(f"{path}: data folder not found (data.root, from --data or "
                                f"--data-root)")
        if not split.is_file():
            raise GaitDataError(
                f"{split}: split file missing, so {path} is not a prepared gait tree (nothing was "
                f"written there). Train on synthetic walkers by leaving out --data (they are "
                f"generated in data.cache_dir), write them to a folder with `kpt data get "
                f"gait --dst DIR`, or prepare Gait3D with {PREPARE_COMMAND}")
        return path
    if name == "gait3d":
        raise GaitDataError("--data gait3d needs the prepared Gait3D tree: pass --data-root DIR "
                            f"(config key data.root); make the tree with {PREPARE_COMMAND}")
    cache = cfg.data.cache_dir or os.environ.get("KPT_CACHE", "~/.cache/kpt")
    return ensure_synthetic(Path(cache).expanduser(), synthetic_spec(cfg))


def synthetic_spec(cfg) -> SyntheticSpec:
    d = cfg.data
    return SyntheticSpec(num_train=d.synthetic_train_ids, num_test=d.synthetic_test_ids,
                         seqs_per_id=d.synthetic_seqs, frames=d.synthetic_frames,
                         seed=d.synthetic_seed)


def build_data(cfg) -> TaskData:
    """Training clips + the test sequences (probe set from the split json)."""
    root = _data_root(cfg)
    split = read_split(root / cfg.data.split)
    train_records = scan_layout(root, split.train_ids)
    test_records = scan_layout(root, split.test_ids)
    for key, ids, records in (("TRAIN_SET", split.train_ids, train_records),
                              ("TEST_SET", split.test_ids, test_records)):
        if not records:
            raise GaitDataError(f"{root / cfg.data.split}: split {key} names {len(ids)} ids but "
                                f"none has a sequence folder <id>/<type>/<view> under {root} "
                                f"(check with `kpt data validate gait {root}`)")
    p = cfg.data.aug_prob
    size = {"cut": cfg.data.cut, "downsample": cfg.data.downsample}
    train_tf = GaitTransform(train=True, p_perspective=p, p_flip=p, p_rotate=p, **size)
    test_tf = GaitTransform(train=False, **size)
    train = GaitClipDataset(train_records, train_tf, cfg.data.frames, cfg.data.skip,
                            seed=cfg.train.seed, cache=cfg.data.cache)
    test = GaitSequenceDataset(test_records, test_tf, split.probe_set, cfg.data.max_eval_frames)
    info = {"num_classes": len(train.label_names), "dataset": cfg.data.name,
            "num_train_sequences": len(train), "num_test_sequences": len(test),
            "num_probes": sum(r.key in split.probe_set for r in test_records)}
    return TaskData(train=train, evals={cfg.data.name: test}, info=info,
                    batch_sampler=pk_batch_sampler(cfg.data.k))


# --------------------------------------------------------------------------------------------
# model, step, evaluation
# --------------------------------------------------------------------------------------------
def model_kwargs(cfg, num_classes: int) -> dict:
    """SwinGait2D keyword arguments for ``cfg.model`` (preset resolved)."""
    preset = cfg.model.preset
    if preset == "auto":  # configs written before the gait3d preset chose the size
        preset = "paper" if cfg.data.name == "gait3d" else "cpu"
    if preset not in PRESETS:
        raise ValueError(f"model.preset {preset!r}: use auto, {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[preset])
    if cfg.model.parts:
        kwargs["parts"] = cfg.model.parts
    return dict(kwargs, pos=cfg.model.pos, num_classes=num_classes,
                drop_path_rate=cfg.model.drop_path_rate)


def stem_head_lr_mult(cfg) -> float:
    """``model.stem_head_lr_mult``; 0 (auto): OpenGait's 0.1 when warm-started, else 1.0.

    OpenGait trains the stem, FCs and BNNeck at 0.1 x lr because they come from a trained
    DeepGaitV2; from scratch that rate cost 15 rank-1 points on the synthetic walkers (docs/gait.md).
    """
    mult = float(cfg.model.get("stem_head_lr_mult", 0.0))
    if mult > 0:
        return mult
    return 0.1 if cfg.model.get("init_from", "") else 1.0


def build_model(cfg, info: dict) -> nn.Module:
    """SwinGait2D; warm-started from ``model.init_from``; BatchNorm synchronised under DDP.

    The warm start happens once per run: its report replaces the request in ``info`` (which the
    run saves), so a model rebuilt from a saved run (``kpt eval``) does not read the file again.
    """
    model = SwinGait2D(**model_kwargs(cfg, int(info["num_classes"])))
    init_from = cfg.model.get("init_from", "")
    if init_from and "init_from" not in info:
        info["init_from"] = load_stem_head(model, init_from).summary()
    if cfg.model.get("sync_bn", False):  # OpenGait sync_BN: statistics of the global batch
        model = convert_sync_batchnorm(model)
    mult = stem_head_lr_mult(cfg)
    model.lr_scale_prefixes = {p: mult for p in STEM_HEAD_PREFIXES}
    return model


def training_step(model: nn.Module, batch: dict, cfg) -> tuple[Tensor, dict[str, float]]:
    """Batch: image (n, T, H, W), keypoints (n, T, 17, 2), label (n,) -> triplet + CE."""
    out = model(batch["image"], batch["keypoints"])
    criterion = GaitLoss(cfg.loss.margin, cfg.loss.ce_scale, cfg.loss.label_smoothing,
                         cfg.loss.triplet_weight, cfg.loss.ce_weight,
                         global_triplet=cfg.loss.global_triplet)
    return criterion(out["embeddings"], out["logits"], batch["label"])


def embed_sequences(model: nn.Module, dataset: GaitSequenceDataset, device: torch.device,
                    batch_size: int = 8, amp: str = "none"
                    ) -> tuple[Tensor, list[str], list[bool]]:
    """Embeds every sequence with all its frames, in dataset order.

    Consecutive sequences of equal length share a batch (all of them on the synthetic walkers;
    one at a time on Gait3D, as OpenGait's evaluator does), so memory stays bounded.

    Returns:
        features (N, P, E) float32 on CPU (parts first, as :func:`kpt.metrics.retrieval` expects),
        labels and probe flags in dataset order.
    """
    labels: list[str] = []
    probes: list[bool] = []

    def batches() -> Iterator[dict[str, Tensor]]:
        pending: list[dict] = []
        for i in range(len(dataset)):
            item = dataset[i]
            if pending and (len(pending) == batch_size
                            or item["image"].shape != pending[0]["image"].shape):
                yield _stack_sequences(pending)
                pending = []
            pending.append(item)
            labels.append(item["label"])
            probes.append(bool(item["probe"]))
        if pending:
            yield _stack_sequences(pending)

    def parts_first(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return m(batch["image"], batch["keypoints"])["embeddings"].float().transpose(1, 2)

    feats = predict(model, batches(), parts_first, device=device, amp=amp)  # (N, P, E)
    return feats, labels, probes


def _stack_sequences(items: list[dict]) -> dict[str, Tensor]:
    """Sequences of one length → a batch: image (b, T, H, W), keypoints (b, T, 17, 2)."""
    return {"image": torch.stack([it["image"] for it in items]),
            "keypoints": torch.stack([it["keypoints"] for it in items])}


def evaluate(model: nn.Module, data: TaskData, cfg, device: torch.device) -> dict[str, float]:
    """OpenGait's Gait3D evaluation on every eval set; the first set's metrics are unprefixed."""
    from kpt.metrics import retrieval

    model = getattr(model, "module", model)
    results: dict[str, float] = {}
    for n, (name, dataset) in enumerate(data.evals.items()):
        feats, labels, probe = embed_sequences(model, dataset, device, cfg.eval.batch_size,
                                               cfg.train.amp)
        is_probe = torch.tensor(probe)
        if not is_probe.any():
            raise GaitDataError(f"eval set {name!r}: no sequence of the probe set was found")
        label_ids = {lab: i for i, lab in enumerate(sorted(set(labels)))}
        lab = torch.tensor([label_ids[x] for x in labels])
        metrics = retrieval(feats[is_probe], lab[is_probe], feats[~is_probe], lab[~is_probe],
                            ranks=(1, 5, 10), metric=cfg.eval.metric)
        prefix = "" if n == 0 else f"{name}/"
        results.update({f"{prefix}{k}": float(v) for k, v in metrics.items()})
    return results


def _embed_command(argv: list[str]) -> int:
    from kpt_plugins.gait.embed import embed_main

    return embed_main(argv)


def _synthetic_get(argv: list[str]) -> int:
    """``kpt data get gait --dst DIR``: writes the synthetic walkers that ``kpt train gait`` uses."""
    import argparse

    from kpt.config import build_config

    parser = argparse.ArgumentParser(prog="kpt data get gait")
    parser.add_argument("--dst", type=Path, required=True)
    args = parser.parse_args(argv[1:] if argv and argv[0] in ("synthetic", "gait") else argv)
    # the spec of the default config (its data.synthetic_* keys), not SyntheticSpec's own defaults
    generate(args.dst, synthetic_spec(build_config(PLUGIN)))
    print(f"wrote synthetic walkers to {args.dst}")
    return 0


PLUGIN = Plugin(
    name="gait",
    description="Gait recognition: SwinGait-2D + KP-RPE (17 joints) on Gait3D or synthetic walkers",
    default_config="config.yaml",
    build_data=build_data,
    build_model=build_model,
    training_step=training_step,
    evaluate=evaluate,
    datasets=PLUGIN_DATASETS,
    commands={"data prepare": prepare_main, "data validate": validate_main,
              "data get": _synthetic_get, "embed": _embed_command},
    primary_metric="rank1",
    check_config={"data.synthetic_train_ids": 4, "data.synthetic_test_ids": 3,
                  "data.synthetic_seqs": 2, "data.synthetic_frames": 12, "data.frames": 8,
                  "data.k": 2, "train.batch_size": 4, "model.drop_path_rate": 0.0},
    choices={"model.pos": ("none", "kprpe"), "model.preset": ("auto", *PRESETS),
             "model.parts": (0, 15, 16), "data.name": ("synthetic", "gait3d"),
             "eval.metric": ("euclidean", "cosine")},
)
