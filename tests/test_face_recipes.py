"""The official CVLface face recipes: schedules, optimiser, weight-decay groups, model preset, augmentation.

The expected values are re-derived here from the reference (kprpe.md §6 and CVLface's code), never
read back from kpt: ``step_sgd`` warms up linearly from 0 over one epoch, then multiplies the lr by 0.1
once the step is past 12, 20 and 24 epochs' worth of steps; ``cosine`` is timm's cosine with the
warm-up as a prefix (t_initial = total − warmup, lr_min 0). CVLface's train.py steps its scheduler
after ``optimizer.step()`` with the step just taken, so optimizer step k runs at the schedule's value
of step k − 1 (step 0 at the initial warm-up value, 0).
"""

from __future__ import annotations

import itertools
import json
import math

import cv2
import numpy as np
import pytest
import tiny_plugin as tiny
import torch
from kpt_plugins.face.data.augment import (
    PHOTOMETRIC_OPS,
    AppearanceAugment,
    FaceAugment,
    FaceCollate,
    RepeatedAugmentSampler,
    apply_blur,
    apply_cutout,
    apply_photometric,
    sample_blur,
    sample_cutout,
    sample_photometric,
)

import kpt
from kpt.cli import main
from kpt.config import build_config, parse_yaml, plugin_presets
from kpt.data.keypoints import hflip_keypoints
from kpt.engine.optim import build_optimizer, param_groups
from kpt.engine.trainer import train
from kpt.errors import UserError
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
    official_aug = {"augment": True, "cutout_prob": 0.2, "blur_prob": 0.2, "blur_magnitude": 1.0,
                    "photometric_num_ops": 2, "photometric_magnitude": 14,
                    "photometric_magnitude_offset": 9, "photometric_num_bins": 31,
                    "scale_min": 0.8, "scale_max": 1.2, "rot_prob": 0.2, "max_rot": 20.0,
                    "hflip_prob": 0.5, "extra_offset": 0.1, "repeated_augment_prob": 0.1}
    assert {key: printed["data"][key] for key in official_aug} == official_aug


