"""Proofreading edits: merge, split (by fragments) and undo, each a new committed version.

Why through the id map: synapses and other annotations reference fragments (supervoxels), so an edit only
closes and adds ``id_map`` rows (plus the handful of per-segment rows in ``segments`` and ``cell_types``). A merge
also carries the parts' skeleton nodes and node embeddings to the new id (the parts' geometry is unchanged) and
joins the two skeletons with one edge between their closest nodes, so the merged cell is one tree at once; a
split hands each node (and its embedding) to the part holding the node's fragment (``skeleton_nodes.fragment_id``,
recorded by the skeleton stage) and cuts the edges between the parts. Every
old version stays queryable; a segment id always denotes the same set of fragments (edits mint new ids, like
CAVE root ids), and undo is a further version that restores the touched keys to their state before the edit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from storage.errors import QueryError
from storage.store import versions
from storage.store.sql import Sql


@dataclass(frozen=True)
class EditResult:
    """What an edit did. ``int(result)`` is the new version, so it can be passed as ``version=``."""

    version: int
    kind: str
    edit_id: int
    segments_before: list[int] = field(default_factory=list)
    segments_after: list[int] = field(default_factory=list)

    def __int__(self) -> int:
        return self.version

    def __index__(self) -> int:
        return self.version


def _latest(tx) -> int:
    return int(versions.scalar(tx.query("SELECT max(version) AS v FROM versions WHERE status = 'committed'")))


def _next_id(tx) -> int:
    best = 0
    for sql in ("SELECT max(segment_id) AS x FROM segments", "SELECT max(segment_id) AS x FROM id_map",
                "SELECT max(fragment_id) AS x FROM id_map"):
        x = versions.scalar(tx.query(sql))
        if x is not None:
            best = max(best, int(x))
    return best + 1


def _rows(tx, dialect: str, table: str, key: str, ids: list[int], v: int):
    q = Sql(dialect)
    return tx.query(f"SELECT * FROM {table} t WHERE {q.visible('t', v)} AND {q.in_list('t.' + key, ids)} "
                    f"ORDER BY t.{key}", q.params)


def _close(tx, dialect: str, table: str, key: str, ids: list[int], new_version: int) -> None:
    q = Sql(dialect)
    tx.execute(f"UPDATE {table} SET version_to = {q.p(new_version)} WHERE version_to IS NULL AND "
               f"{q.in_list(key, ids)}", q.params)


def _insert(tx, table: str, rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    q = Sql("x")
    values = ", ".join("(" + ", ".join(q.p(r[c]) for c in cols) + ")" for r in rows)
    tx.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES {values}", q.params)


def _log(tx, version: int, kind: str, user, details: dict, target: int | None = None) -> int:
    x = versions.scalar(tx.query("SELECT max(edit_id) AS x FROM edits"))
    edit_id = 1 if x is None else int(x) + 1
    _insert(tx, "edits", [{"edit_id": edit_id, "version": version, "kind": kind, "user_name": user,
                           "created_at": versions.now(), "target_edit_id": target,
                           "details": json.dumps(details, sort_keys=True)}])
    return edit_id


def _num(x):
    return None if pd.isna(x) else x


def _exists(tx, dialect: str, v: int, ids: list[int]) -> None:
    q = Sql(dialect)
    df = tx.query(
        f"SELECT s.segment_id FROM segments s WHERE {q.visible('s', v)} AND {q.in_list('s.segment_id', ids)} "
        f"UNION SELECT i.segment_id FROM id_map i WHERE {q.visible('i', v)} AND {q.in_list('i.segment_id', ids)}",
        q.params)
    missing = sorted(set(ids) - {int(x) for x in df["segment_id"]})
    if missing:
        raise QueryError(f"unknown segment id(s) at version {v}: {missing}")


def _inherit_types(tx, dialect: str, v: int, sources: list[int], sizes: dict[int, int], new_ids: list[int],
                   nv: int, how: str) -> None:
    """New segments take the cell type (per classification system) of their largest source segment."""
    ct = _rows(tx, dialect, "cell_types", "segment_id", sources, v)
    if ct.empty:
        return
    ct["size"] = [sizes.get(int(s), 0) or 0 for s in ct["segment_id"]]
    ct["first"] = [sources.index(int(s)) for s in ct["segment_id"]]
    best = ct.sort_values(["size", "first"], ascending=[False, True]).groupby("classification_system").head(1)
    _close(tx, dialect, "cell_types", "segment_id", sources, nv)
    rows = []
    for new in new_ids:
        for r in best.itertuples():
            rows.append({"segment_id": new, "cell_type": r.cell_type, "confidence": _num(r.confidence),
                         "classification_system": r.classification_system, "source": f"edit:{how}",
                         "version_from": nv, "version_to": None})
    _insert(tx, "cell_types", rows)


def _node_shifts(tx, dialect: str, sources: list[int], v: int) -> dict[int, int]:
    """Per merged segment, what its node ids are shifted by so they stay unique in the new segment: past the
    previous parts' largest node id in either per-node table (one shift for both, so an embedding keeps
    pointing at its node)."""
    q = Sql(dialect)
    top = tx.query(" UNION ALL ".join(
        f"SELECT t.segment_id, max(t.node_id) AS m FROM {table} t WHERE {q.visible('t', v)} AND "
        f"{q.in_list('t.segment_id', sources)} GROUP BY t.segment_id" for table in ("skeleton_nodes", "embeddings")),
        q.params)
    last: dict[int, int] = {}
    for r in top.dropna().itertuples():
        last[int(r.segment_id)] = max(last.get(int(r.segment_id), -1), int(r.m))
    shift, offset = {}, 0
    for s in sources:
        shift[s] = offset
        offset += last.get(s, -1) + 1
    return shift


def _carry_nodes(tx, dialect: str, table: str, shift: dict[int, int], new: int, v: int, nv: int) -> None:
    """Re-key the per-node rows (skeleton nodes, node embeddings) of merged segments to the new segment, node ids
    shifted by ``shift`` (parent ids with them).

    A merge adds no voxels, so each part's skeleton and node embeddings stay valid. Whole-segment rows (node_id
    NULL: aggregate embeddings) describe one part only and are not carried. Done in SQL (INSERT ... SELECT), so a
    skeleton of any size costs no round trip through Python."""
    from storage.store.schema import TABLES

    q = Sql(dialect)
    sources = list(shift)
    case = "CASE t.segment_id " + " ".join(f"WHEN {q.p(s)} THEN {q.p(shift[s])}" for s in sources) + " END"
    cols = [c for c in TABLES[table].column_names if c not in ("version_from", "version_to")]
    exprs = {c: f"t.{c}" for c in cols}
    exprs["segment_id"] = q.p(new)
    exprs["node_id"] = f"t.node_id + {case}"
    if "parent_id" in exprs:
        exprs["parent_id"] = f"t.parent_id + {case}"
    tx.execute(f"INSERT INTO {table} ({', '.join(cols)}, version_from, version_to) "
               f"SELECT {', '.join(exprs[c] for c in cols)}, {q.p(nv)}, NULL FROM {table} t "
               f"WHERE {q.visible('t', v)} AND {q.in_list('t.segment_id', sources)} AND t.node_id IS NOT NULL",
               q.params)
    _close(tx, dialect, table, "segment_id", sources, nv)


def _join_parts(tx, dialect: str, segment_id: int, first_of_b: int, nv: int) -> None:
    """Join a merged skeleton's two parts (nodes below ``first_of_b`` come from the first part) with one edge
    between their closest nodes: the second part's tree is re-rooted at its closest node (the parent pointers on
    the path to its old root reverse), whose parent becomes the first part's closest node.

    Why: a merge is a proofreader saying "these are one cell", and path lengths, compartment walks and the
    viewer's skeleton layer all need one tree; without the join the cell stays two pieces until the skeleton
    stage reruns. Only the path is rewritten, so the cost is one read of the two parts' node positions."""
    from scipy.spatial import cKDTree

    q = Sql(dialect)
    nodes = tx.query(f"SELECT node_id, parent_id, x_nm, y_nm, z_nm FROM skeleton_nodes WHERE segment_id = "
                     f"{q.p(segment_id)} AND version_from = {q.p(nv)} ORDER BY node_id", q.params)
    is_b = nodes["node_id"] >= first_of_b
    part_a, part_b = nodes[~is_b], nodes[is_b]
    if part_a.empty or part_b.empty:
        return
    xyz = ["x_nm", "y_nm", "z_nm"]
    dist, nearest = cKDTree(part_a[xyz].to_numpy(float)).query(part_b[xyz].to_numpy(float))
    k = int(dist.argmin())  # ties: the first node of b in node order (the query above is ordered)
    child, anchor = int(part_b["node_id"].iloc[k]), int(part_a["node_id"].iloc[int(nearest[k])])
    parent = dict(zip(part_b["node_id"].astype(int), part_b["parent_id"]))
    new_parent, node, up = {child: anchor}, child, parent.get(child)
    while up is not None and not pd.isna(up) and int(up) not in new_parent:  # to the old root, reversing edges
        new_parent[int(up)] = node
        node, up = int(up), parent.get(int(up))
    items = sorted(new_parent.items())
    for lo in range(0, len(items), 1000):  # bounded parameter lists, whatever the path length
        q = Sql(dialect)
        chunk = items[lo:lo + 1000]
        case = "CASE node_id " + " ".join(f"WHEN {q.p(n)} THEN {q.p(p)}" for n, p in chunk) + " END"
        tx.execute(f"UPDATE skeleton_nodes SET parent_id = {case} WHERE segment_id = {q.p(segment_id)} AND "
                   f"version_from = {q.p(nv)} AND {q.in_list('node_id', [n for n, _ in chunk])}", q.params)


