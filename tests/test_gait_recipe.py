"""OpenGait's SwinGait Gait3D recipe in the gait plugin: the triplet loss over the global batch and
synchronised BatchNorm under DDP, the warm start of stem and head (``model.init_from``) with its key
report, and the official values in ``--print-config``. Facts: reference gait.md 3-4 and OpenGait's
configs/swingait/swingait3D_B1442C2_Gait3D.yaml."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from kpt_plugins.gait.plugin import PLUGIN, build_model, training_step
from torch.nn.parallel import DistributedDataParallel

from kpt.config import build_config
from kpt.engine.weights import CheckpointError

# the CPU model with KP-RPE, no stochastic depth (ranks draw different random numbers by design)
TINY = ["model.drop_path_rate=0", "data.k=2", "train.batch_size=8"]
NUM_CLASSES = 6
SETTINGS = {"official": ["loss.global_triplet=true", "model.sync_bn=true"],
            "per_rank": ["loss.global_triplet=false", "model.sync_bn=false"]}


def _global_batch() -> dict[str, torch.Tensor]:
    """8 sequences = 4 identities x 2, whole identities per rank (as kpt's P x K sampler splits)."""
    g = torch.Generator().manual_seed(3)
    return {"image": (torch.rand(8, 4, 32, 22, generator=g) > 0.5).float(),
            "keypoints": torch.rand(8, 4, 17, 2, generator=g),
            "label": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])}


def _step(model: torch.nn.Module, batch: dict, cfg) -> dict:
    """One training step's loss, triplet/CE logs, gradients and BatchNorm running means."""
    model.train()
    loss, logs = training_step(model, batch, cfg)
    loss.backward()
    inner = getattr(model, "module", model)
    grads = {n: p.grad.detach().clone() for n, p in inner.named_parameters() if p.grad is not None}
    stats = {n: b.detach().clone() for n, b in inner.named_buffers() if n.endswith("running_mean")}
    return {"loss": float(loss.detach()), "triplet": logs["triplet"], "ce": logs["ce"],
            "grads": grads, "running_means": stats}


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world)
    try:
        initial = torch.load(f"{folder}/initial.pt", weights_only=True)
        batch = _global_batch()
        per_rank = len(batch["label"]) // world
        mine = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
        results = {}
        for name, overrides in SETTINGS.items():
            cfg = build_config(PLUGIN, overrides=[*TINY, *overrides])
            model = build_model(cfg, {"num_classes": NUM_CLASSES})
            model.load_state_dict(initial)
            results[name] = _step(DistributedDataParallel(model), mine, cfg)
        torch.save(results, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~15 s on an idle 2-core machine, 40 s on a busy one
def test_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path):
    torch.manual_seed(0)
    cfg = build_config(PLUGIN, overrides=TINY)
    model = build_model(cfg, {"num_classes": NUM_CLASSES})
    torch.save(model.state_dict(), tmp_path / "initial.pt")
    single = _step(model, _global_batch(), cfg)

    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    official = [r["official"] for r in ranks]
    # the loss the engine logs (mean over ranks) and the triplet of the whole batch are those of one
    # process; the CE of each rank is its half's, so their mean is the global CE
    assert sum(r["loss"] for r in official) / 2 == pytest.approx(single["loss"], abs=1e-5)
    for r in official:
        assert r["triplet"] == pytest.approx(single["triplet"], abs=1e-5)
    assert sum(r["ce"] for r in official) / 2 == pytest.approx(single["ce"], abs=1e-5)
    assert set(official[0]["grads"]) == set(single["grads"])
    for r in official:  # DDP's averaged gradients = the gradients of one process
        for name, grad in single["grads"].items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")
        for name, mean in single["running_means"].items():  # BN statistics of the global batch
            torch.testing.assert_close(r["running_means"][name], mean, rtol=1e-5, atol=1e-6)

    # without the gathered triplet and synchronised BN the same run differs: the check can fail
    per_rank = ranks[0]["per_rank"]
    worst = max(float((per_rank["grads"][n] - g).abs().max()) for n, g in single["grads"].items())
    assert worst > 1e-3
    assert per_rank["triplet"] != pytest.approx(single["triplet"], abs=1e-3)


# -- warm start --------------------------------------------------------------------------------------
def _bn(prefix: str, c: int, shape: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": torch.randn(c), f"{prefix}.bias": torch.randn(c),
            f"{prefix}.running_mean": torch.randn(c), f"{prefix}.running_var": torch.rand(c) + 0.5,
            f"{prefix}.num_batches_tracked": torch.tensor(60000)}


