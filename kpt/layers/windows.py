"""Window helpers for (shifted-)window attention, in the official Swin / torchvision layout.

Feature maps are channels-last (B, H, W, C). A map is zero-padded at the bottom/right to a
multiple of the window, optionally rolled by (−shift_h, −shift_w), and cut into windows in
row-major window order, batch-major: window w of sample b is row b·nW + w of the result.
KP-RPE's windowed biases (:class:`kpt.position.KeypointRPE`) go through these same helpers, so
bias windows and feature windows always line up.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = [
    "effective_shift",
    "pad_to_windows",
    "shifted_window_mask",
    "to_pair",
    "window_partition",
    "window_reverse",
]

MASK_VALUE = -100.0  # official Swin value for pairs from different regions of a shifted window


def to_pair(value: int | tuple[int, int] | list[int], name: str = "size") -> tuple[int, int]:
    """Return (h, w) from an int or a 2-sequence; raises ValueError naming ``name``."""
    if isinstance(value, int):
        pair = (value, value)
    else:
        pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 0:
        raise ValueError(f"{name} must be an int or (h, w) of non-negative ints, got {value!r}")
    return pair  # type: ignore[return-value]


def padded_size(height: int, width: int, window: int | tuple[int, int]) -> tuple[int, int]:
    """(Hp, Wp): ``height``×``width`` rounded up to a multiple of the window."""
    wh, ww = to_pair(window, "window")
    return height + (-height) % wh, width + (-width) % ww


def pad_to_windows(x: torch.Tensor, window: int | tuple[int, int]
                   ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad (B, H, W, C) at the bottom and right to a multiple of ``window``.

    Returns:
        (x_padded (B, Hp, Wp, C), (pad_h, pad_w)).
    """
    wh, ww = to_pair(window, "window")
    pad_h, pad_w = (-x.shape[1]) % wh, (-x.shape[2]) % ww
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x, (pad_h, pad_w)


def effective_shift(height_padded: int, width_padded: int, window: int | tuple[int, int],
                    shift: int | tuple[int, int]) -> tuple[int, int]:
    """Shift actually applied: none along a side the window already covers (official Swin)."""
    wh, ww = to_pair(window, "window")
    sh, sw = to_pair(shift, "shift")
    return (0 if wh >= height_padded else sh), (0 if ww >= width_padded else sw)


def window_partition(x: torch.Tensor, window: int | tuple[int, int]) -> torch.Tensor:
    """Cut (B, Hp, Wp, C) into windows: (B·nW, wh·ww, C), row-major windows, batch-major.

    Hp and Wp must be multiples of the window (see :func:`pad_to_windows`).
    """
    wh, ww = to_pair(window, "window")
    b, hp, wp, c = x.shape
    if hp % wh or wp % ww:
        raise ValueError(f"map {hp}x{wp} is not a multiple of the window {wh}x{ww}; pad first")
    x = x.view(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (hp // wh) * (wp // ww), wh * ww, c)


def window_reverse(windows: torch.Tensor, window: int | tuple[int, int], height_padded: int,
                   width_padded: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B·nW, wh·ww, C) -> (B, Hp, Wp, C)."""
    wh, ww = to_pair(window, "window")
    nh, nw = height_padded // wh, width_padded // ww
    c = windows.shape[-1]
    x = windows.reshape(-1, nh, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height_padded, width_padded, c)


@functools.lru_cache(maxsize=32)
def _region_mask(hp: int, wp: int, wh: int, ww: int, sh: int, sw: int, device: str) -> torch.Tensor:
    def labels(size: int, win: int, shift: int) -> torch.Tensor:
        pos = torch.arange(size, device=device)
        if shift == 0:
            return torch.zeros_like(pos)
        # regions [0, size−win), [size−win, size−shift), [size−shift, size) of the rolled map
        return (pos >= size - win).long() + (pos >= size - shift).long()

    region = labels(hp, wh, sh)[:, None] * 3 + labels(wp, ww, sw)[None, :]  # (Hp, Wp)
    region = window_partition(region[None, :, :, None], (wh, ww)).squeeze(-1)  # (nW, w²)
    different = region[:, None, :] != region[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill_(different, MASK_VALUE)


def shifted_window_mask(height_padded: int, width_padded: int, window: int | tuple[int, int],
                        shift: int | tuple[int, int], device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Additive mask for shifted windows: (nW, wh·ww, wh·ww), −100 between different regions.

    The shift is first made effective (:func:`effective_shift`); returns None when no shift
    remains (no mask needed). Cached per size and device.
    """
    wh, ww = to_pair(window, "window")
    sh, sw = effective_shift(height_padded, width_padded, (wh, ww), shift)
    if sh == 0 and sw == 0:
        return None
    dev = str(torch.device(device)) if device is not None else "cpu"
    return _region_mask(height_padded, width_padded, wh, ww, sh, sw, dev).to(dtype)


def roll_to_windows(x: torch.Tensor, window: int | tuple[int, int],
                    shift: int | tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad, roll by −(effective) shift and partition a (B, H, W, C) map in one call.

    Returns:
        (windows (B·nW, wh·ww, C), effective shift (sh, sw)).
    """
    x, _ = pad_to_windows(x, window)
    shift = effective_shift(x.shape[1], x.shape[2], window, shift)
    if shift != (0, 0):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    return window_partition(x, window), shift
