"""Import a google/ffn (TF1) ``convstack_3d`` checkpoint into one of our model folders.

Why it is this simple: TF1 ``conv3d`` kernels are stored ``[kz, ky, kx, in, out]`` for NDHWC input with D = z,
exactly Keras ``Conv3D``'s kernel layout, and our layer names equal the reference's scopes under
``seed_update/``. So the import reads each tensor by name, infers depth/features from the shapes, and copies.
Inference settings are not in the checkpoint; they come from ``FFNConfig`` defaults (the FIB-25 ones) unless
the caller overrides them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ffn.model import FFNConfig, build_model, save_model, set_conv_weights
from storage.errors import ConnectomeError

SCOPE = "seed_update/"
_CONV_RE = re.compile(r"^seed_update/(conv\d+_[ab]|conv_lom)/(weights|biases)$")


def read_checkpoint(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a TF checkpoint (prefix without ``.index``/``.data-*``) as numpy arrays."""
    import tensorflow as tf

    prefix = str(prefix)
    if not Path(prefix + ".index").is_file():
        raise ConnectomeError(f"FFN checkpoint {prefix}: no {Path(prefix).name}.index next to it (give the prefix)")
    try:
        reader = tf.train.load_checkpoint(prefix)
        return {name: np.asarray(reader.get_tensor(name)) for name, _ in tf.train.list_variables(prefix)}
    except Exception as exc:  # corrupt/partial files
        raise ConnectomeError(f"FFN checkpoint {prefix}: cannot be read ({type(exc).__name__}: {exc})") from None


def conv_weights_from_checkpoint(tensors: dict[str, np.ndarray], where: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{layer: (kernel, bias)}`` for every ``seed_update/conv*`` pair in the checkpoint."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        m = _CONV_RE.match(name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value.astype(np.float32)
    if not pairs:
        raise ConnectomeError(f"FFN checkpoint {where}: no {SCOPE}conv* variables (not a convstack_3d model?)")
    out = {}
    for layer, wb in pairs.items():
        if set(wb) != {"weights", "biases"}:
            raise ConnectomeError(f"FFN checkpoint {where}: {SCOPE}{layer} lacks weights or biases")
        out[layer] = (wb["weights"], wb["biases"])
    return out


def config_from_weights(weights: dict[str, tuple[np.ndarray, np.ndarray]], where: str, **overrides: Any) -> FFNConfig:
    """Depth and features follow from the variables; everything else from ``overrides`` or the defaults."""
    if "conv0_a" not in weights or "conv_lom" not in weights:
        raise ConnectomeError(f"FFN checkpoint {where}: needs conv0_a and conv_lom")
    k0 = weights["conv0_a"][0]
    if k0.ndim != 5 or k0.shape[3] != 2:
        raise ConnectomeError(f"FFN checkpoint {where}: conv0_a kernel {k0.shape} is not [kz,ky,kx,2,features]")
    features = int(k0.shape[4])
    modules = sorted(int(m.group(1)) for n in weights if (m := re.match(r"conv(\d+)_a$", n)) and m.group(1) != "0")
    depth = 1 + len(modules)
    if modules != list(range(1, depth)):
        raise ConnectomeError(f"FFN checkpoint {where}: residual modules {modules} are not 1..{depth - 1}")
    return FFNConfig(depth=depth, features=features, **overrides)


def import_checkpoint(prefix: str | os.PathLike, out_dir: str | os.PathLike, **config_overrides: Any) -> Path:
    """Checkpoint -> model folder (config.json + weights). Returns the folder."""
    where = str(prefix)
    tensors = read_checkpoint(prefix)
    weights = conv_weights_from_checkpoint(tensors, where)
    metadata = dict(config_overrides.pop("metadata", {}) or {})
    metadata.setdefault("source", f"google/ffn TF1 checkpoint {Path(where).name}")
    if "global_step" in tensors:
        metadata.setdefault("global_step", int(tensors["global_step"]))
    config = config_from_weights(weights, where, metadata=metadata, **config_overrides)
    model = build_model(config)
    set_conv_weights(model, weights, where=where)
    return save_model(model, config, out_dir)
