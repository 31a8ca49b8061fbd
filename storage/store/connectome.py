"""The query API: cells, synapses, partners, connectivity matrices — at a version, as pandas.

Why it looks like this (see ../shared/notes/queries.md): CAVE/neuPrint users suffer from silent truncation,
root-id churn and untyped results. So every call here

- runs at one committed version (``version=``, default the latest) and records it in ``df.attrs['version']``;
- pages deterministically (``limit`` + ``after=`` cursor on the primary key; ``df.attrs['next_after']`` is the next
  cursor or None when the answer is complete) and never cuts an answer short without saying so;
- binds every filter value as a parameter (hostile strings are data) and raises `QueryError` naming unknown ids,
  cell types, versions or malformed filters;
- resolves synapse partners through the versioned fragment -> segment map, so a proofreading edit changes the
  answer at the new version without touching synapse rows.
"""

from __future__ import annotations

import numbers
import threading
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from storage.errors import ConnectomeError, QueryError
from storage.store import morton, schema, versions
from storage.store.backend import open_backend
from storage.store.duckdb_backend import POST_COPY
from storage.store.sql import Sql

MAX_ID = (1 << 63) - 1
UNTYPED = "untyped"
# DuckDB prunes row groups of the clustered synapse table (zone maps) for "pre_fragment_id = ?" but not for a
# bound list parameter, so up to this many fragments become a UNION ALL of point lookups.
MAX_POINT_LOOKUPS = 64
MAX_MATRIX_SEGMENTS = 5000
# Up to this many id_map rows, a committed version's fragment -> segment map and its cell types are held in memory
# (sorted numpy arrays, ~40 bytes a fragment; two versions at most), so a one-cell query is one pruned synapse scan
# plus array lookups instead of three SQL statements. Larger maps are resolved in SQL per query.
MAX_CACHED_FRAGMENTS = 2_000_000

_ID_COLS = {"segment_id", "synapse_id", "pre_segment_id", "post_segment_id", "pre_fragment_id", "post_fragment_id",
            "fragment_id", "partner_id", "node_id", "parent_id"}
_INT_COLS = {"voxel_count", "size_voxels", "n_synapses", "n_cells", "row_index"}
_FLOAT_COLS = {"score", "confidence", "radius_nm", "compartment_confidence"}

SYNAPSE_COLUMNS = (
    "synapse_id", "pre_segment_id", "post_segment_id", "pre_cell_type", "post_cell_type",
    "x_nm", "y_nm", "z_nm", "pre_x_nm", "pre_y_nm", "pre_z_nm", "post_x_nm", "post_y_nm", "post_z_nm",
    "size_voxels", "score", "valid", "pre_fragment_id", "post_fragment_id",
)
CELL_COLUMNS = (
    "segment_id", "voxel_count", "cell_type", "confidence", "classification_system", "source",
    "bbox_min_x_nm", "bbox_min_y_nm", "bbox_min_z_nm", "bbox_max_x_nm", "bbox_max_y_nm", "bbox_max_z_nm",
    "centroid_x_nm", "centroid_y_nm", "centroid_z_nm",
)


def _target_dtype(col: str, has_null: bool) -> str | None:
    if col in _ID_COLS:
        return "UInt64" if has_null else "uint64"
    if col.endswith("_nm") and col != "radius_nm":
        return "Int32" if has_null else "int32"
    if col in _INT_COLS:
        return "Int64" if has_null else "int64"
    if col in _FLOAT_COLS:
        return "float32"
    if col == "valid":
        return "bool"
    return None


def typed(df: pd.DataFrame) -> pd.DataFrame:
    """Give result columns the same dtypes on every backend (ids uint64, positions int32, scores float32)."""
    for col in df.columns:
        s = df[col]
        target = _target_dtype(col, False)
        if target is None or str(s.dtype) == target or (str(s.dtype) == _target_dtype(col, True) and s.hasnans):
            continue
        plain = isinstance(s.dtype, np.dtype) and s.dtype.kind in "iub"  # numpy ints/bools hold no nulls
        df[col] = s.astype(target if plain or not s.isna().any() else _target_dtype(col, True))
    return df


# ---------------------------------------------------------------- argument checks (one clear line each)

