"""``kpt data prepare face`` and ``kpt data validate face`` (plugin ``commands`` entries).

Both receive the remaining command-line arguments and return an exit status.

* ``prepare --data PATH``: runs RetinaFace once over every image of the data set and writes the
  landmark cache beside it (:mod:`~kpt_plugins.face.data.landmarks_cache`).
* ``validate --data PATH``: counts records / images / identities / pairs and reports missing and
  corrupt entries (bad framing, headers, undecodable images, broken identity ranges, a landmark
  cache that does not fit); exit status 1 when anything is wrong.
"""

from __future__ import annotations

import argparse
import logging
import mmap
import struct
import sys
import time
from pathlib import Path

import numpy as np

from .data.checks import LabelSet, gap_summary, label_problems, source_labels
from .data.datasets import describe_missing, detect_kind, open_face_source
from .data.landmarks_cache import cache_path, compute_landmarks, read_landmarks, write_landmarks
from .data.recordio import MAGIC, InsightFaceRec, RecordIOError, decode_image, unpack_record

__all__ = ["prepare", "validate"]

log = logging.getLogger(__name__)

_SMALL_SIDE = 160  # images up to this size are aligned crops: pad and upsample (CVLface's recipe)


def _out(line: str = "") -> None:
    print(line, file=sys.stdout, flush=True)


