"""Ctrl-C / SIGTERM: finish the step, save last.pt, say so; resume ends where an uninterrupted run ends;
time-based checkpoints; a warm-up that train.max_steps cuts is reported."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import tiny_plugin as tiny
import torch

from kpt.config import build_config
from kpt.engine import checkpoint as ckpt_io
from kpt.engine.interrupt import StopRequest, TrainingInterrupted
from kpt.engine.trainer import train

torch.set_num_threads(1)


def _cfg(*overrides):
    return build_config(tiny.PLUGIN, overrides=list(overrides))


def _signalling(at_call: int, signum: int):
    """The tiny plugin, but the process receives ``signum`` in the middle of training step
    ``at_call`` (as a Ctrl-C would arrive)."""
    calls = {"n": 0}

    def step(model, batch, cfg):
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), signum)
        return tiny.training_step(model, batch, cfg)

    return dataclasses.replace(tiny.PLUGIN, training_step=step)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_last_pt_and_resume_matches_uninterrupted_run(tmp_path, signum, kpt_log):
    full = train(tiny.PLUGIN, _cfg(), tmp_path / "a")
    out = tmp_path / "b"
    with pytest.raises(TrainingInterrupted) as info:
        train(_signalling(4, signum), _cfg(), out)  # step 4 of 12: no epoch end, no save_every yet
    assert info.value.step == 4 and info.value.checkpoint == out / "last.pt"
    assert isinstance(info.value, KeyboardInterrupt)  # the CLI exits 130 on it
    assert ckpt_io.load_checkpoint(out / "last.pt")["step"] == 4
    said = str(info.value)
    assert str(out / "last.pt") in said and "not saved" in said and "summary.json" in said
    assert signal.Signals(signum).name in kpt_log.text
    assert not (out / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    resumed = train(tiny.PLUGIN, _cfg(), out, resume=out / "last.pt")  # the lock was released
    a = ckpt_io.load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = ckpt_io.load_checkpoint(out / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["accuracy"] == full["accuracy"]
    rec_a, rec_b = _records(tmp_path / "a" / "metrics.jsonl"), _records(out / "metrics.jsonl")
    assert [(r["type"], r["step"]) for r in rec_b] == [(r["type"], r["step"]) for r in rec_a]
    assert [r.get("loss") for r in rec_b] == [r.get("loss") for r in rec_a]


def test_second_ctrl_c_aborts_at_once():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt) as info:
            os.kill(os.getpid(), signal.SIGINT)
        assert not isinstance(info.value, TrainingInterrupted)


class _Crash(Exception):
    pass


def _crashing(at_call: int):
    calls = {"n": 0}

    def step(model, batch, cfg):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise _Crash
        return tiny.training_step(model, batch, cfg)

    return dataclasses.replace(tiny.PLUGIN, training_step=step)


def test_time_based_checkpoint(tmp_path):
    """train.save_every_minutes saves last.pt by the clock, between the step-based saves."""
    with pytest.raises(_Crash):
        train(_crashing(5), _cfg("train.save_every_minutes=1e-9"), tmp_path / "a")
    assert ckpt_io.load_checkpoint(tmp_path / "a" / "last.pt")["step"] == 4
    with pytest.raises(_Crash):  # off: nothing saved before the first epoch end (step 6)
        train(_crashing(5), _cfg("train.save_every_minutes=0"), tmp_path / "b")
    assert not (tmp_path / "b" / "last.pt").exists()


def test_default_time_based_interval_is_set():
    assert _cfg().train.save_every_minutes > 0


def test_warmup_cut_by_max_steps_is_reported(tmp_path, kpt_log):
    # 6 steps per epoch, 2 epochs planned; warm-up 1 epoch = 6 steps of a 4-step run
    train(tiny.PLUGIN, _cfg("train.max_steps=4", "train.warmup_epochs=1"), tmp_path / "a")
    assert "train.max_steps=4" in kpt_log.text and "warm-up" in kpt_log.text
    kpt_log.clear()
    train(tiny.PLUGIN, _cfg("train.warmup_epochs=1"), tmp_path / "b")
    assert "warm-up" not in kpt_log.text


def test_cli_ctrl_c_exits_130_after_saving(tmp_path, monkeypatch, capsys):
    from kpt.cli import main

    tiny.register_in_process(monkeypatch)
    monkeypatch.setattr(tiny, "PLUGIN", _signalling(3, signal.SIGINT))
    out = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"saved {out / 'last.pt'}" in err and "interrupted" in err
    # the CLI's own last line says it too, not only the log above it
    assert err.strip().splitlines()[-1].startswith(f"kpt: interrupted; saved {out / 'last.pt'}")
    assert ckpt_io.load_checkpoint(out / "last.pt")["step"] == 3
    assert "interrupted (SIGINT) at step 3/12" in (out / "run.log").read_text()
