"""The ``kpt`` command line, in-process: help, plugins listing and check, train/resume/eval, errors."""

from __future__ import annotations

import json
import sys

import pytest
import tiny_plugin as tiny
import torch

from kpt.cli import main
from kpt.engine import checkpoint as ckpt_io

torch.set_num_threads(1)


@pytest.fixture
def tiny_installed(monkeypatch):
    tiny.register_in_process(monkeypatch)


def test_help_shows_worked_examples(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "predict", "data", "plugins", "convert", "new-plugin"):
        assert command in out
    assert "kpt train mnist --test affnist" in out and "torchrun --nproc-per-node" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--resume auto" in capsys.readouterr().out


def test_domain_help_lists_datasets_and_defaults(tiny_installed, capsys):
    assert main(["train", "tiny", "--help"]) == 0
    out = capsys.readouterr().out
    assert "datasets: blobs" in out and "hidden: 16" in out


def test_plugins_listing_and_json(tiny_installed, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist", "face", "gait"):
        assert name in out and "built-in" in out
    assert "tiny" in out and "toolkit-tests" in out
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny"]["status"] == "ok" and rows["tiny"]["datasets"] == ["blobs"]
    for name in ("mnist", "face", "gait"):  # a broken built-in is a bug, never an accepted state
        assert rows[name]["builtin"] and rows[name]["status"] == "ok", rows[name]


def test_plugins_check(tiny_installed, capsys):
    assert main(["plugins", "check", "tiny"]) == 0
    out = capsys.readouterr().out
    assert out.count("[ok]") == 7 and "PASSED" in out


def test_plugins_check_reports_contract_violations(monkeypatch, capsys):
    import dataclasses

    class PixelKeypoints(torch.utils.data.Dataset):  # forgot to normalise: pixels, not [0, 1]
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            return {**self.base[i], "keypoints": self.base[i]["keypoints"] * 8}

    def bad_data(cfg):
        data = tiny.build_data(cfg)
        data.train = PixelKeypoints(data.train)
        return data

    monkeypatch.setattr(tiny, "PLUGIN", dataclasses.replace(tiny.PLUGIN, build_data=bad_data))
    tiny.register_in_process(monkeypatch)
    assert main(["plugins", "check", "tiny"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] one batch" in out and "expected normalised" in out and "FAILED" in out


def test_plugins_check_catches_submodule_calls(monkeypatch, capsys):
    import dataclasses

    def reaches_in(model, batch, cfg):
        return model.fc2(model.fc1(batch["image"].flatten(1)))

    monkeypatch.setattr(tiny, "PLUGIN", dataclasses.replace(tiny.PLUGIN, training_step=reaches_in))
    tiny.register_in_process(monkeypatch)
    assert main(["plugins", "check", "tiny"]) == 1
    assert "must call model(...)" in capsys.readouterr().out


def test_print_config_casts_overrides(tiny_installed, capsys):
    assert main(["train", "tiny", "--print-config", "train.lr=1e-3", "--test", "blobs",
                 "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.001" in out and "epochs: 3" in out and "- blobs" in out


def test_errors_are_one_line_with_suggestions(tiny_installed, capsys):
    assert main(["train", "tiyn"]) == 2
    assert "Did you mean 'tiny'" in capsys.readouterr().err
    assert main(["train", "tiny", "model.hiden=3"]) == 2
    assert "Did you mean 'hidden'" in capsys.readouterr().err
    assert main(["train", "tiny", "train.lr=fast"]) == 2
    assert "expected a number" in capsys.readouterr().err
    assert main(["train", "tiny", "--data", "blobz"]) == 2
    assert "Did you mean 'blobs'" in capsys.readouterr().err
    assert main(["data", "get", "tiny"]) == 2
    assert "has no `data get` command" in capsys.readouterr().err


def test_plugin_commands_receive_remaining_argv(monkeypatch, capsys):
    import dataclasses

    seen = []
    commands = {"data get": lambda argv: seen.append(("get", argv)) or 0,
                "data prepare": lambda argv: seen.append(("prepare", argv)) or 0,
                "predict": lambda argv: seen.append(("predict", argv)) or 3}
    monkeypatch.setattr(tiny, "PLUGIN", dataclasses.replace(tiny.PLUGIN, commands=commands))
    tiny.register_in_process(monkeypatch)
    assert main(["data", "get", "tiny", "--root", "x"]) == 0
    assert main(["predict", "tiny", "a.png", "--checkpoint", "b.pt"]) == 3
    assert main(["data", "prepare", "blobs", "--out", "y"]) == 0  # a dataset name picks its plugin
    assert seen == [("get", ["--root", "x"]), ("predict", ["a.png", "--checkpoint", "b.pt"]),
                    ("prepare", ["blobs", "--out", "y"])]


def test_train_resume_auto_and_eval(tiny_installed, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "tiny", "--out", str(out), "train.max_steps=3"]) == 0
    assert ckpt_io.load_checkpoint(out / "last.pt")["step"] == 3
    assert main(["train", "tiny", "--out", str(out), "--resume", "auto", "train.max_steps=5"]) == 0
    assert ckpt_io.load_checkpoint(out / "last.pt")["step"] == 5
    capsys.readouterr()
    assert main(["eval", "tiny", str(out / "last.pt"), "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"blobs/accuracy", "accuracy"}
    assert metrics["accuracy"] == json.loads((out / "summary.json").read_text())["accuracy"]


def test_convert_calls_the_converter(monkeypatch, capsys):
    import types

    calls = []
    fake = types.SimpleNamespace(convert_cvlface=lambda src, dst: calls.append((src, dst)) or dst)
    monkeypatch.setitem(sys.modules, "kpt.convert", fake)
    assert main(["convert", "cvlface", "src.pt", "dst.safetensors"]) == 0
    assert calls == [("src.pt", "dst.safetensors")]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist", "face", "gait"])
def test_builtin_plugins_pass_the_contract_check(name, capsys):
    assert main(["plugins", "check", name]) == 0, capsys.readouterr().out
