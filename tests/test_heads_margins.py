"""Face margin heads on hand-computed cases: AdaFace, ArcFace, CosFace, KappaFace."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kpt_plugins.face.heads.margins import AdaFace, ArcFace, CosFace, KappaFace

import kpt

S = 64.0


def _eye_head(name: str, **kw):
    """A head with 3 classes in 3-D whose centres are the unit axes, so cos θ_j = ẑ_j."""
    head = kpt.create("head", name, embedding_size=3, num_classes=3, **kw)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3) * 0.01)  # the scale of the centres does not matter
    return head


EMB = torch.tensor([[3.0, 4.0, 0.0]])  # ||e|| = 5, cos = (0.6, 0.8, 0)


def test_create_gives_weight_and_defaults():
    for name, cls in [("adaface", AdaFace), ("arcface", ArcFace), ("cosface", CosFace)]:
        head = kpt.create("head", name, embedding_size=16, num_classes=7)
        assert isinstance(head, cls) and head.weight.shape == (7, 16) and head.s == S
    ada = kpt.create("head", "adaface", embedding_size=4, num_classes=2)
    assert (ada.m, ada.h, ada.t_alpha, ada.eps) == (0.4, 0.333, 0.01, 1e-3)
    assert float(ada.batch_mean) == 20.0 and float(ada.batch_std) == 100.0
    assert kpt.create("head", "arcface", embedding_size=4, num_classes=2).m == 0.5
    assert kpt.create("head", "cosface", embedding_size=4, num_classes=2).m == 0.4
    with pytest.raises(ValueError, match="labels must lie"):
        ada(torch.randn(2, 4), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="embeddings must be"):
        ada(torch.randn(2, 5), torch.tensor([0, 1]))


def test_cosface_and_arcface_values_only_on_target():
    logits = _eye_head("cosface")(EMB, torch.tensor([1]))
    torch.testing.assert_close(logits, S * torch.tensor([[0.6, 0.8 - 0.4, 0.0]]))
    logits = _eye_head("arcface")(EMB, torch.tensor([0]))
    # cos(θ + m) = cos θ cos m − sin θ sin m with cos θ = 0.6, sin θ = 0.8
    target = 0.6 * math.cos(0.5) - 0.8 * math.sin(0.5)
    torch.testing.assert_close(logits, S * torch.tensor([[target, 0.8, 0.0]]))


def test_arcface_fallbacks_when_theta_plus_m_exceeds_pi():
    emb = torch.tensor([[-0.95, math.sqrt(1 - 0.95**2), 0.0]])  # cos θ_y = -0.95 < cos(π − 0.5)
    label = torch.tensor([0])
    plain = _eye_head("arcface")(emb, label)[0, 0].detach() / S
    theta = math.acos(-0.95)
    assert float(plain) == pytest.approx(math.cos(theta + 0.5), abs=1e-6)  # non-monotonic branch
    guarded = _eye_head("arcface", fallback="threshold")(emb, label)[0, 0].detach() / S
    assert float(guarded) == pytest.approx(-0.95 - 0.5 * math.sin(0.5), abs=1e-6)
    easy = _eye_head("arcface", fallback="easy")(emb, label)[0, 0].detach() / S
    assert float(easy) == pytest.approx(-0.95, abs=1e-6)
    # with cos θ_y > cos(π − m) the guard does nothing
    assert float(_eye_head("arcface", fallback="threshold")(EMB, label)[0, 0].detach()) == pytest.approx(
        S * (0.6 * math.cos(0.5) - 0.8 * math.sin(0.5)), abs=1e-4)


@pytest.mark.parametrize("name", ["adaface", "arcface", "cosface"])
def test_margin_gradient_is_straight_through(name):
    head = kpt.create("head", name, embedding_size=4, num_classes=5)
    cos = (torch.rand(6, 5) * 1.6 - 0.8).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 4, -1])  # -1: class on another shard, no margin
    logits = head.margin(cos, labels, torch.full((6, 1), 25.0))
    weights = torch.randn(6, 5)
    (logits * weights).sum().backward()
    torch.testing.assert_close(cos.grad, S * weights)  # d logit / d cos = s everywhere
    off_target = torch.ones(6, 5, dtype=torch.bool)
    off_target[torch.arange(5), labels[:5]] = False
    torch.testing.assert_close(logits[off_target], S * cos.detach()[off_target])
    assert not torch.allclose(logits[~off_target], S * cos.detach()[~off_target])


def _norm_batch(norms: list[float]) -> torch.Tensor:
    """Embeddings along the first axis with the given norms (cos θ_0 = 1 would hit acos' edge: tilt)."""
    direction = torch.tensor([0.6, 0.8, 0.0])
    return torch.tensor(norms)[:, None] * direction


def test_adaface_norm_statistics_across_calls():
    head = _eye_head("adaface")
    head.train()
    head(_norm_batch([10.0, 20.0, 30.0]), torch.tensor([0, 0, 0]))  # mean 20, unbiased std 10
    assert float(head.batch_mean) == pytest.approx(0.01 * 20 + 0.99 * 20)
    assert float(head.batch_std) == pytest.approx(0.01 * 10 + 0.99 * 100)
    logits = head(_norm_batch([40.0, 60.0]), torch.tensor([0, 1])).detach()  # mean 50, std sqrt(200)
    mean = 0.01 * 50 + 0.99 * 20
    std = 0.01 * math.sqrt(200) + 0.99 * (0.01 * 10 + 0.99 * 100)
    assert float(head.batch_mean) == pytest.approx(mean, rel=1e-6)
    assert float(head.batch_std) == pytest.approx(std, rel=1e-6)
    # The margin of this call already uses the updated statistics.
    for row, (norm, label, cos_y) in enumerate([(40.0, 0, 0.6), (60.0, 1, 0.8)]):
        ms = max(-1.0, min(1.0, 0.333 * (norm - mean) / (std + 1e-3)))
        expected = math.cos(math.acos(cos_y) - 0.4 * ms) - (0.4 + 0.4 * ms)
        assert float(logits[row, label]) == pytest.approx(S * expected, rel=1e-5)
    # eval mode and single-sample batches leave the statistics alone
    before = (float(head.batch_mean), float(head.batch_std))
    head.eval()
    head(_norm_batch([90.0, 1.0]), torch.tensor([0, 1]))
    assert (float(head.batch_mean), float(head.batch_std)) == before
    head.train()
    head(_norm_batch([90.0]), torch.tensor([0]))
    assert float(head.batch_std) == before[1] and float(head.batch_mean) != before[0]


def test_adaface_limits_are_cosface_and_arcface():
    # Norm equal to the mean (t_alpha 0 keeps μ = 20) -> ms = 0 -> CosFace(m).
    ada = _eye_head("adaface", t_alpha=0.0)
    torch.testing.assert_close(ada(_norm_batch([20.0]), torch.tensor([1])),
                               _eye_head("cosface", m=0.4)(_norm_batch([20.0]), torch.tensor([1])))
    # A very low norm with a large h -> ms = -1 -> ArcFace(m).
    ada = _eye_head("adaface", t_alpha=0.0, h=100.0)
    torch.testing.assert_close(ada(_norm_batch([1.0]), torch.tensor([1])),
                               _eye_head("arcface", m=0.4)(_norm_batch([1.0]), torch.tensor([1])))


def test_kappaface_margin_and_autograd():
    head = _eye_head("kappaface", num_samples=4)
    with torch.no_grad():
        head.psi.copy_(torch.tensor([0.5, 1.0, 1.0]))
    head.eval()  # no memory update needed for the logits
    emb = EMB.clone().requires_grad_()
    logits = head(emb, torch.tensor([0]))
    target = 0.6 * math.cos(0.4) - 0.8 * math.sin(0.4)  # m·ψ = 0.8 · 0.5
    torch.testing.assert_close(logits.detach(), S * torch.tensor([[target, 0.8, 0.0]]))
    # full autograd through acos/cos: d logit_y / d cos_y = s·sin(θ + mψ)/sin θ (not straight-through)
    cos = torch.tensor([[0.6, 0.8, 0.0]], requires_grad=True)
    head.margin(cos, torch.tensor([0]), torch.ones(1, 1))[0, 0].backward()
    assert float(cos.grad[0, 0]) == pytest.approx(S * math.sin(math.acos(0.6) + 0.4) / 0.8, rel=1e-5)
    with pytest.raises(ValueError, match="indices"):
        head.train()(EMB, torch.tensor([0]))


def test_kappaface_memory_and_psi_hand_computed():
    head = KappaFace(embedding_size=2, num_classes=3, num_samples=6, momentum=1.0,
                     class_counts=[2, 2, 2])
    head.train()
    # momentum 1: each slot becomes the new unit feature. Class 0: two equal vectors (r̄ = 1, κ = inf ->
    # the largest finite κ); class 1: orthogonal (r̄ = √2/2); class 2: opposite (r̄ = 0, κ = 0).
    emb = torch.tensor([[2.0, 0.0], [5.0, 0.0], [1.0, 0.0], [0.0, 3.0], [1.0, 0.0], [-4.0, 0.0]])
    head(emb, torch.tensor([0, 0, 1, 1, 2, 2]), indices=torch.arange(6))
    torch.testing.assert_close(head.memory, F.normalize(emb))
    kappa = head.update_margins()
    r = math.sqrt(2) / 2
    k1 = r * (2 - r**2) / (1 - r**2)
    torch.testing.assert_close(kappa, torch.tensor([k1, k1, 0.0]))
    mean = 2 * k1 / 3
    std = math.sqrt(((k1 - mean) ** 2 * 2 + mean**2) / 2)  # unbiased, as torch.std
    w_count = (math.cos(math.pi / 1.05) + 1) / 2
    expected = [0.7 * (1 - 1 / (1 + math.exp(-0.4 * (k - mean) / std))) + 0.3 * w_count
                for k in (k1, k1, 0.0)]
    torch.testing.assert_close(head.psi, torch.tensor(expected))
    assert float(head.class_sums.abs().sum()) == 0.0  # cleared for the next epoch
    # momentum 0.9 (official): the slot keeps 0.1 of its old value, then is renormalised
    head = KappaFace(embedding_size=2, num_classes=3, num_samples=2)
    old = head.memory.clone()
    head(torch.tensor([[0.0, 2.0]]), torch.tensor([1]), indices=torch.tensor([1]))
    torch.testing.assert_close(head.memory[1], F.normalize(0.1 * old[1] + 0.9 * torch.tensor([0.0, 1.0]),
                                                           dim=0))
    torch.testing.assert_close(head.memory[0], old[0])
    assert "memory" not in head.state_dict() and "psi" in head.state_dict()  # no 12 GB checkpoints


def test_kappaface_external_statistics():
    head = KappaFace(embedding_size=2, num_classes=2, statistics="external")
    head.train()
    head(torch.randn(3, 2), torch.tensor([0, 1, 1]))  # no indices needed
    head.accumulate(torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 1.0]]), torch.tensor([0, 1, 1]))
    torch.testing.assert_close(head.class_sums, torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    kappa = head.update_margins()  # counts = vectors summed (no class_counts): r̄ = 1, κ = inf for both
    torch.testing.assert_close(kappa, torch.zeros(2))  # no finite κ to replace inf with -> 0, z-score 0
    w_count = [(math.cos(math.pi * n / (1.05 * 2)) + 1) / 2 for n in (1, 2)]
    torch.testing.assert_close(head.psi, torch.tensor([0.7 * 0.5 + 0.3 * w for w in w_count]))


@pytest.mark.parametrize("name", ["adaface", "arcface", "cosface", "kappaface"])
def test_heads_run_under_bf16_autocast(name):
    kw = {"num_samples": 8} if name == "kappaface" else {}
    head = kpt.create("head", name, embedding_size=16, num_classes=12, **kw)
    emb = torch.randn(8, 16, requires_grad=True)
    labels = torch.randint(0, 12, (8,))
    extra = {"indices": torch.arange(8)} if name == "kappaface" else {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(head(emb, labels, **extra), labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
