"""The training configuration (one YAML/JSON file) as dataclasses, checked field by field.

Why here and not in ``pipeline.config``: ``ffn`` never imports ``pipeline`` (it must stay usable as a library),
so the small from-dict conversion for this one config lives beside the code that uses it. Every bad value is a
``ConfigError`` naming the field path (``optimizer.learning_rate``) and the value.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ffn.model import FFNConfig
from ffn.train.augment import AugmentConfig
from ffn.train.partitions import DEFAULT_THRESHOLDS
from ffn.train.volumes import TrainingVolume
from storage.errors import ConfigError, ConnectomeError


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"  # adam | sgd (sgd = the reference's default)
    learning_rate: float = 0.001
    momentum: float = 0.9  # sgd only
    decay_steps: int = 0  # > 0: exponential decay of the learning rate
    decay_rate: float = 0.5


@dataclass(frozen=True)
class PartitionConfig:
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    lom_radius_xyz: tuple[int, int, int] | None = None  # default fov_size // 2 + deltas (as google/ffn)
    min_size: int = 10000  # objects smaller than this count as background


@dataclass(frozen=True)
class TrainConfig:
    model: dict[str, Any]  # FFNConfig fields as in a model folder's config.json (spatial fields *_xyz)
    volumes: tuple[TrainingVolume, ...]
    output_dir: str
    export_dir: str | None = None  # model folder refreshed at every checkpoint (config.json + weights)
    init_from: str | None = None  # model folder/name: start from its weights where layer names and shapes match
    batch_size: int = 4
    max_steps: int = 10000
    max_wall_s: float | None = None  # stop (with a checkpoint) after this much wall time in this process
    optimizer: OptimizerConfig = OptimizerConfig()
    clip_gradient_value: float | None = 0.7  # google/ffn clips each gradient element to +-0.7
    # Exported weights = an exponential moving average of the training weights (Keras's optimizer EMA, updated
    # every step, kept in checkpoints): a window of ~1 / (1 - m) steps. Single checkpoints of the synthetic FFN
    # swung between under- and over-flooding (selection VOI 4.35 at 53k steps, 5.26 at 65.5k); the mean of the
    # last 30k steps' exports was better than any of them (ffn/models/synthetic_small/TRAINING.md, stop 23).
    ema_momentum: float | None = None
    seed_pad: float = 0.05
    move_threshold: float = 0.9
    fov_policy: str = "fixed"  # fixed | max_pred
    fov_moves: int = 1
    partitions: PartitionConfig = PartitionConfig()
    augment: AugmentConfig = AugmentConfig()
    checkpoint_every: int = 500
    log_every: int = 50
    keep_checkpoints: int = 3
    threads: int | None = None  # TF intra-op threads (None = TF default)
    random_seed: int = 0

    def ffn_config(self, image_mean: float | None = None, image_stddev: float | None = None) -> FFNConfig:
        """The model's FFNConfig; the inference pad/move thresholds are the training ones (they must match)."""
        d = dict(self.model)
        d.setdefault("pad_value", self.seed_pad)
        d.setdefault("move_threshold", self.move_threshold)
        if image_mean is not None:
            d.setdefault("image_mean", image_mean)
        if image_stddev is not None:
            d.setdefault("image_stddev", image_stddev)
        return FFNConfig.from_json_dict(d, where="training config: model")


def _build(cls: type, data: Any, where: str) -> Any:
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown} (known: {sorted(names)})")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def config_from_dict(data: dict[str, Any], where: str = "training config") -> TrainConfig:
    """Build and check a TrainConfig from parsed YAML/JSON."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    data = dict(data)
    for required in ("model", "volumes", "output_dir"):
        if required not in data:
            raise ConfigError(f"{where}: missing field {required!r}")
    vols = data["volumes"]
    if not isinstance(vols, list) or not vols:
        raise ConfigError(f"{where}: volumes must be a non-empty list, got {vols!r}")
    built = []
    for i, v in enumerate(vols):
        if not isinstance(v, dict) or "image" not in v or "labels" not in v:
            raise ConfigError(f"{where}: volumes[{i}] needs 'image' and 'labels'")
        v = dict(v)
        for key in ("box_start_xyz", "box_stop_xyz"):
            if v.get(key) is not None:
                if len(v[key]) != 3:
                    raise ConfigError(f"{where}: volumes[{i}].{key} needs 3 values (X, Y, Z), got {v[key]!r}")
                v[key] = tuple(int(a) for a in v[key])
        built.append(_build(TrainingVolume, v, f"{where}: volumes[{i}]"))
    data["volumes"] = tuple(built)
    data["optimizer"] = _build(OptimizerConfig, data.get("optimizer", {}), f"{where}: optimizer")
    part = dict(data.get("partitions", {}))
    if "thresholds" in part:
        part["thresholds"] = tuple(float(t) for t in part["thresholds"])
    if part.get("lom_radius_xyz") is not None:
        part["lom_radius_xyz"] = tuple(int(r) for r in part["lom_radius_xyz"])
    data["partitions"] = _build(PartitionConfig, part, f"{where}: partitions")
    data["augment"] = _build(AugmentConfig, data.get("augment", {}), f"{where}: augment")
    cfg = _build(TrainConfig, data, where)
    checks = [
        ("batch_size", cfg.batch_size >= 1),
        ("max_steps", cfg.max_steps >= 0),
        ("fov_policy", cfg.fov_policy in ("fixed", "max_pred")),
        ("fov_moves", cfg.fov_moves >= 1),
        ("checkpoint_every", cfg.checkpoint_every >= 1),
        ("log_every", cfg.log_every >= 1),
        ("seed_pad", 0.0 < cfg.seed_pad < 1.0),
        ("move_threshold", 0.0 < cfg.move_threshold < 1.0),
        ("optimizer.name", cfg.optimizer.name in ("adam", "sgd")),
        ("optimizer.learning_rate", cfg.optimizer.learning_rate > 0),
        ("ema_momentum", cfg.ema_momentum is None or 0.0 < cfg.ema_momentum < 1.0),
    ]
    for name, ok in checks:
        if not ok:
            value = cfg
            for part_name in name.split("."):
                value = getattr(value, part_name)
            raise ConfigError(f"{where}: {name} has an invalid value {value!r}")
    cfg.ffn_config()  # architecture fields checked now, not after the volumes are loaded
    return cfg


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a YAML or JSON training config file."""
    p = Path(path)
    if not p.is_file():
        raise ConnectomeError(f"training config {p}: not found")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError / JSONDecodeError -> one line
        raise ConfigError(f"training config {p}: cannot be parsed ({str(exc).splitlines()[0]})") from None
    return config_from_dict(data, where=f"training config {p}")