def _split_nodes(tx, dialect: str, segment_id: int, parts: dict[int, list[int]], v: int, nv: int) -> None:
    """Hand each skeleton node of a split segment to the part holding the node's fragment, and its node embedding
    with it. An edge whose two nodes land in different parts is cut (the child becomes a root). Nodes without a
    fragment (skeletons made before nodes recorded one) go nowhere: those parts need the skeleton stage again."""
    from storage.store.schema import TABLES

    q = Sql(dialect)

    def part(alias: str) -> str:
        return "CASE " + " ".join(f"WHEN {q.in_list(alias + '.fragment_id', frags)} THEN {q.p(new)}"
                                  for new, frags in parts.items()) + " END"

    cols = [c for c in TABLES["skeleton_nodes"].column_names if c not in ("version_from", "version_to")]
    exprs = {c: f"t.{c}" for c in cols}
    exprs["segment_id"] = part("t")
    exprs["parent_id"] = f"CASE WHEN {part('p')} = {part('t')} THEN t.parent_id END"
    tx.execute(f"INSERT INTO skeleton_nodes ({', '.join(cols)}, version_from, version_to) "
               f"SELECT {', '.join(exprs[c] for c in cols)}, {q.p(nv)}, NULL FROM skeleton_nodes t "
               f"LEFT JOIN skeleton_nodes p ON p.segment_id = t.segment_id AND p.node_id = t.parent_id "
               f"AND {q.visible('p', v)} "
               f"WHERE {q.visible('t', v)} AND t.segment_id = {q.p(segment_id)} AND {part('t')} IS NOT NULL",
               q.params)
    q = Sql(dialect)
    cols = [c for c in TABLES["embeddings"].column_names if c not in ("version_from", "version_to")]
    exprs = {c: f"e.{c}" for c in cols}
    exprs["segment_id"] = part("t")
    tx.execute(f"INSERT INTO embeddings ({', '.join(cols)}, version_from, version_to) "
               f"SELECT {', '.join(exprs[c] for c in cols)}, {q.p(nv)}, NULL FROM embeddings e "
               f"JOIN skeleton_nodes t ON t.segment_id = e.segment_id AND t.node_id = e.node_id "
               f"AND {q.visible('t', v)} "
               f"WHERE {q.visible('e', v)} AND e.segment_id = {q.p(segment_id)} AND {part('t')} IS NOT NULL",
               q.params)
    for table in ("skeleton_nodes", "embeddings"):
        _close(tx, dialect, table, "segment_id", [segment_id], nv)