def _opengait_swingait_state(c0: int, c1: int, dim: int, emb: int, parts: int,
                             classes: int) -> dict[str, torch.Tensor]:
    """A state dict named as OpenGait's SwinGait / DeepGaitV2-P3D (modeling/models/swingait.py:
    SetBlockWrapper ``forward_block``, BasicBlock2D, BasicBlockP3D, SeparateFCs, SeparateBNNecks)."""
    sd = {"layer0.forward_block.0.weight": torch.randn(c0, 1, 3, 3),
          **_bn("layer0.forward_block.1", c0),
          "layer1.forward_block.0.conv1.weight": torch.randn(c0, c0, 3, 3),
          **_bn("layer1.forward_block.0.bn1", c0),
          "layer1.forward_block.0.conv2.weight": torch.randn(c0, c0, 3, 3),
          **_bn("layer1.forward_block.0.bn2", c0)}
    for i in range(4):
        cin = c0 if i == 0 else c1
        sd |= {f"layer2.{i}.conv1.forward_block.0.weight": torch.randn(c1, cin, 3, 3),
               **_bn(f"layer2.{i}.conv1.forward_block.1", c1),
               f"layer2.{i}.conv2.forward_block.0.weight": torch.randn(c1, c1, 3, 3),
               **_bn(f"layer2.{i}.conv2.forward_block.1", c1),
               f"layer2.{i}.shortcut3d.weight": torch.randn(c1, c1, 3, 1, 1),
               **_bn(f"layer2.{i}.sbn", c1)}
    sd |= {"layer2.0.downsample.0.weight": torch.randn(c1, c0, 1, 1, 1),
           **_bn("layer2.0.downsample.1", c1),
           "FCs.fc_bin": torch.randn(parts, 2 * dim, emb),
           "BNNecks.fc_bin": torch.randn(parts, emb, classes),
           **_bn("BNNecks.bn1d", emb * parts),
           "transformer.patch_embed.proj.weight": torch.randn(dim, c1, 1, 2, 2)}
    return {f"module.{k}" if k.startswith("layer2.3") else k: v for k, v in sd.items()}  # DDP-saved


def test_warm_start_converts_opengait_names_and_reports_keys(tmp_path, caplog):
    # CPU preset sizes: stem 8/16 channels, Swin 32 -> 64, 32-d embeddings, 15 parts
    state = _opengait_swingait_state(8, 16, 32, 32, 15, NUM_CLASSES)
    del state["BNNecks.bn1d.running_var"]  # -> reported missing
    state["BNNecks.fc_bin"] = torch.randn(15, 32, NUM_CLASSES + 1)  # another class count: mismatch
    path = tmp_path / "DeepGaitV2_B1441_C2_P3D-60000.pt"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []},
                "iteration": 60000}, path)  # OpenGait's save_ckpt layout

    cfg = build_config(PLUGIN, overrides=[*TINY, f"model.init_from={path}"])
    info = {"num_classes": NUM_CLASSES}
    with caplog.at_level("INFO"):
        model = build_model(cfg, info)
    # loaded: layer0 6 + layer1 12 + layer2 4 x 12 + downsample 6 + FCs 1 + BNNeck BN 4; unexpected:
    # 4 shortcut3d + 4 x 5 sbn + 1 transformer
    assert info["init_from"] == {"path": str(path), "loaded": 77, "missing": 1, "unexpected": 25,
                                 "mismatched": 1}
    assert "bnneck.bn1d.running_var" in caplog.text and "P3D temporal branch" in caplog.text
    assert "transformer.patch_embed.proj.weight" in caplog.text

    torch.testing.assert_close(model.layer0[0].weight, state["layer0.forward_block.0.weight"])
    torch.testing.assert_close(model.layer1.bn2.running_mean,
                               state["layer1.forward_block.0.bn2.running_mean"])
    torch.testing.assert_close(model.layer2[1].bn1.weight,
                               state["layer2.1.conv1.forward_block.1.weight"])
    torch.testing.assert_close(model.layer2[3].conv2.weight,
                               state["module.layer2.3.conv2.forward_block.0.weight"])
    torch.testing.assert_close(model.layer2[0].downsample[0].weight,
                               state["layer2.0.downsample.0.weight"][:, :, 0])
    torch.testing.assert_close(model.fcs.fc_bin, state["FCs.fc_bin"])
    torch.testing.assert_close(model.bnneck.bn1d.weight, state["BNNecks.bn1d.weight"])
    assert not torch.equal(model.bnneck.fc_bin, state["BNNecks.fc_bin"][..., :NUM_CLASSES])
    # warm-started: OpenGait's 0.1 x lr on stem and head
    assert model.lr_scale_prefixes == dict.fromkeys(
        ("layer0.", "layer1.", "layer2.", "fcs.", "bnneck."), pytest.approx(0.1))

    # a model rebuilt from the run's saved info (kpt eval) does not read the file again
    path.unlink()
    build_model(cfg, info)


