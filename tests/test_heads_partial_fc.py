"""PartialFC: sample_rate 1 equals the full head, sampling keeps positives, sharding over 2 gloo ranks."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from kpt_plugins.face.heads.margins import HEADS, KappaFace
from kpt_plugins.face.heads.partial_fc import PartialFC, shard_range

D, C, B = 8, 10, 6
HEADS_WITH_KAPPA = {**HEADS, "kappaface": KappaFace}


def _full_head_loss(name: str, weight: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor, **kw):
    head = HEADS[name](D, weight.shape[0], **kw)
    with torch.no_grad():
        head.weight.copy_(weight)
    head.train()
    loss = F.cross_entropy(head(emb, labels), labels)
    loss.backward()
    return loss, head


@pytest.mark.parametrize("name", ["adaface", "arcface", "cosface"])
def test_sample_rate_one_is_the_full_head(name):
    torch.manual_seed(0)
    emb = (torch.randn(B, D) * 5).requires_grad_()
    labels = torch.tensor([0, 3, 3, 7, 9, 1])
    pfc = PartialFC(D, C, head=name, sample_rate=1.0)
    loss = pfc(emb, labels)
    loss.backward()
    emb_ref = emb.detach().clone().requires_grad_()
    ref, head = _full_head_loss(name, pfc.weight.detach(), emb_ref, labels)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(emb.grad, emb_ref.grad)
    torch.testing.assert_close(pfc.weight.grad, head.weight.grad)
    if name == "adaface":  # the norm statistics moved the same way
        torch.testing.assert_close(pfc.head.batch_mean, head.batch_mean)
        torch.testing.assert_close(pfc.head.batch_std, head.batch_std)


def test_sampling_keeps_positives_and_restricts_the_softmax():
    torch.manual_seed(1)
    pfc = PartialFC(D, 50, head="arcface", sample_rate=0.2)  # 10 of 50 centres per step
    emb = torch.randn(B, D)
    labels = torch.tensor([4, 17, 17, 33, 49, 4])
    loss = pfc(emb, labels)
    index = pfc.last_index
    assert index.numel() == 10 and torch.equal(index, index.sort()[0])
    assert set(labels.tolist()) <= set(index.tolist())
    # the loss is the full ArcFace restricted to the sampled centres, labels remapped into them
    sub = HEADS["arcface"](D, 10)
    with torch.no_grad():
        sub.weight.copy_(pfc.weight[index])
    remapped = torch.searchsorted(index, labels)
    torch.testing.assert_close(loss, F.cross_entropy(sub(emb, remapped), remapped))
    loss.backward()
    unsampled = torch.ones(50, dtype=torch.bool)
    unsampled[index] = False
    assert float(pfc.weight.grad[unsampled].abs().sum()) == 0.0  # sparse update
    assert float(pfc.weight.grad[index].abs().sum()) > 0.0


def test_sampling_edge_cases():
    pfc = PartialFC(D, 20, head="cosface", sample_rate=0.25)  # 5 per step
    labels = torch.arange(12) % 20  # 12 positives > 5: only the positives are used
    pfc(torch.randn(12, D), labels)
    assert pfc.last_index.tolist() == list(range(12))
    pfc.eval()  # evaluation uses every centre
    pfc(torch.randn(12, D), labels)
    assert pfc.last_index is None
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(D, 20, sample_rate=0.0)
    with pytest.raises(ValueError, match="head must be one of"):
        PartialFC(D, 20, head="kappaface")
    with pytest.raises(ValueError, match="labels must lie"):
        pfc(torch.randn(2, D), torch.tensor([0, 20]))


def test_shard_range_matches_insightface_split():
    # C = 10 over 3 ranks: 4, 3, 3 centres starting at 0, 4, 7
    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    assert sum(shard_range(85742, r, 8)[1] for r in range(8)) == 85742


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, head: str, emb: torch.Tensor, labels: torch.Tensor,
                weight: torch.Tensor, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pfc = PartialFC(D, C, head=head)
        start, num = pfc.class_start, pfc.num_local
        with torch.no_grad():
            pfc.weight.copy_(weight[start:start + num])
        half = emb.shape[0] // world
        local = emb[rank * half:(rank + 1) * half].clone().requires_grad_()
        loss = pfc(local, labels[rank * half:(rank + 1) * half])
        loss.backward()
        result = {"loss": loss.detach(), "emb_grad": local.grad, "weight_grad": pfc.weight.grad,
                  "start": start, "num": num, "batch_mean": pfc.head.batch_mean}
        # sampled shards: 40 classes, 20 per rank, 15 sampled per rank; rank 1 holds no positive
        torch.manual_seed(rank)
        sampled = PartialFC(D, 40, head="arcface", sample_rate=0.75)
        with torch.no_grad():
            sampled.weight.copy_(torch.cat([weight] * 4)[sampled.class_start:][:sampled.num_local])
        result["sampled_loss"] = sampled(local.detach(), labels[rank * half:(rank + 1) * half]).detach()
        result["sampled_index"] = sampled.last_index + sampled.class_start
        # KappaFace gathers the global batch before its memory update: identical memory on every rank
        kappa = HEADS_WITH_KAPPA["kappaface"](D, C, num_samples=2 * half)
        kappa.memory.copy_(torch.ones_like(kappa.memory))
        kappa(local.detach(), labels[rank * half:(rank + 1) * half],
              indices=torch.arange(rank * half, (rank + 1) * half))
        result["kappa_memory"], result["kappa_sums"] = kappa.memory, kappa.class_sums
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or "fork" not in mp.get_all_start_methods(),
                    reason="needs torch.distributed (gloo) and the fork start method")
def test_two_rank_sharding_equals_one_process(tmp_path):
    torch.manual_seed(2)
    emb = torch.randn(2 * B, D) * 4
    labels = torch.tensor([0, 3, 3, 7, 9, 1, 5, 5, 2, 8, 4, 6])
    weight = torch.randn(C, D) * 0.01
    # fork: the children reuse the imported modules (spawn would re-import torch, ~10 s on this CPU)
    context = mp.start_processes(_ddp_worker, nprocs=2, join=False, start_method="fork",
                                 args=(2, _free_port(), "adaface", emb, labels, weight, str(tmp_path)))
    deadline = time.monotonic() + 120
    while not context.join(timeout=2):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-rank gloo run did not finish within 120 s")
    emb_ref = emb.clone().requires_grad_()
    ref, head = _full_head_loss("adaface", weight, emb_ref, labels)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        start, num = out["start"], out["num"]
        torch.testing.assert_close(out["loss"], ref.detach())  # every rank reports the global loss
        # embedding gradients are scaled by the world size (DDP then averages them back)
        torch.testing.assert_close(out["emb_grad"], 2 * emb_ref.grad[rank * B:(rank + 1) * B])
        torch.testing.assert_close(out["weight_grad"], head.weight.grad[start:start + num])
        torch.testing.assert_close(out["batch_mean"], head.batch_mean)  # statistics of the global batch
    # sampling per shard: positives kept on rank 0, every rank's softmax shares the union of samples
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["sampled_index"].numel() == rank1["sampled_index"].numel() == 15
    assert set(labels.tolist()) <= set(rank0["sampled_index"].tolist())
    union = torch.cat([rank0["sampled_index"], rank1["sampled_index"]])
    sub = HEADS["arcface"](D, union.numel())
    with torch.no_grad():
        sub.weight.copy_(torch.cat([weight] * 4)[union])
    remapped = torch.searchsorted(union, labels)
    expected = F.cross_entropy(sub(emb, remapped), remapped)
    torch.testing.assert_close(rank0["sampled_loss"], expected)
    torch.testing.assert_close(rank1["sampled_loss"], expected)
    # KappaFace: both ranks hold the memory and sums of the one-process update on the global batch
    kappa = HEADS_WITH_KAPPA["kappaface"](D, C, num_samples=2 * B)
    kappa.memory.copy_(torch.ones_like(kappa.memory))
    kappa(emb, labels, indices=torch.arange(2 * B))
    for out in (rank0, rank1):
        torch.testing.assert_close(out["kappa_memory"], kappa.memory)
        torch.testing.assert_close(out["kappa_sums"], kappa.class_sums)
