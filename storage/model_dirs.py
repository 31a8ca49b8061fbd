"""Model folders: a JSON config plus weights, found by path or by the name of a packaged model.

FFN, SegCLR and the synapse detector all keep models this way (DESIGN.md: "Models are directories"), and `--model`
takes either a folder or a packaged name, so the lookup, the listing and the reading of the config live here once.
The weights themselves are each framework's business.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from storage.errors import ConfigError, ConnectomeError


def packaged_models(models_dir: Path, config_file: str) -> list[str]:
    """Names of the folders under `models_dir` that hold a `config_file`."""
    if not models_dir.is_dir():
        return []
    return sorted(p.name for p in models_dir.iterdir() if (p / config_file).is_file())


def resolve_model_dir(name_or_path: str | os.PathLike, models_dir: Path, config_file: str, kind: str) -> Path:
    """A folder with a config wins, then a packaged model of that name; otherwise one line listing what exists."""
    p = Path(name_or_path).expanduser()
    if (p / config_file).is_file():
        return p
    packaged = models_dir / str(name_or_path)
    if (packaged / config_file).is_file():
        return packaged
    names = ", ".join(packaged_models(models_dir, config_file)) or "none"
    raise ConnectomeError(
        f"{kind} model {str(name_or_path)!r}: no folder with {config_file} there and no packaged model of that name "
        f"(packaged: {names})"
    )


def read_config_json(directory: str | os.PathLike, config_file: str, kind: str) -> dict:
    """The parsed config of a model folder, with one clear line when it is missing or not JSON."""
    path = Path(directory) / config_file
    if not path.is_file():
        raise ConnectomeError(f"{kind} model folder {directory}: missing {config_file}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
