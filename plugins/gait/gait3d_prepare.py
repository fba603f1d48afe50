"""`kpt data prepare gait3d` and `kpt data validate gait`: raw Gait3D -> kpt/OpenGait layout.

Expected raw tree (what the Gait3D authors release, see docs/gait.md)::

    RAW/2D_Silhouettes/<id>/<camidX_videoidY>/<seqZ>/human_crop_f<frame>.png
    RAW/2D_Poses/<id>/<camidX_videoidY>/<seqZ>/human_crop_f<frame>.txt
    RAW/Gait3D.json            (or --split PATH; OpenGait ships it as datasets/Gait3D/Gait3D.json)

Output: ``DST/<id>/<type>/<view>/<view>.pkl`` (uint8 (T,64,64)) and ``<view>-pose.pkl``
(float32 (T,17,3) in the silhouette frame, see :mod:`kpt_plugins.gait.poses`) plus
``DST/Gait3D.json``. Both commands are plain ``(argv) -> exit code`` functions that the plugin
exposes through its ``commands`` mapping.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from kpt_plugins.gait.data import (
    GaitDataError,
    SequenceRecord,
    check_poses,
    check_silhouettes,
    read_array_pkl,
    read_split,
    scan_layout,
    split_problems,
    write_array_pkl,
)
from kpt_plugins.gait.poses import frame_number, pretreat_sequence

from kpt.errors import DataError

logger = logging.getLogger(__name__)

SPLIT_NAME = "Gait3D.json"
PREPARE_HELP = (
    "Prepare Gait3D with\n"
    "  kpt data prepare gait3d --src RAW --dst DIR\n"
    "where RAW holds 2D_Silhouettes/ and 2D_Poses/ as released by the Gait3D authors and\n"
    "Gait3D.json (or pass --split PATH; OpenGait ships it as datasets/Gait3D/Gait3D.json).\n"
    "Then train with: kpt train gait --data gait3d --data-root DIR")


def _strip_dataset_name(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """The CLI may pass the dataset/plugin name first (`kpt data prepare gait3d ...`)."""
    return argv[1:] if argv and argv[0] in names else argv


def _group(root: Path, pattern: str) -> dict[tuple[str, str, str], list[Path]]:
    groups: dict[tuple[str, str, str], list[Path]] = defaultdict(list)
    for path in root.glob(f"*/*/*/{pattern}"):
        sid, typ, view = path.parts[-4:-1]
        groups[(sid, typ, view)].append(path)
    return groups


def _prepare_one(job: tuple[tuple[str, str, str], list[Path], list[Path], Path]) -> dict:
    key, pngs, txts, dst = job
    by_frame = {frame_number(t): t for t in txts}
    sils, poses, report = pretreat_sequence(pngs, by_frame)
    report["key"] = "-".join(key)
    if len(sils) == 0:
        return report
    folder = dst.joinpath(*key)
    write_array_pkl(folder / f"{key[2]}.pkl", sils)
    write_array_pkl(folder / f"{key[2]}-pose.pkl", poses)
    return report


def prepare_main(argv: list[str]) -> int:
    """``kpt data prepare gait3d --src RAW --dst DIR [--split JSON] [--workers N]``."""
    parser = argparse.ArgumentParser(prog="kpt data prepare gait3d", description=PREPARE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, type=Path, help="raw Gait3D folder")
    parser.add_argument("--dst", required=True, type=Path, help="output folder")
    parser.add_argument("--split", type=Path, default=None, help="Gait3D.json (default RAW/)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(_strip_dataset_name(argv, ("gait3d", "gait")))

    sil_root, pose_root = args.src / "2D_Silhouettes", args.src / "2D_Poses"
    split_path = args.split or args.src / SPLIT_NAME
    for path in (sil_root, pose_root, split_path):
        if not path.exists():
            print(f"error: {path} not found.\n{PREPARE_HELP}")
            return 2
    read_split(split_path)  # fail early on a broken split file
    pngs, txts = _group(sil_root, "*.png"), _group(pose_root, "*.txt")
    if not pngs:
        print(f"error: no <id>/<type>/<view>/*.png under {sil_root}.\n{PREPARE_HELP}")
        return 2
    args.dst.mkdir(parents=True, exist_ok=True)
    jobs = [(key, pngs[key], txts.get(key, []), args.dst) for key in sorted(pngs)]
    totals = defaultdict(int)
    empty, no_pose = [], []
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            reports = list(pool.map(_prepare_one, jobs, chunksize=16))
    else:
        reports = [_prepare_one(job) for job in jobs]
    for rep in reports:
        for name in ("frames", "dropped", "missing_pose"):
            totals[name] += rep[name]
        if rep["frames"] == 0:
            empty.append(rep["key"])
        elif rep["missing_pose"] == rep["frames"]:
            no_pose.append(rep["key"])
    shutil.copyfile(split_path, args.dst / SPLIT_NAME)
    print(f"wrote {len(reports) - len(empty)} sequences ({totals['frames']} frames) to {args.dst}; "
          f"dropped {totals['dropped']} empty frames; {totals['missing_pose']} kept frames had "
          f"no pose file (nearest pose, score 0)")
    if empty:
        print(f"{len(empty)} sequences had no usable frame, e.g. {empty[:3]}")
    if no_pose:
        print(f"{len(no_pose)} sequences have no pose at all, e.g. {no_pose[:3]}")
    return 0


def _check_sequence(rec: SequenceRecord) -> list[str]:
    """Problems of one sequence folder: both pkl files are read, whatever the first one gave."""
    problems, sils = [], None
    try:
        sils = check_silhouettes(read_array_pkl(rec.sil_path), rec.sil_path)
    except (DataError, OSError) as exc:  # unsafe / corrupt / zero-byte pkl, wrong array
        problems.append(str(exc))
    if not rec.pose_path.is_file():
        return [*problems, f"{rec.pose_path}: pose file missing"]
    try:
        poses = read_array_pkl(rec.pose_path)
        if sils is not None:
            poses = check_poses(poses, len(sils), rec.pose_path)
            if (poses[:, :, 2] == 0).all():
                problems.append(f"{rec.pose_path}: every joint has score 0 (no pose found)")
    except (DataError, OSError) as exc:
        problems.append(str(exc))
    return problems


def validate_tree(root: Path, split_name: str = SPLIT_NAME) -> list[str]:
    """Checks a prepared tree; returns one human-readable line per problem (empty when fine).

    Every sequence and the split file are checked: one bad file never hides the others.
    """
    problems: list[str] = []
    try:
        records = scan_layout(root)
    except GaitDataError as exc:
        return [str(exc)]
    if not records:
        problems.append(f"{root}: no <id>/<type>/<view>/ sequence folders")
    for rec in records:
        problems += _check_sequence(rec)
    split_path = root / split_name
    if not split_path.is_file():
        problems.append(f"{split_path}: split json missing")
        return problems
    split_lines = split_problems(split_path)
    if split_lines:
        return problems + split_lines
    split = read_split(split_path)
    present = {r.label for r in records}
    keys = {r.key for r in records}
    for name, ids in (("TRAIN_SET", split.train_ids), ("TEST_SET", split.test_ids)):
        missing = [i for i in ids if i not in present]
        if missing:
            problems.append(f"{split_path}: {len(missing)} {name} ids have no sequence folder, "
                            f"e.g. {missing[:3]}")
    missing_probes = sorted(split.probe_set - keys)
    if missing_probes:
        problems.append(f"{split_path}: {len(missing_probes)} PROBE_SET sequences not found, "
                        f"e.g. {missing_probes[:3]}")
    return problems


def validate_main(argv: list[str]) -> int:
    """``kpt data validate gait --data DIR`` (or ``DIR``, ``--root DIR``): reports gaps in a
    prepared tree (exit 1 if any)."""
    parser = argparse.ArgumentParser(prog="kpt data validate gait")
    parser.add_argument("root", type=Path, nargs="?", default=None, help="prepared data folder")
    parser.add_argument("--data", "--root", "--data-root", dest="root_opt", type=Path, default=None,
                        help="prepared data folder (--data as in every plugin's validate)")
    parser.add_argument("--split-name", default=SPLIT_NAME)
    args = parser.parse_args(_strip_dataset_name(argv, ("gait3d", "gait", "synthetic")))
    root = args.root_opt or args.root
    if root is None:
        parser.error("give the prepared data folder")
    problems = validate_tree(root, args.split_name)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s) in {root}")
        return 1
    print(f"{root}: ok ({len(scan_layout(root))} sequences)")
    return 0
