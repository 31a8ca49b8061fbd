"""Publishing: write every Neuroglancer layer of a run from volumes and tables.

Run directory layout (the contract with the other stages; any of these may be a gs:// or s3:// URL)::

    RUN/raw/                     EM image pyramid (precomputed, uint8, raw or jpeg)
    RUN/segmentation/            segment ids at the published version (precomputed uint64,
                                 compressed_segmentation, sharded for large runs); its info references
        mesh/                    zmesh meshes, legacy or multi-resolution Draco (sharded when large)
                                                                     -> info "mesh": "mesh"
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

from storage.box import Box
from storage.errors import ConnectomeError
from viz.annotations import AnnotationOptions, write_synapse_annotations
from viz.kvstore import join, kvstore_url, local_path, write_json
from viz.meshes import MeshOptions, mesh_labels, write_legacy_meshes
from viz.multires_meshes import MultiresOptions, write_multires_meshes
from viz.precomputed_volume import PyramidSpec, link_segmentation_extras, write_pyramid
from viz.segment_properties import write_segment_properties
from viz.skeletons import write_skeletons

RAW, SEGMENTATION, FRAGMENTS, SYNAPSES, STORE = "raw", "segmentation", "fragments", "synapses", "connectome.duckdb"
MESH, SKELETONS, SEGMENT_PROPERTIES = "mesh", "skeletons", "segment_properties"


@dataclass
class PublishOptions:
    chunk_size_xyz: tuple[int, int, int] = (64, 64, 64)
    image_encoding: str = "raw"  # or "jpeg"
    jpeg_quality: int | None = None  # with jpeg: 1-100 (None: 75)
    sharded: bool | None = None  # None: shard volumes larger than 512^3 voxels
    mesh: MeshOptions = field(default_factory=MeshOptions)
    mesh_format: str = "auto"  # legacy | multires | auto (multires above 10,000 segments)
    multires: MultiresOptions = field(default_factory=MultiresOptions)
    annotations: AnnotationOptions = field(default_factory=AnnotationOptions)
    # segmentations up to this many voxels are meshed in memory (single-fragment meshes, legacy or multires);
    # larger ones blockwise on Dask (pipeline/stages/mesh.py: legacy meshes, a fragment per segment and block)
    mesh_in_memory_voxels: int = 512**3
    mesh_block_shape_zyx: tuple[int, int, int] = (256, 256, 256)


def _write_meshes(url: str, meshes: dict, voxel_size_xyz_nm, options: PublishOptions) -> int:
    fmt = options.mesh_format
    if fmt not in ("legacy", "multires", "auto"):
        raise ConnectomeError(f"mesh format must be legacy, multires or auto, got {fmt!r}")
    if fmt == "multires" or (fmt == "auto" and len(meshes) > 10_000):
        return write_multires_meshes(url, meshes, voxel_size_xyz_nm, options=options.multires)
    return write_legacy_meshes(url, meshes)


def _mesh_blockwise(seg_url: str, mesh_url: str, work_dir, client, options: PublishOptions) -> int:
    """Mesh RUN/segmentation block by block on Dask (the caller's client, or a LocalCluster for this call)."""
    from pipeline.stages.mesh import run_mesh

    def go(c) -> int:
        # restart: a publish rewrites the meshes of the segmentation as it is now (after edits, too)
        return run_mesh("precomputed://" + seg_url, mesh_url, work_dir, client=c, progress=False, restart=True,
                        block_shape_zyx=options.mesh_block_shape_zyx, options=options.mesh)["segments"]

    if client is not None:
        return go(client)
    from pipeline.cluster import open_client

    with open_client() as c:
        return go(c)


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
    segmentation_in_place: bool = False,
    meshes: bool = True,
    client: Any = None,
    mesh_work_dir: str | os.PathLike | None = None,
) -> dict:
    """Write the layers given; returns (and writes to publish.json) sizes and seconds per layer.

    `segmentation_in_place=True`: RUN/segmentation already holds `segmentation` (the segment stage wrote it with
    its pyramid); only meshes, skeletons and properties are added to it. A segmentation up to
    `options.mesh_in_memory_voxels` is meshed in memory; a larger one blockwise on Dask from RUN/segmentation
    (`client`, or a LocalCluster opened for it), with its block pieces listed under `mesh_work_dir` (default
    RUN/work/mesh; a local folder).
    """
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
                           encoding=encoding, sharded=sharded,
                           jpeg_quality=options.jpeg_quality if encoding == "jpeg" else None)

    if image is not None:
        url = join(run, RAW)
        timed(RAW, url, lambda: write_pyramid(url, image, spec("image", image, options.image_encoding)))
    if fragments is not None:
        url = join(run, FRAGMENTS)
        timed(FRAGMENTS, url, lambda: write_pyramid(url, fragments, spec("segmentation", fragments, None)))
    if segmentation is not None:
        seg_url = join(run, SEGMENTATION)
        if not segmentation_in_place:
            timed(SEGMENTATION, seg_url,
                  lambda: write_pyramid(seg_url, segmentation, spec("segmentation", segmentation, None)))
        extras: dict[str, str] = {}
        if meshes:
            url = join(seg_url, MESH)
            if int(np.prod(segmentation.shape)) <= options.mesh_in_memory_voxels:
                labels = segmentation if isinstance(segmentation, np.ndarray) else \
                    np.asarray(segmentation.read(segmentation.bounds))
                report["meshes"] = timed(MESH, url, lambda: _write_meshes(
                    url, mesh_labels(labels, voxel_size_xyz_nm, voxel_offset_xyz, options=options.mesh),
                    voxel_size_xyz_nm, options))
            else:
                work = mesh_work_dir if mesh_work_dir is not None else local_path(join(run, "work", "mesh"))
                if work is None:
                    raise ConnectomeError(f"publish: blockwise meshing of {seg_url} needs a local mesh_work_dir")
                report["meshes"] = timed(MESH, url, lambda: _mesh_blockwise(seg_url, url, work, client, options))
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


