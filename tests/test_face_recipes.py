"""The official CVLface face recipes: schedules, optimiser, weight-decay groups, model preset, augmentation.

The expected values are re-derived here from the reference (kprpe.md §6 and CVLface's code), never
read back from kpt: ``step_sgd`` warms up linearly from 0 over one epoch, then multiplies the lr by 0.1
once the step is past 12, 20 and 24 epochs' worth of steps; ``cosine`` is timm's cosine with the
warm-up as a prefix (t_initial = total − warmup, lr_min 0). CVLface's train.py steps its scheduler
after ``optimizer.step()`` with the step just taken, so optimizer step k runs at the schedule's value
of step k − 1 (step 0 at the initial warm-up value, 0).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tiny_plugin as tiny
import torch

import kpt
from kpt.cli import main
from kpt.config import build_config, parse_yaml, plugin_presets
from kpt.engine.optim import build_optimizer, param_groups
from kpt.engine.trainer import train
from kpt.plugin import load_plugin

torch.set_num_threads(1)

FACE = load_plugin("face")


# ----------------------------------------------------------------------------- official schedules
def _official_step_sgd(step: int, steps_per_epoch: int) -> float:
    """CVLface StepScheduler (optims/lr_scheduler.py) at scheduler step ``step``."""
    base, warmup = 0.1, 1 * steps_per_epoch
    if step < warmup:
        return base * step / warmup
    alpha = 1.0
    for milestone in (12, 20, 24):
        if step > milestone * steps_per_epoch:
            alpha *= 0.1
    return base * alpha


def _official_cosine(step: int, steps_per_epoch: int, epochs: int = 34) -> float:
    """timm CosineLRScheduler(t_initial=T−W, warmup_t=W, warmup_lr_init=0, warmup_prefix=True)."""
    base, warmup, total = 1e-4, 3 * steps_per_epoch, epochs * steps_per_epoch
    if step < warmup:
        return base * step / warmup
    t, t_initial = step - warmup, total - warmup
    if t >= t_initial:
        return 0.0
    return 0.5 * base * (1 + math.cos(math.pi * t / t_initial))


def _official_lr_of_optimizer_step(k: int, schedule, steps_per_epoch: int) -> float:
    """CVLface train.py: optimizer step k uses the lr set after step k − 1 (0 before any)."""
    return schedule(max(k - 1, 0), steps_per_epoch)


def _recipe_overrides(recipe: str) -> list[str]:
    """The face preset's ``train`` values as overrides (the preset read as data, not its effect)."""
    preset = plugin_presets(FACE)[recipe]["train"]
    return [f"train.{key}={value if isinstance(value, str) else json.dumps(value)}"
            for key, value in preset.items()]


@pytest.mark.parametrize("recipe, schedule, epochs", [("step_sgd", _official_step_sgd, 26),
                                                      ("cosine", _official_cosine, 34)])
def test_recipe_lr_at_every_step_equals_the_official_schedule(recipe, schedule, epochs, tmp_path,
                                                              monkeypatch):
    tiny.register_in_process(monkeypatch)
    # the engine's real loop on the tiny plugin: 48 items / batch 8 = 6 steps per epoch
    cfg = build_config(tiny.PLUGIN, overrides=[*_recipe_overrides(recipe), "train.batch_size=8",
                                               "train.log_every=1", "train.eval_every=100000",
                                               "train.clip_grad=0"])
    assert cfg.train.epochs == epochs
    train(tiny.PLUGIN, cfg, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    lrs = [r["lr"] for r in records if r["type"] == "train"]  # record of step s: lr of step s − 1
    steps_per_epoch = 6
    assert len(lrs) == epochs * steps_per_epoch
    expected = [_official_lr_of_optimizer_step(k, schedule, steps_per_epoch)
                for k in range(len(lrs))]
    np.testing.assert_allclose(lrs, expected, rtol=1e-9, atol=1e-15)


def test_step_sgd_decays_at_epochs_12_20_24():
    # the schedule of the reference, sampled at the epoch boundaries (6 steps per epoch)
    at = {e: _official_lr_of_optimizer_step(e * 6 + 2, _official_step_sgd, 6) for e in range(26)}
    assert at[11] == pytest.approx(0.1) and at[12] == pytest.approx(0.01)
    assert at[19] == pytest.approx(0.01) and at[20] == pytest.approx(1e-3)
    assert at[24] == pytest.approx(1e-4)


# ----------------------------------------------------------------------------- optimiser, wd groups
@pytest.fixture(scope="module")
def official_face_model():
    cfg = build_config(FACE, overrides=["recipe=step_sgd", "model.name=vit_small_kprpe"])
    return cfg, FACE.build_model(cfg, {"num_classes": 7})


def test_step_sgd_is_plain_sgd_momentum(official_face_model):
    cfg, model = official_face_model
    opt = build_optimizer(model, cfg.train)
    assert type(opt) is torch.optim.SGD
    assert opt.defaults["nesterov"] is False and opt.defaults["momentum"] == 0.9
    assert opt.defaults["lr"] == 0.1
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 5e-4]


