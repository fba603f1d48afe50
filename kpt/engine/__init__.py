"""The training engine shared by every plugin.

- :func:`kpt.engine.trainer.train`: the loop (optimizer, schedule, autocast, evaluation, checkpoints, DDP);
- :mod:`kpt.engine.checkpoint`: atomic checkpoints, ``weights_only`` loading, ``load_model``;
- :mod:`kpt.engine.check`: ``kpt plugins check`` (a tiny CPU dry run of a plugin);
- :mod:`kpt.engine.optim`, :mod:`~kpt.engine.distributed`, :mod:`~kpt.engine.seeding`,
  :mod:`~kpt.engine.progress`: the pieces.

Submodules are imported on use (``import kpt.engine`` stays cheap).
"""
