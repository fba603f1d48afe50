"""Presets: declared by a plugin, applied by the core in build_config, printed as the run uses them."""

from __future__ import annotations

import pytest
import torch
import yaml

from kpt.cli import main
from kpt.config import PRESET_SELECTOR, ConfigError, build_config, plugin_presets
from kpt.plugin import Plugin, discover_plugins, load_plugin

torch.set_num_threads(1)

BUILTINS = sorted(name for name, entry in discover_plugins().items() if entry.builtin)


def _selections() -> list[tuple[str, list[str]]]:
    """(domain, CLI arguments) for every built-in plugin: no preset, then each preset spelled both
    as ``--preset NAME`` and, where it has a selector, as the value that selects it."""
    out = []
    for domain in BUILTINS:
        out.append((domain, []))
        for name, preset in plugin_presets(load_plugin(domain)).items():
            out.append((domain, ["--preset", name]))
            if preset.get(PRESET_SELECTOR):
                out.append((domain, [f"{preset[PRESET_SELECTOR]}={name}"]))
    return out


def _tiny_config(domain: str, tmp_path, **extra) -> str:
    """A --config file with the plugin's own tiny dry-run settings (check_config) and ``extra``."""
    plugin = load_plugin(domain)
    values = {**dict(plugin.check_config), "train.device": "cpu", "train.num_workers": 0}
    if "data.cache_dir" in build_config(plugin).flat():
        values["data.cache_dir"] = str(tmp_path / "cache")
    values.update(extra)
    path = tmp_path / f"tiny_{domain}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _print_config(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main([*argv, "--print-config"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("domain,selection", _selections(),
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_print_config_is_the_config_the_run_uses(domain, selection, tmp_path, capsys, monkeypatch):
    """What --print-config shows is what the trainer receives and still holds after build_data."""
    argv = ["train", domain, *selection, "--config", _tiny_config(domain, tmp_path),
            "--out", str(tmp_path / "run")]
    printed = _print_config(argv, capsys)
    seen = {}

    def fake_train(plugin, cfg, out_dir=None, resume=None, overwrite=False):
        seen["handed"] = cfg.to_yaml()
        try:  # gait3d has no prepared tree here: build_data may fail, but must not edit cfg first
            plugin.build_data(cfg)
        except Exception as exc:  # noqa: BLE001
            seen["error"] = exc
        seen["after_build_data"] = cfg.to_yaml()
        return {}

    monkeypatch.setattr("kpt.engine.trainer.train", fake_train)
    assert main(argv) == 0
    assert printed == seen["handed"] == seen["after_build_data"]
    wanted = [a for a in selection if a != "--preset"]
    names = [a.partition("=")[2] or a for a in wanted]
    assert yaml.safe_load(printed)["preset"] == names


@pytest.mark.parametrize("domain,selection", [
    ("face", ["recipe=step_sgd"]),
    ("gait", []),
    ("mnist", []),
])
def test_print_config_equals_the_written_config_yaml(domain, selection, tmp_path, capsys):
    """A real (two-step) run writes the config.yaml that --print-config printed."""
    extra = {"train.max_steps": 2, "train.eval_every": 1000}
    if domain == "face":
        extra.update({"eval.synthetic_pairs": 8, "eval.protocols": ["aligned"]})
    out = tmp_path / "run"
    argv = ["train", domain, *selection, "--config", _tiny_config(domain, tmp_path, **extra),
            "--out", str(out)]
    printed = _print_config(argv, capsys)
    assert main(argv) == 0
    assert (out / "config.yaml").read_text() == printed


def test_face_recipe_is_applied_and_the_user_wins(tmp_path):
    face = load_plugin("face")
    cfg = build_config(face, overrides=["recipe=step_sgd", "train.lr=0.05"])
    assert cfg.preset == ["step_sgd"]
    assert (cfg.train.optimizer, cfg.train.sched, cfg.train.epochs) == ("momentum", "multistep", 26)
    assert cfg.train.weight_decay == pytest.approx(5e-4)
    assert cfg.train.lr == pytest.approx(0.05)  # the user's value beats the preset's 0.1
    user = tmp_path / "user.yaml"
    user.write_text("train:\n  optimizer: adamw\n")  # a file is a user source too
    cfg = build_config(face, [user], ["recipe=cosine"])
    assert cfg.train.optimizer == "adamw" and cfg.train.lr == pytest.approx(1e-4)
    # the user setting a value equal to the plugin default still wins (no "still at default" guess)
    cfg = build_config(face, overrides=["recipe=step_sgd", "train.epochs=10"])
    assert cfg.train.epochs == 10


