"""Engine: run folder, exact resume, atomic checkpoints, mismatch errors, optimizer groups, load_model."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiny_plugin as tiny
import torch

import kpt
from kpt.config import Config, build_config, parse_yaml
from kpt.engine import checkpoint as ckpt_io
from kpt.engine.optim import build_optimizer, build_scheduler, param_groups
from kpt.engine.trainer import train
from kpt.errors import UserError

torch.set_num_threads(1)


def _cfg(*overrides):
    return build_config(tiny.PLUGIN, overrides=list(overrides))


def test_run_folder_contents(tmp_path, monkeypatch):
    tiny.register_in_process(monkeypatch)
    out = tmp_path / "run"
    summary = train(tiny.PLUGIN, _cfg(), out)
    assert {"config.yaml", "metrics.jsonl", "summary.json", "last.pt", "best.pt",
            "weights.safetensors"} <= {p.name for p in out.iterdir()}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["type"] == "train"]
    assert train_steps == list(range(1, 13))  # 48 items / batch 8 = 6 steps x 2 epochs, log_every=1
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12] and "accuracy" in evals[0]
    assert records[0]["lr"] == pytest.approx(1e-6)  # warmup starts at warmup_lr
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["step"] == 12 and summary["accuracy"] == evals[-1]["accuracy"]
    assert summary["best_accuracy"] == max(r["accuracy"] for r in evals)
    saved = Config(parse_yaml((out / "config.yaml").read_text()))
    assert saved.to_dict() == _cfg().to_dict()
    best = ckpt_io.load_checkpoint(out / "best.pt")
    assert best["step"] == summary["best_step"]

    # kpt.load_model rebuilds the trained model from either file, through the plugin
    last = ckpt_io.load_checkpoint(out / "last.pt")
    x, k = torch.rand(3, 1, 8, 8), torch.rand(3, 2, 2)
    for name in ("weights.safetensors", "last.pt"):
        model = kpt.load_model(str(out / name))
        assert not model.training
        ref = tiny.TinyNet(16, 0.1).eval()
        ref.load_state_dict(last["model"])
        torch.testing.assert_close(model(x, k), ref(x, k), rtol=0, atol=0)


class _Crash(Exception):
    pass


def _crashing(after_calls: int):
    calls = {"n": 0}

    def step(model, batch, cfg):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise _Crash
        return tiny.training_step(model, batch, cfg)

    return dataclasses.replace(tiny.PLUGIN, training_step=step)


@pytest.mark.parametrize("crash_after", [8, 6])  # mid-epoch 2 / right at the epoch boundary
def test_resume_matches_uninterrupted_run(tmp_path, crash_after):
    full = train(tiny.PLUGIN, _cfg("train.save_every=2"), tmp_path / "a")
    with pytest.raises(_Crash):
        train(_crashing(crash_after + 1), _cfg("train.save_every=2"), tmp_path / "b")
    ckpt = ckpt_io.load_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt["step"] == crash_after  # step crash_after + 1 was trained and logged, then lost
    resumed = train(tiny.PLUGIN, _cfg("train.save_every=2"), tmp_path / "b",
                    resume=tmp_path / "b" / "last.pt")
    a = ckpt_io.load_checkpoint(tmp_path / "a" / "last.pt")
    b = ckpt_io.load_checkpoint(tmp_path / "b" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert resumed["accuracy"] == full["accuracy"] and resumed["step"] == 12
    lines_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    losses_a = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl")
                                                  .read_text().splitlines()) if r["type"] == "train"}
    losses_b = {r["step"]: r["loss"] for r in map(json.loads, lines_b) if r["type"] == "train"}
    assert losses_a == losses_b
    steps_b = [(r["type"], r["step"]) for r in map(json.loads, lines_b)]
    assert len(steps_b) == len(set(steps_b))  # records of the lost step were not duplicated


def test_resume_rejects_other_model_or_plugin(tmp_path):
    train(tiny.PLUGIN, _cfg("train.max_steps=1"), tmp_path / "a")
    last = tmp_path / "a" / "last.pt"
    with pytest.raises(ckpt_io.CheckpointError, match=r"shape mismatch.*fc1"):
        train(tiny.PLUGIN, _cfg("model.hidden=8"), tmp_path / "b", resume=last)
    other = dataclasses.replace(tiny.PLUGIN, name="other")
    with pytest.raises(ckpt_io.CheckpointError, match="written by plugin 'tiny'"):
        train(other, _cfg(), tmp_path / "c", resume=last)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert ckpt_io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_run_killed_while_saving_resumes_from_previous_checkpoint(tmp_path):
    """A training process SIGKILLed in the middle of writing last.pt (step 4): the file on disk is still
    the step-2 checkpoint, and resuming from it ends with the weights of an uninterrupted run."""
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(Path(tiny.__file__).parent)!r})
        import tiny_plugin as tiny
        from kpt.config import build_config
        from kpt.engine.trainer import train
        real_save = torch.save
        def save(obj, fh):
            if obj.get("step") == 4 and ".last.pt.tmp" in fh.name:
                fh.write(b"x" * 4096)
                fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(obj, fh)
        torch.save = save
        torch.set_num_threads(1)
        train(tiny.PLUGIN, build_config(tiny.PLUGIN, overrides=["train.save_every=2"]), {str(out)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert any(p.name.startswith(".last.pt.tmp-") for p in out.iterdir())  # the torn write
    assert ckpt_io.load_checkpoint(out / "last.pt")["step"] == 2
    train(tiny.PLUGIN, _cfg("train.save_every=2"), out, resume=out / "last.pt")
    assert not any(p.name.startswith(".last.pt.tmp-") for p in out.iterdir())  # cleaned up
    train(tiny.PLUGIN, _cfg("train.save_every=2"), tmp_path / "full")
    a = ckpt_io.load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = ckpt_io.load_checkpoint(out / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_pickles_for_worker_processes():
    import pickle

    cfg = _cfg("train.lr=0.5")
    back = pickle.loads(pickle.dumps(cfg))
    assert back.to_dict() == cfg.to_dict() and back.train.lr == 0.5


def test_checkpoints_load_with_weights_only(tmp_path):
    train(tiny.PLUGIN, _cfg("train.max_steps=2", "train.amp=bf16"), tmp_path)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["format"] == "kpt.checkpoint" and ckpt["plugin"] == "tiny" and ckpt["step"] == 2
    assert ckpt["model_class"].endswith("TinyNet")


def test_param_groups_skip_norms_biases_and_position_tables():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 4, 8))
            self.proj = torch.nn.Linear(8, 8)
            self.norm = torch.nn.LayerNorm(8)
            self.table = torch.nn.Parameter(torch.zeros(3, 3))

        def no_weight_decay(self):
            return {"table"}

    groups = param_groups(Net(), 0.05, ["pos_embed"])
    by_wd = {g["weight_decay"]: set(g["names"]) for g in groups}
    assert by_wd[0.05] == {"proj.weight"}
    assert by_wd[0.0] == {"pos_embed", "proj.bias", "norm.weight", "norm.bias", "table"}
    opt = build_optimizer(Net(), _cfg().train)
    assert type(opt).__name__ == "SGD" and sorted(g["weight_decay"] for g in opt.param_groups) == \
        [0.0, 1e-4]


def test_lr_scale_from_model_and_config_follows_the_schedule():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Linear(4, 4)
            self.kprpe = torch.nn.Linear(4, 4)
            self.body = torch.nn.Linear(4, 4)
            self.lr_scale_prefixes = {"stem.": 0.1, "kprpe.": 0.5}

    cfg = _cfg("train.optimizer=adamw", "train.lr=1.0", "train.sched=cosine", "train.min_lr=0",
               "train.lr_scale.kprpe=10")
    net = Net()
    opt = build_optimizer(net, cfg.train)
    scale_of = {id(p): g.get("lr_scale", 1.0) for g in opt.param_groups for p in g["params"]}
    assert scale_of[id(net.stem.weight)] == 0.1 and scale_of[id(net.stem.bias)] == 0.1
    assert scale_of[id(net.kprpe.weight)] == 10  # the config overrides the model's own 0.5
    assert scale_of[id(net.body.weight)] == 1.0
    sched = build_scheduler(opt, cfg.train, total_steps=10, steps_per_epoch=5)
    sched.step_update(num_updates=5)
    base = next(g["lr"] for g in opt.param_groups if "lr_scale" not in g)
    assert 0 < base < 1.0
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(base * g.get("lr_scale", 1.0))
    sgd = build_optimizer(net, _cfg("train.sched=none", "train.lr=0.2").train)
    assert sorted(round(g["lr"], 6) for g in sgd.param_groups) == [0.02, 0.02, 0.1, 0.2, 0.2]


def test_schedule_warmup_then_cosine_decay():
    cfg = _cfg("train.sched=cosine", "train.warmup_epochs=1", "train.min_lr=0", "train.lr=1.0")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg.train, total_steps=20, steps_per_epoch=5)
    lrs = []
    for step in range(20):
        sched.step_update(num_updates=step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6) and lrs[:6] == sorted(lrs[:6])  # linear warmup to 1.0
    assert lrs[5:] == sorted(lrs[5:], reverse=True) and lrs[-1] < 0.05
    assert build_scheduler(opt, _cfg("train.sched=none").train, 20, 5) is None


def test_cooldown_holds_min_lr_after_a_shorter_cosine():
    """OpenGait's Gait3D schedule: cosine over T_max = total − cooldown steps, then min_lr."""
    cfg = _cfg("train.sched=cosine", "train.min_lr=0.01", "train.lr=1.0", "train.cooldown_steps=4",
               "train.warmup_epochs=0")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg.train, total_steps=10, steps_per_epoch=5)
    lrs = []
    for step in range(10):
        sched.step_update(num_updates=step)
        lrs.append(opt.param_groups[0]["lr"])
    # lr(t) = min + (max − min)·(1 + cos(π t / T_max))/2 for t < T_max = 6, min afterwards
    expected = [0.01 + 0.99 * (1 + math.cos(math.pi * t / 6)) / 2 for t in range(6)] + [0.01] * 4
    assert lrs == pytest.approx(expected, abs=1e-9)
    with pytest.raises(UserError, match="train.cooldown_steps=10"):
        build_scheduler(opt, _cfg("train.cooldown_steps=10").train, total_steps=10, steps_per_epoch=5)


def test_nonfinite_loss_names_the_step(tmp_path):
    bad = dataclasses.replace(tiny.PLUGIN, training_step=lambda m, b, c: torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="step 0"):
        train(bad, _cfg(), tmp_path)


def test_single_process_never_starts_a_process_group(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train(tiny.PLUGIN, _cfg("train.max_steps=1"), tmp_path)
    assert not torch.distributed.is_initialized()
