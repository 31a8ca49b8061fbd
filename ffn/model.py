"""The flood-filling network: google/ffn's ``convstack_3d`` in Keras 3, its config, and model directories.

Why this shape: the published FIB-25 checkpoint and the reference's inference defaults only make sense for this
exact architecture (2-channel NDHWC input = normalised image + seed logits, 3x3x3 SAME convolutions, ``depth - 1``
residual modules, additive seed update), so the layer names and weight layouts mirror the reference one to one
and a TF1 checkpoint imports by name (see ``ffn.checkpoint_import``).

A model is a directory: ``config.json`` (an ``FFNConfig``; spatial fields written XYZ because people read the
file) plus ``model.weights.h5``. ``save_model`` then ``load_model`` gives bit-identical outputs.
Packaged models live in ``ffn/models/<name>/``; ``resolve_model`` turns ``--model <name or path>`` into a folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from storage.model_dirs import packaged_models, read_config_json, resolve_model_dir
from storage.errors import ConfigError, ConnectomeError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
MODELS_DIR = Path(__file__).resolve().parent / "models"

Triple = tuple[int, int, int]


def logit(p: float) -> float:
    """Inverse sigmoid; thresholds are given as probabilities (as in the reference) and compared as logits."""
    return float(np.log(p) - np.log1p(-p))


@dataclass(frozen=True)
class FFNConfig:
    """Architecture, input normalisation and inference defaults of one FFN model.

    Spatial fields are ZYX in memory (numpy order). The defaults of the inference fields are the ones
    published with the FIB-25 checkpoint; ``pad_value`` and ``move_threshold`` must match what the model
    was trained with (training ``seed_pad`` and move ``threshold``), so they travel with the model.
    """

    depth: int = 9
    features: int = 32
    fov_size: Triple = (33, 33, 33)
    deltas: Triple = (8, 8, 8)
    image_mean: float = 128.0
    image_stddev: float = 33.0
    # inference defaults (probabilities, as in the reference's inference config)
    init_activation: float = 0.95
    pad_value: float = 0.05
    move_threshold: float = 0.9
    segment_threshold: float = 0.6
    min_segment_size: int = 1000
    min_boundary_dist: Triple = (1, 1, 1)
    # "face_max" (the reference: one move per FOV face) or "face_components" (one per above-threshold region of a
    # face, so forks are followed; see ffn.movement)
    movement: str = "face_max"
    # the model sees the volume downsampled by these factors (ZYX; see ffn.scale); FOV, deltas, min_segment_size
    # and min_boundary_dist are in the model's voxels
    scale: Triple = (1, 1, 1)
    # free-form provenance: training command, steps, wall time, scores, source checkpoint ...
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fov_size", tuple(int(v) for v in self.fov_size))
        object.__setattr__(self, "deltas", tuple(int(v) for v in self.deltas))
        object.__setattr__(self, "min_boundary_dist", tuple(int(v) for v in self.min_boundary_dist))
        object.__setattr__(self, "scale", tuple(int(v) for v in self.scale))
        if self.depth < 1:
            raise ConfigError(f"FFN config: depth must be >= 1, got {self.depth}")
        if self.features < 1:
            raise ConfigError(f"FFN config: features must be >= 1, got {self.features}")
        for name in ("fov_size", "deltas", "min_boundary_dist", "scale"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ConfigError(f"FFN config: {name} needs 3 values, got {list(value)}")
        if min(self.scale) < 1:
            raise ConfigError(f"FFN config: scale factors must be integers >= 1 (ZYX), got {list(self.scale)}")
        if any(v < 1 or v % 2 == 0 for v in self.fov_size):
            raise ConfigError(f"FFN config: fov_size must be odd and positive (ZYX), got {list(self.fov_size)}")
        if any(d < 0 or d > f // 2 for d, f in zip(self.deltas, self.fov_size)):
            raise ConfigError(
                f"FFN config: deltas {list(self.deltas)} (ZYX) must lie in 0..fov_size//2 of {list(self.fov_size)}"
            )
        from ffn.movement import check_policy

        check_policy(self.movement, "FFN config")
        if self.image_stddev <= 0:
            raise ConfigError(f"FFN config: image_stddev must be > 0, got {self.image_stddev}")
        for name in ("init_activation", "pad_value", "move_threshold", "segment_threshold"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise ConfigError(f"FFN config: {name} is a probability in (0, 1), got {v}")

    # ---- JSON (XYZ for people) -------------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("fov_size", "deltas", "min_boundary_dist", "scale"):
            d[f"{name}_xyz"] = list(d.pop(name))[::-1]
        d["architecture"] = "convstack_3d"
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any], where: str = "config") -> "FFNConfig":
        d = dict(d)
        arch = d.pop("architecture", "convstack_3d")
        if arch != "convstack_3d":
            raise ConfigError(f"{where}: architecture {arch!r} is not supported (only 'convstack_3d')")
        for name in ("fov_size", "deltas", "min_boundary_dist", "scale"):
            if f"{name}_xyz" in d:
                d[name] = tuple(d.pop(f"{name}_xyz"))[::-1]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown FFN config field(s) {unknown}")
        return cls(**d)

    # ---- derived values ----------------------------------------------------------------------------------------
    def normalize(self, image: np.ndarray) -> np.ndarray:
        """uint8 (or raw float) image -> the network's float32 input channel."""
        return ((np.asarray(image, dtype=np.float32) - np.float32(self.image_mean)) / np.float32(self.image_stddev))

    @property
    def num_convs(self) -> int:
        return 2 * self.depth

    def flops_per_step(self) -> int:
        """Multiply-adds x 2 of one forward pass on one FOV (3x3x3 convs at every voxel, SAME padding)."""
        vox = int(np.prod(self.fov_size))
        f = self.features
        macs = 27 * 2 * f + 27 * f * f  # conv0_a, conv0_b
        macs += (self.depth - 1) * 2 * 27 * f * f  # residual modules
        macs += f  # conv_lom
        return 2 * macs * vox

    def num_params(self) -> int:
        f = self.features
        return (27 * 2 * f + f) + (27 * f * f + f) + (self.depth - 1) * 2 * (27 * f * f + f) + (f + 1)