# ------------------------------------------------------------------------------------------------------------
# From the store
# ------------------------------------------------------------------------------------------------------------

def _versioned_rows(connectome, table: str, version: int) -> pd.DataFrame:
    from storage.store.sql import Sql

    q = Sql(connectome.backend.dialect)
    return connectome.backend.query(f"SELECT * FROM {table} t WHERE {q.visible('t', version)}", q.params)


def store_tables(connectome, version: int | None = None) -> dict[str, pd.DataFrame]:
    """segments (for segment properties), synapses and skeleton_nodes at a version, in publish_layers' columns."""
    v = connectome.version if version is None else int(version)
    cells = connectome.cells(version=v)
    synapses = connectome.synapses(version=v)
    nodes = _versioned_rows(connectome, "skeleton_nodes", v)
    segments = pd.DataFrame({"segment_id": cells["segment_id"].astype(np.int64)})
    if cells["cell_type"].notna().any():
        segments["label"] = [f"{t} {s}" if isinstance(t, str) else str(s) for s, t in zip(cells.segment_id, cells.cell_type)]
        segments["cell_type"] = cells["cell_type"].to_numpy()
        segments["cell_type_confidence"] = cells["confidence"].astype(float).to_numpy()
    if cells["voxel_count"].notna().any():
        segments["voxel_count"] = cells["voxel_count"].fillna(0).astype(np.int64).to_numpy()
    segments["synapses_in"] = segments.segment_id.map(synapses.post_segment_id.value_counts()).fillna(0).astype(np.int64)
    segments["synapses_out"] = segments.segment_id.map(synapses.pre_segment_id.value_counts()).fillna(0).astype(np.int64)
    # nodes of segments no longer at this version (e.g. split without fragment ids) are not published
    nodes = nodes[nodes["segment_id"].isin(segments["segment_id"])]
    return {"segments": segments, "synapses": synapses,
            "skeleton_nodes": nodes.drop(columns=[c for c in ("version_from", "version_to", "morton") if c in nodes])}


class RelabelledVolume:
    """Fragments seen through the store's id map at one version: the segmentation, without writing it first."""

    def __init__(self, fragments: Any, mapping: dict[int, int]):
        self.fragments = fragments
        self.mapping = mapping
        self.shape = tuple(fragments.shape)
        self.dtype = np.dtype(np.uint64)
        self.bounds = getattr(fragments, "bounds", None) or Box.from_shape(self.shape)

    def read(self, box) -> np.ndarray:
        import fastremap

        if isinstance(self.fragments, np.ndarray):
            block = self.fragments[box.relative_to(self.bounds).slices]
        else:
            block = self.fragments.read(box)
        return fastremap.remap(np.ascontiguousarray(block).astype(np.uint64), self.mapping,
                               preserve_missing_labels=True, in_place=False)


