"""bench/keypoint_dependence.py (the keypoint probe) and the keypoint-only synthetic splits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_scripts import load_bench
from kpt_plugins.face.plugin import PLUGIN
from kpt_plugins.face.synthetic.params import SPLITS, image_params
from kpt_plugins.face.synthetic.render import render_faces

import kpt

CENTRED = ("unaligned_centred_rotate", "unaligned_centred_scale", "unaligned_centred_interp")


def _load_probe():
    return load_bench("keypoint_dependence")


def _tiny_backbone(pos: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return kpt.create_model("vit", img_size=112, patch_size=28, embed_dim=16, depth=1, num_heads=2,
                            num_classes=8, pos=pos, head="flatten_bn").eval()


@pytest.fixture(scope="module")
def probe():
    return _load_probe()


@pytest.fixture(scope="module")
def tiny_sets(probe):
    return probe.synthetic_sets(["unaligned_centred_rotate", "unaligned_shift"], 12)


def test_a_keypoint_blind_model_scores_the_same_under_every_perturbation(probe, tiny_sets):
    result = probe.probe_model(_tiny_backbone("abs"), tiny_sets, batch_size=24)
    assert set(result["accuracy"]) == set(result["drift"]) == set(tiny_sets)
    for row in result["accuracy"].values():
        assert set(row) == {"true", "template", "shuffled", "shift2", "shift4", "shift8",
                            "rotate15", "scale1.25"}
        assert len(set(row.values())) == 1, row
    for row in result["drift"].values():
        assert max(abs(v) for v in row.values()) < 1e-6, row


def test_every_perturbation_changes_what_the_backbone_receives(probe, tiny_sets):
    """The probe must feed the perturbed keypoints, or the blind-model test would pass vacuously:
    a KP-RPE backbone's embeddings change under every perturbation but ``true``."""
    from kpt_plugins.face.evaluation.verification import embed

    model = _tiny_backbone("kprpe")
    with torch.no_grad():  # KP-RPE starts keypoint-blind (zero-initialised offsets): wake it up
        for name, param in model.named_parameters():
            if "kprpe" in name:
                param.normal_(0, 2.0)
    pairs = tiny_sets["unaligned_centred_rotate"]
    reference = embed(model, pairs.images, pairs.keypoints, flip=False)
    for name, args in probe.perturbations().items():
        kp = probe.perturbed_keypoints(pairs, name, args)
        moved = (embed(model, pairs.images, kp, flip=False) - reference).abs().max()
        assert (moved == 0) == (name == "true"), name
    drift = probe.probe_model(model, {"s": pairs}, batch_size=24)["drift"]["s"]
    assert drift["true"] == pytest.approx(0, abs=1e-6)
    assert min(v for k, v in drift.items() if k != "true") > 1e-9, drift


def test_shuffling_is_a_derangement(probe):
    gen = torch.Generator().manual_seed(3)
    for n in (2, 3, 10, 101):
        sigma = probe.derangement(n, gen)
        assert sorted(sigma.tolist()) == list(range(n))
        assert (sigma != torch.arange(n)).all()
    with pytest.raises(ValueError, match="at least 2"):
        probe.derangement(1)


def test_displaced_keypoints_move_by_the_stated_amount(probe):
    kp = torch.rand(20, 5, 2) * 0.5 + 0.25
    hw = (112, 96)  # not square: amounts are in pixels on both axes
    size = torch.tensor([hw[1], hw[0]])
    px = kp * size
    for d in (2.0, 4.0, 8.0):
        moved = probe.displace_keypoints(kp, hw, shift_px=d) * size
        step = moved - px
        assert torch.allclose(step.norm(dim=-1), torch.full((20, 5), d), atol=1e-3)
        assert torch.allclose(step, step[:, :1].expand_as(step), atol=1e-3)  # all points alike
    centre = px.mean(1, keepdim=True)
    rotated = probe.displace_keypoints(kp, hw, angle_deg=15) * size
    a, b = px - centre, rotated - centre
    assert torch.allclose(rotated.mean(1, keepdim=True), centre, atol=1e-3)
    assert torch.allclose(a.norm(dim=-1), b.norm(dim=-1), atol=1e-3)
    angle = torch.atan2(a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0], (a * b).sum(-1))
    assert torch.allclose(angle.abs(), torch.full_like(angle, math.radians(15)), atol=1e-4)
    assert (angle > 0).any() and (angle < 0).any()  # both senses
    scaled = probe.displace_keypoints(kp, hw, scale=1.25) * size
    ratio = (scaled - centre).norm(dim=-1) / a.norm(dim=-1)
    assert torch.allclose(scaled.mean(1, keepdim=True), centre, atol=1e-3)
    assert torch.isclose(ratio, torch.tensor(1.25), atol=1e-4).logical_or(
        torch.isclose(ratio, torch.tensor(0.8), atol=1e-4)).all()
    assert (ratio > 1).any() and (ratio < 1).any()


