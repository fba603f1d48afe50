"""Typed config: YAML defaults, files, dotted overrides, casting and unknown keys."""

from __future__ import annotations

import pytest

from kpt.config import Config, ConfigError, build_config, cast_value, parse_yaml
from kpt.plugin import Plugin

DEFAULTS = {
    "model": {"depth": 2, "pos": "kprpe", "drop": 0.0, "extra": {}},
    "data": {"name": "synthetic", "size": 16},
    "train": {"lr": 0.01, "epochs": 2},
    "eval": {"test": ["synthetic"]},
}


def _plugin(default_config=DEFAULTS):
    return Plugin(name="cfgtest", description="", default_config=default_config,
                  build_data=lambda c: None, build_model=lambda c, i: None,
                  training_step=lambda m, b, c: None, evaluate=lambda m, d, c, dev: {},
                  datasets=("synthetic", "other"))


def test_yaml_12_floats_and_bools():
    assert parse_yaml("a: 1e-3\nb: yes\nc: 5\nd: .inf") == {"a": 1e-3, "b": "yes", "c": 5,
                                                             "d": float("inf")}


@pytest.mark.parametrize("value,default,expected", [
    ("1e-3", 0.1, 1e-3), ("3", 0.1, 3.0), ("1e3", 1, 1000), ("true", False, True),
    ("off", True, False), ("a,b", ["x"], ["a", "b"]), ("[1, 2]", [0], [1, 2]), (7, "s", "7"),
    ("[1, 2]", None, [1, 2]),
])
def test_cast_value(value, default, expected):
    got = cast_value(value, default, "k", "test")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value,default", [("abc", 1), ("1.5", 1), ("maybe", True), ("x", 0.5)])
def test_cast_value_errors(value, default):
    with pytest.raises(ConfigError, match="k="):
        cast_value(value, default, "k", "test")


def test_layering_and_engine_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  lr: 5e-4\nmodel:\n  depth: 3\n")
    cfg = build_config(_plugin(), [cfg_file], ["model.depth=4", "train.amp=bf16"],
                       data="other", test=["synthetic", "other"])
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.depth == 4 and cfg.train.epochs == 2  # plugin default beats engine default
    assert cfg.train.batch_size == 32 and cfg.train.amp == "bf16"  # engine defaults fill the rest
    assert cfg.data.name == "other" and cfg.eval.test == ["synthetic", "other"]
    assert cfg["train.lr"] == cfg.train.lr and cfg.flat()["model.pos"] == "kprpe"
    cfg2 = build_config(_plugin(), data=str(tmp_path))
    assert cfg2.data.root == str(tmp_path) and cfg2.data.name == "synthetic"


def test_unknown_keys_are_rejected_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'depth'"):
        build_config(_plugin(), overrides=["model.depht=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        build_config(_plugin(), [bad])
    with pytest.raises(ConfigError, match="Did you mean 'other'"):
        build_config(_plugin(), data="othr")
    with pytest.raises(ConfigError, match="section.key=value"):
        build_config(_plugin(), overrides=["depth"])
    cfg = build_config(_plugin(), overrides=["model.extra.anything=3"])  # open section
    assert cfg.model.extra.anything == 3


def test_attribute_setting_casts_and_roundtrips(tmp_path):
    cfg = Config({"a": {"lr": 0.1, "n": 1}})
    cfg.a.lr = "2e-2"
    assert cfg.a.lr == 0.02
    with pytest.raises(ConfigError):
        cfg.a.m = 3
    with pytest.raises(AttributeError, match="Did you mean 'lr'"):
        _ = cfg.a.lrr
    back = Config(parse_yaml(cfg.to_yaml()))
    assert back.to_dict() == cfg.to_dict()


def test_yaml_default_path_relative_to_plugin_module(tmp_path, monkeypatch):
    import kpt.plugin as plugin_mod

    (tmp_path / "defaults.yaml").write_text("model:\n  width: 8\ntrain:\n  lr: 1e-3\n")
    monkeypatch.setattr(plugin_mod, "plugin_module_dir", lambda p: tmp_path)
    cfg = build_config(_plugin("defaults.yaml"))
    assert cfg.model.width == 8 and cfg.train.lr == 1e-3