def merge(backend, a: int, b: int, *, user: str | None = None) -> EditResult:
    if a == b:
        raise QueryError(f"cannot merge segment {a} with itself")
    d = backend.dialect
    with backend.transaction() as tx:
        v = _latest(tx)
        _exists(tx, d, v, [a, b])
        nv = versions.begin(tx, "merge", f"merge {a} + {b}", user, status="committed")
        new = _next_id(tx)
        segs = _rows(tx, d, "segments", "segment_id", [a, b], v)
        sizes = {int(r.segment_id): _num(r.voxel_count) for r in segs.itertuples()}
        frags = _rows(tx, d, "id_map", "segment_id", [a, b], v)
        mapping = [(int(r.fragment_id), _num(r.voxel_count)) for r in frags.itertuples()]
        for s in (a, b):  # a segment never split into fragments is its own single fragment
            if not (frags["segment_id"] == s).any():
                mapping.append((s, sizes.get(s)))
        _close(tx, d, "id_map", "segment_id", [a, b], nv)
        _insert(tx, "id_map", [{"fragment_id": f, "segment_id": new, "voxel_count": None if c is None else int(c),
                                "version_from": nv, "version_to": None} for f, c in mapping])
        row = {"segment_id": new, "voxel_count": None, "version_from": nv, "version_to": None}
        if not segs.empty:
            vc = segs["voxel_count"]
            row["voxel_count"] = None if vc.isna().any() else int(vc.sum())
            for ax in "xyz":
                lo, hi = segs[f"bbox_min_{ax}_nm"], segs[f"bbox_max_{ax}_nm"]
                row[f"bbox_min_{ax}_nm"] = None if lo.isna().any() else int(lo.min())
                row[f"bbox_max_{ax}_nm"] = None if hi.isna().any() else int(hi.max())
                c = segs[f"centroid_{ax}_nm"]
                ok = not c.isna().any() and not vc.isna().any() and vc.sum() > 0
                row[f"centroid_{ax}_nm"] = int(round(float((c * vc).sum() / vc.sum()))) if ok else None
            _close(tx, d, "segments", "segment_id", [a, b], nv)
        _insert(tx, "segments", [row])
        _inherit_types(tx, d, v, [a, b], sizes, [new], nv, "merge")
        shift = _node_shifts(tx, d, [a, b], v)
        for table in ("skeleton_nodes", "embeddings"):
            _carry_nodes(tx, d, table, shift, new, v, nv)
        _join_parts(tx, d, new, shift[b], nv)
        details = {"segments_before": [a, b], "segments_after": [new], "fragments": sorted(f for f, _ in mapping)}
        edit_id = _log(tx, nv, "merge", user, details)
    return EditResult(nv, "merge", edit_id, [a, b], [new])