def test_the_probe_writes_a_table_and_json(probe, tiny_sets, tmp_path):
    results = {"tiny": probe.probe_model(_tiny_backbone("abs"), tiny_sets,
                                          probe.perturbations([4], 0, 1.0), batch_size=24)}
    text = probe.write_outputs(results, tmp_path, {"pairs": 12})
    header = text.splitlines()[2]
    assert "| unaligned_centred_rotate |" in text and "shift4" in header and "rotate" not in header
    saved = json.loads((tmp_path / "keypoint_dependence.json").read_text())
    assert set(saved["results"]["tiny"]["accuracy"]["unaligned_shift"]) == {
        "true", "template", "shuffled", "shift4"}
    assert "embedding drift" in text


def _similarity(split: str, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(matrix, scale, angle) of n placements of a split."""
    m = image_params(np.arange(n) + 1000, np.arange(n) % 7, 0, split)["matrix"].astype(np.float64)
    lin = m[:, :, :2]
    scale = np.sqrt(np.linalg.det(lin))
    angle = np.arctan2(lin[:, 1, 0], lin[:, 0, 0])
    return m, scale, angle


@pytest.mark.parametrize("split", CENTRED)
def test_keypoint_only_splits_are_centred_similarities_in_their_ranges(split):
    m, scale, angle = _similarity(split)
    lin = m[:, :, :2]
    # a similarity (no shear or anisotropy) that keeps the face centre where it is
    assert np.allclose(lin[:, 0, 0], lin[:, 1, 1], atol=1e-5)
    assert np.allclose(lin[:, 0, 1], -lin[:, 1, 0], atol=1e-5)
    centre = np.array([56.0, 66.0])
    assert np.allclose(lin @ centre + m[:, :, 2], centre, atol=1e-3)
    log_s = np.abs(np.log(scale))
    if split.endswith("rotate"):
        assert np.allclose(log_s, 0, atol=1e-5)
        assert np.abs(angle).min() >= 0.45 - 1e-5 and np.abs(angle).max() <= 0.9 + 1e-5
        assert (angle > 0).any() and (angle < 0).any()
    elif split.endswith("scale"):
        assert np.allclose(angle, 0, atol=1e-5)
        assert log_s.min() >= 0.25 - 1e-5 and log_s.max() <= 0.4 + 1e-5
        assert (scale > 1).any() and (scale < 1).any()
    else:  # interpolation: t of the way to (|ln s| 0.35, |angle| 0.8), the same t for both
        t = np.abs(angle) / 0.8
        assert np.allclose(log_s / 0.35, t, atol=1e-4)
        assert t.min() < 0.1 and t.max() > 0.9 and t.max() <= 1 + 1e-6


def test_keypoint_only_splits_keep_the_face_centred_beyond_the_training_range():
    """Rendered keypoints stay near the template's centroid (unlike ``unaligned``, which shifts by
    up to 28 px), while their spread says the face is rotated / scaled beyond augmentation."""
    ids, samples = np.arange(24) + 5000, np.arange(24)
    _, aligned = render_faces(ids, samples, 0, "aligned", 112)
    for split in CENTRED:
        _, kp = render_faces(ids, samples, 0, split, 112)
        drift = ((kp - aligned).mean(1) * 112).norm(dim=-1)
        assert drift.max() < 10, split  # a rotation about the face centre moves the centroid
    _, shifted = render_faces(ids, samples, 0, "unaligned", 112)
    assert ((shifted - aligned).mean(1) * 112).norm(dim=-1).max() > 15
    assert ("unaligned_centred_rotate" in SPLITS
            and set(CENTRED) <= set(PLUGIN.choices["eval.protocols"]))


def test_other_splits_are_unchanged_by_the_new_ones():
    """Image k of every split keeps its appearance draws; the older splits' placements do not
    depend on the new code (regression guard for the shared parameter table)."""
    _, scale, angle = _similarity("unaligned_rotate")
    assert np.abs(angle).max() <= 0.6 and np.allclose(scale, scale.clip(0.97, 1.03))
    a = image_params([7], [3], 0, "unaligned")
    b = image_params([7], [3], 0, "unaligned_centred_interp")
    assert all(np.array_equal(a[k], b[k]) for k in a if k != "matrix")


@pytest.mark.slow  # trains for one step and runs RetinaFace: ~10 s on a shared CPU
def test_the_robustness_bench_reports_the_probe(tmp_path):
    pytest.importorskip("matplotlib")
    bench = load_bench("face_robustness")
    out = tmp_path / "out"
    assert bench.main(["--variants", "abs", "--steps", "1", "--batch-size", "8", "--identities",
                       "4", "--images-per-identity", "2", "--pairs", "10", "--probe",
                       "--probe-sets", "unaligned_centred_scale,aligned", "--out", str(out),
                       "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
                       "model.patch_size=28", "eval.batch_size=20"]) == 0
    row = json.loads((out / "face_robustness.json").read_text())["results"][0]
    assert len(set(row["probe"]["accuracy"]["unaligned_centred_scale"].values())) == 1  # blind
    assert "| unaligned_centred_scale |" in (out / "keypoint_dependence.md").read_text()


def test_the_command_probes_weights_files_and_keeps_same_named_runs_apart(probe, tmp_path):
    from kpt.models import save_model

    runs = []
    for seed in ("s0", "s1"):
        path = tmp_path / seed / "run" / "weights.safetensors"
        path.parent.mkdir(parents=True)
        save_model(_tiny_backbone("abs"), path)
        runs.append(str(path))
    out = tmp_path / "out"
    assert probe.main([*runs, "--out", str(out), "--pairs", "6", "--sets", "unaligned_centred_scale",
                       "--shifts", "4", "--rotate", "0", "--scale", "1"]) == 0
    saved = json.loads((out / "keypoint_dependence.json").read_text())["results"]
    assert list(saved) == ["run", runs[1]]


def _bench_output(folder: Path, seed: int, pos: str, label: str, true: float, template: float):
    probe = {"accuracy": {s: {"true": true, "template": template} for s in CENTRED},
             "drift": {s: {"true": 0.0, "template": 1e-3} for s in CENTRED}}
    result = {"pos": pos + label, "aligned": 0.9, "unaligned_retinaface": 0.6, "probe": probe}
    folder.mkdir(parents=True)
    (folder / "face_robustness.json").write_text(json.dumps(
        {"config": {"seed": seed, "label": label}, "results": [result]}))
    return folder


def test_combine_pools_seeds_and_pairs_margins(tmp_path):
    probe = _load_probe()
    dirs = [_bench_output(tmp_path / "k0", 0, "kprpe", "-kprpe-wide", 0.80, 0.70),
            _bench_output(tmp_path / "k1", 1, "kprpe", "-kprpe-wide", 0.90, 0.70),
            _bench_output(tmp_path / "r0", 0, "rpe", "-wide", 0.75, 0.75),
            _bench_output(tmp_path / "r1", 1, "rpe", "-wide", 0.80, 0.80)]
    groups = probe.collect(dirs)
    assert sorted(groups) == ["kprpe-wide", "rpe-wide"]  # the label's encoding is not repeated
    text = probe.seed_summary(groups, [("kprpe-wide", "rpe-wide")])
    row = next(line for line in text.splitlines() if line.startswith("| `kprpe-wide` | 0, 1"))
    assert "85.0 (80.0 to 90.0)" in row and "+15.0 (+10.0 to +20.0)" in row
    # margins per seed +5 and +10, mean +7.5; spread = kprpe's 10-point range
    assert "+5.0, +10.0 / **+7.5** / 10.0" in text
    # another probe column: kprpe with template keypoints against rpe (-5, -10)
    text = probe.seed_summary(groups, [("kprpe-wide@template", "rpe-wide")])
    assert "| `kprpe-wide@template` | `rpe-wide` | -5.0, -10.0 / **-7.5** / 5.0" in text
    assert probe.main(["--combine", *map(str, dirs), "--out", str(tmp_path / "o"),
                       "--versus", "kprpe-wide:rpe-wide"]) == 0
    assert "**+7.5**" in (tmp_path / "o" / "keypoint_dependence_seeds.md").read_text()
    with pytest.raises(ValueError, match="seed 0 is already"):
        probe.collect([dirs[0], dirs[0]])
    with pytest.raises(ValueError, match="no results for"):
        probe.seed_summary(groups, [("kprpe-wide", "abs")])


def test_kprpe_hidden_without_kprpe_is_reported(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="kpt.models.vit"):
        kpt.create_model("vit", img_size=112, patch_size=28, embed_dim=16, depth=1, num_heads=2,
                         num_classes=8, pos="abs", kprpe_hidden=64)
    assert "kprpe_hidden=64 has no effect with pos='abs'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kpt.models.vit"):
        kpt.create_model("vit", img_size=112, patch_size=28, embed_dim=16, depth=1, num_heads=2,
                         num_classes=8, pos="kprpe", kprpe_hidden=64)
    assert "no effect" not in caplog.text
