"""Flood-filling networks (google/ffn's convstack_3d) in Keras 3: TensorFlow by default, JAX on GPU nodes without it.

- ``ffn.model``: FFNConfig, build/save/load model folders, packaged-model registry (``ffn/models/<name>``).
- ``ffn.checkpoint_import``: google/ffn TF1 checkpoints -> model folders.
- ``ffn.inference``: ``segment_volume`` / ``segment_volumes`` / ``consensus_segment`` (the stage's entry points),
  built on ``ffn.canvas`` (per-volume state), ``ffn.seeds``, ``ffn.movement`` and ``ffn.executor`` (batched
  model calls across canvases) and ``ffn.scale`` (models that run on a downsampled volume).
- ``ffn.train``: training (partitions, coordinates, examples, loop).
"""

from storage.tensorflow_env import configure as _configure_tensorflow

_configure_tensorflow()  # before any module of this package imports TensorFlow
