"""KP-RPE overhead: train-step and eval throughput per position encoding, as ratios to ``none``.

Models (``--models``):

* ``vit_s8``: timm-size ViT-S (D 384, depth 12, 6 heads, MLP ×4) with patch 8 at 112×112
  (14×14 = 196 tokens, no class token, mean pool + Linear(384 → 512));
* ``face_small``: the official CVLface ViT-KPRPE small architecture (D 512, depth 12, 8 heads, MLP ×5,
  ReLU6, flatten-BN head), with its ``pos`` replaced per variant;
* ``mnist``: the calibration prototype's shallow 40×40 MNIST ViT (D 64, depth 4, 4 heads, patch 4 →
  100 tokens, linear patches, MLP ×2, mean pool + Linear(64 → 10));
* ``mnist_default``: the model ``kpt train mnist`` trains, built by the mnist plugin from its default
  config with only ``model.pos`` changed (today: conv stem, patch 5 → 64 tokens, D 64, depth 4,
  4 heads), at the plugin's batch size.

For every model, one instance per ``pos`` (none, abs, rpe, irpe, kprpe by default) with its own
AdamW is timed **interleaved round-robin** (the order rotates every round) so machine noise hits all
variants alike; the figure is the median step time after warm-up. A train step is forward,
cross-entropy on random labels, backward and AdamW; eval is a forward under ``inference_mode``.
KP-RPE weights are randomised (zero-init costs the same, but this keeps the comparison honest).

Usage::

    python bench/kprpe_overhead.py                       # CPU, fp32, both default models
    python bench/kprpe_overhead.py --dtype bf16 --steps 10 --models mnist
    python bench/kprpe_overhead.py --device cuda --batch 128 --eval-batch 256
    python bench/kprpe_overhead.py --profile kprpe --models mnist   # where KP-RPE time goes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import kpt

MODELS: dict[str, dict] = {
    "vit_s8": {
        "kwargs": {"img_size": 112, "patch_size": 8, "embed_dim": 384, "depth": 12, "num_heads": 6,
                   "mlp_ratio": 4.0, "num_classes": 512, "head": "avg"},
        "img": 112, "chans": 3, "batch": 16, "eval_batch": 32,
    },
    "face_small": {
        "kwargs": {"img_size": 112, "patch_size": 8, "embed_dim": 512, "depth": 12, "num_heads": 8,
                   "mlp_ratio": 5.0, "num_classes": 512, "head": "flatten_bn",
                   "act_layer": "relu6", "qkv_bias": False},
        "img": 112, "chans": 3, "batch": 16, "eval_batch": 32,
    },
    "mnist": {
        "kwargs": {"img_size": 40, "patch_size": 4, "in_chans": 1, "embed_dim": 64, "depth": 4,
                   "num_heads": 4, "mlp_ratio": 2.0, "num_classes": 10, "head": "avg"},
        "img": 40, "chans": 1, "batch": 128, "eval_batch": 512,
    },
    "mnist_default": {
        "plugin": "mnist", "kwargs": {"num_classes": 10},
        "img": 40, "chans": 1, "batch": 64, "eval_batch": 500,
    },
}
POS = ("none", "abs", "rpe", "irpe", "kprpe")


def build(model_name: str, pos: str, device: torch.device) -> torch.nn.Module:
    """One backbone+head with the given ``pos``; relative tables randomised (not zero)."""
    torch.manual_seed(0)
    spec = MODELS[model_name]
    if spec.get("plugin") == "mnist":
        from kpt_plugins.mnist.plugin import PLUGIN, build_model

        from kpt.config import build_config
        cfg = build_config(PLUGIN, overrides=[f"model.pos={pos}"])
        model = build_model(cfg, {"num_classes": 10}).to(device)
    else:
        model = kpt.create_model("vit", pos=pos, **spec["kwargs"]).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("kprpe.", "rel_bias.")) or ".rpe." in name:
                p.normal_(0, 0.02)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_steps(model_name: str, pos: str, args: argparse.Namespace, device: torch.device
               ) -> tuple[Callable[[], None], Callable[[], None]]:
    """(train_step, eval_step) closures for one variant, with fixed random inputs."""
    spec = MODELS[model_name]
    model = build(model_name, pos, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = args.batch or spec["batch"]
    eval_batch = args.eval_batch or spec["eval_batch"]
    g = torch.Generator().manual_seed(1)
    shape = (spec["chans"], spec["img"], spec["img"])
    images = torch.randn(batch, *shape, generator=g).to(device)
    keypoints = torch.rand(batch, 5, 2, generator=g).to(device)
    labels = torch.randint(0, spec["kwargs"]["num_classes"], (batch,), generator=g).to(device)
    eval_images = torch.randn(eval_batch, *shape, generator=g).to(device)
    eval_keypoints = torch.rand(eval_batch, 5, 2, generator=g).to(device)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
           else contextlib.nullcontext())

    def train_step() -> None:
        model.train()
        with amp:
            loss = F.cross_entropy(model(images, keypoints).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def eval_step() -> None:
        model.eval()
        with torch.inference_mode(), amp:
            model(eval_images, eval_keypoints)

    return train_step, eval_step


def time_interleaved(steps: dict[str, Callable[[], None]], rounds: int, warmup: int,
                     device: torch.device) -> dict[str, float]:
    """Median seconds per call of each closure, run round-robin with a rotating order."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            _sync(device)
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
        if r >= warmup:  # progress on stderr: long CPU runs otherwise print nothing for minutes
            done = ", ".join(f"{n} {1e3 * times[n][-1]:.0f}" for n in names)
            print(f"  round {r - warmup + 1}/{rounds} ms: {done}", file=sys.stderr, flush=True)
    return {n: statistics.median(t) for n, t in times.items()}


