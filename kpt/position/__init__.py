"""Position encodings: iRPE buckets, KP-RPE and the baselines (absolute, RPE, contextual iRPE)."""

from kpt.position.absolute import POS_CHOICES, AbsolutePositionEmbedding, parse_pos
from kpt.position.buckets import bucket_ids, gather_buckets, num_buckets, piecewise_index
from kpt.position.irpe import ContextualRPE
from kpt.position.kprpe import VARIANTS, KeypointRPE, patch_centres
from kpt.position.rpe import RelativePositionBias

__all__ = [
    "POS_CHOICES",
    "VARIANTS",
    "AbsolutePositionEmbedding",
    "ContextualRPE",
    "KeypointRPE",
    "RelativePositionBias",
    "bucket_ids",
    "gather_buckets",
    "num_buckets",
    "parse_pos",
    "patch_centres",
    "piecewise_index",
]
