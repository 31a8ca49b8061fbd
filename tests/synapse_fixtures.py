"""A two-cell volume with one cleft, small enough to train on in a test. Imports only the synapse model and trainer
(no TensorFlow, no Dask), so a subprocess under another Keras backend can use it too."""

from __future__ import annotations

import numpy as np

from pipeline.synapse_model import SynapseModelConfig
from pipeline.synapse_training import TrainingVolume, polarity_targets


def two_cells() -> tuple[np.ndarray, np.ndarray]:
    """Segment 1 (left) presynaptic, segment 2 (right) postsynaptic, a cleft on their shared face."""
    seg = np.zeros((5, 20, 20), np.uint64)
    seg[:, :, :10] = 1
    seg[:, :, 10:] = 2
    clefts = np.zeros(seg.shape, np.uint64)
    clefts[1:4, 8:12, 9:11] = 77
    return seg, clefts


def tiny_training_set() -> tuple[np.ndarray, TrainingVolume, SynapseModelConfig]:
    """(image, training volume, a 4-feature dilated detector config): the cleft drawn dark on a noisy image."""
    seg, clefts = two_cells()
    image = np.random.default_rng(0).integers(100, 200, seg.shape).astype(np.uint8)
    image[clefts > 0] = 30
    vol = TrainingVolume(image, *polarity_targets(seg, clefts, {77: 1}, {77: 2}, (1.0, 3.0, 3.0)))
    return image, vol, SynapseModelConfig(features=4, dilations=(1, 2), z_dilations=(1, 1), z_kernel=(3, 3))