def _as_id(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        else:
            raise QueryError(f"{what} must be an integer segment id, got {value!r}")
    v = int(value)
    if v < 0 or v > MAX_ID:
        raise QueryError(f"{what} {v} is out of range (ids are 0 < id < 2**63)")
    return v


def _as_ids(value, what: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        raise QueryError(f"{what} must be an integer id or a list of them, got {value!r}")
    if isinstance(value, (numbers.Integral, np.integer)):
        return [_as_id(value, what)]
    try:
        items = list(value)
    except TypeError:
        raise QueryError(f"{what} must be an integer id or a list of them, got {value!r}") from None
    if not items:
        raise QueryError(f"{what} is an empty list")
    return sorted({_as_id(v, what) for v in items})


def _as_number(value, what: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.number)) or value != value:
        raise QueryError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = float("inf")
    if number in (float("inf"), float("-inf")):
        raise QueryError(f"{what} must be a finite number, got {value!r}")
    return number


def _as_texts(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        items = list(value)
    except TypeError:
        raise QueryError(f"{what} must be a string or a list of strings, got {value!r}") from None
    if not items or not all(isinstance(v, str) for v in items):
        raise QueryError(f"{what} must be a string or a non-empty list of strings, got {value!r}")
    return sorted(set(items))


def _as_limit(limit) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (numbers.Integral, np.integer)) or int(limit) <= 0:
        raise QueryError(f"limit must be a positive integer, got {limit!r}")
    return min(int(limit), MAX_ID - 1)  # larger pages mean "everything"; SQL LIMIT takes a 64-bit integer


def _as_bbox(bbox) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    try:
        lo, hi = bbox
        lo = tuple(int(_as_number(v, "bbox")) for v in lo)
        hi = tuple(int(_as_number(v, "bbox")) for v in hi)
    except (TypeError, ValueError):
        raise QueryError(f"bbox must be ((x0, y0, z0), (x1, y1, z1)) in nm, got {bbox!r}") from None
    if len(lo) != 3 or len(hi) != 3:
        raise QueryError(f"bbox must be ((x0, y0, z0), (x1, y1, z1)) in nm, got {bbox!r}")
    if any(h <= l for l, h in zip(lo, hi)):
        raise QueryError(f"bbox {bbox!r} is empty: each stop must exceed its start (XYZ nm, stop exclusive)")
    return lo, hi


_ARROW_TARGET = {"uint64": pa.uint64(), "int32": pa.int32(), "int64": pa.int64(), "float32": pa.float32(),
                 "bool": pa.bool_()}


def arrow_frame(table: pa.Table) -> pd.DataFrame:
    """Arrow result -> pandas with the result dtypes (casting in Arrow is much cheaper than in pandas)."""
    for i, field in enumerate(table.schema):
        target = _target_dtype(field.name, False)
        if target is not None and field.type != _ARROW_TARGET[target]:
            table = table.set_column(i, field.name, table.column(i).cast(_ARROW_TARGET[target], safe=False))
    return typed(table.to_pandas())


# Synapse columns read from the table by the two-step path (partners and cell types are resolved afterwards).
_SYNAPSE_ROW_COLUMNS = ("synapse_id", "pre_fragment_id", "post_fragment_id") + SYNAPSE_COLUMNS[5:17]


def _column(col: pa.ChunkedArray, target: str):
    """An Arrow column as numpy (or a pandas nullable array when it holds nulls) in its result dtype."""
    if col.null_count == 0:
        return col.to_numpy().astype(target, copy=False)
    if target in ("int32", "int64", "uint64"):
        values = col.fill_null(0).to_numpy().astype(target, copy=False)
        mask = col.is_null().to_numpy(zero_copy_only=False)
        return pd.arrays.IntegerArray(values, mask)
    return col.to_numpy(zero_copy_only=False).astype(target, copy=False)  # floats: NaN marks null


class _VersionMaps:
    """fragment -> segment and segment -> cell type at one version, as sorted arrays (lookups by searchsorted).

    Built either for a whole committed version (cached, see MAX_CACHED_FRAGMENTS) or for just the fragments one
    query touches (then unknown fragments simply map to segment 0, as the SQL LEFT JOIN does)."""

    def __init__(self, fragments: np.ndarray, segments: np.ndarray):
        fragments = np.asarray(fragments, dtype=np.int64)
        segments = np.asarray(segments, dtype=np.int64)
        order = np.argsort(fragments, kind="stable")
        self.frag, self.seg_of_frag = fragments[order], segments[order]
        order = np.lexsort((fragments, segments))
        self.seg, self.frag_of_seg = segments[order], fragments[order]
        # system -> (segment ids sorted, label code per segment, labels + [None]); codes keep one Python string
        # per distinct cell type in memory, not one per segment
        self.types: dict[str | None, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _lookup(keys: np.ndarray, table: np.ndarray, values: np.ndarray, default):
        if len(table) == 0:
            return np.full(len(keys), default, dtype=values.dtype)
        idx = np.minimum(np.searchsorted(table, keys), len(table) - 1)
        return np.where(table[idx] == keys, values[idx], default)

    def fragments(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """Fragments of these segments (sorted) and the segments that have none."""
        keys = np.asarray(ids, dtype=np.int64)
        lo, hi = np.searchsorted(self.seg, keys, "left"), np.searchsorted(self.seg, keys, "right")
        missing = keys[hi == lo].tolist()
        if len(keys) == 1:
            frags = self.frag_of_seg[lo[0]:hi[0]]
        else:
            frags = np.concatenate([self.frag_of_seg[a:b] for a, b in zip(lo, hi)])
        return sorted(frags.tolist()), missing

    def segments(self, fragments: np.ndarray) -> np.ndarray:
        """Segment of each fragment (0 where the fragment is not mapped)."""
        return self._lookup(np.asarray(fragments, dtype=np.int64), self.frag, self.seg_of_frag, 0)

    def cell_types(self, segments: np.ndarray, system: str | None) -> np.ndarray:
        """Cell type of each segment in one classification system (None where untyped)."""
        keys, codes, labels = self.types[system]
        return labels[self._lookup(np.asarray(segments, dtype=np.int64), keys, codes, -1)]

    def set_types(self, system: str | None, segments, labels) -> None:
        """``labels``: one cell type per segment (a list or an Arrow string column)."""
        segments = np.asarray(segments, dtype=np.int64)
        labels = pa.chunked_array([pa.array(labels, pa.string())]) if isinstance(labels, list) else labels
        encoded = labels.combine_chunks().dictionary_encode()
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        order = np.argsort(segments, kind="stable")
        self.types[system] = (segments[order], codes[order],
                              np.array(encoded.dictionary.to_pylist() + [None], dtype=object))


def _finish(df: pd.DataFrame, version: int, limit: int | None, key: str | None, *,
            is_typed: bool = False) -> pd.DataFrame:
    """Cut a page (limit + 1 rows fetched -> limit rows and a cursor) and record the version in ``df.attrs``.
    ``is_typed``: the columns already have the result dtypes (skips re-checking them)."""
    next_after = None
    if limit is not None and len(df) > limit:
        df = df.iloc[:limit].copy()
        next_after = int(df[key].iloc[-1])
    if not isinstance(df.index, pd.RangeIndex) or df.index.start != 0 or df.index.step != 1:
        df = df.reset_index(drop=True)
    if not is_typed:
        df = typed(df)
    df.attrs["version"] = int(version)
    df.attrs["next_after"] = next_after
    df.attrs["complete"] = next_after is None
    return df


class Connectome:
    """A connectome store opened for queries (and proofreading edits when writable).

    ``Connectome.open(path_or_url)`` accepts a DuckDB file path, a ``postgresql://`` URL or a Parquet release
    directory (read-only, no server). Every method takes ``version=`` and returns pandas with
    ``df.attrs['version']``.
    """

    def __init__(self, backend):
        self.backend = backend
        # Facts about a committed version never change (versions are immutable), so they are cached per version.
        self._cache: dict[tuple, object] = {}
        self._maps_cache: dict[int, _VersionMaps | None] = {}  # version -> its maps (None: too large to hold)
        self._maps_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle
    @classmethod
    def open(cls, location: str | Path, *, read_only: bool = False, threads: int | None = None) -> "Connectome":
        backend = open_backend(location, read_only=read_only, threads=threads)
        try:
            meta = backend.query("SELECT value FROM store_meta WHERE key = 'schema_version'")
        except Exception:
            backend.close()
            raise ConnectomeError(f"connectome store {location}: not a connectome store (no store_meta table)") from None
        if meta.empty:
            backend.close()
            raise ConnectomeError(f"connectome store {location}: not a connectome store (no schema version)")
        if not backend.read_only and int(meta["value"].iloc[0]) < schema.SCHEMA_VERSION:  # (releases: read-only)
            from storage.store import migrate

            migrate.upgrade(backend)
        return cls(backend)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def location(self) -> str:
        return self.backend.location

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r}, {self.backend.dialect})"

    def _frame(self, sql: str, params: dict) -> pd.DataFrame:
        """Run a result query; DuckDB hands over Arrow, which becomes pandas with the result dtypes."""
        if self.backend.dialect == "duckdb":
            return arrow_frame(self.backend.query_arrow(sql, params))
        return typed(self.backend.query(sql, params))

    # ------------------------------------------------------------ versions
    def versions(self) -> pd.DataFrame:
        """All versions with kind (load/merge/split/undo), status and description."""
        return versions.table(self.backend)

    @property
    def version(self) -> int:
        """The latest committed version (what queries read by default)."""
        return versions.latest_committed(self.backend)

    def _v(self, version) -> int:
        if version is None:
            # DuckDB: only this process can write the file, so the latest version changes only when one of its
            # write transactions commits; the backend counts those (PostgreSQL: always ask the server).
            token = getattr(self.backend, "write_generation", lambda: None)()
            if token is not None:
                return self._cached(("latest", token), lambda: versions.resolve(self.backend, None))
        return versions.resolve(self.backend, version)

    # ------------------------------------------------------------ helpers
    def _cached(self, key: tuple, compute):
        if key not in self._cache:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = compute()
        return self._cache[key]

    def _systems(self, v: int) -> list[str]:
        def compute():
            q = Sql(self.backend.dialect)
            df = self.backend.query(
                f"SELECT DISTINCT classification_system AS s FROM cell_types c WHERE {q.visible('c', v)} ORDER BY s",
                q.params)
            return [str(x) for x in df["s"]]

        return self._cached(("systems", v), compute)

    def _system(self, v: int, system: str | None) -> str | None:
        systems = self._systems(v)
        if system is not None:
            if not isinstance(system, str):
                raise QueryError(f"classification_system must be a string, got {system!r}")
            if system not in systems:
                raise QueryError(f"unknown classification_system {system!r} at version {v} (known: {systems})")
            return system
        if not systems:
            return None
        # one system decides the type columns: 'default' if present, else the first by name
        return "default" if "default" in systems else systems[0]

    def _ctes(self, q: Sql, v: int, system: str | None) -> str:
        """Common table expressions: m = fragment -> segment, ct = segment -> cell type, at version v."""
        ct_filter = f" AND c.classification_system = {q.p(system)}" if system is not None else ""
        # PostgreSQL would materialise a CTE used twice (a full id_map scan); inlined, it probes the indexes.
        inline = "NOT MATERIALIZED " if self.backend.dialect == "postgres" else ""
        return (
            f"m AS {inline}(SELECT i.fragment_id, i.segment_id FROM id_map i WHERE {q.visible('i', v)}), "
            f"ct AS {inline}(SELECT c.segment_id, c.cell_type, c.confidence FROM cell_types c "
            f"WHERE {q.visible('c', v)}{ct_filter})"
        )

    def _check_segments(self, v: int, ids: list[int], what: str) -> None:
        if not ids:
            return
        q = Sql(self.backend.dialect)
        df = self.backend.query(
            f"SELECT s.segment_id FROM segments s WHERE {q.visible('s', v)} AND {q.in_list('s.segment_id', ids)} "
            f"UNION SELECT i.segment_id FROM id_map i WHERE {q.visible('i', v)} AND {q.in_list('i.segment_id', ids)}",
            q.params)
        missing = sorted(set(ids) - {int(x) for x in df["segment_id"]})
        if missing:
            shown = missing[:10] + (["..."] if len(missing) > 10 else [])
            raise QueryError(f"unknown {what} segment id(s) at version {v}: {shown}")

    def _check_types(self, v: int, types: list[str], system: str | None, what: str) -> None:
        if not types:
            return
        known = self._cached(("types", v, system), lambda: set(
            self.cell_type_counts(version=v, classification_system=system)["cell_type"]))
        missing = [t for t in types if t not in known]
        if missing:
            raise QueryError(f"unknown {what} {missing!r} at version {v} (known: {sorted(known)})")

    def _fragments(self, v: int, ids: list[int], what: str | None = None) -> list[int]:
        """Fragments of these segments at v; with ``what``, unknown segments raise QueryError (one round trip
        when every segment has fragments, the common case)."""
        maps = self._version_maps(v)
        if maps is not None:
            frags, missing = maps.fragments(ids)
            if what is not None:
                self._check_segments(v, missing, what)
            return frags
        q = Sql(self.backend.dialect)
        rows = self.backend.rows(
            f"SELECT i.segment_id, i.fragment_id FROM id_map i WHERE {q.visible('i', v)} AND "
            f"{q.in_list('i.segment_id', ids)}", q.params)
        if what is not None:
            missing = sorted(set(ids) - {int(r[0]) for r in rows})
            self._check_segments(v, missing, what)
        return sorted(int(r[1]) for r in rows)

    def _post_copy(self) -> bool:
        """Whether DuckDB's copy of the synapses in postsynaptic order holds exactly the committed rows: it exists
        and no committed version wrote synapses after it was built (checked once per write generation)."""
        token = getattr(self.backend, "write_generation", lambda: None)()
        if self.backend.dialect != "duckdb" or token is None:
            return False

        def compute() -> bool:
            if not self.backend.rows("SELECT 1 FROM duckdb_tables() WHERE table_name = $t AND NOT temporary",
                                     {"t": POST_COPY}):
                return False
            built = self.backend.rows("SELECT value FROM store_meta WHERE key = $k", {"k": POST_COPY})
            newest = self.backend.rows(
                "SELECT max(l.version) FROM load_batches l JOIN versions v ON v.version = l.version "
                "WHERE l.table_name = 'synapses' AND v.status = 'committed'")[0][0]
            return bool(built) and (newest is None or int(newest) <= int(built[0][0]))

        return self._cached(("post_copy", token), compute)

    def _version_maps(self, v: int) -> _VersionMaps | None:
        """The whole fragment -> segment map of committed version v in memory, when it is small enough (DuckDB:
        this process is the only writer, and a committed version never changes, so the copy cannot go stale)."""
        if self.backend.dialect != "duckdb":
            return None
        with self._maps_lock:  # reader threads may share this object: build each version's maps once
            if v in self._maps_cache:
                return self._maps_cache[v]
            maps = None
            n = self.backend.rows("SELECT count(*) FROM id_map")[0][0]
            if n <= MAX_CACHED_FRAGMENTS:
                q = Sql(self.backend.dialect)
                t = self.backend.query_arrow(
                    f"SELECT i.fragment_id, i.segment_id FROM id_map i WHERE {q.visible('i', v)}", q.params)
                maps = _VersionMaps(t.column(0).to_numpy(), t.column(1).to_numpy())
            while len(self._maps_cache) >= 2:
                self._maps_cache.pop(next(iter(self._maps_cache)))
            self._maps_cache[v] = maps
            return maps

    def _version_types(self, maps: _VersionMaps, v: int, system: str | None) -> _VersionMaps:
        """Cell types of one classification system at v, loaded once into the cached maps."""
        if system not in maps.types:  # (two threads may both load them: same content, last one kept)
            if system is None:
                maps.set_types(None, [], [])
            else:
                q = Sql(self.backend.dialect)
                t = self.backend.query_arrow(
                    f"SELECT c.segment_id, c.cell_type FROM cell_types c WHERE {q.visible('c', v)} "
                    f"AND c.classification_system = {q.p(system)}", q.params)
                maps.set_types(system, t.column(0).to_numpy(), t.column(1))
        return maps

    # ------------------------------------------------------------ cells
    def cells(self, cell_type: str | Iterable[str] | None = None, min_voxels: float | None = None,
              ids: int | Iterable[int] | None = None, *, classification_system: str | None = None,
              version=None, limit: int | None = None, after: int | None = None) -> pd.DataFrame:
        """Segments at a version with their cell type (one classification system), ordered by segment_id.

        Columns: segment_id, voxel_count, cell_type, confidence, classification_system, source, bbox_*_nm,
        centroid_*_nm. Unknown ``ids`` or ``cell_type`` raise QueryError.
        """
        v = self._v(version)
        types = _as_texts(cell_type, "cell_type")
        id_list = _as_ids(ids, "ids")
        limit = _as_limit(limit)
        system = self._system(v, classification_system)
        self._check_types(v, types, system, "cell type")
        self._check_segments(v, id_list, "ids")
        q = Sql(self.backend.dialect)
        sys_filter = f" AND c.classification_system = {q.p(system)}" if system is not None else ""
        where = [q.visible("s", v)]
        if types:
            where.append(q.in_list("c.cell_type", types))
        if min_voxels is not None:
            where.append(f"s.voxel_count >= {q.p(_as_number(min_voxels, 'min_voxels'))}")
        if id_list:
            where.append(q.in_list("s.segment_id", id_list))
        if after is not None:
            where.append(f"s.segment_id > {q.p(_as_id(after, 'after'))}")
        sql = (
            "SELECT s.segment_id, s.voxel_count, c.cell_type, c.confidence, c.classification_system, c.source, "
            "s.bbox_min_x_nm, s.bbox_min_y_nm, s.bbox_min_z_nm, s.bbox_max_x_nm, s.bbox_max_y_nm, s.bbox_max_z_nm, "
            "s.centroid_x_nm, s.centroid_y_nm, s.centroid_z_nm "
            f"FROM segments s LEFT JOIN cell_types c ON c.segment_id = s.segment_id AND {q.visible('c', v)}{sys_filter} "
            f"WHERE {' AND '.join(where)} ORDER BY s.segment_id"
        )
        if limit is not None:
            sql += f" LIMIT {q.p(limit + 1)}"
        return _finish(self._frame(sql, q.params), v, limit, "segment_id")

    def skeleton(self, segment_id, *, version=None) -> pd.DataFrame:
        """One segment's skeleton at a version: node_id, x/y/z_nm, radius_nm, parent_id, compartment,
        compartment_confidence, ordered by node_id (empty when the segment has no skeleton yet, e.g. right after a
        split). An unknown segment id raises QueryError."""
        v = self._v(version)
        sid = _as_id(segment_id, "segment_id")
        self._check_segments(v, [sid], "skeleton")
        q = Sql(self.backend.dialect)
        sql = ("SELECT n.node_id, n.x_nm, n.y_nm, n.z_nm, n.radius_nm, n.parent_id, n.compartment, "
               f"n.compartment_confidence FROM skeleton_nodes n WHERE {q.visible('n', v)} AND "
               f"n.segment_id = {q.p(sid)} ORDER BY n.node_id")
        df = _finish(self._frame(sql, q.params), v, None, None)
        df.attrs["segment_id"] = sid
        return df

    def cell_type_counts(self, *, classification_system: str | None = None, version=None) -> pd.DataFrame:
        """Number of cells per cell type (columns cell_type, n_cells), most common first."""
        v = self._v(version)
        system = self._system(v, classification_system)
        q = Sql(self.backend.dialect)
        sys_filter = f" AND c.classification_system = {q.p(system)}" if system is not None else ""
        df = self.backend.query(
            f"SELECT c.cell_type, count(*) AS n_cells FROM cell_types c WHERE {q.visible('c', v)}{sys_filter} "
            "GROUP BY c.cell_type ORDER BY n_cells DESC, c.cell_type", q.params)
        return _finish(df, v, None, None)

    # ------------------------------------------------------------ synapses
    def _base_sql(self, q: Sql, v: int, *, pre: list[int], post: list[int], pre_types: list[str],
                  post_types: list[str], bbox, min_score, valid_only: bool, after: int | None,
                  columns: str = "s.*") -> str:
        """SQL of the synapse rows (fragment level) that can match, with the cheap filters pushed down."""
        push = [q.visible("s", v)]
        if bbox is not None:
            lo, hi = bbox
            # PostgreSQL answers the Morton ranges from its b-tree; DuckDB prunes row groups with the per-column
            # min/max of x/y/z directly (an OR of ranges would only add per-row work there).
            if self.backend.dialect == "postgres":
                ranges = morton.box_ranges(lo, hi)
                push.append("(" + " OR ".join(f"s.morton BETWEEN {q.p(a)} AND {q.p(b)}" for a, b in ranges) + ")"
                            if ranges else "FALSE")
            for axis, a, b in zip("xyz", lo, hi):
                push.append(f"s.{axis}_nm >= {q.p(a)} AND s.{axis}_nm < {q.p(b)}")
        if min_score is not None:
            push.append(f"s.score >= {q.p(float(min_score))}")
        if valid_only:
            push.append("s.valid")
        if after is not None:
            push.append(f"s.synapse_id > {q.p(int(after))}")
        pushed = " AND ".join(push)

        # The most selective side drives the scan: explicit ids use the fragment index / zone maps.
        if pre or post:
            side, ids = ("pre", pre) if pre else ("post", post)
            frags = self._fragments(v, ids, side)
            if pre and post:
                self._fragments(v, post, "post")
            col = f"s.{side}_fragment_id"
            if not frags:
                return f"SELECT {columns} FROM synapses s WHERE FALSE"
            # DuckDB: input-side lookups read the copy in postsynaptic order (same rows) when it is current
            table = POST_COPY if side == "post" and self._post_copy() else "synapses"
            if self.backend.dialect == "duckdb" and len(frags) <= MAX_POINT_LOOKUPS:
                return " UNION ALL ".join(
                    f"SELECT {columns} FROM {table} s WHERE {col} = {q.p(f)} AND {pushed}" for f in frags)
            return f"SELECT {columns} FROM {table} s WHERE {q.in_list(col, frags)} AND {pushed}"
        if pre_types or post_types:
            side, types = ("pre", pre_types) if pre_types else ("post", post_types)
            return (f"SELECT {columns} FROM synapses s WHERE s.{side}_fragment_id IN "
                    f"(SELECT m.fragment_id FROM m JOIN ct ON ct.segment_id = m.segment_id "
                    f"WHERE {q.in_list('ct.cell_type', types)}) AND {pushed}")
        return f"SELECT {columns} FROM synapses s WHERE {pushed}"

    def _synapse_select(self, q: Sql, v: int, *, pre: list[int], post: list[int], pre_types: list[str],
                        post_types: list[str], bbox, min_score, valid_only: bool, system: str | None,
                        after: int | None) -> str:
        """SQL (WITH ... SELECT, no ORDER BY) of the synapses matching the filters, partners resolved at v."""
        base = self._base_sql(q, v, pre=pre, post=post, pre_types=pre_types, post_types=post_types, bbox=bbox,
                              min_score=min_score, valid_only=valid_only, after=after)
        where = ["TRUE"]
        if pre:
            where.append(q.in_list("m1.segment_id", pre))
        if post:
            where.append(q.in_list("m2.segment_id", post))
        if pre_types:
            where.append(q.in_list("c1.cell_type", pre_types))
        if post_types:
            where.append(q.in_list("c2.cell_type", post_types))
        valid_expr = ("(b.valid AND COALESCE(m1.segment_id, 0) <> 0 AND COALESCE(m2.segment_id, 0) <> 0 "
                      "AND m1.segment_id <> m2.segment_id)")
        if valid_only:
            where.append(valid_expr)
        return (
            f"WITH {self._ctes(q, v, system)}, b AS ({base}) "
            "SELECT b.synapse_id, COALESCE(m1.segment_id, 0) AS pre_segment_id, "
            "COALESCE(m2.segment_id, 0) AS post_segment_id, c1.cell_type AS pre_cell_type, "
            "c2.cell_type AS post_cell_type, b.x_nm, b.y_nm, b.z_nm, b.pre_x_nm, b.pre_y_nm, b.pre_z_nm, "
            f"b.post_x_nm, b.post_y_nm, b.post_z_nm, b.size_voxels, b.score, {valid_expr} AS valid, "
            "b.pre_fragment_id, b.post_fragment_id "
            "FROM b LEFT JOIN m m1 ON m1.fragment_id = b.pre_fragment_id "
            "LEFT JOIN m m2 ON m2.fragment_id = b.post_fragment_id "
            "LEFT JOIN ct c1 ON c1.segment_id = m1.segment_id LEFT JOIN ct c2 ON c2.segment_id = m2.segment_id "
            f"WHERE {' AND '.join(where)}"
        )

    def _resolve_rows(self, v: int, *, pre: list[int], post: list[int], pre_types: list[str], post_types: list[str],
                      bbox, min_score, valid_only: bool, system: str | None, after: int | None):
        """DuckDB two-step path: fetch the candidate rows with a pruned scan (zone maps of the clustered table),
        then resolve only their fragments — from the version's cached maps when it has them, else in one SQL
        statement. Same answer as _synapse_select without joining the whole id map and cell-type table per query.

        Returns (rows, pre_seg, post_seg, pre_type, post_type, valid, idx): idx = the kept rows in synapse_id
        order."""
        q = Sql(self.backend.dialect)
        base = self._base_sql(q, v, pre=pre, post=post, pre_types=[], post_types=[], bbox=bbox, min_score=min_score,
                              valid_only=valid_only, after=after,
                              columns=", ".join(f"s.{c}" for c in _SYNAPSE_ROW_COLUMNS))
        rows = self.backend.query_arrow(base, q.params)
        pre_f = rows.column("pre_fragment_id").to_numpy()
        post_f = rows.column("post_fragment_id").to_numpy()
        maps = self._version_maps(v)
        if maps is not None:
            self._version_types(maps, v, system)
        else:
            frags = np.union1d(pre_f, post_f).tolist()
            got: list[tuple] = []
            if frags:
                q = Sql(self.backend.dialect)
                sys_filter = f" AND c.classification_system = {q.p(system)}" if system is not None else " AND FALSE"
                got = self.backend.rows(
                    f"WITH i AS (SELECT i.fragment_id, i.segment_id FROM id_map i WHERE {q.visible('i', v)} AND "
                    f"{q.in_list('i.fragment_id', frags)}) SELECT i.fragment_id, i.segment_id, c.cell_type FROM i "
                    f"LEFT JOIN (SELECT c.segment_id, c.cell_type FROM cell_types c WHERE {q.visible('c', v)}"
                    f"{sys_filter} AND c.segment_id IN (SELECT segment_id FROM i)) c ON c.segment_id = i.segment_id",
                    q.params)
            maps = _VersionMaps(np.array([r[0] for r in got], np.int64), np.array([r[1] for r in got], np.int64))
            maps.set_types(system, [r[1] for r in got if r[2] is not None], [r[2] for r in got if r[2] is not None])
        pre_seg, post_seg = maps.segments(pre_f), maps.segments(post_f)
        pre_t, post_t = maps.cell_types(pre_seg, system), maps.cell_types(post_seg, system)
        valid = (rows.column("valid").to_numpy(zero_copy_only=False).astype(bool) & (pre_seg != 0)
                 & (post_seg != 0) & (pre_seg != post_seg))
        keep = valid.copy() if valid_only else np.ones(len(pre_seg), dtype=bool)
        if pre:
            keep &= np.isin(pre_seg, pre)
        if post:
            keep &= np.isin(post_seg, post)
        if pre_types:
            keep &= np.isin(pre_t, pre_types)
        if post_types:
            keep &= np.isin(post_t, post_types)
        idx = np.flatnonzero(keep)
        idx = idx[np.argsort(rows.column("synapse_id").to_numpy()[idx], kind="stable")]
        return rows, pre_seg, post_seg, pre_t, post_t, valid, idx

    def _synapses_two_step(self, v: int, *, limit: int | None = None, **kw) -> pd.DataFrame:
        """Synapse rows (result columns and dtypes) by the two-step path; at most limit + 1 rows with a limit."""
        rows, pre_seg, post_seg, pre_t, post_t, valid, idx = self._resolve_rows(v, **kw)
        if limit is not None:
            idx = idx[:limit + 1]
        if len(idx) == rows.num_rows and bool(np.all(idx == np.arange(len(idx)))):
            idx = slice(None)  # every row kept, already in synapse_id order (the clustered scan's order)
            take = lambda col: col  # noqa: E731
        else:
            take = lambda col: col.take(idx)  # noqa: E731
        cols = {"synapse_id": rows.column("synapse_id").to_numpy()[idx].astype(np.uint64),
                "pre_segment_id": pre_seg[idx].astype(np.uint64), "post_segment_id": post_seg[idx].astype(np.uint64),
                "pre_cell_type": pre_t[idx], "post_cell_type": post_t[idx]}
        for col in SYNAPSE_COLUMNS[5:]:
            if col == "valid":
                cols[col] = valid[idx]
            else:
                cols[col] = _column(take(rows.column(col)), _target_dtype(col, False))
        return pd.DataFrame(cols, copy=False)

    def synapses(self, pre=None, post=None, pre_type=None, post_type=None, bbox=None, min_score=None,
                 valid_only: bool = True, *, classification_system: str | None = None, version=None,
                 limit: int | None = None, after: int | None = None) -> pd.DataFrame:
        """Synapses at a version, ordered by synapse_id, partners resolved through the id map.

        ``pre``/``post``: segment id(s); ``pre_type``/``post_type``: cell type(s); ``bbox``: ((x0,y0,z0),
        (x1,y1,z1)) nm of the cleft, stop exclusive; ``min_score``; ``valid_only`` drops detector-invalid rows,
        autapses and partner 0 *at this version*. Columns: see SYNAPSE_COLUMNS.
        """
        v = self._v(version)
        pre_ids, post_ids = _as_ids(pre, "pre"), _as_ids(post, "post")
        pre_types, post_types = _as_texts(pre_type, "pre_type"), _as_texts(post_type, "post_type")
        box = _as_bbox(bbox) if bbox is not None else None
        score = _as_number(min_score, "min_score") if min_score is not None else None
        limit = _as_limit(limit)
        cursor = _as_id(after, "after") if after is not None else None
        system = self._system(v, classification_system)
        self._check_types(v, pre_types, system, "pre_type")
        self._check_types(v, post_types, system, "post_type")
        # DuckDB: explicit ids (a pruned scan of the clustered table), or a box when the version's maps are held
        # in memory (the scan's rows are resolved by array lookups instead of joining id map and cell types);
        # paged box queries stay in SQL, where ORDER BY ... LIMIT bounds the work.
        two_step = bool(pre_ids or post_ids) or (
            box is not None and limit is None and not pre_types and not post_types
            and self._version_maps(v) is not None)
        if self.backend.dialect == "duckdb" and two_step:
            df = self._synapses_two_step(v, pre=pre_ids, post=post_ids, pre_types=pre_types, post_types=post_types,
                                         bbox=box, min_score=score, valid_only=bool(valid_only), system=system,
                                         after=cursor, limit=limit)
            return _finish(df, v, limit, "synapse_id", is_typed=True)
        q = Sql(self.backend.dialect)
        sql = self._synapse_select(q, v, pre=pre_ids, post=post_ids, pre_types=pre_types, post_types=post_types,
                                   bbox=box, min_score=score, valid_only=bool(valid_only), system=system,
                                   after=cursor)
        sql += " ORDER BY b.synapse_id"
        if limit is not None:
            sql += f" LIMIT {q.p(limit + 1)}"
        return _finish(self._frame(sql, q.params), v, limit, "synapse_id")


    def partners(self, segment_id, direction: str = "out", min_synapses: int = 1, *, valid_only: bool = True,
                 classification_system: str | None = None, version=None) -> pd.DataFrame:
        """Synaptic partners of one segment: direction 'out' = its postsynaptic targets, 'in' = its inputs.

        Columns: partner_id, n_synapses, partner_cell_type; strongest first, ties by partner_id.
        """
        v = self._v(version)
        seg = _as_id(segment_id, "segment_id")
        if direction not in ("out", "in"):
            raise QueryError(f"direction must be 'out' or 'in', got {direction!r}")
        n_min = int(min(max(_as_number(min_synapses, "min_synapses"), 0), 2**62))  # SQL takes 64-bit ints
        system = self._system(v, classification_system)
        kw = dict(pre=[seg], post=[]) if direction == "out" else dict(pre=[], post=[seg])
        partner, ptype = ("post_segment_id", "post_cell_type") if direction == "out" else ("pre_segment_id", "pre_cell_type")
        if self.backend.dialect == "duckdb":
            _, pre_seg, post_seg, pre_t, post_t, _, idx = self._resolve_rows(
                v, pre_types=[], post_types=[], bbox=None, min_score=None, valid_only=bool(valid_only), system=system,
                after=None, **kw)
            seg_col, type_col = (post_seg, post_t) if direction == "out" else (pre_seg, pre_t)
            ids, first, counts = np.unique(seg_col[idx], return_index=True, return_counts=True)
            types = type_col[idx][first]
            strong = counts >= n_min
            ids, counts, types = ids[strong], counts[strong], types[strong]
            order = np.lexsort((ids, -counts))
            df = pd.DataFrame({"partner_id": ids[order].astype(np.uint64), "n_synapses": counts[order].astype(np.int64),
                               "partner_cell_type": types[order].astype(object)}, copy=False)
            return _finish(df, v, None, None, is_typed=True)
        q = Sql(self.backend.dialect)
        inner = self._synapse_select(q, v, pre_types=[], post_types=[], bbox=None, min_score=None,
                                     valid_only=bool(valid_only), system=system, after=None, **kw)
        sql = (f"SELECT x.{partner} AS partner_id, count(*) AS n_synapses, min(x.{ptype}) AS partner_cell_type "
               f"FROM ({inner}) x GROUP BY x.{partner} HAVING count(*) >= {q.p(n_min)} "
               "ORDER BY n_synapses DESC, partner_id")
        return _finish(self._frame(sql, q.params), v, None, None)

    # ------------------------------------------------------------ connectivity
    def connectivity(self, group_by: str = "cell_type", normalize: str | None = None, min_synapses: int = 1, *,
                     ids=None, valid_only: bool = True, classification_system: str | None = None,
                     version=None) -> pd.DataFrame:
        """Connectivity matrix: rows = presynaptic group, columns = postsynaptic group, values = synapse counts.

        ``group_by``: 'cell_type' (segments without a type form the group 'untyped') or 'segment' (then restrict
        with ``ids=`` if more than 5000 segments take part). ``min_synapses``: a segment pair counts only with at
        least this many synapses (Codex convention: 5). ``normalize='post_total'`` divides each column by the
        post group's total input within the matrix.
        """
        v = self._v(version)
        if group_by not in ("cell_type", "segment"):
            raise QueryError(f"group_by must be 'cell_type' or 'segment', got {group_by!r}")
        if normalize not in (None, "post_total"):
            raise QueryError(f"normalize must be None or 'post_total', got {normalize!r}")
        n_min = int(min(max(_as_number(min_synapses, "min_synapses"), 0), 2**62))  # SQL takes 64-bit ints
        id_list = _as_ids(ids, "ids")
        self._check_segments(v, id_list, "ids")
        system = self._system(v, classification_system) if group_by == "cell_type" else None
        q = Sql(self.backend.dialect)
        push = [q.visible("s", v)]
        if valid_only:
            push.append("s.valid")
        where = ["TRUE"]
        # Autapses (both sides in one segment at v) are not valid synapses. DuckDB: counted out with an aggregate
        # FILTER rather than a WHERE, which it would fold into the 10^7-row hash join as a non-equality
        # condition at twice the join's cost (measured); groups left with no synapse are dropped by HAVING.
        n_having = n_min
        count = "count(*)"
        if valid_only and self.backend.dialect == "duckdb":
            count = "count(*) FILTER (WHERE m1.segment_id <> m2.segment_id)"
            n_having = max(n_min, 1)
        elif valid_only:
            where.append("m1.segment_id <> m2.segment_id")
        if id_list:
            where.append(q.in_list("m1.segment_id", id_list))
            where.append(q.in_list("m2.segment_id", id_list))
        joins = ("FROM synapses s JOIN mt m1 ON m1.fragment_id = s.pre_fragment_id "
                 "JOIN mt m2 ON m2.fragment_id = s.post_fragment_id")
        inline = "NOT MATERIALIZED " if self.backend.dialect == "postgres" else ""  # lets PostgreSQL go parallel
        # Cell types become small integer codes (0 = untyped) before the 10^7-row join and aggregation:
        # grouping integers is several times cheaper than grouping strings; labels are joined back at the end.
        # (PostgreSQL keeps the strings: the window function would make its plan parallel-restricted, and a
        # parallel plan matters more there.)
        if self.backend.dialect == "postgres":
            tc = ("tc AS (SELECT DISTINCT ct.cell_type, ct.cell_type AS code FROM ct)")
            mt = (f"mt AS {inline}(SELECT m.fragment_id, m.segment_id, ct.cell_type AS code FROM m "
                  "LEFT JOIN ct ON ct.segment_id = m.segment_id)")
        else:
            tc = ("tc AS (SELECT d.cell_type, dense_rank() OVER (ORDER BY d.cell_type) AS code "
                  "FROM (SELECT DISTINCT cell_type FROM ct) d)")
            mt = ("mt AS (SELECT m.fragment_id, m.segment_id, COALESCE(tc.code, 0) AS code FROM m "
                  "LEFT JOIN ct ON ct.segment_id = m.segment_id LEFT JOIN tc ON tc.cell_type = ct.cell_type)")
        cond = f"WHERE {' AND '.join(push + where)}"
        head = f"WITH {self._ctes(q, v, system)}, {tc}, {mt}"
        if group_by == "segment":
            sql = (f"{head} SELECT m1.segment_id AS pre_group, m2.segment_id AS "
                   f"post_group, {count} AS n {joins} {cond} GROUP BY 1, 2 HAVING {count} >= {q.p(n_having)}")
        else:
            if n_min <= 1:
                agg = f"SELECT m1.code AS pre_code, m2.code AS post_code, {count} AS n {joins} {cond} GROUP BY 1, 2"
                if count != "count(*)":  # autapses filtered: drop groups left empty
                    agg += f" HAVING {count} >= {q.p(n_having)}"
            else:
                agg = (f"SELECT pre_code, post_code, sum(n) AS n FROM (SELECT m1.segment_id, m2.segment_id, "
                       f"min(m1.code) AS pre_code, min(m2.code) AS post_code, {count} AS n {joins} {cond} "
                       f"GROUP BY m1.segment_id, m2.segment_id HAVING {count} >= {q.p(n_having)}) e GROUP BY 1, 2")
            untyped = q.p(UNTYPED)
            if self.backend.dialect == "postgres":  # codes are the labels themselves (NULL = untyped)
                sql = (f"{head}, a AS ({agg}) SELECT COALESCE(a.pre_code, {untyped}) AS pre_group, "
                       f"COALESCE(a.post_code, {untyped}) AS post_group, a.n FROM a")
            else:
                sql = (f"{head}, a AS ({agg}) SELECT COALESCE(t1.cell_type, {untyped}) AS pre_group, "
                       f"COALESCE(t2.cell_type, {untyped}) AS post_group, a.n FROM a "
                       "LEFT JOIN tc t1 ON t1.code = a.pre_code LEFT JOIN tc t2 ON t2.code = a.post_code")
        edges = self.backend.query(sql, q.params)
        edges["n"] = edges["n"].astype("int64")
        if group_by == "segment":
            segs = set(edges["pre_group"]) | set(edges["post_group"])
            if len(segs) > MAX_MATRIX_SEGMENTS:
                raise QueryError(f"segment matrix would have {len(segs)} rows/columns (limit {MAX_MATRIX_SEGMENTS}); "
                                 "pass ids=... or use partners()/synapses() with paging")
            for col in ("pre_group", "post_group"):
                edges[col] = edges[col].astype("uint64")
        matrix = edges.pivot_table(index="pre_group", columns="post_group", values="n", aggfunc="sum", fill_value=0)
        labels = sorted(set(matrix.index) | set(matrix.columns), key=lambda x: (x == UNTYPED, x))
        matrix = matrix.reindex(index=labels, columns=labels, fill_value=0).astype("int64")
        matrix.index.name, matrix.columns.name = "pre", "post"
        if normalize == "post_total":
            totals = matrix.sum(axis=0)
            matrix = matrix.div(totals.where(totals > 0, 1), axis=1).astype("float64")
        matrix.attrs["version"] = v
        matrix.attrs["group_by"] = group_by
        matrix.attrs["normalize"] = normalize
        matrix.attrs["min_synapses"] = n_min
        matrix.attrs["next_after"] = None
        matrix.attrs["complete"] = True
        return matrix

    # ------------------------------------------------------------ proofreading
    def merge(self, a, b, *, user: str | None = None):
        """Merge segments a and b into a new segment at a new version (see edits.py)."""
        from storage.store import edits

        return edits.merge(self.backend, _as_id(a, "a"), _as_id(b, "b"), user=user)

    def split(self, segment_id, fragments_a, fragments_b, *, user: str | None = None):
        """Split a segment into two new segments by its fragments (supervoxels) at a new version."""
        from storage.store import edits

        return edits.split(self.backend, _as_id(segment_id, "segment_id"), _as_ids(fragments_a, "fragments_a"),
                           _as_ids(fragments_b, "fragments_b"), user=user)

    def undo(self, *, user: str | None = None):
        """Revert the latest edit not yet undone, as a new version (history is kept)."""
        from storage.store import edits

        return edits.undo(self.backend, user=user)

    def edits(self) -> pd.DataFrame:
        """The proofreading log: edit_id, version, kind, user_name, created_at, target_edit_id, details (JSON)."""
        return self.backend.query("SELECT * FROM edits ORDER BY edit_id")

    def fragments(self, segment_id, *, version=None) -> list[int]:
        """Fragment (supervoxel) ids of a segment at a version."""
        v = self._v(version)
        return self._fragments(v, [_as_id(segment_id, "segment_id")], "segment_id")