def profile(model_name: str, pos: str, args: argparse.Namespace, device: torch.device) -> None:
    """Print the operators taking the most self time in a few train steps of one variant."""
    train_step, _ = make_steps(model_name, pos, args, device)
    for _ in range(2):
        train_step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            train_step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vit_s8,mnist",
                        help=f"comma list of {sorted(MODELS)}")
    parser.add_argument("--pos", default=",".join(POS), help="comma list of pos variants")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, default=0, help="train batch (0: per-model default)")
    parser.add_argument("--eval-batch", type=int, default=0, help="eval batch (0: default)")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: keep)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-eval", action="store_true", help="time train steps only")
    parser.add_argument("--profile", default="", help="profile this pos instead of timing")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        from kpt.engine.malloc import keep_freed_memory
        keep_freed_memory()  # as the trainer does on CPU
    models = [m for m in args.models.split(",") if m]
    variants = [p for p in args.pos.split(",") if p]
    if "none" not in variants:
        variants.insert(0, "none")
    if args.profile:
        for model_name in models:
            profile(model_name, args.profile, args, device)
        return 0

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"dtype {args.dtype}, rounds {args.steps} (+{args.warmup} warm-up), interleaved")
    results = []
    for model_name in models:
        spec = MODELS[model_name]
        closures = {pos: make_steps(model_name, pos, args, device) for pos in variants}
        train = time_interleaved({p: c[0] for p, c in closures.items()}, args.steps,
                                 args.warmup, device)
        evals = ({} if args.no_eval else
                 time_interleaved({p: c[1] for p, c in closures.items()}, args.steps,
                                  args.warmup, device))
        batch = args.batch or spec["batch"]
        eval_batch = args.eval_batch or spec["eval_batch"]
        print(f"\n{model_name} (train batch {batch}, eval batch {eval_batch})")
        print(f"{'pos':<8} {'train ms':>9} {'img/s':>8} {'ratio':>6}   "
              f"{'eval ms':>9} {'img/s':>8} {'ratio':>6}")
        for pos in variants:
            row = {"model": model_name, "pos": pos, "dtype": args.dtype,
                   "train_s": train[pos], "train_ratio": train[pos] / train["none"]}
            line = (f"{pos:<8} {1e3 * train[pos]:9.1f} {batch / train[pos]:8.1f} "
                    f"{row['train_ratio']:6.3f}")
            if evals:
                row.update(eval_s=evals[pos], eval_ratio=evals[pos] / evals["none"])
                line += (f"   {1e3 * evals[pos]:9.1f} {eval_batch / evals[pos]:8.1f} "
                         f"{row['eval_ratio']:6.3f}")
            print(line)
            results.append(row)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
