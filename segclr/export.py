"""Embeddings in the published SegCLR CSV-in-ZIP sharded layout (interoperable with released H01/MICrONS data).

Layout (as read by google-research/connectomics ``segclr/reader.py``): a folder of ``{shard}.zip`` files; each
holds one ``{segment_id}.csv`` per segment whose lines are ``node_id,x,y,z,e0,...,e{d-1}`` (no header, lines
joined by '\\n'). ``shard = md5_shard(segment_id)``: md5 of the id as a little-endian ``bytewidth``-byte integer,
digest read as a little-endian integer, modulo ``num_shards`` (``connectomics/common/sharding.md5_shard``;
current releases use bytewidth 8, the 2022 ones accidentally 64). A ``segclr_export.json`` beside the zips
records num_shards/bytewidth/dim so this module can read its own exports without being told.

Floats are written with 9 significant digits, which round-trips float32 exactly; zip members get a fixed
timestamp and segments are written in id order, so the same embeddings give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from storage.errors import ConnectomeError

MANIFEST = "segclr_export.json"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def md5_shard(segment_id: int, num_shards: int, bytewidth: int = 8, byteorder: str = "little") -> int:
    digest = hashlib.md5(int(segment_id).to_bytes(bytewidth, byteorder)).digest()
    return int.from_bytes(digest, byteorder) % int(num_shards)


def format_csv(node_ids: np.ndarray, xyz: np.ndarray, emb: np.ndarray) -> str:
    lines = []
    for n, p, e in zip(np.asarray(node_ids), np.asarray(xyz, np.float64), np.asarray(emb, np.float32)):
        lines.append(",".join([str(int(n))] + [f"{float(v):.9g}" for v in p] + [f"{float(v):.9g}" for v in e]))
    return "\n".join(lines)


def parse_csv(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [r.split(",") for r in text.split("\n") if r.strip()]
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 0), np.float32)
    node = np.array([int(float(r[0])) for r in rows], np.int64)
    xyz = np.array([[float(v) for v in r[1:4]] for r in rows], np.float64)
    emb = np.array([[float(v) for v in r[4:]] for r in rows], np.float32)
    return node, xyz, emb


def write_csv_zips(out_dir: str | os.PathLike,
                   segments: Iterable[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
                   *, num_shards: int = 8, bytewidth: int = 8, model: str = "") -> dict:
    """Write (segment_id, node_ids (N,), xyz_nm (N, 3), embeddings (N, d)) records; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_shard: dict[int, list] = {}
    dim = None
    for sid, nodes, xyz, emb in segments:
        emb = np.asarray(emb, np.float32)
        dim = emb.shape[1] if emb.ndim == 2 else dim
        by_shard.setdefault(md5_shard(int(sid), num_shards, bytewidth), []).append((int(sid), nodes, xyz, emb))
    for shard, recs in sorted(by_shard.items()):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for sid, nodes, xyz, emb in sorted(recs, key=lambda r: r[0]):
                info = zipfile.ZipInfo(f"{sid}.csv", date_time=_FIXED_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(info, format_csv(nodes, xyz, emb))
        tmp = out / f"{shard}.zip.tmp"
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, out / f"{shard}.zip")
    manifest = {"num_shards": int(num_shards), "bytewidth": int(bytewidth), "embedding_dim": dim, "model": model,
                "layout": "segclr_csv_zip"}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class CsvZipReader:
    """``reader[segment_id] -> (node_ids, xyz_nm, embeddings)`` over a CSV-ZIP folder (ours or a release copy)."""

    def __init__(self, folder: str | os.PathLike, num_shards: int | None = None, bytewidth: int | None = None):
        self.folder = Path(folder)
        manifest = {}
        if (self.folder / MANIFEST).is_file():
            manifest = json.loads((self.folder / MANIFEST).read_text())
        self.num_shards = int(num_shards or manifest.get("num_shards") or 0)
        self.bytewidth = int(bytewidth or manifest.get("bytewidth") or 8)
        if not self.num_shards:
            raise ConnectomeError(f"CSV-ZIP embeddings {self.folder}: no {MANIFEST}; pass num_shards")

    def shard_of(self, segment_id: int) -> int:
        return md5_shard(segment_id, self.num_shards, self.bytewidth)

    def __getitem__(self, segment_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        path = self.folder / f"{self.shard_of(segment_id)}.zip"
        if not path.is_file():
            raise ConnectomeError(f"CSV-ZIP embeddings: segment {segment_id} -> shard file {path} is missing")
        with zipfile.ZipFile(path) as z:
            try:
                text = z.read(f"{int(segment_id)}.csv").decode("utf-8")
            except KeyError:
                raise ConnectomeError(f"CSV-ZIP embeddings: segment {segment_id} is not in {path}") from None
        return parse_csv(text)

    def segment_ids(self) -> list[int]:
        ids = []
        for p in sorted(self.folder.glob("*.zip")):
            with zipfile.ZipFile(p) as z:
                ids += [int(n[:-4]) for n in z.namelist() if n.endswith(".csv")]
        return sorted(ids)
