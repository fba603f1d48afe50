"""KP-RPE: keypoint relative position encoding (Kim et al., CVPR 2024).

Every patch (query) gets a small table of per-bucket biases predicted from where the
keypoints are relative to it:

    rel[b, n]       = [x_n − x_0, y_n − y_0, ..., x_n − x_{K−1}, y_n − y_{K−1}]   (B, N, 2K)
    T[b, n]         = linear(rel[b, n])                       (B, N, Σ_l heads_l · nb)
    bias_l[b,h,i,j] = T_l[b, h, i, bucket(i, j)]              (B, H_l, N, N)

with (x_n, y_n) = ((col + 0.5)/W, (row + 0.5)/H) the centre of patch n = row·W + col in [0, 1]
image coordinates, and bucket(i, j) the iRPE product bucket of the query−key offset
(:mod:`kpt.position.buckets`). The bias is added to the attention logits after the 1/√d
scaling. This is the official CVLface behaviour (``rpe_options.make_kprpe_input`` and the iRPE
contextual gather), reproduced to ~1e-6 including Swin's windowed layout.

Windowed attention (Swin): the per-token table is laid out on the map, zero-padded to a
multiple of the window, rolled by −shift on shifted layers (no shift along a side the window
covers) and cut into row-major windows with the same helpers the features use
(:mod:`kpt.layers.windows`); buckets are the local window offsets. Padded tokens have zero
tables, so their query rows get bias 0, as official.

Speed: the gather is ``torch.gather`` on a contiguous (B, H, N, nb) per-layer table. Measured on
this project's CPU (1 thread, interleaved, ViT-S shape B=32, H=6, N=196, nb=49) against the
alternatives: gather on the strided (transposed) table 1.35× slower forward, the official flat
``index_select`` 1.66× slower forward, flat ``index_select`` straight from the (B, N, F) linear
output 2.8× slower forward; forward+backward all within ±10% (the backward scatter dominates).
Shallow MNIST shape (B=128, H=4, N=100): gather on the contiguous table 1.4-1.6× faster forward.
Each layer's table is computed on its own by one broadcast matmul straight into the (B, H, N, nb)
layout (:meth:`KeypointRPE.layer_bias`). Against the official order (one linear for all layers,
then slice, transpose, gather) the whole module's forward+backward takes 0.28x the time for
ViT-S (12 layers; the backward of each slice zero-fills the full (B, N, L·H·nb) table) and
0.49x for the 4-layer MNIST ViT (forward alone 0.69x and 0.94x). :meth:`KeypointRPE.iter_biases`
lets a model build each (B, H, N, N) bias right before the block that uses it instead of
holding all of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from kpt.layers.windows import roll_to_windows, to_pair
from kpt.position.buckets import bucket_ids, gather_buckets, num_buckets

__all__ = ["VARIANTS", "KeypointRPE", "patch_centres"]

VARIANTS = ("rel", "rel_splithead", "rel_unshared", "rel_splithead_unshared")


def patch_centres(height: int, width: int, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, 2) patch centres (x, y) = ((col + 0.5)/W, (row + 0.5)/H), token n = row·W + col."""
    ys = (torch.arange(height, device=device, dtype=torch.float64) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float64) + 0.5) / width
    grid = torch.stack([xs.repeat(height), ys.repeat_interleave(width)], dim=-1)
    return grid.to(dtype)