def test_gait3d_data_brings_its_preset_and_the_user_wins():
    gait = load_plugin("gait")
    cfg = build_config(gait, data="gait3d", overrides=["train.batch_size=32"])
    assert cfg.preset == ["gait3d"] and cfg.model.preset == "paper"
    assert cfg.train.max_steps == 80000 and cfg.train.batch_size == 32
    synthetic = build_config(gait)
    assert synthetic.preset == [] and synthetic.train.max_steps == 300


@pytest.mark.parametrize("name", ["vit_small_kprpe", "vit_base_kprpe"])
def test_official_face_model_name_brings_its_settings(name):
    from kpt_plugins.face.plugin import backbone_kwargs

    face = load_plugin("face")
    cfg = build_config(face, overrides=[f"model.name={name}"])
    assert cfg.preset == [name]
    assert cfg.model.embedding_size == 512 and cfg.model.drop_path_rate == pytest.approx(0.1)
    arch, kwargs = backbone_kwargs(cfg)
    assert arch == name and kwargs["num_classes"] == 512
    assert kwargs["drop_path_rate"] == pytest.approx(0.1)
    cfg = build_config(face, overrides=[f"model.name={name}", "model.drop_path_rate=0.2"])
    assert cfg.model.drop_path_rate == pytest.approx(0.2) and cfg.model.embedding_size == 512
    assert build_config(face).model.embedding_size == 128  # the small CPU ViT keeps its own


def test_unknown_preset_is_an_error_with_did_you_mean(capsys):
    face = load_plugin("face")
    with pytest.raises(ConfigError, match="Did you mean 'step_sgd'"):
        build_config(face, presets=["stepsgd"])
    with pytest.raises(ConfigError, match="Did you mean 'cosine'"):
        build_config(face, overrides=["recipe=cosin"])
    with pytest.raises(ConfigError, match="unknown preset 'gait4d'.*Did you mean 'gait3d'"):
        build_config(load_plugin("gait"), overrides=["preset=gait4d"])
    assert main(["train", "face", "--preset", "step_sdg", "--print-config"]) == 2
    assert "Did you mean 'step_sgd'" in capsys.readouterr().err


def test_resumed_config_is_not_changed_by_presets():
    face = load_plugin("face")
    saved = build_config(face, overrides=["recipe=step_sgd", "model.name=vit_small_kprpe",
                                          "train.optimizer=adamw", "model.embedding_size=256"])
    again = build_config(face, base=saved.to_dict())
    assert again.to_dict() == saved.to_dict()
    assert again.train.optimizer == "adamw" and again.model.embedding_size == 256
    older = {k: v for k, v in saved.to_dict().items() if k != "preset"}
    older["recipe"] = None  # what a face run of an older kpt saved (no preset record)
    assert build_config(face, base=older).preset == []


def _plugin(presets: dict, **defaults) -> Plugin:
    config = {"model": {"name": "small", "width": 8, "drop": 0.0},
              "data": {"name": "toy"}, "recipe": "", **defaults, "presets": presets}
    return Plugin(name="presettest", description="", default_config=config,
                  build_data=lambda c: None, build_model=lambda c, i: None,
                  training_step=lambda m, b, c: None, evaluate=lambda m, d, c, dev: {})


def test_presets_of_a_third_party_plugin():
    plugin = _plugin({
        "wide": {"selected_by": "model.name", "model.width": 64},        # dotted keys
        "fast": {"selected_by": "recipe", "train": {"lr": 0.5}, "model": {"name": "wide"}},
        "noisy": {"model": {"drop": 0.3}},                               # explicit only
    })
    cfg = build_config(plugin, overrides=["recipe=fast"])
    assert cfg.preset == ["wide", "fast"]  # fast chose model.name=wide, which brought its preset
    assert cfg.model.width == 64 and cfg.train.lr == pytest.approx(0.5)
    cfg = build_config(plugin, presets=["noisy"], overrides=["preset=wide"])
    assert cfg.preset == ["wide", "noisy"] and cfg.model.name == "wide"
    assert cfg.model.drop == pytest.approx(0.3)
    assert "presets" not in build_config(plugin).to_dict()


@pytest.mark.parametrize("presets,overrides,match", [
    ({"a": {"model.width": 1}, "b": {"model.width": 2}}, ["preset=a,b"], "set model.width"),
    ({"a": {"model.widht": 1}}, ["preset=a"], "Did you mean 'width'"),
    ({"a": {"selected_by": "model.nam"}}, [], "selected_by"),
    ({"a": {"preset": ["b"]}}, [], "cannot choose other presets"),
])
def test_bad_preset_declarations_are_errors(presets, overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config(_plugin(presets), overrides=overrides)


def test_domain_help_lists_presets(capsys):
    assert main(["train", "face", "--help"]) == 0
    assert "step_sgd (recipe=step_sgd)" in capsys.readouterr().out
