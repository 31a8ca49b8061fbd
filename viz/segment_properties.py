"""Segment properties (``neuroglancer_segment_properties``, inline) from a per-segment table.

Columns used when present (one row per segment): ``segment_id`` (required), ``label`` (shown next to the
id), ``description``, ``cell_type`` (tags, so the viewer's segment list filters by ``#type``),
``cell_type_confidence``, ``voxel_count``, ``synapses_in``, ``synapses_out`` (numbers), plus any other
numeric column. Tags may not contain spaces or ``#`` and match case-insensitively, so cell types are
normalised (``"Mi1 neuron" -> "Mi1_neuron"``) and the original names kept as ``tag_descriptions``.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np
import pandas as pd

from storage.errors import ConnectomeError
from viz.kvstore import write_json

NUMBER_COLUMNS = ("cell_type_confidence", "voxel_count", "synapses_in", "synapses_out")
_RANGES = {
    "uint8": (0, 2**8 - 1), "int8": (-(2**7), 2**7 - 1), "uint16": (0, 2**16 - 1), "int16": (-(2**15), 2**15 - 1),
    "uint32": (0, 2**32 - 1), "int32": (-(2**31), 2**31 - 1),
}


def tag_name(cell_type: str) -> str:
    tag = re.sub(r"[\s#]+", "_", str(cell_type).strip())
    return tag or "unnamed"


def _number_type(values: pd.Series) -> str:
    """The smallest Neuroglancer number type that holds these values exactly (float32 otherwise)."""
    v = values.dropna()
    if v.empty or not np.all(np.equal(np.mod(v.to_numpy(np.float64), 1), 0)):
        return "float32"
    lo, hi = float(v.min()), float(v.max())
    for name in ("uint32", "int32"):
        a, b = _RANGES[name]
        if a <= lo and hi <= b:
            return name
    return "float32"


def _json_number(x: Any, data_type: str) -> float | int:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return 0
    return int(x) if data_type != "float32" else float(x)


def build_segment_properties(table: pd.DataFrame) -> dict:
    if "segment_id" not in table.columns:
        raise ConnectomeError(f"segment properties table lacks column segment_id (has {list(table.columns)})")
    table = table.drop_duplicates("segment_id").sort_values("segment_id")
    ids = [str(int(i)) for i in table["segment_id"]]
    if any(int(i) <= 0 for i in ids):
        raise ConnectomeError("segment properties: segment ids must be positive (0 is background)")
    properties: list[dict[str, Any]] = []
    if "label" in table:
        properties.append({"id": "label", "type": "label", "values": [("" if pd.isna(v) else str(v)) for v in table["label"]]})
    if "description" in table:
        properties.append(
            {"id": "description", "type": "description",
             "values": [("" if pd.isna(v) else str(v)) for v in table["description"]]}
        )
    if "cell_type" in table:
        names = sorted({str(v) for v in table["cell_type"].dropna()})
        tags: list[str] = []
        index: dict[str, int] = {}
        for name in names:
            tag = tag_name(name)
            if tag.lower() not in {t.lower() for t in tags}:
                tags.append(tag)
            index[name] = [t.lower() for t in tags].index(tag.lower())
        descriptions = [", ".join(n for n in names if index[n] == i) for i in range(len(tags))]
        properties.append(
            {"id": "cell_type", "type": "tags", "tags": tags, "tag_descriptions": descriptions,
             "values": [([] if pd.isna(v) else [index[str(v)]]) for v in table["cell_type"]]}
        )
    numeric = [c for c in NUMBER_COLUMNS if c in table] + [
        c for c in table.columns
        if c not in NUMBER_COLUMNS and c not in ("segment_id", "label", "description", "cell_type")
        and pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c])
    ]
    for column in numeric:
        data_type = "float32" if column == "cell_type_confidence" else _number_type(table[column])
        properties.append(
            {"id": column, "type": "number", "data_type": data_type, "description": column.replace("_", " "),
             "values": [_json_number(v, data_type) for v in table[column].tolist()]}
        )
    return {"@type": "neuroglancer_segment_properties", "inline": {"ids": ids, "properties": properties}}


def write_segment_properties(dest: str | os.PathLike, table: pd.DataFrame) -> dict:
    """Write ``<dest>/info``; reference it from the segmentation with ``segment_properties``."""
    info = build_segment_properties(table)
    write_json(dest, "info", info)
    return info
