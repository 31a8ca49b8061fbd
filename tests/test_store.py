"""Connectome store: the same query, edit and error tests on DuckDB and on a real PostgreSQL server."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import Connectome
from storage.errors import ConnectomeError, QueryError
from storage.store import ConnectomeStore, morton, schema
from storage.store.synthetic import pandas_reference, synthetic_connectome

N_CELLS, N_SYN = 120, 3000
HOSTILE = "x'; DROP TABLE synapses; --"


def load(store: ConnectomeStore, tables: dict, batches: int = 3) -> int:
    with store.loading("synthetic") as v:
        for name in ("segments", "cell_types", "id_map", "skeleton_nodes"):
            if name in tables:
                getattr(store, f"write_{name}")(tables[name], version=v)
        syn = tables["synapses"]
        step = -(-syn.num_rows // batches)
        for start in range(0, syn.num_rows, step):
            store.write_synapses(syn.slice(start, step), version=v)
    return v


def new_store(request, tmp_path, name="store") -> ConnectomeStore:
    if request.param == "duckdb":
        return ConnectomeStore.create(tmp_path / f"{name}.duckdb", threads=1)
    server = request.getfixturevalue("postgres_server")
    return ConnectomeStore.create(server.new_database())


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_store(request, tmp_path):
    store = new_store(request, tmp_path)
    yield store
    store.close()


@pytest.fixture(scope="module")
def tables():
    return synthetic_connectome(N_CELLS, N_SYN, fragments_per_segment=2, seed=3)


@pytest.fixture(scope="module", params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def loaded(request, tmp_path_factory, tables):
    """A store loaded once per module and backend, for read-only tests."""
    tmp = tmp_path_factory.mktemp(f"store-{request.param}")
    store = new_store(request, tmp)
    load(store, tables)
    yield store
    store.close()


@pytest.fixture(scope="module")
def reference(tables):
    return pandas_reference(tables)


# ------------------------------------------------------------------ schema and Morton keys

def test_schema_has_every_design_table_with_typed_positions():
    for name in ("segments", "cell_types", "skeleton_nodes", "synapses", "embeddings", "edits", "versions", "id_map"):
        assert name in schema.TABLES
    syn = schema.SYNAPSES
    assert syn.column("x_nm").type == "pos" and syn.column("morton").type == "int"
    assert all("INTEGER" in s or "BIGINT" in s for s in schema.ddl("postgres")[:1] + schema.ddl("duckdb")[:1])
    assert "| pre_fragment_id | BIGINT |" in schema.markdown()


@settings(max_examples=40, deadline=None)
@given(st.tuples(*[st.integers(0, 60_000)] * 3), st.tuples(*[st.integers(1, 30_000)] * 3))
def test_morton_box_ranges_cover_every_point_in_the_box(lo, size):
    hi = tuple(a + s for a, s in zip(lo, size))
    rng = np.random.default_rng(sum(lo))
    pts = rng.integers(0, 100_000, (3, 3000))
    keys = morton.encode(*pts)
    inside = np.all([(pts[i] >= lo[i]) & (pts[i] < hi[i]) for i in range(3)], axis=0)
    covered = np.zeros(len(keys), bool)
    ranges = morton.box_ranges(lo, hi)
    assert len(ranges) <= 64
    for a, b in ranges:
        covered |= (keys >= a) & (keys <= b)
    assert not np.any(inside & ~covered)


# ------------------------------------------------------------------ queries against a pandas reference

def test_cells_filters_match_reference(loaded, reference):
    cells, _ = reference
    assert isinstance(loaded, Connectome)
    df = loaded.cells(cell_type="basket")
    assert df.attrs["version"] == loaded.version
    assert list(df["segment_id"]) == sorted(cells.loc[cells.cell_type == "basket", "segment_id"])
    big = loaded.cells(min_voxels=500_000)
    assert set(big["segment_id"]) == set(cells.loc[cells.voxel_count >= 500_000, "segment_id"])
    some = loaded.cells(ids=[3, 1, 2])
    assert list(some["segment_id"]) == [1, 2, 3] and some["segment_id"].dtype == np.uint64
    counts = loaded.cell_type_counts()
    ref = cells["cell_type"].value_counts()
    assert dict(zip(counts["cell_type"], counts["n_cells"])) == ref.to_dict()


def _valid(syn: pd.DataFrame) -> pd.DataFrame:
    ok = syn.valid & (syn.pre_segment_id != syn.post_segment_id) & (syn.pre_segment_id != 0) & (syn.post_segment_id != 0)
    return syn[ok]


def test_synapse_filters_match_reference(loaded, reference):
    cells, syn = reference
    syn = _valid(syn)
    df = loaded.synapses(pre=7)
    assert list(df["synapse_id"]) == sorted(syn.loc[syn.pre_segment_id == 7, "synapse_id"])
    assert (df["pre_segment_id"] == 7).all() and df["synapse_id"].is_monotonic_increasing
    df = loaded.synapses(post=[7, 8], min_score=0.5)
    want = syn[syn.post_segment_id.isin([7, 8]) & (syn.score >= 0.5)]
    assert list(df["synapse_id"]) == sorted(want["synapse_id"])
    types = cells.set_index("segment_id")["cell_type"]
    df = loaded.synapses(pre_type="basket", post_type="pyramidal")
    want = syn[(syn.pre_segment_id.map(types) == "basket") & (syn.post_segment_id.map(types) == "pyramidal")]
    assert list(df["synapse_id"]) == sorted(want["synapse_id"]) and len(df) > 0
    lo, hi = (40_000, 30_000, 20_000), (120_000, 150_000, 160_000)
    df = loaded.synapses(bbox=(lo, hi))
    inside = np.all([(syn[f"{a}_nm"] >= lo[i]) & (syn[f"{a}_nm"] < hi[i]) for i, a in enumerate("xyz")], axis=0)
    assert list(df["synapse_id"]) == sorted(syn.loc[inside, "synapse_id"]) and len(df) > 0
    everything = loaded.synapses(pre=7, valid_only=False)
    assert len(everything) >= len(loaded.synapses(pre=7))


def test_partners_and_connectivity_match_reference(loaded, reference):
    cells, syn = reference
    syn = _valid(syn)
    out = loaded.partners(9, direction="out")
    want = syn[syn.pre_segment_id == 9].groupby("post_segment_id").size()
    assert dict(zip(out["partner_id"], out["n_synapses"])) == want.to_dict()
    assert list(out["n_synapses"]) == sorted(out["n_synapses"], reverse=True)
    inp = loaded.partners(9, direction="in", min_synapses=2)
    want = syn[syn.post_segment_id == 9].groupby("pre_segment_id").size()
    assert dict(zip(inp["partner_id"], inp["n_synapses"])) == want[want >= 2].to_dict()

    types = cells.set_index("segment_id")["cell_type"].fillna("untyped")
    m = loaded.connectivity(group_by="cell_type")
    ref = syn.assign(pre=syn.pre_segment_id.map(types).fillna("untyped"),
                     post=syn.post_segment_id.map(types).fillna("untyped")).groupby(["pre", "post"]).size()
    assert m.attrs["version"] == loaded.version
    for (a, b), n in ref.items():
        assert m.loc[a, b] == n
    assert m.to_numpy().sum() == len(syn)
    norm = loaded.connectivity(normalize="post_total")
    np.testing.assert_allclose(norm.sum(axis=0)[m.sum(axis=0) > 0], 1.0)
    strong = loaded.connectivity(min_synapses=2)
    pairs = syn.groupby(["pre_segment_id", "post_segment_id"]).size()
    assert strong.to_numpy().sum() == pairs[pairs >= 2].sum()
    seg = loaded.connectivity(group_by="segment", ids=[1, 2, 3, 4, 5, 6, 7, 8, 9])
    sub = syn[syn.pre_segment_id.isin(range(1, 10)) & syn.post_segment_id.isin(range(1, 10))]
    assert seg.to_numpy().sum() == len(sub)


def test_pagination_is_deterministic_and_complete(loaded):
    full = loaded.synapses(post_type="basket")
    pages, after = [], None
    while True:
        page = loaded.synapses(post_type="basket", limit=37, after=after)
        pages.append(page)
        after = page.attrs["next_after"]
        if after is None:
            assert page.attrs["complete"]
            break
        assert not page.attrs["complete"] and len(page) == 37
    joined = pd.concat(pages, ignore_index=True)
    pd.testing.assert_frame_equal(joined, full.reset_index(drop=True), check_like=False)
    by_cell = loaded.synapses(pre=[7, 8, 9], valid_only=False)
    page1 = loaded.synapses(pre=[7, 8, 9], valid_only=False, limit=5)
    page2 = loaded.synapses(pre=[7, 8, 9], valid_only=False, limit=1000, after=page1.attrs["next_after"])
    assert page2.attrs["complete"] and list(page1["synapse_id"]) + list(page2["synapse_id"]) == list(
        by_cell["synapse_id"])
    first = loaded.cells(limit=10)
    assert len(first) == 10 and first.attrs["next_after"] == int(first["segment_id"].iloc[-1])
    assert int(loaded.cells(limit=10, after=first.attrs["next_after"])["segment_id"].iloc[0]) > 10 - 1


# ------------------------------------------------------------------ errors and hostile input

@pytest.mark.parametrize("call, message", [
    (lambda c: c.synapses(pre=10**9), "unknown pre segment id"),
    (lambda c: c.cells(ids=[1, 10**9]), "unknown ids segment id"),
    (lambda c: c.partners(10**9), "unknown pre segment id"),
    (lambda c: c.cells(cell_type="no-such-type"), "unknown cell type"),
    (lambda c: c.cells(cell_type=HOSTILE), "unknown cell type"),
    (lambda c: c.synapses(pre_type=HOSTILE), "unknown pre_type"),
    (lambda c: c.cells(classification_system=HOSTILE), "unknown classification_system"),
    (lambda c: c.synapses(pre=HOSTILE), "must be an integer"),
    (lambda c: c.synapses(pre=-3), "out of range"),
    (lambda c: c.synapses(bbox=((10, 10, 10), (5, 20, 20))), "empty"),
    (lambda c: c.synapses(bbox="everything"), "bbox"),
    (lambda c: c.synapses(limit=0), "limit"),
    (lambda c: c.synapses(min_score="high"), "min_score"),
    (lambda c: c.cells(version=999), "unknown version 999"),
    (lambda c: c.partners(1, direction="sideways"), "direction"),
    (lambda c: c.connectivity(group_by="colour"), "group_by"),
    (lambda c: c.connectivity(normalize="pre_total"), "normalize"),
])
def test_bad_queries_raise_one_clear_query_error(loaded, call, message):
    with pytest.raises(QueryError, match=message):
        call(loaded)
    assert loaded.backend.query("SELECT count(*) AS n FROM synapses")["n"].iloc[0] == N_SYN


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=40), number=st.one_of(st.integers(), st.floats(allow_nan=True), st.text()))
def test_fuzzed_filter_values_are_data_never_sql(loaded, text, number):
    for call in (lambda: loaded.cells(cell_type=text), lambda: loaded.synapses(post_type=[text, "basket"]),
                 lambda: loaded.cells(min_voxels=number), lambda: loaded.synapses(pre=number),
                 lambda: loaded.cell_type_counts(classification_system=text)):
        try:
            result = call()
            assert isinstance(result, pd.DataFrame)
        except QueryError:
            pass
    assert loaded.backend.query("SELECT count(*) AS n FROM synapses")["n"].iloc[0] == N_SYN


def test_writer_rejects_bad_batches_with_clear_messages(empty_store):
    with pytest.raises(ConnectomeError, match="unknown column"):
        empty_store.write_segments(pd.DataFrame({"segment_id": [1], "colour": ["red"]}))
    with pytest.raises(ConnectomeError, match="missing required"):
        empty_store.write_cell_types(pd.DataFrame({"segment_id": [1]}))
    with pytest.raises(ConnectomeError, match="2\\*\\*63"):
        empty_store.write_segments(pa_table({"segment_id": np.array([2**63 + 5], np.uint64)}))
    with pytest.raises(ConnectomeError, match="out of range"):
        empty_store.write_synapses(pd.DataFrame({"synapse_id": [1], "pre_segment_id": [1], "post_segment_id": [2],
                                                 "x_nm": [-5], "y_nm": [0], "z_nm": [0]}))


def pa_table(cols):
    import pyarrow as pa

    return pa.table(cols)


# ------------------------------------------------------------------ proofreading through the id map

def test_merge_split_undo_make_versions_without_rewriting_synapses(empty_store, tables):
    c = empty_store
    v1 = load(c, tables)
    syn_rows = c.backend.query("SELECT * FROM synapses ORDER BY synapse_id")
    before_a, before_b = c.synapses(pre=5), c.synapses(pre=6)
    type_a = c.cells(ids=5)["cell_type"].iloc[0]

    merged = c.merge(5, 6, user="alice")
    (new,) = merged.segments_after
    assert merged.version == v1 + 1 and c.version == merged.version
    after = c.synapses(pre=new)
    # every synapse of 5 or 6 now comes from the merged cell, except the 5<->6 ones, which became autapses
    autapses = set(before_a.loc[before_a.post_segment_id == 6, "synapse_id"]) | set(
        before_b.loc[before_b.post_segment_id == 5, "synapse_id"])
    assert set(after["synapse_id"]) == (set(before_a["synapse_id"]) | set(before_b["synapse_id"])) - autapses
    assert set(c.synapses(pre=new, valid_only=False)["synapse_id"]) >= autapses
    with pytest.raises(QueryError, match="unknown pre segment"):
        c.synapses(pre=5)
    pd.testing.assert_frame_equal(c.synapses(pre=5, version=v1), before_a)  # old version unchanged
    merged_cell = c.cells(ids=new)
    assert merged_cell["voxel_count"].iloc[0] == sum(c.cells(ids=[5, 6], version=v1)["voxel_count"])
    assert merged_cell["cell_type"].iloc[0] in set(c.cells(ids=[5, 6], version=v1)["cell_type"])

    frags = c.fragments(new)
    assert frags == sorted(c.fragments(5, version=v1) + c.fragments(6, version=v1))
    part_a = [f for f in frags if f // 1000 == 5]
    part_b = [f for f in frags if f // 1000 == 6]
    split = c.split(new, part_a, part_b, user="bob")
    s_a, s_b = split.segments_after
    assert set(c.synapses(pre=s_a)["synapse_id"]) == set(before_a["synapse_id"])
    assert set(c.synapses(pre=s_b)["synapse_id"]) == set(before_b["synapse_id"])

    undo1 = c.undo(user="bob")  # undoes the split
    assert undo1.kind == "undo" and undo1.segments_after == [new]
    assert set(c.synapses(pre=new)["synapse_id"]) == set(after["synapse_id"])
    undo2 = c.undo(user="bob")  # undoes the merge
    pd.testing.assert_frame_equal(c.synapses(pre=5), before_a.assign())
    assert c.cells(ids=5)["cell_type"].iloc[0] == type_a
    with pytest.raises(QueryError, match="nothing to undo"):
        c.undo()
    log = c.edits()
    assert list(log["kind"]) == ["merge", "split", "undo", "undo"]
    assert list(log["user_name"]) == ["alice", "bob", "bob", "bob"]
    assert list(c.versions()["kind"])[-4:] == ["merge", "split", "undo", "undo"]
    assert undo2.version == c.version
    # the synapse annotations themselves were never rewritten
    pd.testing.assert_frame_equal(c.backend.query("SELECT * FROM synapses ORDER BY synapse_id"), syn_rows)


def test_merge_carries_skeletons_and_node_embeddings_and_undo_restores_them(empty_store, tables):
    c = empty_store
    with c.loading("synthetic") as v1:
        for name in ("segments", "cell_types", "id_map", "skeleton_nodes"):
            getattr(c, f"write_{name}")(tables[name], version=v1)
        c.write_synapses(tables["synapses"], version=v1)
        # node embeddings on a subset of the nodes (every other one, as the embed stage's spacing does)
        c.write_embeddings(pd.DataFrame({"segment_id": [5, 5, 6, 6], "node_id": [0, 2, 1, None],
                                         "model": "m", "vector": [[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [9.0, 9.0]]}),
                           version=v1)
    sk5, sk6 = c.skeleton(5), c.skeleton(6)
    assert len(sk5) == len(sk6) == 4 and sk5.attrs["version"] == v1

    (new,) = c.merge(5, 6).segments_after
    sk = c.skeleton(new)
    assert len(sk) == 8 and sk["node_id"].is_unique
    # same points, same trees: every node's parent is the same point as before the merge
    before = pd.concat([sk5, sk6])
    key = ["x_nm", "y_nm", "z_nm"]
    pd.testing.assert_frame_equal(sk.sort_values(key)[key].reset_index(drop=True),
                                  before.sort_values(key)[key].reset_index(drop=True), check_dtype=False)

    def edges(df):  # undirected, as pairs of points (node ids differ between the parts and the merged cell)
        pos = df.set_index("node_id")[key]
        kids = df.dropna(subset=["parent_id"])
        ends = zip(map(tuple, kids[key].to_numpy().tolist()),
                   map(tuple, pos.loc[kids["parent_id"].astype(int)].to_numpy().tolist()))
        return sorted(tuple(sorted(e)) for e in ends)

    # one tree: every edge of both parts (re-rooting only turns some around) plus one edge joining the parts at
    # their closest nodes
    assert sk["parent_id"].isna().sum() == 1
    p5, p6 = sk5[key].to_numpy(float), sk6[key].to_numpy(float)
    d = np.linalg.norm(p5[:, None] - p6[None], axis=2)
    i, j = np.unravel_index(d.argmin(), d.shape)
    join = tuple(sorted((tuple(sk5[key].iloc[i].tolist()), tuple(sk6[key].iloc[j].tolist()))))
    assert edges(sk) == sorted(edges(sk5) + edges(sk6) + [join])
    emb = c.backend.query(f"SELECT node_id, vector FROM embeddings WHERE segment_id = {new} AND version_to IS NULL "
                          "ORDER BY node_id")
    # node embeddings follow their node (6's node 1 comes after 5's nodes 0-3, though 5's last embedding is on
    # node 2); the 6-only aggregate does not
    assert emb["node_id"].tolist() == [0, 2, 5] and [list(x) for x in emb["vector"]][2] == [2.0, 2.0]
    node5 = sk.set_index("node_id").loc[5, key].tolist()
    assert node5 == sk6.set_index("node_id").loc[1, key].tolist()  # the node that embedding was computed at
    with pytest.raises(QueryError, match="unknown skeleton segment"):
        c.skeleton(5)
    pd.testing.assert_frame_equal(c.skeleton(5, version=v1), sk5)  # history unchanged

    c.undo()
    pd.testing.assert_frame_equal(c.skeleton(5), sk5, check_like=True)
    assert len(c.backend.query("SELECT * FROM embeddings WHERE version_to IS NULL")) == 4


def test_merge_joins_the_skeletons_at_their_closest_nodes_re_rooting_the_second(empty_store, tables):
    c = empty_store
    load(c, tables)
    # segment 1: a chain rooted at x=0 (0, 100, 200, 300); segment 2: a chain rooted at x=1000 whose leaf (x=700)
    # is its node closest to segment 1, so the join re-roots segment 2 there and turns its whole path around
    with c.loading("skeletons") as v:
        c.write_skeleton_nodes(pd.DataFrame({
            "segment_id": [1] * 4 + [2] * 4, "node_id": list(range(4)) * 2,
            "x_nm": [0, 100, 200, 300, 1000, 900, 800, 700], "y_nm": 50, "z_nm": 60,
            "parent_id": pd.array([None, 0, 1, 2, None, 0, 1, 2], dtype="Int64")}), version=v)
    (new,) = c.merge(1, 2).segments_after
    sk = c.skeleton(new).set_index("node_id")
    x = sk["x_nm"].astype(int)
    parent_x = {int(x[n]): (None if pd.isna(p) else int(x[int(p)])) for n, p in sk["parent_id"].items()}
    assert parent_x == {0: None, 100: 0, 200: 100, 300: 200, 700: 300, 800: 700, 900: 800, 1000: 900}
    c.undo()
    assert c.skeleton(2)["parent_id"].isna().tolist() == [True, False, False, False]  # the old root again


def test_split_hands_each_skeleton_node_and_embedding_to_the_part_holding_its_fragment(empty_store, tables):
    c = empty_store
    load(c, tables)
    # segment 4 (fragments 4001, 4002): a chain 0-1-2-3-4-5 whose first half lies in 4001, the rest in 4002
    with c.loading("skeletons") as v:
        c.write_skeleton_nodes(pd.DataFrame({
            "segment_id": 4, "node_id": range(6), "x_nm": [100 * i for i in range(6)], "y_nm": 50, "z_nm": 60,
            "parent_id": pd.array([None, 0, 1, 2, 3, 4], dtype="Int64"),
            "fragment_id": [4001, 4001, 4001, 4002, 4002, 4002]}), version=v)
        c.write_embeddings(pd.DataFrame({"segment_id": 4, "node_id": range(6), "model": "m",
                                         "vector": [[float(i)] for i in range(6)]}), version=v)
    before = c.skeleton(4)
    a, b = c.split(4, [4001], [4002]).segments_after
    sk_a, sk_b = c.skeleton(a), c.skeleton(b)
    assert sk_a["node_id"].tolist() == [0, 1, 2] and sk_b["node_id"].tolist() == [3, 4, 5]
    assert sk_a["parent_id"].tolist()[1:] == [0, 1] and pd.isna(sk_a["parent_id"].iloc[0])
    assert pd.isna(sk_b["parent_id"].iloc[0]) and sk_b["parent_id"].tolist()[1:] == [3, 4]  # edge 2-3 cut
    assert sk_b["x_nm"].tolist() == [300, 400, 500]
    emb = c.backend.query("SELECT segment_id, node_id, vector FROM embeddings WHERE version_to IS NULL "
                          f"AND segment_id IN ({a}, {b}) ORDER BY node_id")
    assert emb["segment_id"].tolist() == [a, a, a, b, b, b]
    assert [list(x)[0] for x in emb["vector"]] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    c.undo()
    pd.testing.assert_frame_equal(c.skeleton(4), before)


def test_a_store_made_by_the_previous_schema_is_upgraded_in_place(tmp_path, tables):
    """Schema 1 had no skeleton_nodes.fragment_id: opening such a store for writing adds it, keeping every row."""
    import duckdb

    path = tmp_path / "old.duckdb"
    store = ConnectomeStore.create(path)
    load(store, tables)
    n = len(store.backend.query("SELECT * FROM skeleton_nodes"))
    store.close()
    con = duckdb.connect(str(path))
    con.execute("ALTER TABLE skeleton_nodes DROP COLUMN fragment_id")
    con.execute("UPDATE store_meta SET value = '1' WHERE key = 'schema_version'")
    con.close()
    with Connectome.open(path, read_only=True) as old:  # read-only: read as it is
        assert len(old.skeleton(3)) == 4
    with Connectome.open(path) as c:
        assert c.backend.query("SELECT value FROM store_meta WHERE key = 'schema_version'")["value"].iloc[0] == str(
            schema.SCHEMA_VERSION)
        rows = c.backend.query("SELECT fragment_id FROM skeleton_nodes")
        assert len(rows) == n and rows["fragment_id"].isna().all()
        (new,) = c.merge(3, 4).segments_after  # edits work on the upgraded store
        assert len(c.skeleton(new)) == 8


def test_edit_errors(empty_store, tables):
    c = empty_store
    load(c, tables)
    with pytest.raises(QueryError, match="itself"):
        c.merge(4, 4)
    with pytest.raises(QueryError, match="unknown segment"):
        c.merge(4, 10**9)
    with pytest.raises(QueryError, match="do not belong"):
        c.split(4, [4001], [5001])
    with pytest.raises(QueryError, match="empty"):
        c.split(4, [4001, 4002], [])
    with pytest.raises(QueryError, match="both parts"):
        c.split(4, [4001, 4002], [4002])


def test_segment_id_synapses_follow_representative_fragments(empty_store):
    t = synthetic_connectome(30, 400, fragments_per_segment=0, seed=5)
    load(empty_store, t, batches=2)
    ref = pandas_reference(t)[1]
    got = empty_store.synapses(pre=3, valid_only=False)
    assert set(got["synapse_id"]) == set(ref.loc[ref.pre_segment_id == 3, "synapse_id"])
    merged = empty_store.merge(3, 4)
    assert len(empty_store.synapses(pre=merged.segments_after[0], valid_only=False)) == int(
        ref.pre_segment_id.isin([3, 4]).sum())


def test_versions_and_results_carry_version(empty_store, tables):
    with pytest.raises(ConnectomeError, match="is empty|no committed|unknown"):
        empty_store.synapses(pre=1)
    v = load(empty_store, tables)
    v2 = empty_store.begin_load("second")
    with pytest.raises(QueryError, match="pending"):
        empty_store.cells(version=v2)
    assert empty_store.cells().attrs["version"] == v
    with pytest.raises(ConnectomeError, match="still loading"):
        empty_store.merge(1, 2)
    empty_store.abort(v2)
    assert empty_store.version == v
    assert empty_store.connectivity().attrs["version"] == v


def test_embeddings_skeletons_and_classification_systems(empty_store, tables):
    c = empty_store
    v = load(c, tables)
    emb = pd.DataFrame({"segment_id": [1, 1, 2], "node_id": [0, 1, None], "model": ["segclr"] * 3,
                        "vector": [[0.5, 1.5, 2.5], [1.0, 0.0, -1.0], None],
                        "uri": [None, None, "file:///emb/shard-0.npy"], "row_index": [None, None, 7]})
    emb["node_id"] = emb["node_id"].astype("Int64")
    emb["row_index"] = emb["row_index"].astype("Int64")
    with c.loading("embeddings") as v2:
        c.write_embeddings(emb, version=v2)
        c.write_cell_types(pd.DataFrame({"segment_id": [1, 2], "cell_type": ["excitatory", "inhibitory"],
                                         "classification_system": ["valence", "valence"],
                                         "source": ["person:carol", "person:carol"]}), version=v2)
    got = c.backend.query("SELECT segment_id, node_id, vector, uri, row_index FROM embeddings ORDER BY segment_id, node_id")
    assert [list(np.round(np.asarray(x, float), 3)) if isinstance(x, (list, np.ndarray)) else None
            for x in got["vector"]] == [
        [0.5, 1.5, 2.5], [1.0, 0.0, -1.0], None]
    assert got["uri"].iloc[2] == "file:///emb/shard-0.npy" and int(got["row_index"].iloc[2]) == 7
    nodes = c.backend.query("SELECT * FROM skeleton_nodes WHERE segment_id = 1 ORDER BY node_id")
    assert len(nodes) == 4 and nodes["parent_id"].isna().iloc[0] and (nodes["morton"] > 0).all()
    # two vocabularies: 'default' decides type columns unless another is asked for
    assert set(c.cell_type_counts()["cell_type"]) <= set(tables["cell_types"]["cell_type"].to_pylist())
    val = c.cells(ids=[1, 2], classification_system="valence")
    assert list(val["cell_type"]) == ["excitatory", "inhibitory"] and list(val["source"]) == ["person:carol"] * 2
    assert len(c.synapses(pre=1, post_type="inhibitory", classification_system="valence")) == len(
        c.synapses(pre=1, post=2))
    assert c.cells(version=v).attrs["version"] == v
