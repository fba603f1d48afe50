"""RecordIO framing, IRHeader, insightface layout, image folders and TinyFace folders."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest
from kpt_plugins.face.data.folders import DISTRACTOR_LABEL, ImageFolderFaces, TinyFaceProtocol
from kpt_plugins.face.data.recordio import (
    MAGIC,
    InsightFaceRec,
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    decode_image,
    encode_image,
    pack_record,
    unpack_record,
    write_insightface_rec,
)

MAGIC_BYTES = struct.pack("<I", MAGIC)


def _image(seed: int, size: int = 112) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    return np.kron(base, np.ones((size // 8, size // 8, 1), np.uint8))  # blocky: JPEG-friendly


def test_magic_in_payload_round_trip(tmp_path):
    records = {
        1: b"plain",
        2: MAGIC_BYTES + b"abcd" + MAGIC_BYTES + b"wxyz" + MAGIC_BYTES,  # aligned: split 3×
        3: b"ab" + MAGIC_BYTES + b"cd",  # unaligned: not split
        4: MAGIC_BYTES,
        5: b"",
        6: bytes(range(256)) * 3 + MAGIC_BYTES * 2,
    }
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with RecordIOWriter(rec, idx) as w:
        for key in (3, 1, 6, 2, 5, 4):  # any write order; the reader seeks by .idx
            w.write(key, records[key])
    raw = rec.read_bytes()
    assert len(raw) % 4 == 0
    # record 2 is split at its three aligned magics: 4 chunks with cflags 1, 2, 2, 3
    off2 = int(next(ln for ln in idx.read_text().splitlines() if ln.startswith("2\t")).split()[1])
    flags, pos = [], off2
    for _ in range(4):
        magic, lrec = struct.unpack_from("<II", raw, pos)
        assert magic == MAGIC
        flags.append(lrec >> 29)
        pos += 8 + (((lrec & (2**29 - 1)) + 3) & ~3)
    assert flags == [1, 2, 2, 3]
    reader = RecordIOReader(rec, idx)
    assert sorted(reader.keys) == sorted(records)
    for key, payload in records.items():
        assert reader.read(key) == payload


def test_header_scalar_and_array_labels():
    packed = pack_record(IRHeader(0, 7.0, 3, 0), b"img")
    header, payload = unpack_record(packed)
    assert (header.flag, header.label, header.id, payload) == (0, 7.0, 3, b"img")
    packed = pack_record(IRHeader(0, np.array([5.0, 9.0]), 4, 1), b"x")
    header, payload = unpack_record(packed)
    assert header.flag == 2 and header.label.tolist() == [5.0, 9.0] and payload == b"x"
    assert struct.unpack_from("<IfQQ", packed) == (2, 0.0, 4, 1)
    with pytest.raises(RecordIOError, match="24-byte"):
        unpack_record(b"short")


def test_insightface_layout_round_trip(tmp_path):
    labels = [0, 0, 0, 1, 2, 2]
    images = [_image(i) for i in range(len(labels))]
    n = write_insightface_rec(
        tmp_path, [(lab, encode_image(im)) for lab, im in zip(labels, images)]
    )
    assert n == 6
    assert (tmp_path / "property").read_text().strip() == "3,112,112"
    idx_lines = (tmp_path / "train.idx").read_text().splitlines()
    assert idx_lines[-1].startswith("0\t")  # record 0 written last, like rec_builder
    rec = InsightFaceRec(tmp_path)
    assert rec.image_keys == [1, 2, 3, 4, 5, 6] and len(rec) == 6
    assert rec.read_identity_ranges() == {0: (1, 4), 1: (4, 5), 2: (5, 7)}
    for i, (img, lab) in enumerate(rec):
        assert lab == labels[i]
        assert np.abs(img.astype(int) - images[i]).mean() < 8  # JPEG q95 of blocky colours
        payload, _ = rec.read_item(i)
        bgr = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(img, bgr[..., ::-1])  # RGB, as mx.image.imdecode
    with pytest.raises(ValueError, match="contiguous"):
        write_insightface_rec(tmp_path / "bad", [(0, b"a"), (1, b"b"), (0, b"c")])


def test_colour_order_is_rgb():
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    out = decode_image(encode_image(red))
    assert out[..., 0].mean() > 240 and out[..., 2].mean() < 15


def test_bad_files_give_clear_errors(tmp_path):
    write_insightface_rec(tmp_path, [(0, encode_image(_image(0)))])
    rec_path = tmp_path / "train.rec"
    raw = bytearray(rec_path.read_bytes())
    raw[0:4] = b"\0\0\0\0"  # break record 1's magic
    rec_path.write_bytes(bytes(raw))
    rec = InsightFaceRec(tmp_path)
    with pytest.raises(RecordIOError, match="bad magic"):
        rec[0]
    (tmp_path / "train.idx").write_text("1\tnot-a-number\n")
    with pytest.raises(RecordIOError, match=r"train.idx:1"):
        RecordIOReader(rec_path)
    with pytest.raises(FileNotFoundError, match="missing.rec"):
        RecordIOReader(tmp_path / "missing.rec")


def test_image_folder_label_order(tmp_path):
    for name in ["10", "2", "1", "abc"]:
        (tmp_path / name).mkdir()
        for j in range(2):
            (tmp_path / name / f"{j}.jpg").write_bytes(encode_image(_image(j, 16)))
    (tmp_path / "2" / "notes.txt").write_text("ignored")
    faces = ImageFolderFaces(tmp_path)
    assert faces.classes == ["1", "10", "2", "abc"]  # string order, as torchvision ImageFolder
    assert faces.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    img, label = faces[2]
    assert img.shape == (16, 16, 3) and label == 1
    assert faces.paths[2].parent.name == "10"


def test_tinyface_folders(tmp_path):
    base = tmp_path / "Testing_Set"
    files = {
        "Probe": ["1_1.jpg", "2_1.jpg"],
        "Gallery_Match": ["1_2.jpg", "2_5.jpg", "3_1.jpg"],
        "Gallery_Distractor": ["x.jpg", "y.jpg"],
    }
    for folder, names in files.items():
        (base / folder).mkdir(parents=True)
        for n in names:
            (base / folder / n).write_bytes(encode_image(_image(1, 16)))
    proto = TinyFaceProtocol.from_folder(tmp_path)
    assert proto.probe_labels.tolist() == [1, 2]
    assert proto.gallery_labels.tolist() == [1, 2, 3, DISTRACTOR_LABEL, DISTRACTOR_LABEL]
    assert proto.read_image(proto.gallery_paths[0]).shape == (16, 16, 3)
    with pytest.raises(FileNotFoundError, match="TinyFace"):
        TinyFaceProtocol.from_folder(tmp_path / "Testing_Set" / "Probe")


def test_image_records_with_label_arrays(tmp_path):
    # some packs store each image's label as an array whose first element is the class id
    jpeg = encode_image(_image(3, 16))
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key, label in ((1, 4.0), (2, 7.0)):
            w.write(key, pack_record(IRHeader(0, np.array([label, 0.5]), key, 0), jpeg))
    rec = InsightFaceRec(tmp_path)  # no key 0 and no property: every key is an image
    assert rec.image_keys == [1, 2]
    assert [rec[i][1] for i in range(2)] == [4, 7]
    payload, label = rec.read_item(1)
    assert bytes(payload) == jpeg and label == 7


def test_dataloader_workers_read_the_rec(tmp_path):
    import torch
    from kpt_plugins.face.data.datasets import FaceDataset

    labels = [0, 0, 1, 1, 2, 2]
    write_insightface_rec(
        tmp_path, [(lab, encode_image(_image(i))) for i, lab in enumerate(labels)]
    )
    ds = FaceDataset(tmp_path)
    ds[0]  # the parent opens (and maps) the file first; workers must not share its handle
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    batches = list(loader)
    assert torch.cat([b["label"] for b in batches]).tolist() == labels
    assert batches[0]["image"].shape == (3, 3, 112, 112)
    assert batches[0]["keypoints"].shape == (3, 5, 2)


def test_face_io_bench_runs(capsys):
    from bench_scripts import load_bench

    bench = load_bench("face_io")
    result = bench.main(["--images", "40", "--rounds", "1", "--json"])
    assert result["images"] == 40
    assert result["recordio img/s"] > 0 and result["imdecode img/s"] > 0
    assert 0 < result["recordio/imdecode"] < 10
    assert '"recordio/imdecode"' in capsys.readouterr().out


def test_num_classes_sources(tmp_path):
    write_insightface_rec(tmp_path / "a", [(0, b"x"), (1, b"y"), (1, b"z")])
    assert InsightFaceRec(tmp_path / "a").num_classes == 2  # property
    (tmp_path / "a" / "property").unlink()
    assert InsightFaceRec(tmp_path / "a").num_classes == 2  # identity records
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key, label in ((1, 0.0), (2, 4.0)):
            w.write(key, pack_record(IRHeader(0, label, key, 0), b"jpeg"))
    assert InsightFaceRec(tmp_path).num_classes == 5  # largest label + 1


def test_identity_range_beyond_float32_uses_property(tmp_path):
    # key 0's [first, end) is float32: past 2^24 it is rounded, so the layout is recovered from
    # the property's class count (the identity records are the last K keys)
    jpeg = encode_image(_image(0, 16))
    big = float(2**24 + 3)  # not representable: float32 rounds it
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key in (1, 2, 3):
            w.write(key, pack_record(IRHeader(0, float(key - 1), key, 0), jpeg))
        for key, lo in ((4, 1), (5, 2)):
            w.write(key, pack_record(IRHeader(2, np.array([lo, lo + 1], "f4"), key, 0)))
        w.write(0, pack_record(IRHeader(2, np.array([big, big + 2], "f4"), 0, 1)))
    (tmp_path / "property").write_text("2,16,16\n")
    rec = InsightFaceRec(tmp_path)
    assert rec.image_keys == [1, 2, 3]
    assert rec.read_identity_ranges() == {0: (1, 2), 1: (2, 3)}
