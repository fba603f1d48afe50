"""``kpt embed gait SEQUENCES... --weights RUN --out emb.npz [--gallery DIR --top K]``.

Each argument is a folder of OpenGait's pkl layout: a data root ``<root>/<id>/<type>/<view>/``, one
identity or type folder of it, or one sequence folder (the folder ``<view>`` that holds
``<view>.pkl`` and ``<view>-pose.pkl``). Every sequence below it is embedded with all its frames
(at most ``data.max_eval_frames``), preprocessed as the run's evaluation does (its ``data.cut`` and
``data.downsample``), through the same path as ``kpt eval gait``
(:func:`~kpt_plugins.gait.plugin.embed_sequences`). Files are read with the plugin's checked
readers (restricted unpickler).

Written with the sequence keys ``id-type-view`` (OpenGait's probe-set keys):

* ``.npz``: ``embeddings`` (N, P, E) float32 (P horizontal parts, E features each, as the
  evaluation compares them), ``keys`` (N,) str, ``labels`` (N,) str (the id folder);
* ``.npy``: the (N, P, E) embeddings, and the keys one per line in ``<out>.keys.txt``.

``--gallery DIR`` ranks the sequences under DIR for every input by the evaluation's distance (mean
over parts of the per-part distance, ``eval.metric`` of the run: Euclidean by default; smaller is
closer) and prints the ``--top`` nearest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kpt.config import Config

from .data import GaitDataError, GaitSequenceDataset, SequenceRecord
from .transforms import GaitTransform

__all__ = ["embed_main", "embed_records", "find_sequences", "rank_sequences"]


def _is_sequence(folder: Path) -> bool:
    return (folder / f"{folder.name}.pkl").is_file()


def find_sequences(items: list[str]) -> list[SequenceRecord]:
    """The sequences under each argument, in argument order, each folder's in OpenGait's order
    (id → type → view); a sequence named twice is kept once.

    Raises:
        GaitDataError: an argument is not a folder, or holds no sequence folder.
    """
    records: dict[Path, SequenceRecord] = {}
    for item in items:
        path = Path(item)
        if not path.is_dir():
            raise GaitDataError(f"{path}: no such folder; expected a gait data root "
                                f"<root>/<id>/<type>/<view>/ or one of its sequence folders")
        # the folder itself, or every folder below it (a root, an id or a type folder), that
        # holds its own <view>.pkl; names come from the resolved path ("." has no name)
        folders = [path] if _is_sequence(path) else sorted(
            {p.parent for p in path.rglob("*.pkl") if _is_sequence(p.parent)})
        found = []
        for folder in folders:
            resolved = folder.resolve()
            found.append(SequenceRecord(resolved.parent.parent.name, resolved.parent.name,
                                        resolved.name, folder))
        if not found:
            raise GaitDataError(f"{path}: no gait sequence inside (expected <id>/<type>/<view>/"
                                f"<view>.pkl with its <view>-pose.pkl, OpenGait's layout)")
        for record in found:
            records.setdefault(record.folder.resolve(), record)
    return list(records.values())


def load_gait_run(weights: str | Path, device: str = "cpu") -> tuple[nn.Module, Config, Path]:
    """``(model in eval mode, the run's config, the weights file)`` of a gait run folder,
    ``last.pt``/``best.pt`` or ``weights.safetensors`` (resolved by
    :func:`kpt.engine.weights.resolve_run_weights`; another plugin's file is refused)."""
    from kpt.engine.weights import apply_run_state, read_run_state

    from .plugin import build_model

    run = read_run_state(weights, "gait")
    cfg = Config(run["config"])
    model = build_model(cfg, dict(run["info"]))
    apply_run_state(model, run)
    return model.to(device).eval(), cfg, Path(run["path"])


def embed_records(model: nn.Module, cfg: Config, records: list[SequenceRecord],
                  device: str = "cpu") -> np.ndarray:
    """Embeddings (N, P, E) float32 of the sequences, as the run's evaluation computes them."""
    from .plugin import embed_sequences

    transform = GaitTransform(train=False, cut=cfg.data.cut, downsample=cfg.data.downsample)
    dataset = GaitSequenceDataset(records, transform, set(), cfg.data.max_eval_frames)
    feats, _, _ = embed_sequences(model, dataset, torch.device(device), cfg.eval.batch_size,
                                  cfg.train.amp)
    return feats.numpy().astype(np.float32)


def rank_sequences(query: np.ndarray, keys: list[str], gallery: np.ndarray,
                   gallery_keys: list[str], top: int, metric: str = "euclidean"
                   ) -> dict[str, list[tuple[str, float]]]:
    """``{query key: [(gallery key, distance), ...]}``, nearest first.

    Args:
        query: (N, P, E) embeddings; gallery: (G, P, E).
        metric: ``euclidean`` or ``cosine`` (1 − cosine similarity), mean over the P parts.
    """
    from kpt.metrics.retrieval import pairwise_distance

    distance = pairwise_distance(query, gallery, metric)  # (N, G)
    order = np.argsort(distance, axis=1, kind="stable")[:, :top]
    return {key: [(gallery_keys[j], float(distance[i, j])) for j in order[i]]
            for i, key in enumerate(keys)}


def write_embeddings(out: Path, embeddings: np.ndarray, records: list[SequenceRecord]
                     ) -> list[Path]:
    """``.npz`` (embeddings, keys, labels) or ``.npy`` + ``.keys.txt``; returns the files."""
    keys = [r.key for r in records]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, embeddings)
        listing = out.with_suffix(".keys.txt")
        listing.write_text("".join(f"{k}\n" for k in keys))
        return [out, listing]
    if out.suffix != ".npz":
        raise GaitDataError(f"--out {out}: expected a .npz or .npy file name")
    np.savez(out, embeddings=embeddings, keys=np.asarray(keys, dtype=str),
             labels=np.asarray([r.label for r in records], dtype=str))
    return [out]


def embed_main(argv: list[str]) -> int:
    """The ``kpt embed gait`` command; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="kpt embed gait",
        description="Embeddings of gait sequences (OpenGait pkl layout) with their keys "
                    "id-type-view; optionally rank a gallery of sequences against them.",
        epilog="example: kpt embed gait data/gait/0005 --weights runs/gait/RUN --out emb.npz")
    parser.add_argument("sequences", nargs="+", metavar="FOLDER",
                        help="data root, id, type or sequence folder(s)")
    parser.add_argument("--weights", required=True,
                        help="run folder, last.pt, best.pt or weights.safetensors of a gait run")
    parser.add_argument("--out", type=Path, help="embeddings file: .npz or .npy")
    parser.add_argument("--gallery", type=Path, help="folder of sequences to rank for each input")
    parser.add_argument("--top", type=int, default=5, help="matches printed per input (--gallery)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the ranking as JSON")
    args = parser.parse_args(argv)
    if args.out is None and args.gallery is None:
        parser.error("give --out FILE (embeddings) and/or --gallery DIR (ranking)")
    records = find_sequences(args.sequences)
    model, cfg, weights = load_gait_run(args.weights, args.device)
    embs = embed_records(model, cfg, records, args.device)
    if args.out is not None:
        files = write_embeddings(args.out, embs, records)
        print(f"wrote {len(records)} embeddings ({embs.shape[1]} parts x {embs.shape[2]}, "
              f"weights {weights}) to {' and '.join(map(str, files))}")
    if args.gallery is not None:
        g_records = find_sequences([str(args.gallery)])
        g_embs = embed_records(model, cfg, g_records, args.device)
        ranking = rank_sequences(embs, [r.key for r in records], g_embs,
                                 [r.key for r in g_records], args.top, cfg.eval.metric)
        if args.json:
            print(json.dumps(ranking))
        else:
            print(f"distance: {cfg.eval.metric}, mean over parts (smaller is closer)",
                  file=sys.stderr)
            for key, matches in ranking.items():
                print(f"{key}: " + ", ".join(f"{k} {d:.3f}" for k, d in matches))
    return 0