# ---- the network -------------------------------------------------------------------------------------------------

def conv_layer_names(depth: int) -> list[str]:
    """Layer names in order; identical to the reference's variable scopes under ``seed_update/``."""
    names = ["conv0_a", "conv0_b"]
    for i in range(1, depth):
        names += [f"conv{i}_a", f"conv{i}_b"]
    return names + ["conv_lom"]


def build_model(config: FFNConfig, *, spatial_shape: Triple | None = None, dtype: str | None = None) -> keras.Model:
    """convstack_3d: ``logits = seed + update(concat(image, seed))``, input/output NDHWC (D = z).

    ``spatial_shape`` defaults to the FOV; the network is fully convolutional so another shape gives the same
    per-voxel computation (only the SAME-padding border changes). ``dtype`` is a Keras dtype policy
    (e.g. ``"mixed_bfloat16"``) for faster CPU/GPU inference; weights stay float32.
    """
    shape = tuple(spatial_shape or config.fov_size)
    f = config.features
    inp = keras.Input(shape=(*shape, 2), name="image_and_seed", dtype="float32")
    seed = keras.layers.Lambda(lambda t: t[..., 1:2], name="seed", dtype="float32")(inp)

    def conv(name: str, activation: str | None, kernel: int = 3, filters: int = f) -> keras.layers.Conv3D:
        return keras.layers.Conv3D(
            filters, kernel, padding="same", activation=activation, name=name, dtype=dtype
        )

    x = conv("conv0_a", "relu")(inp)
    x = conv("conv0_b", None)(x)
    for i in range(1, config.depth):
        y = keras.layers.ReLU(name=f"relu{i}", dtype=dtype)(x)
        y = conv(f"conv{i}_a", "relu")(y)
        y = conv(f"conv{i}_b", None)(y)
        x = keras.layers.Add(name=f"residual{i}", dtype=dtype)([x, y])
    x = keras.layers.ReLU(name="relu_out", dtype=dtype)(x)
    update = conv("conv_lom", None, kernel=1, filters=1)(x)
    update = keras.layers.Activation("linear", dtype="float32", name="update_f32")(update)
    logits = keras.layers.Add(name="logits", dtype="float32")([seed, update])
    return keras.Model(inp, logits, name="convstack_3d")


def get_conv_weights(model: keras.Model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Layer name -> (kernel [kz,ky,kx,in,out], bias) as numpy float32."""
    out = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv3D):
            k, b = layer.get_weights()
            out[layer.name] = (np.asarray(k, np.float32), np.asarray(b, np.float32))
    return out


def set_conv_weights(model: keras.Model, weights: dict[str, tuple[np.ndarray, np.ndarray]], where: str = "") -> None:
    """Set every conv layer by name; a missing or mis-shaped entry is an error naming the layer."""
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Conv3D):
            continue
        if layer.name not in weights:
            raise ConnectomeError(f"{where or 'weights'}: no weights for layer {layer.name!r}")
        k, b = weights[layer.name]
        want_k, want_b = tuple(layer.kernel.shape), tuple(layer.bias.shape)
        if tuple(k.shape) != want_k or tuple(b.shape) != want_b:
            raise ConnectomeError(
                f"{where or 'weights'}: layer {layer.name!r} expects kernel {want_k} bias {want_b}, "
                f"got {tuple(k.shape)} {tuple(b.shape)}"
            )
        layer.set_weights([np.asarray(k, np.float32), np.asarray(b, np.float32)])


# ---- model directories -----------------------------------------------------------------------------------------

def save_model(model: keras.Model, config: FFNConfig, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.weights.h5``; weights go to a temp name first so a crash leaves no
    folder that looks finished."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / ("tmp." + WEIGHTS_FILE)
    model.save_weights(str(tmp))
    os.replace(tmp, d / WEIGHTS_FILE)
    tmp_cfg = d / (CONFIG_FILE + ".tmp")
    tmp_cfg.write_text(json.dumps(config.to_json_dict(), indent=2) + "\n")
    os.replace(tmp_cfg, d / CONFIG_FILE)
    return d


def load_config(directory: str | os.PathLike) -> FFNConfig:
    return FFNConfig.from_json_dict(read_config_json(directory, CONFIG_FILE, "FFN"),
                                   where=str(Path(directory) / CONFIG_FILE))


def load_model(directory: str | os.PathLike, *, dtype: str | None = None) -> tuple[keras.Model, FFNConfig]:
    """Load a model folder (a path, or a packaged model's name) -> (model, config)."""
    d = resolve_model(directory)
    config = load_config(d)
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise ConnectomeError(f"FFN model folder {d}: missing {WEIGHTS_FILE}")
    model = build_model(config, dtype=dtype)
    try:
        model.load_weights(str(weights))
    except Exception as exc:  # h5 mismatch -> one clear line
        raise ConnectomeError(f"{weights}: cannot load weights into a {config.depth}-deep model ({exc})") from None
    return model, config


def available_models() -> list[str]:
    """Names of the packaged models."""
    return packaged_models(MODELS_DIR, CONFIG_FILE)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """``--model`` value -> model folder: an existing folder with a config wins, then a packaged name."""
    return resolve_model_dir(name_or_path, MODELS_DIR, CONFIG_FILE, "FFN")