def publish_from_store(
    run: str | os.PathLike,
    connectome,
    *,
    image: Any = None,
    fragments: Any = None,
    segmentation: Any = None,
    voxel_size_xyz_nm: tuple[float, float, float] | None = None,
    voxel_offset_xyz: tuple[int, int, int] | None = None,
    version: int | None = None,
    options: PublishOptions = PublishOptions(),
    write_fragments: bool = True,
) -> dict:
    """Publish the run at a store version: segmentation = fragments relabelled through the id map (or the
    given segmentation), segment properties / skeletons / synapses from the store's tables.

    `write_fragments=False` when `fragments` already is RUN/fragments (it is read, not rewritten).
    """
    from viz.proofread import id_map

    v = connectome.version if version is None else int(version)
    volumes = [x for x in (image, fragments, segmentation) if x is not None]
    if voxel_size_xyz_nm is None:
        sized = next((x for x in volumes if hasattr(x, "voxel_size")), None)
        if sized is None:
            raise ConnectomeError("publish: give voxel_size_xyz_nm (no input volume carries a voxel size)")
        voxel_size_xyz_nm = tuple(sized.voxel_size)  # type: ignore[assignment]
        voxel_offset_xyz = voxel_offset_xyz or tuple(getattr(sized, "voxel_offset", (0, 0, 0)))  # type: ignore[assignment]
    if segmentation is None and fragments is not None:
        rows = id_map(connectome, v)
        segmentation = RelabelledVolume(fragments, dict(zip(rows.fragment_id.tolist(), rows.segment_id.tolist())))
    tables = store_tables(connectome, v)
    return publish_layers(
        run, voxel_size_xyz_nm=tuple(voxel_size_xyz_nm), voxel_offset_xyz=tuple(voxel_offset_xyz or (0, 0, 0)),
        image=image, segmentation=segmentation, fragments=fragments if write_fragments else None,
        skeleton_nodes=tables["skeleton_nodes"] if len(tables["skeleton_nodes"]) else None,
        segments=tables["segments"] if len(tables["segments"]) else None,
        synapses=tables["synapses"], options=options, version=v,
    )


def publish_run(
    run: str | os.PathLike,
    *,
    image: Any = None,
    store: str | None = None,
    skeletons_dir: str | os.PathLike | None = None,
    meshes: bool = True,
    version: int | None = None,
    options: PublishOptions = PublishOptions(),
    client: Any = None,
) -> dict:
    """The pipeline's publish stage: RUN/segmentation (and RUN/fragments) exist already, written by the segment
    stage; add RUN/raw from `image` (a URL or Volume; skipped if it already is RUN/raw), meshes, and skeletons,
    segment properties and synapses from the store (skeletons from `skeletons_dir`/skeletons.parquet when the
    store has none). Returns the publish report (also RUN/publish.json)."""
    from storage import Connectome
    from storage.volume import open_volume

    seg_dir = local_path(join(run, SEGMENTATION))
    try:
        segmentation = open_volume("precomputed://" + join(run, SEGMENTATION))
    except ConnectomeError as exc:
        raise ConnectomeError(f"publish: no segmentation in {run} (run the segment stage first): {exc}") from None
    location = str(store or os.path.join(str(run), STORE))
    with Connectome.open(location) as connectome:
        v = connectome.version if version is None else int(version)
        tables = store_tables(connectome, v)
    nodes = tables["skeleton_nodes"]
    parquet = Path(skeletons_dir) / "skeletons.parquet" if skeletons_dir is not None else None
    if not len(nodes) and parquet is not None and parquet.exists():
        nodes = pd.read_parquet(parquet)
    raw = None
    if image is not None:
        raw = image if hasattr(image, "read") else None
        if raw is None and kvstore_url(str(image).replace("precomputed://", "")) != join(run, RAW):
            raw = open_volume(image)
    report = publish_layers(
        run, voxel_size_xyz_nm=tuple(segmentation.voxel_size), voxel_offset_xyz=tuple(segmentation.voxel_offset),
        image=raw, segmentation=segmentation, segmentation_in_place=True, meshes=meshes, client=client,
        skeleton_nodes=nodes if len(nodes) else None,
        segments=tables["segments"] if len(tables["segments"]) else None,
        synapses=tables["synapses"], options=options, version=v,
    )
    report["segmentation_dir"] = seg_dir
    return report
