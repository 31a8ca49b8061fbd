"""The synapse detector: a small fully convolutional 3D CNN predicting cleft, presynaptic and postsynaptic sides.

Why three sigmoid channels rather than a direction field: partner assignment then needs no geometry, only "which
segment next to this cleft carries the most presynaptic (postsynaptic) probability", which is robust to clefts
cut by block faces and to segments that touch a cleft from several sides. Data with cleft masks but no polarity
(ISBI 2012) train the cleft channel alone: the polarity channels are masked out of the loss.

Dilated convolutions give a receptive field of ~30 voxels in-plane at a few GFLOP per megavoxel, which keeps
blockwise detection cheap on CPU. Anisotropic data use 1x3x3 kernels for the first layers (z sections are thick).
A model is a directory: config.json + model.weights.h5, like every model in this project.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from storage.errors import ConfigError  # noqa: E402
from storage.model_dirs import read_config_json, resolve_model_dir  # noqa: E402

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
MODELS_DIR = Path(__file__).resolve().parent / "models"
CHANNELS = ("cleft", "pre", "post")


@dataclass(frozen=True)
class SynapseModelConfig:
    """Architecture and input normalisation. `dilations` are in-plane (y, x); `z_dilations` for z (1 = none)."""

    features: int = 16
    dilations: tuple[int, ...] = (1, 2, 4, 8, 1)
    z_dilations: tuple[int, ...] = (1, 1, 2, 2, 1)
    z_kernel: tuple[int, ...] = (3, 3, 3, 3, 3)
    image_mean: float = 128.0
    image_stddev: float = 40.0
    polarity: bool = True
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("dilations", "z_dilations", "z_kernel"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not (len(self.dilations) == len(self.z_dilations) == len(self.z_kernel)):
            raise ConfigError("synapse model: dilations, z_dilations and z_kernel need the same length")
        if self.features < 1:
            raise ConfigError(f"synapse model: features must be >= 1, got {self.features}")

    @property
    def halo_zyx(self) -> tuple[int, int, int]:
        """Voxels of context each side a prediction needs (the receptive field radius)."""
        z = sum(d * (k // 2) for d, k in zip(self.z_dilations, self.z_kernel)) + 1
        yx = sum(self.dilations) + 1
        return (z, yx, yx)

    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json_dict(cls, d: dict, where: str = "config") -> "SynapseModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown synapse model field(s) {unknown}")
        return cls(**d)


def build_model(config: SynapseModelConfig):
    import keras

    inp = keras.Input(shape=(None, None, None, 1), name="image")
    x = inp
    for i, (d, dz, kz) in enumerate(zip(config.dilations, config.z_dilations, config.z_kernel)):
        x = keras.layers.Conv3D(config.features, (kz, 3, 3), padding="same", dilation_rate=(dz, d, d),
                                activation="relu", name=f"conv{i}")(x)
    out = keras.layers.Conv3D(len(CHANNELS), 1, name="logits")(x)
    return keras.Model(inp, out, name="synapse_detector")


def normalize(image: np.ndarray, config: SynapseModelConfig) -> np.ndarray:
    return ((image.astype(np.float32) - config.image_mean) / config.image_stddev)[None, ..., None]


def save_model(model, config: SynapseModelConfig, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_weights(directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_json_dict(), indent=2))
    return directory


def resolve_model(name_or_path: str | Path) -> Path:
    return resolve_model_dir(name_or_path, MODELS_DIR, CONFIG_FILE, "synapse")


def load_model(name_or_path: str | Path):
    directory = resolve_model(name_or_path)
    config = SynapseModelConfig.from_json_dict(read_config_json(directory, CONFIG_FILE, "synapse"), str(directory))
    model = build_model(config)
    model.load_weights(directory / WEIGHTS_FILE)
    return model, config


def predict(model, config: SynapseModelConfig, image: np.ndarray) -> np.ndarray:
    """Probabilities (3, Z, Y, X) float32 for cleft, pre, post over the whole array (SAME padding)."""
    import tensorflow as tf

    logits = model(tf.constant(normalize(image, config)), training=False)
    return tf.transpose(tf.sigmoid(logits)[0], (3, 0, 1, 2)).numpy()
