"""Parameters of the synthetic EM generator.

Everything that changes the output lives here, so `SynthParams` (plus the box asked for) fully determines the
bytes written. Lengths are in nanometres, voxel sizes are XYZ as a person types them. `shape_zyx` is the extent
of the whole volume: objects are clipped to it (a neurite that leaves the volume and comes back gets two ids), which
is what keeps every ground-truth segment one connected component without a global pass.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from storage.errors import ConnectomeError

CELL_TYPES = ("spiny_dendrite", "smooth_dendrite", "axon", "glia")
# compartment codes of DST/compartments (0 = background / extracellular space)
COMPARTMENTS = {"background": 0, "axon": 1, "dendrite": 2, "soma": 3, "glia": 4}


@dataclass(frozen=True)
class SynthParams:
    """Synthetic neuropil: morphology densities, EM appearance, artefacts. Defaults look like 8x8x40 nm ssEM."""

    seed: int = 0
    shape_zyx: tuple[int, int, int] = (128, 256, 256)
    voxel_size_xyz_nm: tuple[float, float, float] = (8.0, 8.0, 40.0)

    # --- morphology -------------------------------------------------------------------------------
    cell_nm: float = 2500.0                 # side of the super-cells objects are seeded in
    axons_per_cell: float = 60.0             # Poisson means per super-cell
    spiny_per_cell: float = 2.0
    smooth_per_cell: float = 1.3
    glia_per_cell: float = 3.0
    soma_cell_nm: float = 12000.0           # somata are seeded in a coarser grid
    soma_probability: float = 0.35
    core_nm: float = 30.0                   # every object is a core set grown by core_nm + gap_nm
    gap_nm: float = 90.0                    # how far membranes sit outside the nominal radius (packing)
    axon_gap_nm: float = 90.0               # axons stay thin: their neighbours fill the space around them
    glia_fill_nm: float = 250.0             # glia fill interstices up to this far (sheet-like processes)

    # --- synapses ---------------------------------------------------------------------------------
    synapse_probability: float = 0.55       # per touching (bouton, dendrite) pair
    spine_synapse_probability: float = 0.9  # per touching (bouton, spine head) pair
    cleft_radius_nm: float = 140.0
    cleft_half_thickness_nm: float = 14.0

    # --- EM appearance ----------------------------------------------------------------------------
    membrane_darkness: float = 105.0
    weak_membrane_fraction: float = 0.25    # fraction of membrane area that is faint
    cytoplasm_level: float = 150.0
    ecs_level: float = 172.0
    texture_amplitude: float = 14.0
    noise_sigma: float = 11.0
    blur_nm: float = 7.0                    # point-spread in XY; Z blur follows the section thickness
    mito_per_um: float = 0.35               # mitochondria per micron of dendrite (axons: a third of it)
    vesicles_per_bouton: int = 60

    # --- section artefacts (per z section, deterministic) -----------------------------------------
    missing_section_probability: float = 0.01
    shifted_section_probability: float = 0.015
    brightness_jump_probability: float = 0.03
    max_shift_voxels: int = 6

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape_zyx", tuple(int(v) for v in self.shape_zyx))
        object.__setattr__(self, "voxel_size_xyz_nm", tuple(float(v) for v in self.voxel_size_xyz_nm))
        if len(self.shape_zyx) != 3 or min(self.shape_zyx) <= 0:
            raise ConnectomeError(f"synthetic volume shape must be 3 positive numbers, got {self.shape_zyx} (zyx)")
        if len(self.voxel_size_xyz_nm) != 3 or min(self.voxel_size_xyz_nm) <= 0:
            raise ConnectomeError(f"voxel size must be 3 positive numbers (x y z nm), got {self.voxel_size_xyz_nm}")
        if self.seed < 0:
            raise ConnectomeError(f"seed must be >= 0, got {self.seed}")

    @property
    def voxel_size_zyx(self) -> tuple[float, float, float]:
        x, y, z = self.voxel_size_xyz_nm
        return (z, y, x)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape_zyx"] = list(self.shape_zyx)
        d["voxel_size_xyz_nm"] = list(self.voxel_size_xyz_nm)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SynthParams":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConnectomeError(f"unknown synthetic parameter(s) {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> "SynthParams":
        d = self.to_json()
        d.update(changes)
        return SynthParams.from_json(d)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True)
