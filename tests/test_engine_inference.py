"""kpt.engine.inference.predict: the one evaluation loop (mode, grad, autocast, batching, joins),
and the three plugins' evaluations through it giving what their own loops gave."""

from __future__ import annotations

import pytest
import torch
from kpt_plugins.face.data.augment import normalize_images
from kpt_plugins.face.evaluation.verification import embed
from kpt_plugins.gait.model import SwinGait2D
from kpt_plugins.gait.plugin import embed_sequences
from kpt_plugins.mnist.plugin import DigitDataset, predict_labels
from torch import nn

import kpt
from kpt.engine.inference import autocast_context, default_forward, move_to_device, predict
from kpt.errors import UserError

TINY_VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}


class _Probe(nn.Module):
    """Records mode, grad and autocast state at each call; output (B, 3) from images and points."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.seen: list[tuple[bool, bool, bool]] = []

    def forward(self, images: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append((self.training, torch.is_grad_enabled(),
                          torch.is_autocast_enabled(images.device.type)))
        return self.linear(images)


def test_eval_mode_no_grad_and_train_mode_restored():
    model = _Probe().train()
    out = predict(model, [torch.randn(2, 4), torch.randn(3, 4)])
    assert out.shape == (5, 3) and not out.requires_grad and out.device.type == "cpu"
    assert model.seen == [(False, False, False)] * 2
    assert model.training  # put back
    model.eval()
    predict(model, [torch.randn(1, 4)])
    assert not model.training  # an eval-mode model stays in eval mode


def test_train_mode_restored_when_forward_fails():
    model = _Probe().train()

    def boom(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        predict(model, [torch.randn(2, 4)], boom)
    assert model.training


def test_autocast_as_the_run_uses_it():
    model = _Probe()
    out = predict(model, [torch.randn(2, 4)], amp="bf16")
    assert model.seen == [(False, False, True)] and out.dtype == torch.bfloat16
    with pytest.raises(UserError, match="expected none, bf16 or fp16"):
        predict(model, [torch.randn(2, 4)], amp="fp8")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        autocast_context("fp16", "cpu")
    assert len(model.seen) == 1  # a bad amp fails before any batch runs


def test_dataset_batching_collate_and_structured_outputs():
    items = [{"image": torch.full((4,), float(i)), "keypoints": torch.zeros(1, 2),
              "label": torch.tensor(i)} for i in range(7)]
    model = _Probe()
    sizes: list[int] = []

    def both(m: nn.Module, batch: dict) -> dict:
        sizes.append(len(batch["label"]))
        return {"out": m(batch["image"]), "label": batch["label"]}

    out = predict(model, items, both, batch_size=3)
    assert sizes == [3, 3, 1]  # in order, last batch kept
    assert torch.equal(out["label"], torch.arange(7))
    torch.testing.assert_close(out["out"], model.linear(torch.stack([i["image"] for i in items])))
    pairs = predict(model, [(torch.ones(2, 4),), (torch.zeros(1, 4),)],
                    lambda m, b: (m(*b), b[0].sum(1)))
    assert pairs[0].shape == (3, 3) and torch.equal(pairs[1], torch.tensor([4.0, 4.0, 0.0]))
    per_batch = predict(model, [torch.ones(2, 4), torch.ones(1, 4)], concat=False)
    assert [tuple(o.shape) for o in per_batch] == [(2, 3), (1, 3)]
    with pytest.raises(ValueError, match="no batches"):
        predict(model, [])
    with pytest.raises(ValueError, match="collate_fn needs batch_size"):
        predict(model, [], collate_fn=list)


def test_default_forward_and_device_moves():
    model = _Probe()
    kp = torch.rand(2, 1, 2)
    x = torch.randn(2, 4)
    torch.testing.assert_close(default_forward(model, {"image": x, "keypoints": kp}), model(x))
    torch.testing.assert_close(default_forward(model, (x, kp)), model(x))
    moved = move_to_device({"a": [x, (kp,)], "n": 3}, "cpu")
    assert moved["n"] == 3 and torch.equal(moved["a"][1][0], kp)


# ---------------------------------------------------------------- the plugins' evaluations
def _old_mnist_loop(model, dataset, batch_size):
    """The loop mnist's ``predict_labels`` had before the shared helper."""
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            x = dataset.images[i:i + batch_size, None].float().div(255)
            preds.append(model(x, dataset.keypoints[i:i + batch_size]).argmax(1))
    model.train()
    return torch.cat(preds)


