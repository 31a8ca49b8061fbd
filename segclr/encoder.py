"""The SegCLR encoder: a 3D ResNet on segment-masked EM cutouts -> 64-d embedding, plus the training-only
projection head, its config, and model directories.

Why this shape: the published model (google-research/connectomics ``segclr``) is a ResNet-18 stack
(stem conv, max-pool, 4 stages x 2 basic blocks, stride 2 from stage 2, global average pooling) followed by a
small dense "bottleneck" head whose 64-d output is the embedding that gets released, and a projection head
(-> 16-d) used only by the contrastive loss. Every width/depth/size is a config field so the same code builds
the full ResNet-18 layout (`SegCLRConfig.resnet18()`) and the CPU-sized model we train here.

A model is a directory: ``config.json`` (spatial fields written XYZ because people read the file) plus
``encoder.weights.h5``. ``save_model`` then ``load_model`` gives bit-identical outputs.
Packaged models live in ``segclr/models/<name>/``; ``resolve_model`` turns a name or path into a folder.
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
WEIGHTS_FILE = "encoder.weights.h5"
MODELS_DIR = Path(__file__).resolve().parent / "models"
CHANNELS = ("masked_em", "mask", "em")

Triple = tuple[int, int, int]


@dataclass(frozen=True)
class SegCLRConfig:
    """Architecture and input definition of one SegCLR encoder (ZYX in memory).

    ``cutout_size`` is in voxels of the *model scale*, which is scale 0 of the volume downsampled by
    ``downsample`` (integer factors per axis). ``channels``: ``masked_em`` (EM where the centre segment is,
    0 elsewhere; the published "segmentation-guided" input), ``mask`` (the segment mask alone), ``em``.
    """

    cutout_size: Triple = (33, 33, 33)
    downsample: Triple = (1, 1, 1)
    channels: tuple[str, ...] = ("masked_em", "mask")
    stem_filters: int = 16
    stem_kernel: int = 5
    stem_stride: int = 2
    stem_pool: bool = False
    stage_filters: tuple[int, ...] = (16, 32, 64, 128)
    blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2)
    head_hidden: int = 128
    embedding_dim: int = 64
    projection_dims: tuple[int, ...] = (64, 64, 16)
    batchnorm_momentum: float = 0.9
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("cutout_size", "downsample"):
            v = tuple(int(x) for x in getattr(self, name))
            if len(v) != 3 or any(x < 1 for x in v):
                raise ConfigError(f"SegCLR config: {name} needs 3 positive values (ZYX), got {list(v)}")
            object.__setattr__(self, name, v)
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "stage_filters", tuple(int(x) for x in self.stage_filters))
        object.__setattr__(self, "blocks_per_stage", tuple(int(x) for x in self.blocks_per_stage))
        object.__setattr__(self, "projection_dims", tuple(int(x) for x in self.projection_dims))
        bad = [c for c in self.channels if c not in CHANNELS]
        if bad or not self.channels:
            raise ConfigError(f"SegCLR config: channels must be a non-empty subset of {list(CHANNELS)}, got {bad}")
        if len(self.stage_filters) != len(self.blocks_per_stage) or not self.stage_filters:
            raise ConfigError(
                f"SegCLR config: stage_filters {list(self.stage_filters)} and blocks_per_stage "
                f"{list(self.blocks_per_stage)} must have the same, non-zero length"
            )
        if self.embedding_dim < 1:
            raise ConfigError(f"SegCLR config: embedding_dim must be >= 1, got {self.embedding_dim}")

    @classmethod
    def resnet18(cls, **overrides: Any) -> "SegCLRConfig":
        """The published layout: 129^3 cutouts, stem 7^3/2 x64 + max-pool, stages 64/128/256/512 x 2 blocks."""
        base = dict(cutout_size=(129, 129, 129), stem_filters=64, stem_kernel=7, stem_stride=2, stem_pool=True,
                    stage_filters=(64, 128, 256, 512), blocks_per_stage=(2, 2, 2, 2), head_hidden=512)
        base.update(overrides)
        return cls(**base)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (*self.cutout_size, len(self.channels))

    # ---- JSON (XYZ for people) ---------------------------------------------------------------------------------
    def to_json_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("cutout_size", "downsample"):
            d[f"{name}_xyz"] = list(d.pop(name))[::-1]
        for name in ("channels", "stage_filters", "blocks_per_stage", "projection_dims"):
            d[name] = list(d[name])
        d["architecture"] = "segclr_resnet3d"
        return d

    @classmethod
    def from_json_dict(cls, d: dict[str, Any], where: str = "config") -> "SegCLRConfig":
        d = dict(d)
        arch = d.pop("architecture", "segclr_resnet3d")
        if arch != "segclr_resnet3d":
            raise ConfigError(f"{where}: architecture {arch!r} is not supported (only 'segclr_resnet3d')")
        for name in ("cutout_size", "downsample"):
            if f"{name}_xyz" in d:
                d[name] = tuple(d.pop(f"{name}_xyz"))[::-1]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown SegCLR config field(s) {unknown}")
        return cls(**d)


# ---- the network -------------------------------------------------------------------------------------------------

def _bn(cfg: SegCLRConfig, name: str) -> keras.layers.Layer:
    return keras.layers.BatchNormalization(momentum=cfg.batchnorm_momentum, name=name)


def _basic_block(x, filters: int, stride: int, cfg: SegCLRConfig, name: str):
    """ResNet basic block (conv-BN-ReLU, conv-BN, + projected shortcut when the shape changes)."""
    shortcut = x
    y = keras.layers.Conv3D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = _bn(cfg, f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv3D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = _bn(cfg, f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv3D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
        shortcut = _bn(cfg, f"{name}_proj_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def build_encoder(config: SegCLRConfig) -> keras.Model:
    """Cutout (B, Z, Y, X, C) float32 -> embedding (B, embedding_dim)."""
    inp = keras.Input(shape=config.input_shape, name="cutout", dtype="float32")
    x = keras.layers.Conv3D(config.stem_filters, config.stem_kernel, strides=config.stem_stride, padding="same",
                            use_bias=False, name="stem_conv")(inp)
    x = _bn(config, "stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    if config.stem_pool:
        x = keras.layers.MaxPooling3D(3, strides=2, padding="same", name="stem_pool")(x)
    for s, (filters, blocks) in enumerate(zip(config.stage_filters, config.blocks_per_stage)):
        for b in range(blocks):
            stride = 2 if (s > 0 and b == 0) else 1
            x = _basic_block(x, filters, stride, config, name=f"stage{s + 1}_block{b + 1}")
    x = keras.layers.GlobalAveragePooling3D(name="pool")(x)
    x = keras.layers.Dense(config.head_hidden, use_bias=False, name="head_dense1")(x)
    x = _bn(config, "head_bn1")(x)
    x = keras.layers.ReLU(name="head_relu1")(x)
    emb = keras.layers.Dense(config.embedding_dim, name="embedding")(x)
    return keras.Model(inp, emb, name="segclr_encoder")


def build_projection_head(config: SegCLRConfig) -> keras.Model:
    """Embedding -> projection used only by the contrastive loss (the published setting ends at 16-d)."""
    inp = keras.Input(shape=(config.embedding_dim,), name="embedding_in")
    x = inp
    dims = config.projection_dims
    for i, d in enumerate(dims):
        last = i == len(dims) - 1
        x = keras.layers.Dense(d, use_bias=last, name=f"proj_dense{i + 1}")(x)
        if not last:
            x = _bn(config, f"proj_bn{i + 1}")(x)
            x = keras.layers.ReLU(name=f"proj_relu{i + 1}")(x)
    return keras.Model(inp, x, name="segclr_projection")


def count_macs(config: SegCLRConfig) -> int:
    """Multiply-accumulates of one forward pass (convs and dense layers), for sizing runs."""
    model = build_encoder(config)
    macs = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv3D):
            k = int(np.prod(layer.kernel.shape))
            macs += k * int(np.prod(layer.output.shape[1:4]))
        elif isinstance(layer, keras.layers.Dense):
            macs += int(np.prod(layer.kernel.shape))
    return macs


# ---- model directories -----------------------------------------------------------------------------------------

def save_model(encoder: keras.Model, config: SegCLRConfig, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``encoder.weights.h5``; temp names first, so a crash leaves nothing finished-looking."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / ("tmp." + WEIGHTS_FILE)
    encoder.save_weights(str(tmp))
    os.replace(tmp, d / WEIGHTS_FILE)
    tmp_cfg = d / (CONFIG_FILE + ".tmp")
    tmp_cfg.write_text(json.dumps(config.to_json_dict(), indent=2) + "\n")
    os.replace(tmp_cfg, d / CONFIG_FILE)
    return d


def load_config(directory: str | os.PathLike) -> SegCLRConfig:
    return SegCLRConfig.from_json_dict(read_config_json(directory, CONFIG_FILE, "SegCLR"),
                                   where=str(Path(directory) / CONFIG_FILE))


def load_model(name_or_path: str | os.PathLike) -> tuple[keras.Model, SegCLRConfig]:
    """Load a model folder (a path, or a packaged model's name) -> (encoder, config)."""
    d = resolve_model(name_or_path)
    config = load_config(d)
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise ConnectomeError(f"SegCLR model folder {d}: missing {WEIGHTS_FILE}")
    encoder = build_encoder(config)
    try:
        encoder.load_weights(str(weights))
    except Exception as exc:  # h5 mismatch -> one clear line
        raise ConnectomeError(f"{weights}: cannot load weights into the encoder of {d / CONFIG_FILE} ({exc})") from None
    return encoder, config


def available_models() -> list[str]:
    """Names of the packaged models."""
    return packaged_models(MODELS_DIR, CONFIG_FILE)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """``--model`` value -> model folder: an existing folder with a config wins, then a packaged name."""
    return resolve_model_dir(name_or_path, MODELS_DIR, CONFIG_FILE, "SegCLR")