def split(backend, segment_id: int, fragments_a: list[int], fragments_b: list[int], *,
          user: str | None = None) -> EditResult:
    d = backend.dialect
    if not fragments_a or not fragments_b:
        raise QueryError(f"split of segment {segment_id}: both fragment lists must be non-empty")
    both = set(fragments_a) & set(fragments_b)
    if both:
        raise QueryError(f"split of segment {segment_id}: fragments {sorted(both)} are in both parts")
    with backend.transaction() as tx:
        v = _latest(tx)
        _exists(tx, d, v, [segment_id])
        frags = _rows(tx, d, "id_map", "segment_id", [segment_id], v)
        have = {int(r.fragment_id): _num(r.voxel_count) for r in frags.itertuples()}
        if not have:
            raise QueryError(f"segment {segment_id} has no fragments in the id map at version {v}; cannot split it")
        foreign = sorted((set(fragments_a) | set(fragments_b)) - set(have))
        if foreign:
            raise QueryError(f"split of segment {segment_id}: fragments {foreign[:10]} do not belong to it at "
                             f"version {v}")
        left = sorted(set(have) - set(fragments_a) - set(fragments_b))
        if left:
            raise QueryError(f"split of segment {segment_id}: fragments {left[:10]} are in neither part "
                             f"(it has {len(have)} fragments)")
        nv = versions.begin(tx, "split", f"split {segment_id}", user, status="committed")
        n1 = _next_id(tx)
        n2 = n1 + 1
        _close(tx, d, "id_map", "segment_id", [segment_id], nv)
        rows = [{"fragment_id": f, "segment_id": n1 if f in fragments_a else n2,
                 "voxel_count": None if have[f] is None else int(have[f]), "version_from": nv, "version_to": None}
                for f in sorted(have)]
        _insert(tx, "id_map", rows)
        segs = _rows(tx, d, "segments", "segment_id", [segment_id], v)
        sizes = {}
        for new, part in ((n1, fragments_a), (n2, fragments_b)):
            counts = [have[f] for f in part]
            sizes[new] = None if any(c is None for c in counts) else int(sum(counts))
        if not segs.empty:
            _close(tx, d, "segments", "segment_id", [segment_id], nv)
        _insert(tx, "segments", [{"segment_id": n, "voxel_count": sizes[n], "version_from": nv, "version_to": None}
                                 for n in (n1, n2)])
        ct = _rows(tx, d, "cell_types", "segment_id", [segment_id], v)
        if not ct.empty:
            _close(tx, d, "cell_types", "segment_id", [segment_id], nv)
            _insert(tx, "cell_types", [
                {"segment_id": n, "cell_type": r.cell_type, "confidence": _num(r.confidence),
                 "classification_system": r.classification_system, "source": "edit:split",
                 "version_from": nv, "version_to": None} for n in (n1, n2) for r in ct.itertuples()])
        _split_nodes(tx, d, segment_id, {n1: sorted(fragments_a), n2: sorted(fragments_b)}, v, nv)
        details = {"segments_before": [segment_id], "segments_after": [n1, n2], "fragments": sorted(have),
                   "fragments_a": sorted(fragments_a), "fragments_b": sorted(fragments_b)}
        edit_id = _log(tx, nv, "split", user, details)
    return EditResult(nv, "split", edit_id, [segment_id], [n1, n2])


