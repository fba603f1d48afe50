"""Learned absolute position embedding (ViT style), and the ``pos`` option parser.

DESIGN §4: a model's ``pos`` is ``"none"``, one absolute or relative encoding, or ``"abs+"`` joined
with a relative one. ``"abs+kprpe"`` is the official face combination; a relative encoding alone
carries no absolute embedding (on MNIST→affNIST an absolute embedding ties the model to absolute
positions and cancels KP-RPE's robustness).
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

__all__ = ["POS_CHOICES", "RELATIVE_CHOICES", "AbsolutePositionEmbedding", "parse_pos"]

RELATIVE_CHOICES = ("rpe", "irpe", "kprpe")
POS_CHOICES = ("none", "abs", *RELATIVE_CHOICES, *(f"abs+{r}" for r in RELATIVE_CHOICES))


def parse_pos(pos: str) -> tuple[bool, str | None]:
    """Split a ``pos`` option into (absolute?, relative kind or None).

    >>> parse_pos("abs+kprpe")
    (True, 'kprpe')
    >>> parse_pos("irpe")
    (False, 'irpe')
    """
    key = str(pos).strip().lower().replace(" ", "")
    if key not in POS_CHOICES:
        raise ValueError(f"unknown position encoding pos={pos!r}; expected one of "
                         f"{', '.join(POS_CHOICES)}")
    if key == "none":
        return False, None
    if key == "abs":
        return True, None
    absolute = key.startswith("abs+")
    return absolute, key.split("+")[-1]


class AbsolutePositionEmbedding(nn.Module):
    """Learned (1, N, D) embedding added to the tokens; trunc-normal(std 0.02) init (timm).

    Args:
        num_tokens: N, tokens the embedding covers (row-major patches, plus prefix tokens if the
            model gives them positions).
        dim: D.
    """

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) -> x + pos_embed."""
        if x.shape[1:] != self.pos_embed.shape[1:]:
            raise ValueError(f"AbsolutePositionEmbedding covers {tuple(self.pos_embed.shape[1:])} "
                             f"(tokens, dim) but got tokens of shape {tuple(x.shape)}")
        return x + self.pos_embed.to(x.dtype)
