"""A tiny plugin used by the core tests (importable as ``tiny_plugin`` from tests/).

Images (1, 8, 8) hold a bright pixel at a random position; the two keypoints are that pixel and the image
centre; the label says whether the pixel lies in the left or right half. The model is a small MLP over
the image and the keypoints, with dropout so that RNG restoring matters for exact resume.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from kpt.plugin import Plugin, TaskData

DEFAULTS = {
    "model": {"hidden": 16, "dropout": 0.1, "rank_local": False},
    "data": {"name": "blobs", "size": 48, "eval_size": 16, "jitter": 0.01},
    "train": {"batch_size": 8, "lr": 0.05, "optimizer": "sgd", "sched": "cosine", "epochs": 2,
              "warmup_epochs": 0.5, "log_every": 1, "weight_decay": 1e-4},
    "eval": {"test": ["blobs"]},
}


class Blobs(Dataset):
    def __init__(self, size: int, seed: int, jitter: float = 0.0) -> None:
        self.jitter = jitter
        g = torch.Generator().manual_seed(seed)
        self.pos = torch.randint(0, 8, (size, 2), generator=g)
        self.noise = 0.1 * torch.rand(size, 1, 8, 8, generator=g)

    def __len__(self) -> int:
        return len(self.pos)

    def __getitem__(self, i: int) -> dict:
        image = self.noise[i].clone()
        x, y = self.pos[i].tolist()
        image[0, y, x] = 1.0
        kp = torch.tensor([[(x + 0.5) / 8, (y + 0.5) / 8], [0.5, 0.5]])
        # a random jitter drawn from the global RNG, like an augmentation
        image = image + self.jitter * torch.rand_like(image)
        return {"image": image, "keypoints": kp, "label": torch.tensor(int(x >= 4))}


class RankLocal(nn.Module):
    """A parameter sharded over DDP ranks, like PartialFC's class centres: rank r holds r+1 values."""

    kpt_rank_local = True

    def __init__(self) -> None:
        super().__init__()
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.offset = nn.Parameter(torch.full((rank + 1,), float(rank)))


class TinyNet(nn.Module):
    def __init__(self, hidden: int, dropout: float, rank_local: bool = False) -> None:
        super().__init__()
        self.local = RankLocal() if rank_local else None
        self.fc1 = nn.Linear(64 + 4, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, images: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        x = torch.cat([images.flatten(1), keypoints.flatten(1)], dim=1)
        logits = self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))
        if self.local is not None:  # same shift for every class: the loss does not depend on it
            logits = logits + self.local.offset.mean()
        return logits


class BrightestPixel:
    """Keypoint source ``brightest`` (a plugin component, so that the core's component tests cover one).

    ``__call__(images (B, 1, H, W)) -> (keypoints (B, 2, 2), found (B,) bool)``: the centre of the
    brightest pixel and the image centre, (x, y) in [0, 1]; ``found`` is False for a flat image.
    """

    num_keypoints = 2

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = images.shape
        flat = images.reshape(b, -1)
        index = flat.argmax(dim=1)
        x = (index % w).float() + 0.5
        y = torch.div(index, w, rounding_mode="floor").float() + 0.5
        pixel = torch.stack([x / w, y / h], dim=1)
        keypoints = torch.stack([pixel, torch.full_like(pixel, 0.5)], dim=1)
        return keypoints, flat.amax(dim=1) > flat.amin(dim=1)


def build_data(cfg) -> TaskData:
    return TaskData(train=Blobs(cfg.data.size, seed=1, jitter=cfg.data.jitter),
                    evals={name: Blobs(cfg.data.eval_size, seed=2) for name in cfg.eval.test},
                    info={"num_classes": 2})


def build_model(cfg, info) -> nn.Module:
    return TinyNet(cfg.model.hidden, cfg.model.dropout, cfg.model.rank_local)


def training_step(model, batch, cfg):
    logits = model(batch["image"], batch["keypoints"])
    loss = nn.functional.cross_entropy(logits, batch["label"])
    return loss, {"acc": float((logits.argmax(1) == batch["label"]).float().mean())}


def evaluate(model, data, cfg, device) -> dict:
    out = {}
    for name, ds in data.evals.items():
        batch = {k: torch.stack([ds[i][k] for i in range(len(ds))]).to(device)
                 for k in ("image", "keypoints", "label")}
        logits = model(batch["image"], batch["keypoints"])
        out[f"{name}/accuracy"] = float((logits.argmax(1) == batch["label"]).float().mean())
    out["accuracy"] = sum(out.values()) / max(1, len(out))
    return out


PLUGIN = Plugin(name="tiny", description="toolkit test plugin: blobs left or right",
                default_config=DEFAULTS, build_data=build_data, build_model=build_model,
                training_step=training_step, evaluate=evaluate, datasets=("blobs",),
                primary_metric="accuracy", check_config={"data.size": 16},
                components={"keypoints": {"brightest": "tiny_plugin:BrightestPixel"}})


def register_in_process(monkeypatch) -> None:
    """Make ``tiny`` discoverable in this process (as if installed through an entry point)."""
    from kpt.plugin import discovery as plugin_mod

    found = dict(plugin_mod.discover_plugins(refresh=True))
    entry = plugin_mod.PluginEntry("tiny", "tiny_plugin:PLUGIN", builtin=False,
                                   package="toolkit-tests")
    found["tiny"] = entry
    monkeypatch.setattr(plugin_mod, "_DISCOVERED", found)


def write_entry_point(folder, name: str = "tiny", target: str = "tiny_plugin:PLUGIN"):
    """A minimal ``*.dist-info`` in ``folder`` whose entry point registers ``name`` -> ``target``.

    Put ``folder`` (and tests/) on PYTHONPATH of a subprocess to make ``kpt`` find the plugin.
    """
    from pathlib import Path

    info = Path(folder) / f"kpt_plugin_{name}-0.0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kpt-plugin-{name}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[kpt.plugins]\n{name} = {target}\n")
    return folder

