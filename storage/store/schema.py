"""The connectome store schema: one definition, rendered as DDL for DuckDB and PostgreSQL.

Why a Python table of columns rather than two SQL files: both backends, the Parquet export, the writers' input
validation and the docs all read this one list, so they cannot drift apart.

Conventions (see DESIGN.md): ids are integers > 0 stored as BIGINT (they must be < 2**63 because PostgreSQL has
no unsigned type; 0 means "no segment"); positions are integer nanometres, XYZ, named ``*_nm``; ``morton`` is a
Z-order key of the position computed by the store (see ``morton.py``) so a box query is a set of range predicates.

Versioning: every annotation/mapping row carries ``version_from`` (the version that wrote it) and ``version_to``
(the version that superseded it; NULL while current). A reader at version v sees rows with
``version_from <= v AND (version_to IS NULL OR version_to > v)``. Only committed versions can be read, so a
half-finished load (a pending version) is invisible and the previous version stays intact.

Annotations (synapses) reference *fragment* ids (supervoxels / pre-agglomeration ids); ``id_map`` maps fragment ->
segment per version. Proofreading and re-segmentation therefore rewrite only ``id_map`` (and the small per-segment
tables), never the synapse rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # logical type: id, int, pos, float, text, bool, time, floatlist
    nullable: bool = True
    doc: str = ""


# logical type -> (duckdb, postgres, arrow)
TYPES: dict[str, tuple[str, str, pa.DataType]] = {
    "id": ("BIGINT", "BIGINT", pa.int64()),
    "int": ("BIGINT", "BIGINT", pa.int64()),
    "version": ("INTEGER", "INTEGER", pa.int32()),
    "pos": ("INTEGER", "INTEGER", pa.int32()),
    "float": ("REAL", "REAL", pa.float32()),
    "text": ("VARCHAR", "TEXT", pa.string()),
    "bool": ("BOOLEAN", "BOOLEAN", pa.bool_()),
    "time": ("TIMESTAMP", "TIMESTAMP", pa.timestamp("us")),
    "floatlist": ("FLOAT[]", "REAL[]", pa.list_(pa.float32())),
}

VERSION_COLUMNS = (
    Column("version_from", "version", False, "version that wrote this row (filled by the store)"),
    Column("version_to", "version", True, "version that superseded this row; NULL while current (filled by the store)"),
)


def _xyz(prefix: str, doc: str, nullable: bool = True) -> tuple[Column, ...]:
    return tuple(Column(f"{prefix}{a}_nm", "pos", nullable, f"{doc} {a} (nm)") for a in "xyz")


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]  # writing the same key at a later version supersedes the older row
    required: tuple[str, ...]  # input columns a writer must pass
    versioned: bool = True
    doc: str = ""

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, TYPES[c.type][2], nullable=c.nullable) for c in self.columns])

    def input_columns(self) -> list[str]:
        """Columns a writer may pass (everything except what the store computes)."""
        return [c for c in self.column_names if c not in ("version_from", "version_to", "morton")]


TABLES: dict[str, Table] = {}


def _table(t: Table) -> Table:
    TABLES[t.name] = t
    return t


VERSIONS = _table(Table(
    "versions",
    (
        Column("version", "version", False, "version number, increasing"),
        Column("parent", "version", True, "version this one was derived from"),
        Column("kind", "text", False, "load | merge | split | undo"),
        Column("status", "text", False, "pending | committed | aborted"),
        Column("description", "text"),
        Column("user_name", "text"),
        Column("created_at", "time"),
        Column("committed_at", "time"),
    ),
    key=("version",), required=(), versioned=False,
    doc="One row per version; only committed versions can be read.",
))

LOAD_BATCHES = _table(Table(
    "load_batches",
    (
        Column("version", "version", False),
        Column("table_name", "text", False),
        Column("batch_key", "text", False, "content hash (or caller key) of the batch"),
        Column("n_rows", "int", False),
        Column("written_at", "time"),
    ),
    key=("version", "table_name", "batch_key"), required=(), versioned=False,
    doc="Written in the same transaction as a batch's rows, so a retried batch is skipped, never duplicated.",
))

SEGMENTS = _table(Table(
    "segments",
    (
        Column("segment_id", "id", False, "segment id (> 0)"),
        Column("voxel_count", "int"),
        *_xyz("bbox_min_", "bounding box start"),
        *_xyz("bbox_max_", "bounding box stop (exclusive)"),
        *_xyz("centroid_", "centroid"),
        *VERSION_COLUMNS,
    ),
    key=("segment_id",), required=("segment_id",),
    doc="One row per segment (cell or fragment of one) at the versions it exists.",
))

CELL_TYPES = _table(Table(
    "cell_types",
    (
        Column("segment_id", "id", False),
        Column("cell_type", "text", False),
        Column("confidence", "float"),
        Column("classification_system", "text", False, "vocabulary, e.g. 'default', 'valence'"),
        Column("source", "text", False, "who said so: 'model:<name>' or 'person:<name>'"),
        *VERSION_COLUMNS,
    ),
    key=("segment_id", "classification_system"), required=("segment_id", "cell_type"),
    doc="Cell type per segment and classification system.",
))

SKELETON_NODES = _table(Table(
    "skeleton_nodes",
    (
        Column("segment_id", "id", False),
        Column("node_id", "id", False),
        *_xyz("", "node position", nullable=False),
        Column("radius_nm", "float"),
        Column("parent_id", "id", True, "parent node id; NULL for the root"),
        Column("compartment", "text", True, "axon | dendrite | soma | ..."),
        Column("compartment_confidence", "float"),
        Column("fragment_id", "id", True, "fragment (supervoxel) under the node: a split hands the node to the part "
                                          "holding it"),
        Column("morton", "int", False, "Z-order key of the position (computed by the store)"),
        *VERSION_COLUMNS,
    ),
    key=("segment_id",), required=("segment_id", "node_id", "x_nm", "y_nm", "z_nm"),
    doc="Skeleton nodes; writing a segment's nodes at a later version replaces its whole skeleton.",
))

SYNAPSES = _table(Table(
    "synapses",
    (
        Column("synapse_id", "id", False, "stable synapse id"),
        Column("pre_fragment_id", "id", False, "fragment (supervoxel) at the presynaptic site; 0 = none"),
        Column("post_fragment_id", "id", False, "fragment (supervoxel) at the postsynaptic site; 0 = none"),
        *_xyz("", "cleft centre", nullable=False),
        *_xyz("pre_", "presynaptic point"),
        *_xyz("post_", "postsynaptic point"),
        Column("size_voxels", "int", True, "cleft size in voxels"),
        Column("score", "float", True, "detector score"),
        Column("valid", "bool", False, "detector verdict (not a duplicate); autapses/partner 0 are judged per version"),
        Column("morton", "int", False, "Z-order key of the cleft centre (computed by the store)"),
        *VERSION_COLUMNS,
    ),
    key=("synapse_id",), required=("synapse_id", "x_nm", "y_nm", "z_nm"),
    doc="Synapse annotations; segments are resolved through id_map at the version asked.",
))

EMBEDDINGS = _table(Table(
    "embeddings",
    (
        Column("segment_id", "id", False),
        Column("node_id", "id", True, "skeleton node; NULL = whole-segment aggregate"),
        Column("model", "text", False, "embedding model name"),
        Column("vector", "floatlist", True, "the vector inline, or NULL when stored in a file set"),
        Column("uri", "text", True, "file set holding the vector (when not inline)"),
        Column("row_index", "int", True, "row of the vector in the file at uri"),
        *VERSION_COLUMNS,
    ),
    key=("segment_id",), required=("segment_id", "model"),
    doc="SegCLR embeddings, inline or by reference to a sharded file set.",
))

ID_MAP = _table(Table(
    "id_map",
    (
        Column("fragment_id", "id", False, "fragment / supervoxel id"),
        Column("segment_id", "id", False, "segment the fragment belongs to at these versions"),
        Column("voxel_count", "int", True, "fragment size in voxels (lets a split compute segment sizes)"),
        *VERSION_COLUMNS,
    ),
    key=("fragment_id",), required=("fragment_id", "segment_id"),
    doc="fragment -> segment per version; edits and re-segmentation rewrite only this mapping.",
))

EDITS = _table(Table(
    "edits",
    (
        Column("edit_id", "version", False),
        Column("version", "version", False, "version the edit produced"),
        Column("kind", "text", False, "merge | split | undo"),
        Column("user_name", "text"),
        Column("created_at", "time"),
        Column("target_edit_id", "version", True, "for undo: the edit undone"),
        Column("details", "text", True, "JSON: segments/fragments before and after"),
    ),
    key=("edit_id",), required=(), versioned=False,
    doc="Proofreading log (who, when, what).",
))

# Tables whose rows writers load in batches.
WRITABLE = ("segments", "cell_types", "skeleton_nodes", "synapses", "embeddings", "id_map")

# PostgreSQL b-tree indexes: (table, column). DuckDB gets none: it answers from zone maps (min/max per row group)
# of physically ordered data instead (see DuckDBBackend.cluster), since its ART indexes are not used for scans
# with more than one filter.
INDEXES: tuple[tuple[str, str], ...] = (
    ("synapses", "pre_fragment_id"),
    ("synapses", "post_fragment_id"),
    ("synapses", "morton"),
    ("id_map", "segment_id"),
    ("id_map", "fragment_id"),
    ("segments", "segment_id"),
    ("cell_types", "segment_id"),
    ("skeleton_nodes", "segment_id"),
    ("embeddings", "segment_id"),
)

SCHEMA_VERSION = 2  # 2: skeleton_nodes.fragment_id


def missing_columns_sql(dialect: str, existing: dict[str, set[str]]) -> list[str]:
    """ALTER TABLE statements adding the columns a store made by an older schema lacks (``existing``: table ->
    its column names). Only nullable columns are ever added to the schema, so old rows read as NULL there."""
    i = 0 if dialect == "duckdb" else 1
    out = []
    for t in TABLES.values():
        have = existing.get(t.name)
        if not have:
            continue
        for c in t.columns:
            if c.name not in have:
                assert c.nullable, f"schema: new column {t.name}.{c.name} must be nullable"
                out.append(f"ALTER TABLE {t.name} ADD COLUMN {c.name} {TYPES[c.type][i]}")
    return out


def create_table_sql(table: Table, dialect: str, name: str | None = None) -> str:
    i = 0 if dialect == "duckdb" else 1
    cols = ", ".join(f"{c.name} {TYPES[c.type][i]}{'' if c.nullable else ' NOT NULL'}" for c in table.columns)
    return f"CREATE TABLE IF NOT EXISTS {name or table.name} ({cols})"


def ddl(dialect: str) -> list[str]:
    """CREATE TABLE statements for 'duckdb' or 'postgres'."""
    i = 0 if dialect == "duckdb" else 1
    out = [create_table_sql(t, dialect) for t in TABLES.values()]
    out.append("CREATE TABLE IF NOT EXISTS store_meta (key VARCHAR PRIMARY KEY, value VARCHAR)"
               if i == 0 else "CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT)")
    return out


def index_ddl(dialect: str) -> list[str]:
    return [f"CREATE INDEX IF NOT EXISTS idx_{t}_{c} ON {t} ({c})" for t, c in INDEXES]


def markdown() -> str:
    """The schema as a Markdown table (for docs and the team's STORE_SCHEMA.md)."""
    lines = []
    for t in TABLES.values():
        lines.append(f"### {t.name}\n{t.doc}\n\n| column | type | null | meaning |\n|---|---|---|---|")
        for c in t.columns:
            lines.append(f"| {c.name} | {TYPES[c.type][0]} | {'yes' if c.nullable else 'no'} | {c.doc} |")
        lines.append("")
    return "\n".join(lines)
