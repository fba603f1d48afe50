"""Gait data: pkl layout round trip, restricted reading, split json, pose->silhouette mapping,
clip sampling, transforms, synthetic walkers, prepare/validate commands."""

from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest
from kpt_plugins.gait.data import (
    GaitClipDataset,
    GaitDataError,
    GaitSequenceDataset,
    SequenceRecord,
    ordered_clip_indices,
    read_array_pkl,
    read_split,
    scan_layout,
    write_array_pkl,
)
from kpt_plugins.gait.gait3d_prepare import prepare_main, validate_main, validate_tree
from kpt_plugins.gait.poses import crop_silhouette, map_joints, read_pose_txt
from kpt_plugins.gait.synthetic import SyntheticSpec, generate
from kpt_plugins.gait.transforms import GaitTransform, horizontal_flip, random_rotate

TINY = SyntheticSpec(num_train=3, num_test=2, seqs_per_id=2, frames=10, seed=1)


def test_pkl_round_trip_and_layout(tmp_path):
    sils = (np.random.default_rng(0).random((7, 64, 64)) > 0.5).astype(np.uint8) * 255
    poses = np.random.default_rng(1).random((7, 17, 3)).astype(np.float32)
    folder = tmp_path / "0001" / "camid0_videoid2" / "seq0"
    write_array_pkl(folder / "seq0.pkl", sils)
    write_array_pkl(folder / "seq0-pose.pkl", poses)
    (rec,) = scan_layout(tmp_path)
    assert rec.key == "0001-camid0_videoid2-seq0"
    got_sils, got_poses = rec.load()
    np.testing.assert_array_equal(got_sils, sils)
    np.testing.assert_array_equal(got_poses, poses)
    # OpenGait writes with the default protocol; numpy's protocol-5 reduction must also load.
    with open(folder / "p5.pkl", "wb") as f:
        pickle.dump(sils, f, protocol=5)
    np.testing.assert_array_equal(read_array_pkl(folder / "p5.pkl"), sils)


def test_pkl_errors_name_the_file(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("boom",))

    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="evil.pkl.*builtins.print"):
        read_array_pkl(bad)
    trunc = tmp_path / "trunc.pkl"
    trunc.write_bytes(pickle.dumps(np.zeros((3, 4), np.uint8))[:20])
    with pytest.raises((GaitDataError, pickle.UnpicklingError), match="trunc.pkl"):
        read_array_pkl(trunc)
    with pytest.raises(GaitDataError, match="missing.pkl: file not found"):
        read_array_pkl(tmp_path / "missing.pkl")


def test_frame_count_mismatch_is_reported(tmp_path):
    folder = tmp_path / "0001" / "t" / "v"
    write_array_pkl(folder / "v.pkl", np.zeros((5, 64, 64), np.uint8))
    write_array_pkl(folder / "v-pose.pkl", np.zeros((4, 17, 3), np.float32))
    rec = SequenceRecord("0001", "t", "v", folder)
    with pytest.raises(GaitDataError, match="4 pose frames but 5 silhouette frames"):
        rec.load()


def test_split_json_checks(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"TRAIN_SET": ["0001"], "TEST_SET": ["0002"],
                                "PROBE_SET": ["0002-camid1_videoid0-seq0"]}))
    split = read_split(path)
    assert split.train_ids == ["0001"] and split.probe_set == {"0002-camid1_videoid0-seq0"}
    path.write_text(json.dumps({"TRAIN_SET": ["0001"], "TEST_SET": ["0001"], "PROBE_SET": []}))
    with pytest.raises(GaitDataError, match="both TRAIN_SET and TEST_SET"):
        read_split(path)
    path.write_text(json.dumps({"TRAIN_SET": ["0001"], "TEST_SET": ["0002"]}))
    with pytest.raises(GaitDataError, match="PROBE_SET"):
        read_split(path)