def test_mnist_predictions_unchanged():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (11, 40, 40), dtype=torch.uint8)
    images[:, :, :4] = 0  # an empty band: the digit boxes (and keypoints) differ per image
    images[5:, 30:] = 0
    dataset = DigitDataset(images, torch.arange(11) % 10)
    model = kpt.create_model("vit", img_size=40, patch_size=8, in_chans=1, embed_dim=16,
                             depth=1, num_heads=2, num_classes=10, pos="kprpe", num_keypoints=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "kprpe" in name:
                p.normal_(0, 1.0)  # KP-RPE starts at zero: make the keypoints count
    model.train()
    got = predict_labels(model, dataset, torch.device("cpu"), batch_size=4)
    assert model.training
    want = _old_mnist_loop(model, dataset, 4)
    assert len(set(want.tolist())) > 1 and torch.equal(got, want)


def _old_gait_loop(model, items, batch_size):
    """The loop gait's ``embed_sequences`` had: equal-length neighbours share a batch."""
    model.eval()
    feats, pending = [], []

    def flush():
        if pending:
            images = torch.stack([it["image"] for it in pending])
            keypoints = torch.stack([it["keypoints"] for it in pending])
            with torch.no_grad():
                feats.extend(model(images, keypoints)["embeddings"].float().transpose(1, 2))
            pending.clear()

    for item in items:
        if pending and (len(pending) == batch_size or item["image"].shape != pending[0]["image"].shape):
            flush()
        pending.append(item)
    flush()
    return torch.stack(feats)


def test_gait_embeddings_unchanged():
    torch.manual_seed(0)
    model = SwinGait2D(pos="kprpe", channels=(4, 8), embed_dim=8, depths=(1, 1), num_heads=(2, 2),
                       token_grid=(4, 2), window_size=(2, 2), shift_size=(1, 1), embedding_dim=8,
                       num_classes=3, parts=4, drop_path_rate=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "kprpe" in name:
                p.normal_(0, 1.0)  # KP-RPE starts at zero: make the keypoints count
    lengths = [3, 3, 3, 5, 5, 2]  # runs of equal length, one longer than the batch
    items = [{"image": torch.rand(t, 16, 8), "keypoints": torch.rand(t, 17, 2),
              "label": f"id{i % 3}", "probe": i % 2 == 0} for i, t in enumerate(lengths)]
    feats, labels, probes = embed_sequences(model, items, torch.device("cpu"), batch_size=2)
    want = _old_gait_loop(model, items, 2)
    assert feats.shape == (6, 4, 8)  # (N, parts, E)
    torch.testing.assert_close(feats, want, rtol=0, atol=1e-6)
    assert labels == [it["label"] for it in items] and probes == [it["probe"] for it in items]


def test_face_embeddings_unchanged():
    torch.manual_seed(0)
    model = kpt.create_model("vit", pos="kprpe", num_keypoints=5, num_classes=6, **TINY_VIT)
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    keypoints = torch.rand(5, 5, 2)
    got = embed(model, images, keypoints, batch_size=2)
    assert model.training
    model.eval()
    with torch.no_grad():
        want = []
        for s in range(0, 5, 2):
            x, k = normalize_images(images[s:s + 2]), keypoints[s:s + 2]
            mirrored = k[:, [1, 0, 2, 4, 3]].clone()  # the face plugin's own flip, as it was
            mirrored[..., 0] = 1.0 - mirrored[..., 0]
            feats = model(x, k).float() + model(x.flip(-1), mirrored).float()
            want.append(nn.functional.normalize(feats, dim=1))
    torch.testing.assert_close(got, torch.cat(want), rtol=0, atol=1e-6)


def test_predict_leaves_the_global_generator_alone():
    """An evaluation in the middle of a run must not change the run's later random draws (a DataLoader
    draws its base seed from the global generator)."""
    model, data = nn.Linear(3, 2), torch.utils.data.TensorDataset(torch.randn(5, 3))
    state = torch.random.get_rng_state().clone()
    predict(model, data, batch_size=2, forward=lambda m, b: m(b[0]))
    assert torch.equal(torch.random.get_rng_state(), state)
