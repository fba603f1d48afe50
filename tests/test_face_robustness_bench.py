"""bench/face_robustness.py end to end on a tiny budget: train, then re-evaluate the saved model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


def _load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "face_robustness.py"
    spec = importlib.util.spec_from_file_location("face_robustness_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


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
    assert bench.main([*tiny, "--out", str(tmp_path / "eval"), "--eval-only", "--template",
                       "--factors"]) == 0
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
