"""``torchrun -m kpt train`` on 2 CPU processes (gloo).

The engine itself checks at the end of a DDP run that the replicas are identical over ranks (it raises
otherwise); here the run must succeed and its weights must match one process with the same global batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_plugin as tiny
import torch

from kpt.config import build_config
from kpt.engine import checkpoint as ckpt_io
from kpt.engine.trainer import train

# No dropout or jitter (ranks draw different random numbers by design); a few steps of momentum SGD.
# The model carries a rank-local (sharded) parameter, as PartialFC does.
OVERRIDES = ["model.dropout=0", "data.jitter=0", "train.max_steps=4", "train.batch_size=8",
             "train.eval_every=2", "train.device=cpu", "model.rank_local=true"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, *args: str) -> subprocess.CompletedProcess:
    tests_dir = Path(__file__).parent
    tiny.write_entry_point(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(tests_dir)]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "kpt", "train", "tiny", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_two_processes_match_single_process(tmp_path):
    proc = _torchrun(tmp_path, "--out", str(tmp_path / "ddp"), *OVERRIDES)
    assert "processes 2" in proc.stderr and "[rank 1]" not in proc.stderr  # rank-0 logging only

    ddp = ckpt_io.load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2 and ddp["step"] == 4
    assert ddp["rank_local"] == {"world_size": 2, "names": ["local.offset"]}
    for rank in (0, 1):  # each rank's shard kept its own values (DDP did not broadcast rank 0's)
        shard = ckpt_io.load_checkpoint(tmp_path / "ddp" / f"last.step4.rank{rank}.pt")
        torch.testing.assert_close(shard["model"]["local.offset"],  # ~zero gradient: rounding only
                                   torch.full((rank + 1,), float(rank)), rtol=0, atol=1e-6)
    assert not list((tmp_path / "ddp").glob("last.step2.*"))  # older shards removed
    records = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "eval"] == [2, 4]  # written once, by rank 0
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]

    torch.set_num_threads(1)
    train(tiny.PLUGIN, build_config(tiny.PLUGIN, overrides=OVERRIDES), tmp_path / "single")
    single = ckpt_io.load_checkpoint(tmp_path / "single" / "last.pt")

    torch.manual_seed(0)
    initial = tiny.TinyNet(16, 0.0).state_dict()
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(single["model"][k], initial[k]) for k in initial
               if k.endswith("weight") and k.startswith("fc"))
    # the training loss logged by DDP is the mean over ranks = the single-process batch loss
    single_losses = [json.loads(x)["loss"] for x in (tmp_path / "single" / "metrics.jsonl")
                     .read_text().splitlines() if json.loads(x)["type"] == "train"]
    ddp_losses = [r["loss"] for r in records if r["type"] == "train"]
    assert ddp_losses == [pytest_approx(v) for v in single_losses]


def pytest_approx(value: float):
    import pytest

    return pytest.approx(value, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_torchrun_resume_with_rank_local_shards(tmp_path):
    """Resume a 2-process run (with sharded parameters) and match an uninterrupted single process."""
    constant = [*OVERRIDES, "train.sched=none"]  # the LR must not depend on the planned length
    _torchrun(tmp_path, "--out", str(tmp_path / "ddp"), *constant, "train.max_steps=2")
    _torchrun(tmp_path, "--out", str(tmp_path / "ddp"), "--resume", "auto", "train.max_steps=4")
    ddp = ckpt_io.load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ddp["step"] == 4
    torch.set_num_threads(1)
    train(tiny.PLUGIN, build_config(tiny.PLUGIN, overrides=constant), tmp_path / "single")
    single = ckpt_io.load_checkpoint(tmp_path / "single" / "last.pt")
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-6)
    shard1 = ckpt_io.load_checkpoint(tmp_path / "ddp" / "last.step4.rank1.pt")
    torch.testing.assert_close(shard1["model"]["local.offset"], torch.ones(2), rtol=0, atol=1e-6)
