"""OME-NGFF multiscales metadata for our zarr outputs.

zarr-python, napari (ome-zarr) and Neuroglancer find voxel size and pyramid levels through the NGFF
`multiscales` attribute of a group: v0.4 for zarr v2 (`.zattrs`), v0.5 for zarr v3 (`zarr.json` attributes under
`ome`). Our volumes are such a group with levels "0", "1", ... as array children. Positions are physical (nm), so
a level's voxel offset is stored as translation = offset * scale and read back by dividing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

AXES = [
    {"name": "z", "type": "space", "unit": "nanometer"},
    {"name": "y", "type": "space", "unit": "nanometer"},
    {"name": "x", "type": "space", "unit": "nanometer"},
]


@dataclass(frozen=True)
class Level:
    """One pyramid level: its array path inside the group, voxel size (XYZ nm) and voxel offset (XYZ voxels)."""

    path: str
    voxel_size_xyz: tuple[float, float, float]
    voxel_offset_xyz: tuple[int, int, int]


def multiscales(levels: Sequence[Level], name: str = "", version: str | None = "0.4") -> list[dict]:
    """The `multiscales` list (v0.4 carries "version" inside; v0.5 puts it next to it under "ome")."""
    datasets = []
    for level in levels:
        scale_zyx = [float(v) for v in reversed(level.voxel_size_xyz)]
        translation_zyx = [float(o * s) for o, s in zip(reversed(level.voxel_offset_xyz), scale_zyx)]
        datasets.append(
            {
                "path": level.path,
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale_zyx},
                    {"type": "translation", "translation": translation_zyx},
                ],
            }
        )
    entry: dict = {"name": name, "axes": AXES, "datasets": datasets}
    if version:
        entry = {"version": version, **entry}
    return [entry]


def group_attributes(levels: Sequence[Level], zarr_format: int, name: str = "") -> dict:
    """Group attributes for zarr v2 (NGFF 0.4) or v3 (NGFF 0.5)."""
    if zarr_format == 3:
        return {"ome": {"version": "0.5", "multiscales": multiscales(levels, name, version=None)}}
    return {"multiscales": multiscales(levels, name, version="0.4")}


def read_levels(attributes: dict) -> list[Level] | None:
    """Levels from group attributes (v0.4 or v0.5), or None when the group has no multiscales."""
    ms = attributes.get("ome", {}).get("multiscales") if isinstance(attributes.get("ome"), dict) else None
    ms = ms or attributes.get("multiscales")
    if not ms:
        return None
    entry = ms[0]
    axes = [a["name"] if isinstance(a, dict) else a for a in entry.get("axes", ["z", "y", "x"])]
    spatial = [axes.index(a) for a in ("x", "y", "z") if a in axes]
    if len(spatial) != 3:
        return None
    levels = []
    for ds in entry["datasets"]:
        scale = [1.0] * len(axes)
        translation = [0.0] * len(axes)
        for t in ds.get("coordinateTransformations", []):
            if t.get("type") == "scale":
                scale = t["scale"]
            elif t.get("type") == "translation":
                translation = t["translation"]
        size = tuple(float(scale[i]) for i in spatial)
        offset = tuple(int(round(translation[i] / scale[i])) if scale[i] else 0 for i in spatial)
        levels.append(Level(ds["path"], size, offset))  # type: ignore[arg-type]
    return levels
