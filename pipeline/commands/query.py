"""`connectome query RUN WHAT ...`: cells, synapses, partners, connectivity, cell types, skeletons, versions.

RUN is a run directory holding ``connectome.duckdb``, a ``.duckdb`` file, a ``postgresql://`` URL or a Parquet
release directory. The table goes to stdout (all rows; nothing is cut) or, with ``--out``, to a CSV or Parquet
file. A paged answer (``--limit``) ends with the cursor for ``--after``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from storage.errors import ConnectomeError

HELP = "query a connectome store: cells, synapses, partners, connectivity, types, skeleton, versions"
WHAT = ("cells", "synapses", "partners", "connectivity", "types", "skeleton", "versions")


def _ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConnectomeError(f"ids must be integers separated by commas, got {text!r}") from None


def _bbox(text: str | None):
    if text is None:
        return None
    try:
        v = [int(float(x)) for x in text.split(",")]
    except ValueError:
        v = []
    if len(v) != 6:
        raise ConnectomeError(f"--bbox must be x0,y0,z0,x1,y1,z1 in nm, got {text!r}")
    return (tuple(v[:3]), tuple(v[3:]))


def resolve_store(run: str) -> str:
    """The store location for RUN (run directory, store file, URL or Parquet release)."""
    if run.startswith(("postgresql://", "postgres://")):
        return run
    p = Path(run)
    if p.is_dir() and not (p / "manifest.json").is_file():
        if (p / "connectome.duckdb").is_file():
            return str(p / "connectome.duckdb")
        raise ConnectomeError(f"run {p}: no connectome.duckdb (and not a Parquet release directory)")
    return str(p)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory, .duckdb file, postgresql:// URL or Parquet release")
    parser.add_argument("what", choices=WHAT, help="what to list")
    parser.add_argument("--type", dest="cell_type", action="append", help="cells: cell type (repeatable)")
    parser.add_argument("--min-voxels", type=float, help="cells: minimum voxel count")
    parser.add_argument("--ids", help="cells/connectivity: segment ids, comma separated")
    parser.add_argument("--pre", help="synapses: presynaptic segment id(s), comma separated")
    parser.add_argument("--post", help="synapses: postsynaptic segment id(s), comma separated")
    parser.add_argument("--pre-type", action="append", help="synapses: presynaptic cell type (repeatable)")
    parser.add_argument("--post-type", action="append", help="synapses: postsynaptic cell type (repeatable)")
    parser.add_argument("--bbox", help="synapses: x0,y0,z0,x1,y1,z1 in nm (stop exclusive)")
    parser.add_argument("--min-score", type=float, help="synapses: minimum detector score")
    parser.add_argument("--all", action="store_true", help="synapses/partners/connectivity: keep invalid synapses")
    parser.add_argument("--id", type=int, help="partners/skeleton: the segment")
    parser.add_argument("--direction", choices=("out", "in"), default="out", help="partners: out = targets, in = inputs")
    parser.add_argument("--by", choices=("cell_type", "segment"), default="cell_type", help="connectivity: grouping")
    parser.add_argument("--normalize", choices=("post_total",), help="connectivity: divide columns by total input")
    parser.add_argument("--min-synapses", type=int, default=1, help="partners/connectivity: minimum per pair")
    parser.add_argument("--system", help="classification system of the cell types")
    parser.add_argument("--version", type=int, help="store version (default: latest committed)")
    parser.add_argument("--limit", type=int, help="cells/synapses: page size")
    parser.add_argument("--after", type=int, help="cells/synapses: cursor from the previous page")
    parser.add_argument("--out", help="write the table to this .csv or .parquet file instead of stdout")


def _query(c, args):
    v = args.version
    if args.what == "cells":
        return c.cells(cell_type=args.cell_type, min_voxels=args.min_voxels, ids=_ids(args.ids),
                       classification_system=args.system, version=v, limit=args.limit, after=args.after)
    if args.what == "synapses":
        return c.synapses(pre=_ids(args.pre), post=_ids(args.post), pre_type=args.pre_type, post_type=args.post_type,
                          bbox=_bbox(args.bbox), min_score=args.min_score, valid_only=not args.all,
                          classification_system=args.system, version=v, limit=args.limit, after=args.after)
    if args.what == "partners":
        if args.id is None:
            raise ConnectomeError("partners needs --id SEGMENT")
        return c.partners(args.id, direction=args.direction, min_synapses=args.min_synapses,
                          valid_only=not args.all, classification_system=args.system, version=v)
    if args.what == "connectivity":
        return c.connectivity(group_by=args.by, normalize=args.normalize, min_synapses=args.min_synapses,
                              ids=_ids(args.ids), valid_only=not args.all, classification_system=args.system,
                              version=v)
    if args.what == "types":
        return c.cell_type_counts(classification_system=args.system, version=v)
    if args.what == "skeleton":
        if args.id is None:
            raise ConnectomeError("skeleton needs --id SEGMENT")
        return c.skeleton(args.id, version=v)
    return c.versions()


def _write(df, out: str) -> None:
    path = Path(out)
    keep_index = df.index.name is not None
    if path.suffix.lower() == ".csv":
        df.to_csv(path, index=keep_index)
    elif path.suffix.lower() in (".parquet", ".pq"):
        frame = df.copy()
        frame.columns = [str(c) for c in frame.columns]
        if keep_index:
            frame.index = frame.index.map(str)
        frame.to_parquet(path, index=keep_index)
    else:
        raise ConnectomeError(f"--out {out}: unknown format (use .csv or .parquet)")


def run(args) -> int:
    import pandas as pd

    from storage.store.connectome import Connectome

    with Connectome.open(resolve_store(args.run)) as c:
        df = _query(c, args)
        version = df.attrs.get("version")
        if args.out:
            _write(df, args.out)
            print(f"wrote {len(df)} rows to {args.out} (version {version})")
        else:
            with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250):
                print(df.to_string())
        tail = f"# {len(df)} rows at version {version}" if version is not None else f"# {len(df)} rows"
        if df.attrs.get("next_after") is not None:
            tail += f"; more rows: --after {df.attrs['next_after']}"
        print(tail, file=sys.stderr)
    return 0