class KeypointRPE(nn.Module):
    """Keypoint relative position bias for every attention layer of a backbone (or Swin stage).

    Args:
        num_keypoints: K, keypoints used per sample (extra input points are ignored).
        num_heads: heads per layer, an int or a list of ``depth`` ints (Swin stages).
        depth: number of attention layers served.
        grid_size: token grid, int or (h, w); tokens are row-major.
        window_size: None for global attention, or int / (wh, ww) for windowed attention.
        shift_sizes: per-layer shifts (int or (sh, sw)) for windowed attention; None = no shift.
        ratio: iRPE ratio r (alpha r, beta 2r, gamma 8r); 1.9 gives 49 product buckets.
        variant: ``"rel"`` (one table for all layers and heads), ``"rel_splithead"`` (per head),
            ``"rel_unshared"`` (per layer), ``"rel_splithead_unshared"`` (per layer and head,
            the official model and the default).
        keypoint_grad: let gradients reach the keypoints (off by default, as official).
        method: iRPE bucket method (``"product"`` as official).
        hidden: 0 (official): the tables are linear in the relative keypoints. > 0: the relative
            keypoints first pass Linear(2K, hidden) → ReLU → LayerNorm(hidden), the feature map of
            CVLface's ``rel_keypoint_v2`` variants, and ``linear`` maps those features to the
            tables. Why offer it: a linear table splits into a grid-only part plus a keypoint-only
            part that is the same for every query, so keypoints can only add one offset
            preference shared by all patches (a translation); rotation and scale need a
            preference that depends on the query's position *relative to* the keypoints, which
            a non-linear map can give. kpt keeps the per-layer, per-head table layout of
            ``variant`` (official v2 shares one table over heads).

    The ``nn.Linear`` ``linear`` maps the 2K relative coordinates [dx0, dy0, dx1, ...] (or the
    ``hidden`` features) to the tables, rows ordered (layer, head, bucket) and zero-initialised
    (KP-RPE starts as a no-op).
    """

    def __init__(self, num_keypoints: int, num_heads: int | Sequence[int], depth: int,
                 grid_size: int | tuple[int, int], window_size: int | tuple[int, int] | None = None,
                 shift_sizes: Sequence[int | tuple[int, int]] | None = None, ratio: float = 1.9,
                 variant: str = "rel_splithead_unshared", keypoint_grad: bool = False,
                 method: str = "product", hidden: int = 0) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown KP-RPE variant {variant!r}; expected one of {VARIANTS}")
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0: the official linear map), got {hidden}")
        if num_keypoints < 1 or depth < 1:
            raise ValueError(f"num_keypoints and depth must be >= 1, got {num_keypoints}, {depth}")
        heads = [int(num_heads)] * depth if isinstance(num_heads, int) else list(num_heads)
        if len(heads) != depth:
            raise ValueError(f"num_heads lists {len(heads)} layers but depth is {depth}")
        self.num_keypoints = num_keypoints
        self.depth = depth
        self.heads = heads
        self.grid_size = to_pair(grid_size, "grid_size")
        self.window_size = None if window_size is None else to_pair(window_size, "window_size")
        if shift_sizes is None:
            shifts = [(0, 0)] * depth
        else:
            shifts = [to_pair(s, "shift_sizes[]") for s in shift_sizes]
            if len(shifts) != depth:
                raise ValueError(f"shift_sizes lists {len(shifts)} layers but depth is {depth}")
            if self.window_size is None and any(s != (0, 0) for s in shifts):
                raise ValueError("shift_sizes need window_size (shifts only exist for windows)")
        self.shift_sizes = shifts
        self.ratio = ratio
        self.method = method
        self.variant = variant
        self.keypoint_grad = keypoint_grad
        self.num_buckets = num_buckets(method, ratio)

        split_head = variant in ("rel_splithead", "rel_splithead_unshared")
        self.unshared = variant in ("rel_unshared", "rel_splithead_unshared")
        if split_head and not self.unshared and len(set(heads)) != 1:
            raise ValueError("variant 'rel_splithead' shares one table over layers and needs the "
                             f"same number of heads in every layer, got {heads}")
        # Table heads and first output feature of each layer's table (shared variants: offset 0).
        self.table_heads = [h if split_head else 1 for h in heads]
        offsets, start = [], 0
        for th in self.table_heads:
            offsets.append(start)
            if self.unshared:
                start += th * self.num_buckets
        self.offsets = offsets
        out_features = start if self.unshared else self.table_heads[0] * self.num_buckets
        self.hidden = hidden
        self.encoder = (nn.Sequential(nn.Linear(2 * num_keypoints, hidden), nn.ReLU(),
                                      nn.LayerNorm(hidden)) if hidden else None)
        self.linear = nn.Linear(hidden or 2 * num_keypoints, out_features)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        gh, gw = self.grid_size
        self.register_buffer("grid", patch_centres(gh, gw), persistent=False)

    def extra_repr(self) -> str:
        return (f"variant={self.variant}, keypoints={self.num_keypoints}, depth={self.depth}, "
                f"heads={self.heads}, grid={self.grid_size}, window={self.window_size}, "
                f"buckets={self.num_buckets}, hidden={self.hidden}")

    def relative_keypoints(self, keypoints: torch.Tensor) -> torch.Tensor:
        """(B, K', 2) keypoints, K' ≥ K -> (B, N, 2K) patch-minus-keypoint features [dx0, ...].

        The backbone has checked the points (:func:`kpt.data.keypoints.check_keypoints`, once per
        forward); extra points are ignored, as the official code slices them away.
        """
        kp = keypoints[:, :self.num_keypoints]
        if not self.keypoint_grad:
            kp = kp.detach()
        grid = self.grid.to(kp.dtype)
        return (grid[None, :, None, :] - kp[:, None, :, :]).flatten(2)

    def encoded(self, keypoints: torch.Tensor) -> torch.Tensor:
        """(B, N, 2K) relative keypoints, or (B, N, hidden) encoder features when ``hidden``."""
        rel = self.relative_keypoints(keypoints)
        return rel if self.encoder is None else self.encoder(rel)

    def tables(self, keypoints: torch.Tensor) -> torch.Tensor:
        """All per-token bucket tables at once, (B, N, F) = linear(rel) (for inspection).

        The forward pass never builds this: it computes each layer's table on its own.
        """
        return self.linear(self.encoded(keypoints))

    def features(self, keypoints: torch.Tensor) -> torch.Tensor:
        """(B, N, C + 1): :meth:`encoded` (C = 2K or ``hidden``) with a constant 1 appended.

        The 1 carries the linear's bias, so a zero-padded token (all-zero features) gets an
        all-zero table, exactly the official zero padding of the table itself; this lets the
        windowed path pad/roll/partition the 2K + 1 features instead of the nb-wide tables.
        """
        rel = self.encoded(keypoints)
        return torch.cat([rel, torch.ones_like(rel[..., :1])], dim=-1)

    def _layer_weight(self, layer: int) -> torch.Tensor:
        """(H_l, C + 1, nb): this layer's rows of [linear.weight | linear.bias]."""
        th, nb = self.table_heads[layer], self.num_buckets
        rows = slice(self.offsets[layer], self.offsets[layer] + th * nb)
        weight = torch.cat([self.linear.weight[rows], self.linear.bias[rows, None]], dim=1)
        return weight.view(th, nb, -1).transpose(1, 2)

    def layer_bias(self, features: torch.Tensor, layer: int) -> torch.Tensor:
        """Bias of one layer from :meth:`features`.

        The layer's table (B', H_l, L, nb) comes out of one broadcast matmul already in the
        head-major layout the gather wants (no (B, N, F) table, no transpose copy, and the
        backward of a slice of a big table, which zero-fills the whole table once per layer,
        never happens).

        Returns:
            (B, H_l, N, N) for global attention, or (B·nW, H_l, wh·ww, wh·ww) for windowed
            attention (windows batch-major, row-major, as :func:`kpt.layers.windows
            .window_partition`); H_l = 1 for the variants without per-head tables.
        """
        if not 0 <= layer < self.depth:
            raise IndexError(f"layer {layer} out of range for depth {self.depth}")
        weight = self._layer_weight(layer).to(features.dtype)
        if self.window_size is None:
            gh, gw = self.grid_size
            ids = bucket_ids(gh, gw, self.method, self.ratio, device=features.device)
            table = torch.matmul(features.unsqueeze(1), weight)  # (B, H_l, N, nb)
            return gather_buckets(table, ids)
        (gh, gw), (wh, ww) = self.grid_size, self.window_size
        b, _, c = features.shape
        windows, _ = roll_to_windows(features.reshape(b, gh, gw, c), self.window_size,
                                     self.shift_sizes[layer])
        table = torch.matmul(windows.unsqueeze(1), weight)  # (B·nW, H_l, wh·ww, nb)
        ids = bucket_ids(wh, ww, self.method, self.ratio, device=features.device)
        return gather_buckets(table, ids)

    def _reuse_key(self, layer: int) -> tuple | None:
        """Layers whose biases are identical (shared tables, same effective shift) share a key."""
        if self.unshared:
            return None
        return (self.shift_sizes[layer],)

    def iter_biases(self, keypoints: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the layer biases one by one (same values as :meth:`forward`).

        Memory-friendly: the linear runs once, and each (B, H, N, N) bias is only built when the
        consumer asks for it, so a backbone looping ``zip(blocks, rpe.iter_biases(kp))`` holds
        one bias at a time instead of ``depth`` of them (the gather keeps no copy for backward).
        """
        features = self.features(keypoints)
        done: dict[tuple, torch.Tensor] = {}
        for layer in range(self.depth):
            key = self._reuse_key(layer)
            if key is not None and key in done:
                yield done[key]
                continue
            bias = self.layer_bias(features, layer)
            if key is not None:
                done[key] = bias
            yield bias

    def forward(self, keypoints: torch.Tensor) -> list[torch.Tensor]:
        """Biases for every layer.

        Args:
            keypoints: (B, K', 2) float, (x, y) normalised to [0, 1] by the image the backbone
                sees, K' ≥ num_keypoints.

        Returns:
            ``depth`` tensors: (B, H_l, N, N) (global) or (B·nW, H_l, wh·ww, wh·ww) (windowed).
            Shared variants return the same tensor object for layers that share a table.
        """
        return list(self.iter_biases(keypoints))

    @property
    def num_windows(self) -> int:
        """Windows per sample (1 for global attention)."""
        if self.window_size is None:
            return 1
        (gh, gw), (wh, ww) = self.grid_size, self.window_size
        return math.ceil(gh / wh) * math.ceil(gw / ww)