def test_warm_start_from_kpt_names_loads_the_stem_and_head_only(tmp_path):
    torch.manual_seed(1)
    donor = build_model(build_config(PLUGIN, overrides=TINY), {"num_classes": NUM_CLASSES})
    torch.save({"format": "kpt.checkpoint", "model": donor.state_dict()}, tmp_path / "last.pt")
    cfg = build_config(PLUGIN, overrides=[*TINY, f"model.init_from={tmp_path / 'last.pt'}"])
    info = {"num_classes": NUM_CLASSES}
    torch.manual_seed(2)
    model = build_model(cfg, info)
    stem_head = [k for k in donor.state_dict() if k.split(".")[0] in
                 ("layer0", "layer1", "layer2", "fcs", "bnneck")]
    assert info["init_from"]["loaded"] == len(stem_head) and info["init_from"]["missing"] == 0
    assert info["init_from"]["unexpected"] == len(donor.state_dict()) - len(stem_head)
    for key in stem_head:
        torch.testing.assert_close(model.state_dict()[key], donor.state_dict()[key])
    assert not torch.equal(model.patch_embed.weight, donor.patch_embed.weight)  # transformer: new


def test_from_scratch_trains_stem_and_head_at_full_lr():
    model = build_model(build_config(PLUGIN, overrides=TINY), {"num_classes": NUM_CLASSES})
    assert set(model.lr_scale_prefixes.values()) == {1.0}
    cfg = build_config(PLUGIN, overrides=[*TINY, "model.stem_head_lr_mult=0.5"])
    assert set(build_model(cfg, {"num_classes": 3}).lr_scale_prefixes.values()) == {0.5}


def test_warm_start_file_errors_name_the_file(tmp_path):
    def build(path):
        cfg = build_config(PLUGIN, overrides=[*TINY, f"model.init_from={path}"])
        return build_model(cfg, {"num_classes": NUM_CLASSES})

    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pt"):
        build(text)
    with pytest.raises(CheckpointError, match="missing.pt"):
        build(tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"head.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(CheckpointError, match=r"other\.pt.*no stem or head tensor"):
        build(other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": {"layer0.0.weight": torch.zeros(1)}, "extra": tmp_path}, pickled)
    with pytest.raises(CheckpointError, match="pickled.pt"):  # never unpickled beyond tensors
        build(pickled)


# -- the official values ------------------------------------------------------------------------------
def test_print_config_shows_opengait_swingait_gait3d_values(tmp_path, capsys):
    from kpt.cli import main

    assert main(["train", "gait", "--data", "gait3d", "--data-root", str(tmp_path),
                 "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    d, t, m, loss = cfg["data"], cfg["train"], cfg["model"], cfg["loss"]
    # swingait3D_B1442C2_Gait3D.yaml: BaseSilTransform (64x64), 30 + 4 frames, 32 x 4, p = 0.2
    assert (d["cut"], d["downsample"], d["frames"], d["skip"], d["k"]) == (False, 1, 30, 4, 4)
    assert d["aug_prob"] == 0.2 and d["max_eval_frames"] == 720
    assert t["batch_size"] == 128 and t["optimizer"] == "adamw"
    assert (float(t["lr"]), float(t["weight_decay"]), float(t["min_lr"])) == (3e-4, 0.02, 1e-6)
    assert t["sched"] == "cosine" and t["warmup_epochs"] == 0 and t["amp"] == "fp16"
    # total_iter 80000 with the cosine over T_max_iter 60000, then 1e-6 for the last 20000
    assert t["max_steps"] == 80000 and t["cooldown_steps"] == 20000
    assert m["preset"] == "paper" and m["drop_path_rate"] == 0.1 and m["sync_bn"] is True
    assert (loss["margin"], loss["ce_scale"], loss["label_smoothing"]) == (0.2, 16.0, 0.1)
    assert (loss["triplet_weight"], loss["ce_weight"], loss["global_triplet"]) == (1.0, 1.0, True)
    assert cfg["eval"]["metric"] == "euclidean"


def test_synthetic_walkers_survive_two_ranks_generating_at_once(tmp_path, monkeypatch):
    """Under torchrun every rank builds its data: the loser of the race must use the winner's."""
    from kpt_plugins.gait import synthetic

    spec = synthetic.SyntheticSpec(num_train=2, num_test=1, seqs_per_id=2, frames=6)
    root = tmp_path / f"gait-synthetic-{spec.digest()}"
    real = synthetic.generate

    def other_rank_finishes_first(folder, spec_):
        real(folder, spec_)
        if not root.exists():
            real(tmp_path / "other", spec_).rename(root)
        return folder

    monkeypatch.setattr(synthetic, "generate", other_rank_finishes_first)
    assert synthetic.ensure_synthetic(tmp_path, spec) == root
    assert (root / "SPEC.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # its own copy discarded
