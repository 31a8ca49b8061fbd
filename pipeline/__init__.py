"""The pipeline: stages (segment, reconcile, synapses, skeletonize, embed, ...), the blockwise runner and its
clusters, the synthetic generator, the detectors' models and the `connectome` CLI."""

from storage.tensorflow_env import configure as _configure_tensorflow

_configure_tensorflow()  # before any module of this package imports TensorFlow
