"""Building SQL with bound parameters only.

Why: every value that comes from a caller (ids, cell types, scores, boxes) goes through `Sql.p()` and is bound as
a parameter; identifiers come from the fixed schema. So a hostile filter such as ``x'; DROP TABLE synapses; --``
is only ever compared as data. Placeholders are written ``$name`` (DuckDB's named style) and rewritten to
``%(name)s`` for psycopg.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sql:
    dialect: str
    params: dict[str, Any] = field(default_factory=dict)

    def p(self, value: Any) -> str:
        """Bind a value; return its placeholder."""
        name = f"p{len(self.params)}"
        self.params[name] = value
        return f"${name}"

    def in_list(self, column: str, values: list) -> str:
        """``column`` is one of ``values`` (bound as one list parameter)."""
        values = list(values)
        if not values:
            return "FALSE"
        if len(values) == 1:
            return f"{column} = {self.p(values[0])}"
        if self.dialect == "postgres":
            return f"{column} = ANY({self.p(values)})"
        return f"list_contains({self.p(values)}, {column})"

    def visible(self, alias: str, version: int) -> str:
        """Row of a versioned table is visible at ``version``."""
        v = self.p(int(version))
        return f"({alias}.version_from <= {v} AND ({alias}.version_to IS NULL OR {alias}.version_to > {v}))"


_PLACEHOLDER = re.compile(r"\$(p\d+|[a-z_]+)\b")


def to_psycopg(sql: str) -> str:
    """``$name`` -> ``%(name)s``; literal percent signs are escaped."""
    return _PLACEHOLDER.sub(r"%(\1)s", sql.replace("%", "%%"))
