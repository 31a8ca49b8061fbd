"""The DuckDB query fast paths give exactly the answer of the general SQL path.

One-cell synapse and partner queries (and unpaged box queries) on DuckDB scan only the candidate rows and resolve
their partners afterwards — from the version's fragment -> segment map and cell types held in memory when the map
is small (``MAX_CACHED_FRAGMENTS``), else with one SQL statement. Both must equal the general path (one SQL
statement joining id map and cell types, as PostgreSQL runs it) column for column, dtype for dtype, at every
version, and the cached maps must follow edits. PostgreSQL must give the same frames as DuckDB.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from storage.store import ConnectomeStore
from storage.store import connectome as cm
from storage.store.sql import Sql
from storage.store.synthetic import synthetic_connectome

N_CELLS, N_SYN = 80, 2500


def _load(store: ConnectomeStore, tables: dict) -> int:
    with store.loading("synthetic") as v:
        for name in ("segments", "cell_types", "id_map"):
            getattr(store, f"write_{name}")(tables[name], version=v)
        syn = tables["synapses"]
        for start in range(0, syn.num_rows, 1000):
            store.write_synapses(syn.slice(start, 1000), version=v)
    return v


@pytest.fixture(scope="module")
def tables():
    # points=True: pre/post points present; the second store below has none (nullable position columns)
    return synthetic_connectome(N_CELLS, N_SYN, fragments_per_segment=2, seed=11)


@pytest.fixture()
def store(tmp_path, tables):
    s = ConnectomeStore.create(tmp_path / "fast.duckdb", threads=1)
    _load(s, tables)
    yield s
    s.close()


def _general(c, *, pre=None, post=None, pre_type=None, post_type=None, bbox=None, min_score=None, valid_only=True,
             after=None, version=None) -> pd.DataFrame:
    """The general path: one SQL statement with the id map and cell types joined in (PostgreSQL's plan)."""
    v = c._v(version)
    q = Sql(c.backend.dialect)
    sql = c._synapse_select(q, v, pre=cm._as_ids(pre, "pre"), post=cm._as_ids(post, "post"),
                            pre_types=cm._as_texts(pre_type, "pre_type"),
                            post_types=cm._as_texts(post_type, "post_type"),
                            bbox=cm._as_bbox(bbox) if bbox is not None else None, min_score=min_score,
                            valid_only=valid_only, system=c._system(v, None), after=after)
    return cm._finish(c._frame(sql + " ORDER BY b.synapse_id", q.params), v, None, "synapse_id")


def _general_partners(c, seg: int, direction: str, min_synapses: int = 1, version=None) -> pd.DataFrame:
    syn = _general(c, **({"pre": seg} if direction == "out" else {"post": seg}), version=version)
    col, tcol = ("post_segment_id", "post_cell_type") if direction == "out" else ("pre_segment_id", "pre_cell_type")
    g = syn.groupby(col)
    df = pd.DataFrame({"n_synapses": g.size().astype("int64"), "partner_cell_type": g[tcol].first()})
    df = df.rename_axis("partner_id").reset_index()
    df = df[df.n_synapses >= min_synapses].sort_values(["n_synapses", "partner_id"], ascending=[False, True])
    df["partner_cell_type"] = df["partner_cell_type"].astype(object).where(df["partner_cell_type"].notna(), None)
    return df.reset_index(drop=True)


CASES = [
    dict(pre=7), dict(pre=[3, 4, 5]), dict(post=[7, 8], min_score=0.5), dict(pre=9, valid_only=False),
    dict(pre=[3, 4, 5, 6], post_type="basket"), dict(post=11, after=1200), dict(pre=12, post=[1, 2, 3, 4, 5, 6, 7]),
    dict(bbox=((20_000, 20_000, 20_000), (150_000, 150_000, 150_000))),
    dict(bbox=((0, 0, 0), (10**6, 10**6, 10**6)), valid_only=False),
]


def _assert_paths_agree(c, cases, version=None):
    for kw in cases:
        want = _general(c, version=version, **kw)
        got = c.synapses(version=version, **kw)
        pd.testing.assert_frame_equal(got, want)
        assert got.attrs["version"] == c._v(version) and got.attrs["complete"]
        assert len(got) > 0, kw  # the cases are chosen to hit rows: an empty answer would prove nothing
    for seg in (3, 9):
        for direction in ("out", "in"):
            got = c.partners(seg, direction=direction, version=version)
            pd.testing.assert_frame_equal(got, _general_partners(c, seg, direction, version=version))
            assert len(got) > 0


def test_fast_paths_equal_general_sql_cached_and_uncached(store, monkeypatch):
    v = store.version
    _assert_paths_agree(store, CASES)
    assert isinstance(store._maps_cache.get(v), cm._VersionMaps)  # the cached maps answered
    # the uncached path: the map is 'too large' to hold, fragments are resolved in SQL per query
    monkeypatch.setattr(cm, "MAX_CACHED_FRAGMENTS", 0)
    store._maps_cache.clear()
    _assert_paths_agree(store, CASES)
    assert store._maps_cache.get(v, "absent") is None


def test_cached_maps_follow_edits_and_old_versions_stay(store, monkeypatch):
    before = store.synapses(pre=7, valid_only=False)
    v1 = store.version
    merged = store.merge(7, 8)
    new = merged.segments_after[0]
    assert store.version == merged.version != v1
    with pytest.raises(cm.QueryError, match="unknown pre segment id"):
        store.synapses(pre=7)
    got = store.synapses(pre=new)
    assert set(got["pre_segment_id"]) == {new} and len(got) > len(store.synapses(pre=8, version=v1))
    # the merged pair's synapses between 7 and 8 are autapses now: invalid at the new version, valid before
    pair_old = store.synapses(pre=7, post=8, version=v1)
    pair_new = store.synapses(pre=new, valid_only=False)
    assert set(pair_old["synapse_id"]) <= set(pair_new.loc[~pair_new["valid"], "synapse_id"])
    pd.testing.assert_frame_equal(store.synapses(pre=7, valid_only=False, version=v1), before)
    cases = [dict(pre=new), dict(post=new, valid_only=False), dict(pre=[3, 4, 5], post_type="basket"),
             dict(bbox=((0, 0, 0), (10**6, 10**6, 10**6)))]
    _assert_paths_agree(store, cases)
    _assert_paths_agree(store, [dict(pre=7, valid_only=False), dict(post=8)], version=v1)
    frags = store.fragments(new)
    split = store.split(new, frags[:1], frags[1:])
    _assert_paths_agree(store, [dict(pre=split.segments_after[0]), dict(post=split.segments_after[1])])
    monkeypatch.setattr(cm, "MAX_CACHED_FRAGMENTS", 0)
    store._maps_cache.clear()
    _assert_paths_agree(store, [dict(pre=split.segments_after[0]), dict(post=split.segments_after[1])])
    _assert_paths_agree(store, [dict(pre=7, valid_only=False)], version=v1)


def test_paging_and_nullable_positions_on_the_fast_path(tmp_path):
    t = synthetic_connectome(40, 1500, fragments_per_segment=1, seed=5, points=False)
    s = ConnectomeStore.create(tmp_path / "nulls.duckdb", threads=1)
    try:
        _load(s, t)
        full = s.synapses(pre=[1, 2, 3, 4, 5], valid_only=False)
        assert str(full["pre_x_nm"].dtype) == "Int32" and full["pre_x_nm"].isna().all()
        pd.testing.assert_frame_equal(full, _general(s, pre=[1, 2, 3, 4, 5], valid_only=False))
        pages, after = [], None
        while True:
            page = s.synapses(pre=[1, 2, 3, 4, 5], valid_only=False, limit=7, after=after)
            pages.append(page)
            after = page.attrs["next_after"]
            if after is None:
                break
            assert len(page) == 7 and not page.attrs["complete"]
        pd.testing.assert_frame_equal(pd.concat(pages, ignore_index=True), full)
    finally:
        s.close()


@pytest.mark.postgres
def test_postgres_returns_the_same_frames_as_duckdb(store, tables, postgres_server):
    pg = ConnectomeStore.create(postgres_server.new_database())
    try:
        _load(pg, tables)
        for kw in CASES:
            pd.testing.assert_frame_equal(pg.synapses(**kw), store.synapses(**kw))
        for seg in (3, 9):
            for direction in ("out", "in"):
                pd.testing.assert_frame_equal(pg.partners(seg, direction=direction),
                                              store.partners(seg, direction=direction))
        np.testing.assert_array_equal(pg.connectivity().to_numpy(), store.connectivity().to_numpy())
    finally:
        pg.close()


def test_connectivity_leaves_out_autapses_made_by_a_merge(store):
    merged = store.merge(7, 8).segments_after[0]
    whole = ((0, 0, 0), (10**6, 10**6, 10**6))
    everything = _general(store, bbox=whole, valid_only=False)
    autapses = everything[(everything.pre_segment_id == merged) & (everything.post_segment_id == merged)]
    assert len(autapses) > 0  # the merge made autapses (synapses between 7 and 8)
    syn = _general(store, bbox=whole)  # valid synapses at the new version
    pre = syn.pre_cell_type.fillna("untyped")
    post = syn.post_cell_type.fillna("untyped")
    ref = pd.crosstab(pre, post)
    m = store.connectivity()
    assert m.to_numpy().sum() == len(syn)
    for a in ref.index:
        for b in ref.columns:
            assert m.loc[a, b] == ref.loc[a, b]
    assert set(m.index) == set(ref.index) | set(ref.columns)
    pairs = syn.groupby(["pre_segment_id", "post_segment_id"]).size()
    assert store.connectivity(min_synapses=2).to_numpy().sum() == pairs[pairs >= 2].sum()
    ids = [merged, 1, 2, 3, 4, 5, 6, 9, 10]
    seg = store.connectivity(group_by="segment", ids=ids)
    sub = syn[syn.pre_segment_id.isin(ids) & syn.post_segment_id.isin(ids)]
    assert seg.to_numpy().sum() == len(sub) and seg.loc[merged, merged] == 0
    seg0 = store.connectivity(group_by="segment", ids=ids, min_synapses=0)
    assert seg0.to_numpy().sum() == len(sub)
    assert store.connectivity(group_by="segment", ids=ids, valid_only=False).loc[merged, merged] == len(autapses)


def test_groups_with_only_autapses_do_not_appear(tiny_store):
    s = tiny_store
    with s.loading("tiny") as v:
        s.write_segments(pd.DataFrame({"segment_id": [1, 2, 3]}), version=v)
        s.write_cell_types(pd.DataFrame({"segment_id": [1, 2, 3], "cell_type": ["a", "a", "b"]}), version=v)
        s.write_id_map(pd.DataFrame({"fragment_id": [1, 2, 10, 11], "segment_id": [1, 2, 3, 3]}), version=v)
        s.write_synapses(pd.DataFrame({"synapse_id": [1, 2, 3], "pre_fragment_id": [1, 10, 10],
                                       "post_fragment_id": [2, 11, 11], "x_nm": [0, 0, 0], "y_nm": [0, 0, 0],
                                       "z_nm": [0, 0, 0]}), version=v)
    m = s.connectivity()
    assert list(m.index) == ["a"] and m.loc["a", "a"] == 1
    assert list(s.connectivity(valid_only=False).index) == ["a", "b"]
    assert list(s.connectivity(group_by="segment", min_synapses=0).index) == [1, 2]
    assert list(s.connectivity(min_synapses=2).index) == []
    assert s.partners(3).empty and len(s.synapses(pre=3, valid_only=False)) == 2


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def tiny_store(request, tmp_path):
    if request.param == "duckdb":
        s = ConnectomeStore.create(tmp_path / "tiny.duckdb", threads=1)
    else:
        s = ConnectomeStore.create(request.getfixturevalue("postgres_server").new_database())
    yield s
    s.close()


def test_post_ordered_copy_is_rebuilt_on_commit_and_ignored_when_stale(store):
    from storage.store import versions

    assert store._post_copy()
    assert store.backend.rows("SELECT count(*) FROM synapses_by_post")[0][0] == N_SYN
    before = set(store.synapses(post=5)["synapse_id"])
    new = pd.DataFrame({"synapse_id": [10**6, 10**6 + 1], "pre_segment_id": [3, 4], "post_segment_id": [5, 5],
                        "x_nm": [1, 2], "y_nm": [1, 2], "z_nm": [1, 2]})
    with store.loading("more") as v:
        store.write_synapses(new, version=v)
    assert store._post_copy()  # rebuilt in the commit's transaction
    assert set(store.synapses(post=5)["synapse_id"]) - before == {10**6, 10**6 + 1}
    assert set(store.partners(5, direction="in")["partner_id"]) >= {3, 4}
    # a writer that does not rebuild the copy (say, an older version of this package) leaves it stale: unused
    with store.backend.transaction() as tx:
        raw = versions.begin(tx, "load", "raw insert")
        tx.execute("INSERT INTO synapses SELECT * REPLACE (1000005 AS synapse_id, $v AS version_from) "
                   "FROM synapses WHERE synapse_id = 1000000", {"v": raw})
        tx.execute("INSERT INTO load_batches (version, table_name, batch_key, n_rows) VALUES ($v, 'synapses', "
                   "'raw', 1)", {"v": raw})
        versions.commit(tx, raw)
    assert not store._post_copy()
    got = store.synapses(post=5)
    assert 1000005 in set(got["synapse_id"])
    pd.testing.assert_frame_equal(got, _general(store, post=5))
