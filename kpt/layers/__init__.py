"""Attention layers with an additive bias (global and shifted-window) and the window helpers."""

from kpt.layers.attention import Attention, attend, attention_path
from kpt.layers.window_attention import WindowAttention, add_window_mask
from kpt.layers.windows import (
    effective_shift,
    pad_to_windows,
    roll_to_windows,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

__all__ = [
    "Attention",
    "WindowAttention",
    "add_window_mask",
    "attend",
    "attention_path",
    "effective_shift",
    "pad_to_windows",
    "roll_to_windows",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]
