"""The face benchmark board: IJB-B/C, TinyFace and the ``.bin`` sets as one row (CVLface's table).

``kpt eval face CHECKPOINT --test full eval.bin_root=BOARD_ROOT`` evaluates every set found under
the board root (``eval.bin_root``, else ``data.root``) and writes the row as markdown and CSV
(``eval.board_out``, default ``board``): the seed's columns

    AVG, LFW, CPLFW, CFP-FP, CALFW, AgeDB, IJB-B@0.01, IJB-C@0.01, TinyFace R1, TinyFace R5

(accuracies and TAR@FAR = 0.01 % in percent; AVG = the mean of those nine, left empty unless all
nine were measured) and the unaligned columns ``IJB-C@0.01 unaligned`` and ``CFP-FP unaligned``
(KP-RPE paper, Table 1; the raw CFP tree, :mod:`.cfp`). Sets that are not found are named in the
output, never silently dropped. ``--test ijbb ijbc ijbc_unaligned tinyface cfp_fp_unaligned`` runs
single protocols.

The recogniser is an :data:`~.features.Embedder`: a kpt model (kpt weights, converted CVLface
weights) through :class:`~.features.ModelEmbedder`, or any object with the same call (ONNX).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

from kpt.config import Config
from kpt.metrics.tar_at_far import far_key

from .cfp import evaluate_cfp, find_cfp_root
from .features import ModelEmbedder, cache_folder
from .ijb import evaluate_ijb, find_ijb_root
from .tinyface import evaluate_tinyface, find_tinyface_root

__all__ = ["BOARD_BINS", "BOARD_TESTS", "COLUMNS", "board_metrics", "board_row", "run_board_sets",
           "write_board"]

logger = logging.getLogger(__name__)

#: ``--test`` names handled here (not ``.bin`` files).
BOARD_TESTS = ("ijbb", "ijbc", "ijbb_unaligned", "ijbc_unaligned", "tinyface", "cfp_fp_unaligned",
               "full")
#: The verification ``.bin`` sets of the board, in column order.
BOARD_BINS = ("lfw", "cplfw", "cfp_fp", "calfw", "agedb_30")
_BOARD_FAR = far_key(1e-4)
#: (column, metric key); every value in percent (the face plugin reports accuracy in percent).
COLUMNS = (
    ("LFW", "lfw/accuracy"), ("CPLFW", "cplfw/accuracy"), ("CFP-FP", "cfp_fp/accuracy"),
    ("CALFW", "calfw/accuracy"), ("AgeDB", "agedb_30/accuracy"),
    ("IJB-B@0.01", f"ijbb/{_BOARD_FAR}"), ("IJB-C@0.01", f"ijbc/{_BOARD_FAR}"),
    ("TinyFace R1", "tinyface/rank1"), ("TinyFace R5", "tinyface/rank5"),
    ("IJB-C@0.01 unaligned", f"ijbc_unaligned/{_BOARD_FAR}"),
    ("CFP-FP unaligned", "cfp_fp_unaligned/accuracy"),
)
_AVERAGED = 9  # AVG is over the seed's nine columns, as the CVLface board


def board_roots(cfg: Config) -> list[str]:
    """Folders searched for the board's sets: ``eval.bin_root``, then ``data.root``."""
    return [r for r in (cfg.eval.bin_root, cfg.data.root) if r]


def find_bins(roots: list[str]) -> dict[str, Path]:
    """The board's ``.bin`` files found under ``roots`` (name → path)."""
    found = {}
    for name in BOARD_BINS:
        for root in roots:
            if (Path(root) / f"{name}.bin").is_file():
                found[name] = Path(root) / f"{name}.bin"
                break
    return found


def _target(name: str) -> str:
    return name.removesuffix("_unaligned")


def expand_tests(tests: list[str], roots: list[str]) -> tuple[list[str], list[str]]:
    """(board protocols to run, sets not found) for the ``--test`` names.

    ``full`` stands for every IJB / TinyFace protocol found under ``roots``; the rest are named
    as missing. An explicitly named protocol that is not found is an error.
    """
    from ..data.checks import MissingDataError

    run: list[str] = []
    missing: list[str] = []
    wanted = [t for t in tests if t in BOARD_TESTS]
    if "full" in wanted:
        wanted = [t for t in wanted if t != "full"] + ["ijbb", "ijbc", "ijbc_unaligned", "tinyface",
                                                       "cfp_fp_unaligned"]
        optional = True
    else:
        optional = False
    for name in dict.fromkeys(wanted):
        found = (find_tinyface_root(roots) if name == "tinyface"
                 else find_cfp_root(roots) if name == "cfp_fp_unaligned"
                 else find_ijb_root(roots, _target(name)))
        if found is not None:
            run.append(name)
        elif optional and name not in tests:
            missing.append(name)
        else:
            where = " or ".join(roots) or "(no eval.bin_root / data.root set)"
            raise MissingDataError(f"--test {name}: no {_layout_hint(name)} under {where}; set "
                                   f"eval.bin_root to the folder that holds it")
    return run, missing


