"""Position encodings: iRPE buckets, KP-RPE and the baselines (absolute, RPE, contextual iRPE)."""

from kpt.position.buckets import bucket_ids, gather_buckets, num_buckets, piecewise_index

__all__ = ["bucket_ids", "gather_buckets", "num_buckets", "piecewise_index"]