def _prepare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kpt data prepare face",
        description="Detect the five RetinaFace landmarks of every image once and cache them "
        "beside the data (ldmk_5points.csv).",
        epilog="example: kpt data prepare face --data data/faces_webface_112x112",
    )
    p.add_argument("--data", required=True, help="train.rec folder, image folder, TinyFace, .bin")
    p.add_argument("--weights", default=None, help="official RetinaFace .pth (default: bundled)")
    p.add_argument("--network", default=None, choices=["mobilenet0.25", "resnet50"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    p.add_argument(
        "--padding-ratio",
        type=float,
        default=None,
        help="black border per side before detecting (default: 0.215 for crops up to "
        "160 px, as CVLface labels aligned 112×112 sets; 0 otherwise)",
    )
    p.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="detector input side (default: 160 for small crops, else original size)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing cache")
    return p


def prepare(argv: list[str]) -> int:
    """Compute and store the landmark cache of one data set."""
    args = _prepare_parser().parse_args(argv)
    from .retinaface.detector import RetinaFaceKeypoints

    data = Path(args.data)
    target = cache_path(data)
    if target.exists() and not args.force:
        _out(f"{target} exists; use --force to recompute")
        return 0
    kind, source = open_face_source(data)
    if len(source) == 0:
        _out(f"{data}: no images")
        return 1
    first, _ = source[0]
    small = max(first.shape[:2]) <= _SMALL_SIDE
    padding = args.padding_ratio if args.padding_ratio is not None else (0.215 if small else 0.0)
    input_size = (
        args.input_size if args.input_size is not None else (_SMALL_SIDE if small else None)
    )
    detector = RetinaFaceKeypoints(
        weights=args.weights,
        network=args.network,
        padding_ratio=padding,
        input_size=input_size,
        device=args.device,
    )
    _out(
        f"{data} ({kind}): {len(source)} images; RetinaFace {detector.net.cfg.name}, "
        f"padding {padding}, input size {input_size or 'original'}"
    )
    start = time.perf_counter()
    last = [start]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 10 or done == total:
            last[0] = now
            _out(f"  {done}/{total} images, {done / (now - start):.1f} img/s")

    keypoints, found, scores = compute_landmarks(
        source, detector, args.batch_size, progress, workers=args.workers
    )
    write_landmarks(target, keypoints, scores)
    missing = describe_missing(source, found, limit=10)
    _out(f"wrote {target}: {int(found.sum())}/{len(found)} faces found"
         + (f"; template used, {missing}" if missing else ""))
    return 0


# ----------------------------------------------------------------------------------- validate


class _Report:
    def __init__(self, limit: int = 20) -> None:
        self.problems: list[str] = []
        self.limit = limit

    def problem(self, text: str) -> None:
        self.problems.append(text)
        if len(self.problems) <= self.limit:
            _out(f"  ! {text}")


def _scan_rec(path: Path, report: _Report) -> set[int]:
    """Record start offsets found by walking the chunks of a ``.rec`` from the beginning."""
    starts: set[int] = set()
    if path.stat().st_size == 0:
        return starts
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos, in_record = 0, False
        while pos + 8 <= len(data):
            magic, lrec = struct.unpack_from("<II", data, pos)
            if magic != MAGIC:
                report.problem(f"{path}: bad magic at offset {pos}; the rest is unreadable")
                break
            cflag = lrec >> 29
            if not in_record:
                starts.add(pos)
            in_record = cflag in (1, 2)
            pos += 8 + (((lrec & ((1 << 29) - 1)) + 3) & ~3)
    return starts


def _validate_rec(root: Path, rec: InsightFaceRec, report: _Report, decode: bool) -> dict:
    reader = rec.reader
    counts = {"idx entries": len(reader), "images": len(rec)}
    if rec.expected_image_keys is not None:
        absent = sorted(set(rec.expected_image_keys) - set(rec.image_keys))
        counts["missing image keys"] = len(absent)
        if absent:
            report.problem(
                f"{reader.idx_path}: {len(absent)} image keys of key 0's range are "
                f"missing (first: {absent[:5]})"
            )
    starts = _scan_rec(reader.rec_path, report)
    if starts:
        unindexed = starts - set(reader.offsets.values())
        if unindexed:
            report.problem(f"{reader.rec_path}: {len(unindexed)} records not in {reader.idx_path}")
    labels, label_keys = [], []
    for n, key in enumerate(rec.image_keys):
        offset = reader.offsets[key]
        if offset >= reader.file_size:
            report.problem(f"key {key}: offset {offset} is past the end of {reader.rec_path}")
            continue
        try:
            header, payload = unpack_record(reader.read(key), f"{reader.rec_path} key {key}")
            label = header.label if header.flag == 0 else float(np.asarray(header.label)[0])
            labels.append(float(label))  # kept as stored: NaN / negative labels are reported
            label_keys.append(key)
            if decode:
                decode_image(payload, f"{reader.rec_path} key {key}")
        except (RecordIOError, ValueError) as exc:
            report.problem(str(exc))
    ranges = rec.read_identity_ranges()
    counts["identity records"] = len(ranges)
    for cls, (lo, hi) in ranges.items():
        absent = [k for k in (lo, hi - 1) if k not in reader.offsets]
        if hi <= lo or absent:
            report.problem(f"identity {cls}: range [{lo}, {hi}) has missing keys {absent}")
    if labels:
        values = np.asarray(labels)
        counts.update(gap_summary(values))
        num_classes, count_from = None, ""
        if rec.property is not None:
            num_classes, count_from = rec.property[0], f"{root / 'property'}"
            counts["classes (property)"] = num_classes
            finite = values[np.isfinite(values)]
            if len(finite) and (finite.min() < 0 or finite.max() >= num_classes):
                report.problem(f"labels span [{finite.min():g}, {finite.max():g}] outside "
                               f"property's {num_classes} classes ({count_from})")
        path = reader.rec_path
        label_set = LabelSet(values, lambda i: f"{path} record key {label_keys[i]}")
        for line in label_problems(label_set, num_classes, count_from):
            report.problem(line)
    return counts


def _validate_items(source, report: _Report, decode: bool) -> dict:
    bad = 0
    if decode:
        for i in range(len(source)):
            try:
                source[i]
            except (OSError, ValueError) as exc:  # RecordIOError (undecodable) is a ValueError
                bad += 1
                report.problem(f"item {i}: {exc}")
    counts: dict = {"images": len(source), "unreadable": bad}
    label_set = source_labels(source) if not hasattr(source, "protocol") else None
    if label_set is not None:  # TinyFace is a test protocol (distractors are labelled -100)
        counts.update(gap_summary(label_set.labels))
        for line in label_problems(label_set, getattr(source, "num_classes", None),
                                   "the identity folders"):
            report.problem(line)
    return counts


def _validate_ijb(data: Path, report: _Report, check_images: bool) -> int | None:
    """IJB-B / IJB-C layout check (None when ``data`` is no IJB folder): meta files, pairs whose
    templates have no image, images listed but missing."""
    from .evaluation.ijb import IJB_TARGETS, IJBProtocol, find_ijb_root, ijb_layout_problems

    if not data.is_dir():
        return None
    found = {t: find_ijb_root([data], t) for t in IJB_TARGETS}
    found = {t: r for t, r in found.items() if r is not None}
    looks_ijb = (data / "loose_crop").is_dir() or (data / "meta").is_dir()
    if not found and not looks_ijb:
        return None
    board_root = any(root != data for root in found.values())
    _out(f"{data}: {'benchmark board root' if board_root else 'IJB layout'}")
    targets = found or {t: data for t in IJB_TARGETS}
    ok_any = False
    for target, root in targets.items():
        problems = ijb_layout_problems(root, target, check_images)
        if problems and not found:  # a bare set folder: say what each target would need
            _out(f"  {target}: not usable")
        for line in problems:
            report.problem(line)
        if not problems:
            ok_any = True
            protocol = IJBProtocol.from_folder(root, target)
            _out(f"  {target} ({root}): {len(protocol)} images, "
                 f"{len(np.unique(protocol.templates))} templates, "
                 f"{len(np.unique(protocol.medias))} medias, {len(protocol.pair_labels)} pairs "
                 f"({int((protocol.pair_labels > 0).sum())} genuine)")
    if board_root:  # the other board sets too
        from .evaluation.board import BOARD_BINS, find_bins
        from .evaluation.tinyface import find_tinyface_root, tinyface_layout_problems

        tiny = find_tinyface_root([data])
        _out(f"  tinyface: {tiny if tiny else 'not found'}")
        for line in tinyface_layout_problems(tiny) if tiny else []:
            report.problem(line)
        from .evaluation.cfp import cfp_layout_problems, find_cfp_root

        cfp = find_cfp_root([data])
        _out(f"  raw CFP (cfp_fp_unaligned): {cfp if cfp else 'not found'}")
        for line in cfp_layout_problems(cfp, check_images) if cfp else []:
            report.problem(line)
        bins = find_bins([str(data)])
        _out(f"  .bin sets: {', '.join(b for b in BOARD_BINS if b in bins) or 'none'}"
             f"; not found: {', '.join(b for b in BOARD_BINS if b not in bins) or 'none'}")
        missing = ([t for t in IJB_TARGETS if t not in found] + ([] if tiny else ["tinyface"])
                   + ([] if cfp else ["cfp_fp_unaligned"]))
        if missing:
            _out(f"  the board row will leave empty: {', '.join(missing)}")
    if report.problems or not ok_any:
        _out(f"{len(report.problems)} problem(s) found")
        return 1
    _out("OK")
    return 0


def _validate_cfp(data: Path, report: _Report, check_images: bool) -> int | None:
    """Raw CFP tree check (None when ``data`` holds none): pair lists, FP splits, images."""
    from .evaluation.cfp import CFPProtocol, cfp_layout_problems, find_cfp_root

    root = find_cfp_root([data]) if data.is_dir() else None
    if root is None:
        return None
    _out(f"{data}: raw CFP tree ({root})")
    for line in cfp_layout_problems(root, check_images):
        report.problem(line)
    if report.problems:
        _out(f"{len(report.problems)} problem(s) found")
        return 1
    protocol = CFPProtocol.from_folder(root)
    splits = len(set(protocol.fold.tolist()))
    _out(f"  FP: {len(protocol)} pairs ({int(protocol.issame.sum())} genuine) in {splits} splits"
         f"{'' if splits == 10 else ' (the release has 10)'}, {len(protocol.paths)} images")
    _out("OK")
    return 0


def validate(argv: list[str]) -> int:
    """Report counts, missing and corrupt entries of one data set; 0 when clean."""
    p = argparse.ArgumentParser(
        prog="kpt data validate face",
        description="Check a face data set: counts, missing and corrupt records.",
        epilog="example: kpt data validate face --data data/faces_webface_112x112",
    )
    p.add_argument("--data", required=True)
    p.add_argument("--no-decode", action="store_true", help="skip decoding the images")
    args = p.parse_args(argv)
    data = Path(args.data)
    report = _Report()
    ijb = _validate_ijb(data, report, not args.no_decode)
    if ijb is not None:
        return ijb
    cfp = _validate_cfp(data, report, not args.no_decode)
    if cfp is not None:
        return cfp
    try:
        kind = detect_kind(data)
        _, source = open_face_source(data)
    except (OSError, ValueError) as exc:
        _out(f"{data}: cannot open: {exc}")
        return 1
    _out(f"{data}: {kind}")
    if kind == "rec":
        counts = _validate_rec(data, source, report, not args.no_decode)
    else:
        counts = _validate_items(source, report, not args.no_decode)
        if kind == "bin":
            counts["pairs"] = len(source.pairs)
            counts["same pairs"] = int(source.pairs.issame.sum())
        if kind == "folder":
            counts["identities"] = source.num_classes
            empty = [
                c for c in source.classes if not (source.labels == source.classes.index(c)).any()
            ]
            counts["empty identity folders"] = len(empty)
        if kind == "tinyface":
            from .evaluation.tinyface import tinyface_layout_problems, tinyface_protocol

            counts["probes"] = len(source.protocol.probe_paths)
            counts["distractors"] = int((source.protocol.gallery_labels == -100).sum())
            for line in tinyface_layout_problems(data):
                report.problem(line)
            try:
                counts["official .mat lists"] = len(tinyface_protocol(data)[1])
            except (OSError, ValueError):
                pass
    cache = cache_path(data)
    if cache.is_file():
        try:
            rows: list[str] = []
            _, scores = read_landmarks(cache, expected=len(source), problems=rows)
            counts["landmarks cached"] = len(source)
            counts["bad landmark rows"] = len(rows)
            for line in rows:
                report.problem(line)
            if scores is not None:
                counts["landmarks without a face"] = int((scores <= 0).sum())
        except (OSError, ValueError) as exc:
            report.problem(str(exc))
    else:
        counts["landmarks cached"] = 0
    for name, value in counts.items():
        _out(f"  {name:>28}: {value}")
    if report.problems:
        hidden = len(report.problems) - report.limit
        _out(f"{len(report.problems)} problem(s) found"
             + (f" ({hidden} not shown above)" if hidden > 0 else ""))
        return 1
    _out("OK")
    return 0