def _layout_hint(name: str) -> str:
    if name == "tinyface":
        return "TinyFace layout (Probe/, Gallery_Match/, Gallery_Distractor/)"
    if name == "cfp_fp_unaligned":
        return ("raw CFP tree (cfp-dataset/Protocol/Pair_list_F.txt, Pair_list_P.txt, Split/FP/, "
                "Data/Images/)")
    t = _target(name)
    return f"IJB layout ({t.upper()}/loose_crop/ and {t.upper()}/meta/{t}_face_tid_mid.txt)"


def run_board_sets(embedder: Any, names: list[str], roots: list[str], *, size: int = 112,
                   flip: bool = True, keep_norm: bool = True, faceness: bool = True,
                   cache_root: str = "", chunk_size: int = 8192, batch_size: int = 64,
                   workers: int = 0, unaligned_keypoints: str = "provided",
                   tinyface_keypoints: str = "template", detector: Any = None,
                   crop_detector: Any = None, cfp_resize: str = "stretch",
                   cfp_detector: Any = None, flip_keypoints: str = "detect") -> dict[str, float]:
    """Metrics of the IJB / TinyFace protocols ``names`` (see :data:`BOARD_TESTS`).

    Args:
        embedder: the recogniser (see :mod:`.features`); its ``key`` names the feature cache.
        cache_root: feature cache root ('' = ``~/.cache/kpt/features``; ``none`` = no cache).
        detector: ``(B, 3, H, W) uint8 -> (B, 5, 2)`` keypoints for the unaligned IJB protocol
            when ``unaligned_keypoints`` is ``retinaface``.
        crop_detector: the same for TinyFace's aligned crops when ``tinyface_keypoints`` is
            ``retinaface``.
        cfp_resize: ``stretch`` | ``pad``, the unaligned CFP-FP resize rule (see :mod:`.cfp`).
        cfp_detector: ``(B, 3, H, W) uint8 -> ((B, 5, 2), (B,) found)`` for CFP-FP (None:
            RetinaFace).
        flip_keypoints: where keypoints are detected (unaligned IJB with ``retinaface``, TinyFace
            with ``retinaface``, unaligned CFP-FP): ``detect`` also runs the detector on the
            mirrored image for flip fusion (CVLface reruns its aligner) or ``mirror``.

    Returns:
        ``ijbc/tar@far=1e-4`` …, ``ijbc_unaligned/…``, ``tinyface/rank1`` …,
        ``cfp_fp_unaligned/accuracy`` … (percent).
    """
    key = getattr(embedder, "key", "") or "unnamed"
    metrics: dict[str, float] = {}
    for name in names:
        variant = f"{'flip' if flip else 'noflip'}-{size}"
        if name == "cfp_fp_unaligned":
            res = evaluate_cfp(embedder, find_cfp_root(roots), size=size, resize=cfp_resize,
                               flip=flip, detector=cfp_detector, batch_size=batch_size,
                               workers=workers, flip_keypoints=flip_keypoints)
        elif name == "tinyface":
            root = find_tinyface_root(roots)
            kp_fn = crop_detector if tinyface_keypoints == "retinaface" else None
            cache = None if cache_root == "none" else cache_folder(
                cache_root, key, f"tinyface-{variant}-{tinyface_keypoints}")
            res = evaluate_tinyface(embedder, root, size=size, flip=flip, keypoint_fn=kp_fn,
                                    cache_dir=cache, chunk_size=chunk_size,
                                    batch_size=batch_size, workers=workers,
                                    flip_keypoints=flip_keypoints)
        else:
            target = _target(name)
            aligned = not name.endswith("_unaligned")
            kp = "provided" if aligned else unaligned_keypoints
            cache = None if cache_root == "none" else cache_folder(
                cache_root, key, f"{name}-{variant}-{kp}")
            res = evaluate_ijb(embedder, find_ijb_root(roots, target), target, size=size,
                               aligned=aligned, flip=flip, keep_norm=keep_norm, faceness=faceness,
                               cache_dir=cache, chunk_size=chunk_size, batch_size=batch_size,
                               workers=workers, keypoints=kp, detector=detector,
                               flip_keypoints=flip_keypoints)
        metrics.update({f"{name}/{k}": float(v) for k, v in res.items()})
        logger.info("%s: %s", name, ", ".join(f"{k} {v:.2f}" for k, v in res.items()))
    return metrics