def _raw_person(h0: int, w0: int, box: tuple[int, int, int, int]) -> np.ndarray:
    img = np.zeros((h0, w0), np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 255
    return img


@pytest.mark.parametrize("shape,box", [((120, 80), (30, 10, 50, 110)),  # centred
                                       ((100, 90), (2, 20, 14, 95))])  # near the border: padding
def test_pose_to_silhouette_mapping(shape, box):
    """Corners of a synthetic crop land on the corners of the pretreated silhouette's box."""
    img = _raw_person(*shape, box)
    sil, params = crop_silhouette(img)
    assert sil.shape == (64, 64)
    x0, y0, x1, y1 = box
    # centres of the foreground's corner pixels in the raw frame
    corners = np.array([[x0, y0], [x1 - 1, y0], [x0, y1 - 1], [x1 - 1, y1 - 1]], np.float32)
    mapped = map_joints(corners, params)
    # the foreground spans rows 0..63 after the crop; the mapped top/bottom pixel centres must sit
    # within half a resized pixel of the first/last row
    scale = 64 / (y1 - y0)
    assert abs(mapped[0, 1] - (0.5 * scale - 0.5)) < 1e-4
    assert abs(mapped[3, 1] - (63.5 - 0.5 * scale)) < 1e-4
    # horizontally the mapped box must cover the silhouette's foreground columns
    cols = np.nonzero(sil.sum(0) > 0)[0]
    assert abs(mapped[0, 0] - cols[0]) <= 1.0 and abs(mapped[1, 0] - cols[-1]) <= 1.0
    # a joint at the foreground centroid maps onto the silhouette's centroid
    ys, xs = np.nonzero(img)
    centre = map_joints(np.array([[xs.mean(), ys.mean()]]), params)[0]
    sys_, sxs = np.nonzero(sil > 127)
    assert abs(centre[0] - sxs.mean()) < 0.6 and abs(centre[1] - sys_.mean()) < 0.6


def test_crop_drops_empty_frames():
    assert crop_silhouette(np.zeros((50, 40), np.uint8)) is None


def test_read_pose_txt(tmp_path):
    values = [311, 438] + [v for j in range(17) for v in (j, 2 * j, 0.5)]
    path = tmp_path / "human_crop_f0001.txt"
    path.write_text(",".join(str(v) for v in values))
    pose = read_pose_txt(path)
    assert pose.shape == (17, 3) and pose[3, 1] == 6 and pose[16, 2] == 0.5
    path.write_text("1,2,3")
    with pytest.raises(GaitDataError, match="expected 53 numbers"):
        read_pose_txt(path)


def test_ordered_clip_indices():
    rng = np.random.default_rng(0)
    for n in (5, 34, 100):
        idx = ordered_clip_indices(n, 30, 4, rng)
        assert len(idx) == 30 and idx.max() < n
        if n >= 34:
            assert np.all(np.diff(idx) > 0) and idx[-1] - idx[0] <= 33


def test_flip_and_rotate_move_joints_with_pixels():
    sils = np.zeros((1, 64, 44), np.float32)
    sils[0, 20, 10] = 1.0
    joints = np.zeros((1, 17, 2), np.float32)
    joints[0, 5] = (10, 20)  # left shoulder on the lit pixel
    out, moved = horizontal_flip(sils, joints)
    assert out[0, 20, 33] == 1.0 and tuple(moved[0, 6]) == (33.0, 20.0)  # now the right shoulder
    big = np.zeros((1, 64, 44), np.float32)
    big[0, 18:23, 8:13] = 1.0
    out, moved = random_rotate(big, joints, 9.0)
    ys, xs = np.nonzero(out[0] > 0.5)
    assert abs(xs.mean() - moved[0, 5, 0]) < 0.3 and abs(ys.mean() - moved[0, 5, 1]) < 0.3


def test_transform_shapes_and_range():
    rng = np.random.default_rng(0)
    sils = (rng.random((6, 64, 64)) > 0.5).astype(np.uint8) * 255
    joints = rng.uniform(0, 64, (6, 17, 2)).astype(np.float32)
    tf = GaitTransform(train=True, p_perspective=1, p_flip=1, p_rotate=1)
    image, kp = tf(sils, joints, rng)
    assert image.shape == (6, 64, 44) and image.dtype == np.float32 and image.max() <= 1.0
    assert kp.shape == (6, 17, 2) and kp.min() >= 0 and kp.max() <= 1
    image, kp = GaitTransform(train=False, cut=False)(sils, joints, rng)
    assert image.shape == (6, 64, 64)
    np.testing.assert_allclose(kp, np.clip((joints + 0.5) / 64, 0, 1), atol=1e-6)


def test_synthetic_walkers_layout_and_datasets(tmp_path):
    root = generate(tmp_path / "syn", TINY)
    split = read_split(root / "Gait3D.json")
    assert len(split.train_ids) == 3 and len(split.test_ids) == 2 and len(split.probe_set) == 2
    assert validate_tree(root) == []
    records = scan_layout(root, split.train_ids)
    sils, poses = records[0].load()
    assert sils.shape[1:] == (64, 64) and poses.shape == (len(sils), 17, 3)
    # joints sit on the body: the silhouette is lit at most joint positions
    x = np.clip(np.round(poses[..., 0]).astype(int), 0, 63)
    y = np.clip(np.round(poses[..., 1]).astype(int), 0, 63)
    lit = sils[np.arange(len(sils))[:, None], y, x] > 0
    assert lit.mean() > 0.8
    again = generate(tmp_path / "syn2", TINY)
    np.testing.assert_array_equal(scan_layout(again)[3].load()[0], scan_layout(root)[3].load()[0])
    train = GaitClipDataset(records, GaitTransform(train=True), frames=6, skip=2)
    item = train[0]
    assert item["image"].shape == (6, 64, 44) and item["keypoints"].shape == (6, 17, 2)
    assert int(item["label"]) == 0 and train.labels == [0, 0, 1, 1, 2, 2]
    test = GaitSequenceDataset(scan_layout(root, split.test_ids), GaitTransform(), split.probe_set)
    assert sum(bool(test[i]["probe"]) for i in range(len(test))) == 2


def test_prepare_and_validate_commands(tmp_path, capsys):
    raw = tmp_path / "raw"
    rng = np.random.default_rng(0)
    for sid in ("0001", "0002"):
        for f in range(4):
            box = (20 + f, 10, 40 + f, 90)
            d = raw / "2D_Silhouettes" / sid / "camid1_videoid0" / "seq0"
            d.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / f"human_crop_f{f + 8:d}.png"), _raw_person(100, 70, box))
            if f == 3:
                continue  # one frame without a pose file
            p = raw / "2D_Poses" / sid / "camid1_videoid0" / "seq0"
            p.mkdir(parents=True, exist_ok=True)
            joints = np.c_[rng.uniform(20, 40, 17), rng.uniform(10, 90, 17), np.ones(17)]
            (p / f"human_crop_f{f + 8:d}.txt").write_text(
                ",".join(str(v) for v in [70, 100, *joints.ravel()]))
    (raw / "Gait3D.json").write_text(json.dumps(
        {"TRAIN_SET": ["0001"], "TEST_SET": ["0002"], "PROBE_SET": ["0002-camid1_videoid0-seq0"]}))
    dst = tmp_path / "prepared"
    assert prepare_main(["gait3d", "--src", str(raw), "--dst", str(dst)]) == 0
    assert "2 kept frames had no pose file" in capsys.readouterr().out
    sils, poses = scan_layout(dst)[0].load()
    assert sils.shape == (4, 64, 64) and poses.shape == (4, 17, 3)
    assert poses[3, :, 2].max() == 0 and poses[0, :, 2].min() == 1
    assert validate_main([str(dst)]) == 0
    (dst / "0002" / "camid1_videoid0" / "seq0" / "seq0-pose.pkl").unlink()
    assert validate_main(["gait", "--root", str(dst)]) == 1
    assert "pose file missing" in capsys.readouterr().out
    assert prepare_main(["--src", str(tmp_path / "nope"), "--dst", str(dst)]) == 2
    assert "kpt data prepare gait3d" in capsys.readouterr().out