def _restore(tx, dialect: str, table: str, key: str, ids: list[int], at: int, nv: int, columns: list[str]) -> None:
    """Close the current rows of these keys and re-add their rows as they were at version ``at``."""
    if not ids:
        return
    _close(tx, dialect, table, key, ids, nv)
    q = Sql(dialect)
    cols = [c for c in columns if c not in ("version_from", "version_to")]
    tx.execute(
        f"INSERT INTO {table} ({', '.join(cols)}, version_from, version_to) "
        f"SELECT {', '.join('t.' + c for c in cols)}, {q.p(nv)}, NULL FROM {table} t "
        f"WHERE {q.visible('t', at)} AND {q.in_list('t.' + key, ids)}", q.params)


def undo(backend, *, user: str | None = None) -> EditResult:
    from storage.store.schema import TABLES

    d = backend.dialect
    with backend.transaction() as tx:
        log = tx.query("SELECT edit_id, version, kind, target_edit_id, details FROM edits ORDER BY edit_id")
        undone = {int(x) for x in log["target_edit_id"].dropna()}
        todo = log[log["kind"].isin(["merge", "split"]) & ~log["edit_id"].isin(list(undone))]
        if todo.empty:
            raise QueryError("nothing to undo: no merge or split that has not been undone")
        last = todo.iloc[-1]
        details = json.loads(last["details"])
        parent = tx.query("SELECT parent FROM versions WHERE version = $v", {"v": int(last["version"])})["parent"].iloc[0]
        parent = int(parent)
        nv = versions.begin(tx, "undo", f"undo edit {int(last['edit_id'])} ({last['kind']})", user, status="committed")
        segs = sorted(set(details["segments_before"]) | set(details["segments_after"]))
        _restore(tx, d, "id_map", "fragment_id", details["fragments"], parent, nv, TABLES["id_map"].column_names)
        _restore(tx, d, "segments", "segment_id", segs, parent, nv, TABLES["segments"].column_names)
        for table in ("cell_types", "skeleton_nodes", "embeddings"):
            _restore(tx, d, table, "segment_id", segs, parent, nv, TABLES[table].column_names)
        edit_id = _log(tx, nv, "undo", user, {"undid": int(last["edit_id"]), **details}, target=int(last["edit_id"]))
    return EditResult(nv, "undo", edit_id, list(details["segments_after"]), list(details["segments_before"]))
