"""Attention kernels for a KP-RPE bias: gather + SDPA, gather + manual softmax, FlexAttention.

KP-RPE's bias is a per-query table gathered by bucket, ``bias[b,h,i,j] = T[b,h,i,ids[i,j]]``.
Materialising it costs one (B, H, N, N) tensor per layer; FlexAttention's ``score_mod`` can read
the table inside the fused kernel instead. This script measures, interleaved round-robin, the
median time of one attention call (forward, and forward+backward where the kernel has one) at
the shapes kpt cares about:

* ``shallow``: the MNIST ViT ``kpt train mnist`` trains (B 64, H 4, N 64 = 8×8, d 16);
* ``prototype``: the calibration prototype (B 128, H 4, N 100 = 10×10, d 16);
* ``vit_s``: ViT-S/8 at 112×112 (B 16, H 6, N 196 = 14×14, d 64).

Kernels: ``none`` (SDPA, no bias: the floor), ``gather+sdpa``, ``gather+manual`` (kpt's CPU
training path), ``flex`` (``torch.compile(flex_attention)`` with the gather in ``score_mod``).
FlexAttention has no CPU backward in PyTorch ≤ 2.14 (it raises); the script reports that
instead of a time.

Usage::

    python bench/attention_kernels.py --threads 1
    python bench/attention_kernels.py --device cuda --shapes vit_s
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kpt.layers.attention import attend
from kpt.position.buckets import bucket_ids, gather_buckets, num_buckets

SHAPES = {  # B, H, grid side, head dim
    "shallow": (64, 4, 8, 16),
    "prototype": (128, 4, 10, 16),
    "vit_s": (16, 6, 14, 64),
}


def make_inputs(shape: str, device: str, grad: bool) -> dict:
    b, h, side, d = SHAPES[shape]
    n, nb = side * side, num_buckets("product", 1.9)
    gen = torch.Generator().manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device).requires_grad_(grad)

    return {"q": rand(b, h, n, d), "k": rand(b, h, n, d), "v": rand(b, h, n, d),
            "table": rand(b, h, n, nb), "ids": bucket_ids(side, side, device=device)}


def kernels(x: dict) -> dict:
    """name -> callable returning the attention output for inputs ``x``."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v, table, ids = x["q"], x["k"], x["v"], x["table"], x["ids"]
    flex = torch.compile(flex_attention, dynamic=False)

    def score_mod(score, b, h, qi, kj):
        return score + table[b, h, qi, ids[qi, kj]]

    return {
        "none": lambda: F.scaled_dot_product_attention(q, k, v),
        "gather+sdpa": lambda: attend(q, k, v, gather_buckets(table, ids), path="sdpa"),
        "gather+manual": lambda: attend(q, k, v, gather_buckets(table, ids), path="manual"),
        "flex": lambda: flex(q, k, v, score_mod=score_mod),
    }


def time_kernels(shape: str, device: str, grad: bool, rounds: int, warmup: int) -> dict:
    x = make_inputs(shape, device, grad)
    fns = kernels(x)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float] | str] = {name: [] for name in fns}
    reference = None
    for r in range(warmup + rounds):
        names = list(fns)
        names = names[r % len(names):] + names[:r % len(names)]  # rotate the order
        for name in names:
            if isinstance(times[name], str):
                continue
            try:
                sync()
                start = time.perf_counter()
                with torch.set_grad_enabled(grad):
                    out = fns[name]()
                    if grad:
                        out.sum().backward()
                sync()
            except NotImplementedError as err:  # flex has no CPU backward; anything else raises
                times[name] = f"unsupported: {str(err).splitlines()[0][:90]}"
                continue
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
            if r == 0 and name != "none":
                # all bias kernels must agree (the check that the comparison is fair)
                out = out.detach()
                if reference is None:
                    reference = out
                elif (out - reference).abs().max().item() > 1e-4:
                    raise AssertionError(f"{name} disagrees with the other bias kernels")
    return {n: (t if isinstance(t, str) else statistics.median(t)) for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="shallow,prototype,vit_s")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    for shape in args.shapes.split(","):
        for grad in (False, True):
            res = time_kernels(shape, args.device, grad, args.rounds, args.warmup)
            floor = res["none"]
            mode = "fwd+bwd" if grad else "fwd"
            cells = []
            for name, t in res.items():
                cells.append(f"{name} {t}" if isinstance(t, str)
                             else f"{name} {t * 1e3:.2f} ms ({t / floor:.2f}x)")
            print(f"{shape} {SHAPES[shape]} {mode}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
