"""embed: SegCLR embeddings for (subsampled) skeleton nodes, blockwise on Dask, batched.

Each block embeds the nodes whose scale-0 voxel lies in its write box; it reads the write box grown by half a
cutout (at the model's scale), aligned to the model's downsampling grid from the volume origin, so a node's
cutout is identical whichever block it falls in. The encoder is loaded once per worker process. With
``gpu=True`` blocks are sent only to workers advertising the ``GPU`` resource.

Outputs: ``<work_dir>/embed_nodes.parquet`` (which nodes), per-block ``embeddings/block_<id>.npz``, the merged
``<work_dir>/embeddings.parquet`` (segment_id, node_id, x_nm, y_nm, z_nm, e0..e63), optionally the store's
``embeddings`` rows (one vector per node, ``model`` = the model's name) and a CSV-in-ZIP export.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from segclr.cutouts import aligned_read_box, scale_region
from segclr.skeletons import subsample_nodes, table_to_skeletons
from storage.box import Block, BlockGrid
from storage.volume import open_volume

NODES_FILE = "embed_nodes.parquet"
EMBEDDINGS_FILE = "embeddings.parquet"
_CACHE: dict = {}


def _embedder(model: str, batch_size: int):
    key = ("model", model, batch_size)
    if key not in _CACHE:
        import tensorflow as tf

        from segclr.embeddings import Embedder

        threads = int(os.environ.get("CONNECTOME_TF_THREADS", "1"))
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # already initialised in this worker
            pass
        _CACHE[key] = Embedder.load(model, batch_size)
    return _CACHE[key]


def _nodes(path: str) -> pd.DataFrame:
    key = ("nodes", path, Path(path).stat().st_mtime)
    if key not in _CACHE:
        _CACHE[key] = pd.read_parquet(path)
    return _CACHE[key]


def select_nodes(skeleton_table: pd.DataFrame, spacing_nm: float) -> pd.DataFrame:
    """The nodes to embed: per segment, one per ``spacing_nm`` cube (segclr.skeletons.subsample_nodes)."""
    skels = table_to_skeletons(skeleton_table)
    parts = []
    for sid, sk in skels.items():
        keep = subsample_nodes(sk, spacing_nm)
        v = sk.vertices[keep]
        parts.append(pd.DataFrame({"segment_id": np.int64(sid), "node_id": sk.attributes["node_id"][keep],
                                   "x_nm": v[:, 0], "y_nm": v[:, 1], "z_nm": v[:, 2]}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["segment_id", "node_id", "x_nm", "y_nm", "z_nm"])


def embed_block(block: Block, *, raw_spec: dict, seg_spec: dict, model: str, nodes_path: str, work_dir: str,
                batch_size: int) -> dict:
    raw, seg = open_volume(raw_spec), open_volume(seg_spec)
    nodes = _nodes(nodes_path)
    xyz = nodes[["x_nm", "y_nm", "z_nm"]].to_numpy(np.float64)
    vox = np.rint(xyz / np.asarray(seg.voxel_size))[:, ::-1].astype(np.int64)
    inside = np.all((vox >= block.write.start) & (vox < block.write.stop), axis=1)
    out_dir = Path(work_dir) / "embeddings"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"nodes": int(inside.sum())}
    emb = np.zeros((0, 0), np.float32)
    if inside.any():
        embedder = _embedder(model, batch_size)
        cfg = embedder.config
        halo = tuple((c // 2 + 1) * d for c, d in zip(cfg.cutout_size, cfg.downsample))
        read = aligned_read_box(block.write.grow(halo), cfg.downsample, seg.bounds)
        region = scale_region(raw.read(read), seg.read(read), read.start, seg.voxel_size, cfg.downsample)
        emb = embedder.embed_nodes(region, xyz[inside], nodes["segment_id"].to_numpy()[inside])
    tmp = out_dir / f"block_{block.block_id}.tmp.npz"
    np.savez(tmp, row=np.flatnonzero(inside), embedding=emb)
    os.replace(tmp, out_dir / f"block_{block.block_id}.npz")
    return result


def run_embed(raw_url: str, seg_url: str, work_dir: str | Path, *, model: str, client, spacing_nm: float = 500.0,
              block_shape_zyx=(128, 256, 256), batch_size: int = 32, gpu: bool = False, store=None,
              export_dir: str | Path | None = None, num_shards: int = 8, restart: bool = False,
              progress: bool = True) -> pd.DataFrame:
    """Embed the nodes of ``<work_dir>/skeletons.parquet``; returns (and saves) the embeddings table."""
    from pipeline.runner import run_blockwise
    from pipeline.stages.skeletonize import SKELETONS_FILE
    from segclr.encoder import resolve_model
    from storage.errors import ConnectomeError

    work_dir = Path(work_dir)
    skel_path = work_dir / SKELETONS_FILE
    if not skel_path.is_file():
        raise ConnectomeError(f"embed: {skel_path} not found; run the skeletonize stage first")
    model_dir = str(resolve_model(model).resolve())
    nodes = select_nodes(pd.read_parquet(skel_path), spacing_nm)
    nodes_path = work_dir / NODES_FILE
    nodes.to_parquet(str(nodes_path) + ".tmp", index=False)
    os.replace(str(nodes_path) + ".tmp", nodes_path)
    seg = open_volume(seg_url)
    raw = open_volume(raw_url)
    align = seg.chunk_shape
    block_shape = tuple(max(a, b // a * a) for b, a in zip(block_shape_zyx, align))
    grid = BlockGrid(seg.bounds, block_shape, alignment=align)
    run_blockwise("embed", grid, embed_block, client=client, ledger_dir=work_dir / "ledger",
                  resources={"GPU": 1} if gpu else None, restart=restart, progress=progress,
                  params={"raw_spec": raw.spec, "seg_spec": seg.spec, "model": model_dir,
                          "nodes_path": str(nodes_path), "work_dir": str(work_dir), "batch_size": int(batch_size)})
    dim = None
    emb = None
    for b in range(grid.num_blocks):
        with np.load(work_dir / "embeddings" / f"block_{b}.npz") as z:
            if len(z["row"]) == 0:
                continue
            if emb is None:
                dim = z["embedding"].shape[1]
                emb = np.full((len(nodes), dim), np.nan, np.float32)
            emb[z["row"]] = z["embedding"]
    table = nodes.copy()
    if emb is not None:
        table = pd.concat([table, pd.DataFrame(emb, columns=[f"e{i}" for i in range(dim)])], axis=1)
        table = table[np.isfinite(emb).all(1)].reset_index(drop=True)
    table.to_parquet(str(work_dir / EMBEDDINGS_FILE) + ".tmp", index=False)
    os.replace(str(work_dir / EMBEDDINGS_FILE) + ".tmp", work_dir / EMBEDDINGS_FILE)
    name = Path(model_dir).name
    if store is not None and len(table):
        cols = [c for c in table.columns if c.startswith("e") and c[1:].isdigit()]
        rows = pd.DataFrame({"segment_id": table["segment_id"].astype(np.int64),
                             "node_id": table["node_id"].astype(np.int64), "model": name,
                             "vector": list(table[cols].to_numpy(np.float32))})
        with store.loading("embed") as v:
            store.write_embeddings(rows, version=v)
    if export_dir is not None:
        export_table(table, export_dir, num_shards=num_shards, model=name)
    return table


def export_table(table: pd.DataFrame, export_dir: str | Path, *, num_shards: int = 8, model: str = "") -> dict:
    """Embeddings table -> the published CSV-in-ZIP sharded layout (segclr.export)."""
    from segclr.export import write_csv_zips

    cols = [c for c in table.columns if c.startswith("e") and c[1:].isdigit()]
    records = ((int(sid), g["node_id"].to_numpy(), g[["x_nm", "y_nm", "z_nm"]].to_numpy(),
                g[cols].to_numpy(np.float32)) for sid, g in table.groupby("segment_id", sort=True))
    return write_csv_zips(export_dir, records, num_shards=num_shards, model=model)


def run_aggregate(work_dir: str | Path, *, radius_nm: float, export_dir: str | Path | None = None,
                  num_shards: int = 8, model: str = "") -> pd.DataFrame:
    """Mean embedding over a geodesic radius around every embedded node (segclr.aggregation; R = 0: unchanged),
    saved as ``<work_dir>/embeddings_agg<R>nm.parquet`` and optionally exported like the released ``agg10um``."""
    from pipeline.stages.skeletonize import SKELETONS_FILE
    from segclr.aggregation import aggregate_table

    work_dir = Path(work_dir)
    table = pd.read_parquet(work_dir / EMBEDDINGS_FILE)
    skels = table_to_skeletons(pd.read_parquet(work_dir / SKELETONS_FILE))
    cols = [c for c in table.columns if c.startswith("e") and c[1:].isdigit()]
    out = table.copy()
    if len(table):
        out[cols] = aggregate_table(table, skels, radius_nm)
    path = work_dir / f"embeddings_agg{int(radius_nm)}nm.parquet"
    out.to_parquet(str(path) + ".tmp", index=False)
    os.replace(str(path) + ".tmp", path)
    if export_dir is not None:
        export_table(out, export_dir, num_shards=num_shards, model=model)
    return out
