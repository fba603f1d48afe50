"""Data utilities shared by plugins.

- :mod:`kpt.data.safe_pickle`: ``restricted_load`` (never ``pickle.load`` a file you did not write);
- :mod:`kpt.data.samplers`: ``ShardedBatchSampler`` (the engine's default), ``PKBatchSampler`` /
  ``pk_batch_sampler`` (P identities × K samples), ``SkipBatches`` (resume);
- :mod:`kpt.data.keypoints`: normalise, check, affine-map, flip and fill missing keypoints.
"""