# ----------------------------------------------------------------------------- augmentation
def _face_images(n: int = 4, size: int = 112) -> torch.Tensor:
    """uint8 (n, 3, S, S) with texture and colour (a checkerboard over a colour gradient)."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    checker = ((ys // 4 + xs // 4) % 2).float() * 80
    base = torch.stack([xs.float(), ys.float(), (xs + ys).float() / 2]) * 150 / size
    images = (base + checker).clamp(0, 255).to(torch.uint8)
    return images.unsqueeze(0).repeat(n, 1, 1, 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_photometric_draw_follows_the_official_rule():
    draws = [op for seed in range(1500) for op in sample_photometric(generator=_gen(seed))]
    assert len(draws) == 3000 and {name for name, _ in draws} == set(PHOTOMETRIC_OPS)
    levels = {round(abs(v) / 0.03) for name, v in draws if PHOTOMETRIC_OPS[name]}
    assert levels == set(range(5, 23))  # bins 14 ± 9 (numpy randint: high excluded) of 31 over 0.9
    signed = [v for name, v in draws if PHOTOMETRIC_OPS[name]]
    assert 0.4 < np.mean(np.asarray(signed) < 0) < 0.6
    rare = np.mean([name in ("Equalize", "Grayscale") for name, _ in draws])
    assert 0.01 < rare < 0.045  # redrawn twice: (2/7)^3 ≈ 2.3 % instead of 2/7
    assert sample_photometric(generator=_gen(3)) == sample_photometric(generator=_gen(3))


def test_photometric_ops_effects():
    image = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    image[0] = 160
    assert torch.equal(apply_photometric(image, [("Identity", 0.0)]), image)
    brighter = apply_photometric(image, [("Brightness", 0.3)])
    assert int(brighter[1, 0, 0]) == 130 and int(brighter[0, 0, 0]) == 208
    gray = apply_photometric(image, [("Grayscale", 0.0)])
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    desaturated = apply_photometric(image, [("Saturate", -0.9)])
    spread = lambda x: int(x.max(0).values.min()) - int(x.min(0).values.max())
    assert spread(desaturated) < spread(image)
    assert apply_photometric(image, [("Contrast", -0.5), ("Sharpness", 0.5)]).dtype == torch.uint8


def test_blur_draw_probabilities_and_ops():
    draws = [sample_blur(generator=_gen(seed)) for seed in range(3000)]
    kinds = [d[0] for d in draws]
    applied = [k for k in kinds if k != "skip"]
    assert 0.17 < len(applied) / len(draws) < 0.23
    assert 0.74 < applied.count("resize") / len(applied) < 0.86  # 8 of the 10 official entries
    assert {d[1] for d in draws if d[0] == "avg"} <= set(range(1, 10))
    assert all(0.2 <= d[1] < 1.0 for d in draws if d[0] == "resize")
    assert all(0 <= d[1] < 4.0 for d in draws if d[0] == "gaussian")

    image = _face_images(1)[0]
    for param in [("resize", 0.25, (cv2.INTER_AREA, cv2.INTER_LINEAR)), ("avg", 5),
                  ("gaussian", 2.0)]:
        out = apply_blur(image, param)
        assert out.shape == image.shape and out.dtype == torch.uint8
        # blurring removes the checkerboard's high frequencies
        detail = lambda x: float((x.float().diff(dim=-1)).abs().mean())
        assert detail(out) < 0.7 * detail(image), param
    expected = cv2.blur(image.permute(1, 2, 0).numpy().copy(), (5, 5))
    assert torch.equal(apply_blur(image, ("avg", 5)).permute(1, 2, 0), torch.from_numpy(expected))
    assert torch.equal(apply_blur(image, ("skip",)), image)
    assert torch.equal(apply_blur(image, ("avg", 1)), image)


def test_cutout_draw_and_effect():
    draws = [sample_cutout(112, 112, generator=_gen(seed)) for seed in range(4000)]
    applied = [d for d in draws if d[0] != "skip"]
    assert 0.17 < len(applied) / len(draws) < 0.23
    holes = [d for d in applied if d[0] == "holes"]
    assert 0.01 < len(holes) / len(applied) < 0.1  # 5 % CoarseDropout
    assert all(12 <= len(d[1]) <= 20 and all(h == w == 16 for *_, h, w in d[1]) for d in holes)
    for _, (y, x, h, w) in (d for d in applied if d[0] == "keep"):
        assert 0 <= y and y + h <= 112 and 0 <= x and x + w <= 112
        assert 0.2 * 112 * 112 * 0.9 <= h * w <= 112 * 112

    image = _face_images(1)[0] | 1  # no zero pixel of its own
    kept = apply_cutout(image, ("keep", (10, 20, 50, 40)))
    assert torch.equal(kept[:, 10:60, 20:60], image[:, 10:60, 20:60])
    assert int(kept.sum()) == int(image[:, 10:60, 20:60].sum(dtype=torch.int64))
    holed = apply_cutout(image, ("holes", [(0, 0, 16, 16), (50, 60, 16, 16)]))
    assert int((holed == 0).all(0).sum()) == 2 * 16 * 16


def test_appearance_is_deterministic_and_leaves_keypoints_alone():
    images = _face_images(6)
    appearance = AppearanceAugment(cutout_prob=0.5, blur_prob=0.5)
    a, b = appearance(images, _gen(7)), appearance(images, _gen(7))
    assert torch.equal(a, b) and not torch.equal(a, images)
    assert torch.equal(AppearanceAugment(0.0, 0.0, 1.0, 0)(images, _gen(7)), images)  # all off
    with pytest.raises(UserError, match="data.blur_prob"):
        AppearanceAugment(blur_prob=1.5)

    items = [{"image": img, "keypoints": torch.tensor([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6],
                                                        [0.35, 0.8], [0.65, 0.8]]),
              "label": torch.tensor(i)} for i, img in enumerate(images)]
    torch.manual_seed(0)
    plain = FaceCollate(FaceAugment())(items)
    torch.manual_seed(0)
    full = FaceCollate(FaceAugment(), AppearanceAugment(1.0, 1.0))(items)
    torch.testing.assert_close(full["keypoints"], plain["keypoints"], rtol=0, atol=0)
    assert not torch.equal(full["image"], plain["image"])


def test_collate_does_not_clamp_keypoints():
    still = FaceAugment(scale_min=1.0, scale_max=1.0, rot_prob=0.0, hflip_prob=0.0,
                        extra_offset=0.0)
    kp = torch.tensor([[-0.05, 0.4], [1.1, 0.4], [0.5, 0.6], [0.35, 1.02], [0.65, 0.8]])
    items = [{"image": torch.zeros(3, 16, 16, dtype=torch.uint8), "keypoints": kp,
              "label": torch.tensor(0)}]
    out = FaceCollate(still, AppearanceAugment())(items)["keypoints"][0]
    torch.testing.assert_close(out, kp, atol=1e-5, rtol=0)


def test_repeated_augmentation_never_repeats_twice_in_a_row():
    labels = np.repeat(np.arange(30), 4)
    base = [i for b in RepeatedAugmentSampler(labels, 12, seed=2, prob=0.0) for i in b]
    always = [i for b in RepeatedAugmentSampler(labels, 12, seed=2, prob=1.0) for i in b]
    # prob 1: every sample after the first is drawn, but a repeat blocks the next one
    for pos, (orig, got) in enumerate(zip(base, always)):
        if pos % 2 == 1:
            assert labels[got] == labels[always[pos - 1]]  # replaced by the previous identity
        else:
            assert got == orig  # kept: the one before was a repeat (or it is the first)
    some = [i for b in RepeatedAugmentSampler(labels, 12, seed=2, prob=0.5) for i in b]
    replaced = [a != b for a, b in zip(base, some)]
    assert not any(x and y for x, y in itertools.pairwise(replaced))


# ----------------------------------------------------------------------------- .bin keypoints
def test_bin_keypoints_as_cvlface_evaluation(tmp_path, monkeypatch):
    from kpt_plugins.face.data.bin_pairs import write_bin
    from kpt_plugins.face.evaluation import verification as ver
    from kpt_plugins.face.synthetic.dataset import synthetic_pairs

    cfg = build_config(FACE)
    assert cfg.eval.bin_padding == 0.0 and cfg.eval.bin_flip_keypoints == "detect"  # official
    pairs, _ = synthetic_pairs(2, "aligned", 0)
    path = tmp_path / "lfw.bin"
    write_bin(path, pairs.images.permute(0, 2, 3, 1).numpy(), pairs.issame.numpy())
    seen = []
    real = ver.get_detector

    def spy(padding=0.0, input_size=None, weights=""):
        seen.append((padding, input_size))
        return real(padding, input_size, weights)

    monkeypatch.setattr(ver, "get_detector", spy)
    official = ver.load_bin_set(path, "retinaface")
    assert seen == [(0.0, 160), (0.0, 160)]  # no padding, resized to 160; rerun on the mirror
    assert official.flip_keypoints is not None and official.flip_keypoints.shape == (4, 5, 2)
    mirrored = hflip_keypoints(official.keypoints, (1, 0, 2, 4, 3))
    assert float((official.flip_keypoints - mirrored).abs().max()) < 0.1  # same face, mirrored
    seen.clear()
    kpt_way = ver.load_bin_set(path, "retinaface", padding=0.215, flip_keypoints="mirror")
    assert seen == [(0.215, 160)] and kpt_way.flip_keypoints is None

    # flip fusion feeds the mirrored images with the detections on the mirror
    calls = []

    class Probe(torch.nn.Module):
        def forward(self, x, k):
            calls.append(k.clone())
            return torch.ones(len(x), 3)

    ver.embed(Probe(), official.images, official.keypoints, flip_keypoints=official.flip_keypoints)
    torch.testing.assert_close(calls[1], official.flip_keypoints)
    calls.clear()
    ver.embed(Probe(), kpt_way.images, kpt_way.keypoints)
    torch.testing.assert_close(calls[1], hflip_keypoints(kpt_way.keypoints, (1, 0, 2, 4, 3)))


def test_follow_keypoints_preset_is_the_measured_recipe():
    """docs/face.md measures the keypoint-following recipe with these explicit keys; the preset
    must stay exactly them (a user value still wins)."""
    from kpt.config import build_config
    from kpt.plugin import load_plugin

    plugin = load_plugin("face")
    cfg = build_config(plugin, overrides=["preset=follow_keypoints"])
    assert cfg.model.args["kprpe_hidden"] == 64
    assert (cfg.data.rot_prob, cfg.data.max_rot, cfg.data.scale_min, cfg.data.scale_max) == (
        1.0, 50.0, 0.65, 1.5)
    assert list(cfg.preset) == ["follow_keypoints"]
    mine = build_config(plugin, overrides=["preset=follow_keypoints", "data.max_rot=30"])
    assert mine.data.max_rot == 30.0 and mine.data.rot_prob == 1.0
