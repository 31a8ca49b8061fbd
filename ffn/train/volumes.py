"""Reading training volumes (image + labels) into memory.

Training volumes are small (ground truth is expensive), and examples are drawn at random positions all over
them, so they are read once into numpy. A volume is a URL/TensorStore spec understood by
``storage.volume.open_volume``, or ``file.h5:dataset`` for HDF5 files (the form most labelled EM data ships in).
An optional box (XYZ, what a person types) selects e.g. the training sections of a volume.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from storage.box import Box
from storage.errors import ConnectomeError

_H5 = re.compile(r"^(?P<path>.+\.(?:h5|hdf5|hdf))(?::(?P<dataset>.+))$", re.IGNORECASE)


@dataclass(frozen=True)
class TrainingVolume:
    """One labelled volume: where its image and labels are and which box of them to use."""

    image: Any  # URL, spec dict, or "file.h5:dataset"
    labels: Any
    box_start_xyz: tuple[int, int, int] | None = None
    box_stop_xyz: tuple[int, int, int] | None = None
    mask: Any = None  # optional: non-zero where examples may be centred
    name: str = ""

    def box(self) -> Box | None:
        if self.box_start_xyz is None and self.box_stop_xyz is None:
            return None
        if self.box_start_xyz is None or self.box_stop_xyz is None:
            raise ConnectomeError(f"training volume {self.name or self.image}: give both box_start_xyz and box_stop_xyz")
        return Box.from_xyz(self.box_start_xyz, self.box_stop_xyz)


def read_array(spec: Any, box: Box | None = None) -> np.ndarray:
    """The ZYX array of ``spec`` (clipped to ``box`` when given)."""
    if isinstance(spec, (str, Path)):
        m = _H5.match(str(spec))
        if m:
            return _read_h5(m.group("path"), m.group("dataset"), box)
    try:
        from storage.volume import open_volume
    except ImportError as exc:  # pragma: no cover - storage.volume ships with the package
        raise ConnectomeError(f"volume {spec}: storage.volume is unavailable ({exc})") from None
    vol = open_volume(spec)
    return np.asarray(vol.read(box if box is not None else vol.bounds))


def _read_h5(path: str, dataset: str, box: Box | None) -> np.ndarray:
    import h5py

    if not Path(path).is_file():
        raise ConnectomeError(f"HDF5 file {path}: not found")
    with h5py.File(path, "r") as f:
        if dataset not in f:
            raise ConnectomeError(f"HDF5 file {path}: no dataset {dataset!r} (has {sorted(f.keys())})")
        ds = f[dataset]
        if ds.ndim != 3:
            raise ConnectomeError(f"HDF5 file {path}:{dataset}: expected a 3-D ZYX dataset, got shape {ds.shape}")
        if box is None:
            return ds[()]
        if any(a < 0 or b > n for a, b, n in zip(box.start, box.stop, ds.shape)):
            raise ConnectomeError(
                f"HDF5 file {path}:{dataset}: box {box.xyz_start}..{box.xyz_stop} (XYZ) outside shape "
                f"{tuple(ds.shape[::-1])} (XYZ)"
            )
        return ds[box.slices]


def load_training_volume(vol: TrainingVolume) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image, labels, mask or None) of one training volume, same shapes."""
    box = vol.box()
    image = read_array(vol.image, box)
    labels = read_array(vol.labels, box)
    mask = read_array(vol.mask, box) != 0 if vol.mask is not None else None
    if image.shape != labels.shape or (mask is not None and mask.shape != image.shape):
        raise ConnectomeError(
            f"training volume {vol.name or vol.image}: image {image.shape[::-1]} and labels {labels.shape[::-1]} "
            "(XYZ) differ in shape"
        )
    if image.ndim == 4 and image.shape[-1] == 1:
        image = image[..., 0]
    return image, labels, mask
