"""Logs and curves: run.log, curves.png, `kpt plot`, train.logger sinks, strict JSON, one final table."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import ClassVar

import pytest
import tiny_plugin as tiny
import torch

from kpt.cli import main
from kpt.config import build_config
from kpt.engine.curves import plot_curves, read_records
from kpt.engine.trainer import train
from kpt.errors import UserError

torch.set_num_threads(1)
PNG = b"\x89PNG\r\n\x1a\n"


def _cfg(*overrides):
    return build_config(tiny.PLUGIN, overrides=list(overrides))


def _strict(text):
    def refuse(name):
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_run_keeps_console_log_and_draws_curves(tmp_path, kpt_log):
    out = tmp_path / "run"
    train(tiny.PLUGIN, _cfg(), out)
    assert (out / "curves.png").read_bytes()[:8] == PNG
    log = (out / "run.log").read_text()
    assert "plugin tiny" in log and "summary (" in log  # the header and the final table
    # evaluations at steps 6 and 12: the last one is shown once, in the summary table
    assert log.count("evaluation at step 6") == 1 and "evaluation at step 12" not in log
    assert log.count("summary (") == 1


def test_kpt_plot_compares_runs(tmp_path, capsys):
    train(tiny.PLUGIN, _cfg(), tmp_path / "a")
    train(tiny.PLUGIN, _cfg("train.lr=0.01"), tmp_path / "b")
    target = tmp_path / "cmp" / "curves.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(target)]) == 0
    assert target.read_bytes()[:8] == PNG and str(target) in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "missing"), "--out", str(target)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_plot_skips_torn_and_null_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "step": 1, "loss": 1.0, "lr": 0.1}\n'
                    '{"type": "eval", "step": 1, "val": null, "accuracy": 50.0}\n{"type": "tr')
    assert len(read_records(path)) == 2
    assert plot_curves([path], tmp_path / "c.png").read_bytes()[:8] == PNG


def _nan_plugin():
    def evaluate(model, data, cfg, device):
        return {**tiny.evaluate(model, data, cfg, device), "val": float("nan")}

    return dataclasses.replace(tiny.PLUGIN, evaluate=evaluate)


def test_metrics_that_cannot_be_computed_are_null_not_nan(tmp_path):
    out = tmp_path / "run"
    summary = train(_nan_plugin(), _cfg(), out)
    assert math.isnan(summary["val"])
    assert _strict((out / "summary.json").read_text())["val"] is None
    records = [_strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val"] is None for r in records if r["type"] == "eval")


class _Sink:
    records: ClassVar[list] = []

    def __init__(self, out_dir, config):
        self.out_dir, self.config = out_dir, config

    def log(self, record):
        _Sink.records.append(record)

    def close(self):
        _Sink.records.append("closed")


def make_sink(out_dir, config):
    return _Sink(out_dir, config)


def test_logger_hook_receives_every_record(tmp_path):
    _Sink.records = []
    train(tiny.PLUGIN, _cfg(f"train.logger={__name__}:make_sink"), tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert _Sink.records[-1] == "closed" and len(_Sink.records) == len(lines) + 1
    with pytest.raises(UserError, match="cannot import"):
        train(tiny.PLUGIN, _cfg("train.logger=no_such_module:factory"), tmp_path / "bad")


def test_tensorboard_logger(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"kpt\[tb\]"):
            train(tiny.PLUGIN, _cfg("train.logger=tensorboard"), tmp_path / "run")
        return
    train(tiny.PLUGIN, _cfg("train.logger=tensorboard"), tmp_path / "run")
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_evaluation_shows_progress(capsys):
    from kpt.engine.inference import predict

    predict(torch.nn.Linear(2, 2), torch.rand(10, 2), lambda net, b: net(b), batch_size=3,
            progress=True, desc="eval lfw")
    assert "eval lfw" in capsys.readouterr().err
