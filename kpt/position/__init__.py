"""Position encodings: iRPE buckets, KP-RPE and the baselines (absolute, RPE, contextual iRPE)."""

from kpt.position.buckets import bucket_ids, gather_buckets, num_buckets, piecewise_index
from kpt.position.kprpe import KeypointRPE

__all__ = ["KeypointRPE", "bucket_ids", "gather_buckets", "num_buckets", "piecewise_index"]
