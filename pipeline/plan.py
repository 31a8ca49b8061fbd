"""Planning a petabyte run: blocks, device-hours, storage and cost per stage from measured per-voxel rates.

A lab deciding whether to segment a 10-15 mm^3 hippocampus needs the order of magnitude before it books a
cluster: how many blocks each stage has, how many GPU- and CPU-hours at the rates this code actually reaches,
how many bytes each output takes, and what that costs at their prices. Rates come from `pipeline/rates.json`
(figures measured by the benchmarks in `benchmarks/`, each with its source; GPU figures not yet measured on a
GPU are marked "estimate" and say how they were derived), or from a file the user measured on their own hardware.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from storage.errors import ConfigError

RATES_FILE = Path(__file__).resolve().parent / "rates.json"


@dataclass(frozen=True)
class StageRate:
    """Throughput of one stage on one device, in voxels of the scale the stage runs at per device-second."""

    stage: str
    device: str  # "gpu" or "cpu" (one core)
    voxels_per_s: float
    scale: int = 0  # 0 = full resolution; n = downsampled by 2^n in x and y
    block_shape_zyx: tuple[int, int, int] = (128, 512, 512)
    source: str = ""


@dataclass(frozen=True)
class OutputSize:
    """Bytes per voxel (of its scale) of one output, after compression, and the scale it is stored at."""

    name: str
    bytes_per_voxel: float
    scale: int = 0
    source: str = ""


@dataclass
class Rates:
    stages: list[StageRate] = field(default_factory=list)
    outputs: list[OutputSize] = field(default_factory=list)


def load_rates(path: str | Path | None = None) -> Rates:
    path = Path(path) if path else RATES_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"rates file {path} not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"rates file {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    try:
        stages = [StageRate(**{**s, "block_shape_zyx": tuple(s.get("block_shape_zyx", (128, 512, 512)))})
                  for s in data["stages"]]
        outputs = [OutputSize(**o) for o in data["outputs"]]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"rates file {path}: malformed entry ({exc})") from None
    for s in stages:
        if s.voxels_per_s <= 0:
            raise ConfigError(f"rates file {path}: stage {s.stage!r} voxels_per_s must be > 0, got {s.voxels_per_s}")
    return Rates(stages, outputs)


def plan(shape_xyz: tuple[int, int, int], voxel_size_xyz: tuple[float, float, float], rates: Rates, *,
         gpu_hour_price: float = 2.5, cpu_hour_price: float = 0.04, storage_tb_month_price: float = 20.0) -> dict:
    """Blocks, device-hours, bytes and cost per stage for a volume of `shape_xyz` voxels at scale 0."""
    if len(shape_xyz) != 3 or min(shape_xyz) <= 0:
        raise ConfigError(f"plan: shape must be 3 positive voxel counts (x y z), got {list(shape_xyz)}")
    if len(voxel_size_xyz) != 3 or min(voxel_size_xyz) <= 0:
        raise ConfigError(f"plan: voxel size must be 3 positive numbers (x y z nm), got {list(voxel_size_xyz)}")
    x, y, z = (int(v) for v in shape_xyz)
    voxels0 = float(x) * y * z
    volume_mm3 = voxels0 * math.prod(voxel_size_xyz) / 1e18

    def voxels_at(scale: int) -> float:
        return voxels0 / (4 ** scale)

    stages = []
    for s in rates.stages:
        n = voxels_at(s.scale)
        bz, by, bx = s.block_shape_zyx
        blocks = math.ceil(z / bz) * math.ceil(y / (2 ** s.scale) / by) * math.ceil(x / (2 ** s.scale) / bx)
        hours = n / s.voxels_per_s / 3600.0
        price = gpu_hour_price if s.device == "gpu" else cpu_hour_price
        stages.append({"stage": s.stage, "device": s.device, "scale": s.scale, "blocks": blocks,
                       "device_hours": hours, "cost": hours * price, "source": s.source})
    outputs = []
    for o in rates.outputs:
        nbytes = voxels_at(o.scale) * o.bytes_per_voxel
        outputs.append({"output": o.name, "scale": o.scale, "bytes": nbytes,
                        "cost_per_month": nbytes / 1e12 * storage_tb_month_price, "source": o.source})
    gpu_hours = sum(s["device_hours"] for s in stages if s["device"] == "gpu")
    cpu_hours = sum(s["device_hours"] for s in stages if s["device"] == "cpu")
    return {
        "shape_xyz": [x, y, z], "voxel_size_xyz_nm": list(voxel_size_xyz), "volume_mm3": volume_mm3,
        "voxels": voxels0, "stages": stages, "outputs": outputs,
        "gpu_hours": gpu_hours, "cpu_hours": cpu_hours,
        "compute_cost": sum(s["cost"] for s in stages),
        "storage_bytes": sum(o["bytes"] for o in outputs),
        "storage_cost_per_month": sum(o["cost_per_month"] for o in outputs),
        "prices": {"gpu_hour": gpu_hour_price, "cpu_hour": cpu_hour_price, "storage_tb_month": storage_tb_month_price},
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} ZB"


def format_plan(p: dict) -> str:
    lines = [f"volume: {p['shape_xyz']} voxels (xyz) at {p['voxel_size_xyz_nm']} nm = {p['volume_mm3']:.2f} mm^3, "
             f"{p['voxels']:.3g} voxels",
             f"{'stage':<13}{'device':<7}{'scale':>6}{'blocks':>16}{'device-hours':>18}{'cost':>18}"]
    for s in p["stages"]:
        lines.append(f"{s['stage']:<13}{s['device']:<7}{s['scale']:>6} {s['blocks']:>15,} {s['device_hours']:>17,.0f}"
                     f" {s['cost']:>17,.0f}")
    lines.append(f"total: {p['gpu_hours']:,.0f} GPU-hours, {p['cpu_hours']:,.0f} CPU-core-hours, "
                 f"compute cost {p['compute_cost']:,.0f}")
    lines.append(f"{'output':<22}{'scale':>6}{'size':>14}{'per month':>14}")
    for o in p["outputs"]:
        lines.append(f"{o['output']:<22}{o['scale']:>6}{_human_bytes(o['bytes']):>14}{o['cost_per_month']:>14,.0f}")
    lines.append(f"storage: {_human_bytes(p['storage_bytes'])}, {p['storage_cost_per_month']:,.0f} per month")
    return "\n".join(lines)
