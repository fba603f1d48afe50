"""bench/face_robustness.py end to end on a tiny budget: train, then re-evaluate the saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_scripts import load_bench


def _load_bench():
    return load_bench("face_robustness")


def test_eval_only_reproduces_the_training_run_and_adds_the_keypoint_controls(tmp_path):
    pytest.importorskip("matplotlib")
    bench = _load_bench()
    tiny = ["--variants", "abs+kprpe", "--steps", "2", "--batch-size", "8", "--identities", "4",
            "--images-per-identity", "2", "--pairs", "10", "--threads", "1",
            "--runs", str(tmp_path / "runs"), "--label=-tiny",
            "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=28",
            "eval.batch_size=20"]
    assert bench.main([*tiny, "--out", str(tmp_path / "train")]) == 0
    trained = json.loads((tmp_path / "train" / "face_robustness.json").read_text())["results"][0]
    # the keypoint probe runs on every model unless --no-probe
    assert set(trained["probe"]["accuracy"]["unaligned_centred_rotate"]) >= {"true", "template"}
    assert (tmp_path / "train" / "keypoint_dependence.md").is_file()
    assert bench.main([*tiny, "--out", str(tmp_path / "eval"), "--eval-only", "--template",
                       "--factors", "--no-probe"]) == 0
    again = json.loads((tmp_path / "eval" / "face_robustness.json").read_text())["results"][0]
    for key in ("aligned", "unaligned_retinaface", "unaligned_crop"):
        assert again[key] == pytest.approx(trained[key], abs=1e-9), key
    assert 0.0 <= again["unaligned_template"] <= 1.0
    for factor in ("shift", "rotate", "scale"):
        assert 0.0 <= again[f"{factor}_gt"] <= 1.0 and 0.0 <= again[f"{factor}_template"] <= 1.0
    assert (tmp_path / "runs" / "abs_kprpe-tiny" / "weights.safetensors").is_file()
    table = (tmp_path / "eval" / "face_robustness.md").read_text()
    assert "unaligned (template kp)" in table and "`abs+kprpe-tiny`" in table
    assert "shift only (gt kp)" in table
    assert "unaligned (template kp)" not in (tmp_path / "train" / "face_robustness.md").read_text()


def test_eval_only_without_a_trained_model_names_the_missing_file(tmp_path):
    bench = _load_bench()
    with pytest.raises((FileNotFoundError, ValueError), match="weights.safetensors"):
        bench.main(["--variants", "abs", "--eval-only", "--runs", str(tmp_path / "none"),
                    "--out", str(tmp_path / "out"), "--pairs", "10"])


def _write_output(folder: Path, seed: int, rows: dict[str, tuple[float, float]]) -> Path:
    results = [{"pos": pos, "aligned": a, "unaligned_retinaface": u} for pos, (a, u) in rows.items()]
    folder.mkdir(parents=True)
    (folder / "face_robustness.json").write_text(json.dumps({"config": {"seed": seed},
                                                             "results": results}))
    return folder


def test_combine_pools_seeds_and_pairs_leads_by_seed(tmp_path):
    pytest.importorskip("matplotlib")
    bench = _load_bench()
    dirs = [_write_output(tmp_path / "s0", 0, {"abs": (0.90, 0.60), "kprpe": (0.92, 0.75)}),
            _write_output(tmp_path / "s1_abs", 1, {"abs": (0.80, 0.70)}),
            _write_output(tmp_path / "s1_kp", 1, {"kprpe": (0.84, 0.75)})]
    assert bench.main(["--combine", *map(str, dirs), "--out", str(tmp_path / "all")]) == 0
    table = (tmp_path / "all" / "face_robustness_seeds.md").read_text()
    # abs: aligned (90 + 80) / 2, unaligned (60 + 70) / 2; kprpe: 88.0 and 75.0
    assert "| `abs` | 0, 1 | 85.0 (80.0-90.0) | 65.0 (60.0-70.0) |" in table
    assert "| `kprpe` | 0, 1 | 88.0 (84.0-92.0) | 75.0 (75.0-75.0) |" in table
    # leads paired by seed: +15 and +5 unaligned, mean +10; aligned +2 and +4, mean +3
    assert "| `kprpe` | +3.0 | s0 +15.0, s1 +5.0 | **+10.0** |" in table
    assert (tmp_path / "all" / "face_robustness_seeds.png").is_file()
    with pytest.raises(ValueError, match="seed 0 is already"):
        bench.main(["--combine", str(dirs[0]), str(dirs[0]), "--out", str(tmp_path / "dup")])
    with pytest.raises(FileNotFoundError, match="face_robustness.json"):
        bench.main(["--combine", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
