"""The training engine shared by every plugin.

- :func:`kpt.engine.trainer.train`: the loop (optimizer, schedule, autocast, evaluation, checkpoints, DDP);
- :mod:`kpt.engine.checkpoint`: training checkpoints (``last.pt``/``best.pt``), ``--resume``;
- :mod:`kpt.engine.weights`: the one header schema of model files, the run-folder resolver,
  ``load_model`` (behind ``kpt.load_model``), :class:`~kpt.engine.weights.CheckpointError`;
- :mod:`kpt.engine.atomic`: the atomic writer and ``stale_temp_files`` for run-folder cleanup;
- :mod:`kpt.engine.check`: ``kpt plugins check`` (a tiny CPU dry run of a plugin);
- :mod:`kpt.engine.optim`, :mod:`~kpt.engine.distributed`, :mod:`~kpt.engine.seeding`,
  :mod:`~kpt.engine.progress`: the pieces.

Submodules are imported on use (``import kpt.engine`` stays cheap).
"""