def _official_name(name: str) -> str:
    """kpt ViT name → CVLface ViT name (kpt/convert.py maps these two, the rest is identical)."""
    name = name.removeprefix("backbone.")
    if name.startswith("abs_pos."):
        return "pos_embed"
    return name.replace("kprpe.linear.", "keypoint_linear.")


def _official_no_decay(name: str, param: torch.nn.Parameter, classifier: bool) -> bool:
    """CVLface optims.py + lr_scheduler.param_groups_weight_decay (reference kprpe.md §6.3)."""
    if classifier:  # the classifier's parameters all take cfg.optims.weight_decay
        return False
    return (param.ndim <= 1 or name.endswith(".bias") or ("emb" in name and "patch_embed" not in name)
            or "token" in name)


def test_weight_decay_groups_follow_the_official_rule_by_name(official_face_model):
    cfg, model = official_face_model
    groups = param_groups(model, cfg.train.weight_decay, cfg.train.no_decay)
    kpt_exempt = {n: g["weight_decay"] == 0.0 for g in groups for n in g["names"]}
    official = {n: _official_no_decay(_official_name(n), p, classifier=n.startswith("head."))
                for n, p in model.named_parameters()}
    assert kpt_exempt == official
    # the cases the rule is about
    assert kpt_exempt["backbone.abs_pos.pos_embed"] and not kpt_exempt["backbone.kprpe.linear.weight"]
    assert kpt_exempt["backbone.kprpe.linear.bias"]
    assert not kpt_exempt["backbone.patch_embed.proj.weight"] and not kpt_exempt["head.weight"]
    # the backbone alone (kpt.create_model("vit_small_kprpe", ...)) gives the same groups
    assert isinstance(model.backbone, type(kpt.create_model("vit", depth=1, embed_dim=8,
                                                            num_heads=2, img_size=16, patch_size=8)))
    names = {n: g["weight_decay"] == 0.0
             for g in param_groups(model.backbone, 5e-4, cfg.train.no_decay) for n in g["names"]}
    assert names == {n.removeprefix("backbone."): v for n, v in official.items()
                     if n.startswith("backbone.")}


def test_official_model_preset_is_512d_with_drop_path(official_face_model):
    cfg, model = official_face_model
    assert cfg.model.embedding_size == 512 and cfg.model.drop_path_rate == 0.1
    backbone = model.backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, 112, 112), torch.full((1, 5, 2), 0.5))
    backbone.train()
    assert out.shape == (1, 512)
    rates = [b.drop_path.drop_prob for b in backbone.blocks if hasattr(b.drop_path, "drop_prob")]
    assert max(rates) == pytest.approx(0.1)
    mine = build_config(FACE, overrides=["model.name=vit_small_kprpe", "model.drop_path_rate=0",
                                         "model.embedding_size=256"])
    assert mine.model.drop_path_rate == 0.0 and mine.model.embedding_size == 256  # the user wins


# ----------------------------------------------------------------------------- --print-config
@pytest.mark.parametrize("recipe, expected", [
    ("step_sgd", {"optimizer": "momentum", "momentum": 0.9, "lr": 0.1, "weight_decay": 5e-4,
                  "epochs": 26, "warmup_epochs": 1.0, "warmup_lr": 0.0, "sched": "multistep",
                  "decay_milestones": [12, 20, 24], "sched_lag": 1, "clip_grad": 5.0}),
    ("cosine", {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 0.3, "epochs": 34,
                "warmup_epochs": 3.0, "warmup_lr": 0.0, "min_lr": 0.0, "sched": "cosine",
                "warmup_prefix": True, "sched_lag": 1, "clip_grad": 5.0}),
])
def test_print_config_shows_the_official_recipe(recipe, expected, capsys):
    capsys.readouterr()
    assert main(["train", "face", f"recipe={recipe}", "--print-config"]) == 0
    printed = parse_yaml(capsys.readouterr().out)
    assert {key: printed["train"][key] for key in expected} == expected
