"""Publishing: write every Neuroglancer layer of a run from volumes and tables.

Run directory layout (the contract with the other stages; any of these may be a gs:// or s3:// URL)::

    RUN/raw/                     EM image pyramid (precomputed, uint8, raw or jpeg)
    RUN/segmentation/            segment ids at the published version (precomputed uint64,
                                 compressed_segmentation, sharded for large runs); its info references
        mesh/                    legacy meshes (zmesh)               -> info "mesh": "mesh"
        skeletons/               neuroglancer_skeletons (radius, compartment) -> "skeletons"
        segment_properties/      label, cell type tags, numbers       -> "segment_properties"
    RUN/fragments/               pre-agglomeration supervoxel ids (precomputed uint64), for splits
    RUN/synapses/                precomputed annotations: LINE pre->post, relationships pre/post_segment
    RUN/connectome.duckdb        the connectome store (proofreading edits land here)
    RUN/publish.json             what was published: version, sizes, seconds per layer

Inputs are numpy ZYX arrays (or Volume-like objects with ``.read(box)``) and pandas tables with the store's
column names, so this module needs neither the pipeline nor a store; `publish_from_store` reads the tables
from a store first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from viz.annotations import AnnotationOptions, write_synapse_annotations
from viz.kvstore import join, local_path, write_json
from viz.meshes import MeshOptions, mesh_labels, write_legacy_meshes
from viz.precomputed_volume import PyramidSpec, link_segmentation_extras, write_pyramid
from viz.segment_properties import write_segment_properties
from viz.skeletons import write_skeletons

RAW, SEGMENTATION, FRAGMENTS, SYNAPSES, STORE = "raw", "segmentation", "fragments", "synapses", "connectome.duckdb"
MESH, SKELETONS, SEGMENT_PROPERTIES = "mesh", "skeletons", "segment_properties"


@dataclass
class PublishOptions:
    chunk_size_xyz: tuple[int, int, int] = (64, 64, 64)
    image_encoding: str = "raw"  # or "jpeg"
    sharded: bool | None = None  # None: shard volumes larger than 512^3 voxels
    mesh: MeshOptions = field(default_factory=MeshOptions)
    annotations: AnnotationOptions = field(default_factory=AnnotationOptions)


def _dir_bytes(path: str | None) -> int | None:
    if path is None or not os.path.isdir(path):
        return None
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def publish_layers(
    run: str | os.PathLike,
    *,
    voxel_size_xyz_nm: tuple[float, float, float],
    image: Any = None,
    segmentation: Any = None,
    fragments: Any = None,
    skeleton_nodes: pd.DataFrame | None = None,
    segments: pd.DataFrame | None = None,
    synapses: pd.DataFrame | None = None,
    voxel_offset_xyz: tuple[int, int, int] = (0, 0, 0),
    options: PublishOptions = PublishOptions(),
    version: int | None = None,
) -> dict:
    """Write the layers given; returns (and writes to publish.json) sizes and seconds per layer."""
    report: dict[str, Any] = {"version": version, "layers": {}}

    def timed(name: str, url: str, fn) -> Any:
        t0 = time.perf_counter()
        out = fn()
        report["layers"][name] = {"seconds": round(time.perf_counter() - t0, 3), "bytes": _dir_bytes(local_path(url))}
        return out

    def spec(kind: str, data: Any, encoding: str | None) -> PyramidSpec:
        n = int(np.prod(data.shape))
        sharded = options.sharded if options.sharded is not None else n > 512**3
        return PyramidSpec(kind, tuple(voxel_size_xyz_nm), tuple(voxel_offset_xyz), options.chunk_size_xyz,
                           encoding=encoding, sharded=sharded)

    if image is not None:
        url = join(run, RAW)
        timed(RAW, url, lambda: write_pyramid(url, image, spec("image", image, options.image_encoding)))
    if fragments is not None:
        url = join(run, FRAGMENTS)
        timed(FRAGMENTS, url, lambda: write_pyramid(url, fragments, spec("segmentation", fragments, None)))
    if segmentation is not None:
        seg_url = join(run, SEGMENTATION)
        timed(SEGMENTATION, seg_url, lambda: write_pyramid(seg_url, segmentation, spec("segmentation", segmentation, None)))
        extras: dict[str, str] = {}
        if isinstance(segmentation, np.ndarray):  # blockwise meshing of large volumes is the mesh stage's job
            url = join(seg_url, MESH)
            report["meshes"] = timed(MESH, url, lambda: write_legacy_meshes(
                url, mesh_labels(segmentation, voxel_size_xyz_nm, voxel_offset_xyz, options=options.mesh)))
            extras["mesh"] = MESH
        if skeleton_nodes is not None:
            url = join(seg_url, SKELETONS)
            report["skeletons"] = timed(SKELETONS, url, lambda: write_skeletons(url, skeleton_nodes))
            extras["skeletons"] = SKELETONS
        if segments is not None:
            url = join(seg_url, SEGMENT_PROPERTIES)
            timed(SEGMENT_PROPERTIES, url, lambda: write_segment_properties(url, segments))
            extras["segment_properties"] = SEGMENT_PROPERTIES
        link_segmentation_extras(seg_url, **extras)
    if synapses is not None:
        url = join(run, SYNAPSES)
        timed(SYNAPSES, url, lambda: write_synapse_annotations(url, synapses, options.annotations))
        report["synapses"] = int(len(synapses))
    write_json(run, "publish.json", report)
    return report