def board_row(metrics: dict[str, float]) -> dict[str, float | None]:
    """The board's columns (AVG first) from flat metrics; None where a set was not measured."""
    row: dict[str, float | None] = {}
    for column, key in COLUMNS:
        value = metrics.get(key)
        row[column] = None if value is None or not math.isfinite(value) else float(value)
    seed = [row[c] for c, _ in COLUMNS[:_AVERAGED]]
    avg = sum(seed) / len(seed) if all(v is not None for v in seed) else None  # type: ignore[arg-type,misc]
    return {"AVG": avg, **row}


def write_board(row: dict[str, float | None], missing: list[str], out: str | Path,
                model: str = "model") -> tuple[Path, Path]:
    """Write ``<out>.md`` (a markdown table and the missing sets) and ``<out>.csv``.

    Returns:
        (markdown path, CSV path).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cells = ["" if v is None else f"{v:.2f}" for v in row.values()]
    header = ["Model", *row]
    md = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
          "| " + " | ".join([model, *(c or "–" for c in cells)]) + " |", ""]
    if missing:
        md.append("Not measured (set not found under the board root): " + ", ".join(missing))
    if row.get("AVG") is None:
        md.append("AVG needs all nine seed columns.")
    md_path, csv_path = out.with_suffix(".md"), out.with_suffix(".csv")
    md_path.write_text("\n".join(md) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*header, "missing"])
    writer.writerow([model, *cells, ";".join(missing)])
    csv_path.write_text(buf.getvalue())
    return md_path, csv_path


def board_metrics(model: Any, cfg: Config, device: Any, metrics: dict[str, float],
                  embedder: Any = None) -> dict[str, float]:
    """``evaluate``'s part for the board tests of ``cfg.eval.test``; writes the row for ``full``
    (or whenever ``eval.board_out`` is set).

    Args:
        model: the kpt model (ignored when ``embedder`` is given, e.g. an ONNX recogniser).
        metrics: the ``.bin`` metrics already measured (``lfw/accuracy`` …), for the row.
    """
    e = cfg.eval
    roots = board_roots(cfg)
    names, missing = expand_tests(list(e.test), roots)
    if embedder is None:
        embedder = ModelEmbedder(model, device, cfg.train.amp)
    detector = crop_detector = None
    if e.ijb_unaligned_keypoints == "retinaface" or e.tinyface_keypoints == "retinaface":
        from .verification import detect_keypoints

        def detector(images: Any) -> Any:
            return detect_keypoints(images, e.batch_size)[0]

        def crop_detector(images: Any) -> Any:
            return detect_keypoints(images, e.batch_size, crop=True)[0]

    size = int(getattr(cfg.model, "img_size", 112) or 112)
    out = run_board_sets(embedder, names, roots, size=size, flip=e.flip, keep_norm=e.ijb_norm,
                         faceness=e.ijb_faceness, cache_root=e.cache_dir,
                         chunk_size=e.cache_chunk, batch_size=e.batch_size, workers=e.workers,
                         unaligned_keypoints=e.ijb_unaligned_keypoints,
                         tinyface_keypoints=e.tinyface_keypoints, detector=detector,
                         crop_detector=crop_detector, cfp_resize=e.cfp_resize,
                         flip_keypoints=e.bin_flip_keypoints)
    if "full" in e.test or e.board_out:
        found_bins = find_bins(roots)
        missing = [n for n in BOARD_BINS if n not in found_bins] + missing
        for name in missing:
            logger.warning("board: %s not found under %s; its column stays empty", name,
                           " or ".join(roots) or "(no board root)")
        row = board_row({**metrics, **out})
        md, csv_path = write_board(row, missing, e.board_out or "board",
                                   e.board_name or getattr(cfg.model, "name", "model"))
        logger.info("board row written to %s and %s", md, csv_path)
    return out
