"""Fuzzing what people type: run configs, volume URLs/specs and query filters.

Whatever the value, the answer is a valid result or one of the project's own errors (ConnectomeError and its
subclasses, whose message is the one line the CLI prints); never a KeyError, TypeError, a database error or a
hang. Query filters are also checked to be data, never SQL: the store's contents do not change.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.config import load_config
from pipeline.run import RunConfig
from storage.errors import ConnectomeError
from storage.urls import parse_url
from storage.volume import open_volume

# derandomized: CI must not pass or fail by the luck of the draw. To explore new inputs, run with derandomize=False
# (two escapes found that way are pinned below as @example).
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.sampled_from(["", "..", "/", "gs://", "zarr3://", "\x00", "'; DROP TABLE x; --"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=12)

FIELD_PATHS = [
    ("input",), ("output",), ("stages",), ("gpu",), ("segment",), ("segment", "block_shape"),
    ("segment", "overlap"), ("segment", "model"), ("segment", "inference"), ("segment", "match_band"),
    ("segment", "seed_reach"), ("segment", "seed_context"), ("segment", "agglomeration"),
    ("segment", "agglomeration", "expand_voxels"), ("segment", "chunk_shape"), ("segment", "tf_threads"),
    ("synapses", "block_shape"), ("synapses", "detection"), ("skeletonize", "dust_threshold"),
    ("embed", "spacing_nm"), ("classify", "cell_type_model"), ("publish", "meshes"), ("cluster",),
    ("cluster", "kind"), ("cluster", "workers"), ("cluster", "memory_limit"), ("cluster", "slurm"),
    ("cluster", "resources"), ("cluster", "kubernetes"), ("unknown_field",), ("segment", "blok_shape"),
]


def _valid_config() -> dict:
    return {"input": "raw.zarr", "output": "run", "stages": ["segment"],
            "segment": {"block_shape": [16, 64, 64], "overlap": [4, 8, 8]},
            "cluster": {"kind": "local", "workers": 2}}


def _set(data: dict, path: tuple, value) -> dict:
    node = data
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return data


def _build(data) -> RunConfig | None:
    """load_config + validate: a RunConfig, or None for a ConnectomeError; anything else fails the test."""
    try:
        config = load_config(data, RunConfig, source="fuzz.yaml")
        config.validate()
        return config
    except ConnectomeError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None


@SETTINGS
@given(path=st.sampled_from(FIELD_PATHS), value=values)
def test_config_with_one_field_replaced_builds_or_raises_config_error(path, value):
    config = _build(_set(_valid_config(), path, value))
    if config is not None:
        assert isinstance(config, RunConfig) and config.input and config.output


@SETTINGS
@given(data=values)
@example(data="\n")  # a string is a path: "config file \n not found" once broke the one-line rule
def test_arbitrary_config_documents_raise_only_config_errors(data):
    _build(data)


@SETTINGS
@given(text=st.text(max_size=200))
def test_arbitrary_config_files_raise_only_config_errors(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzzcfg") / "run.yaml"
    path.write_text(text, encoding="utf-8")
    _build_from_file(path)


def _build_from_file(path):
    try:
        load_config(path, RunConfig).validate()
    except ConnectomeError as exc:
        assert "\n" not in str(exc)


# ------------------------------------------------------------------------------------------- volume URLs and specs

url_parts = st.sampled_from(["", "precomputed://", "zarr://", "zarr2://", "zarr3://", "n5://", "foo://",
                             "file://", "memory://", "gs://", "s3://", "http://", "https://", "|zarr3:", "|bogus:",
                             "/", "..", "bucket/", "x.zarr", "y.n5", ":", "@", "?", "#", "[", "]", " ", "\t"])
urls = st.one_of(st.text(max_size=40), st.lists(st.one_of(url_parts, st.text(max_size=6)), max_size=6).map("".join))


def parsed_or_none(url: str):
    """parse_url's result, or None when it refuses the URL with a ConnectomeError (the only error it may raise)."""
    try:
        return parse_url(url)
    except ConnectomeError:
        return None


@SETTINGS
@given(url=urls)
@example(url="http://[")  # urllib's "Invalid IPv6 URL" ValueError once escaped as itself
def test_url_parsing_gives_a_spec_or_a_volume_error(url):
    parsed = parsed_or_none(url)
    if parsed is None:
        return
    assert parsed.kvstore["driver"] in ("file", "memory", "gcs", "s3", "http")
    try:
        spec = parsed.tensorstore_spec()
    except ConnectomeError:
        return
    assert spec["driver"] in ("zarr", "zarr3", "n5", "neuroglancer_precomputed")


@SETTINGS
@given(url=urls)
@example(url="http://[")
def test_opening_arbitrary_local_urls_raises_only_volume_errors(url):
    """Only local locations are opened (memory:// and paths): remote ones would wait on the network."""
    parsed = parsed_or_none(url)
    if parsed is None or parsed.kvstore["driver"] not in ("memory", "file"):
        return
    with pytest.raises(ConnectomeError):
        open_volume(url)  # nothing exists there


spec_values = st.fixed_dictionaries(
    {"driver": st.one_of(st.sampled_from(["zarr", "zarr3", "n5", "neuroglancer_precomputed", "precomputed", "json",
                                          ""]), values)},
    optional={"kvstore": st.one_of(values, st.fixed_dictionaries({"driver": st.sampled_from(["memory", "file",
                                                                                                 "nope"]),
                                                                  "path": st.text(max_size=12)})),
              "scale_index": values, "fill_missing_data_reads": values, "transform": values, "dtype": values})


@SETTINGS
@given(spec=spec_values, mode=st.sampled_from(["r", "r+", "w", ""]))
def test_opening_arbitrary_specs_raises_only_volume_errors(tmp_path_factory, spec, mode):
    kv = spec.get("kvstore")
    if isinstance(kv, dict) and kv.get("driver") == "file":  # keep file reads inside a temp dir
        spec = {**spec, "kvstore": {**kv, "path": str(tmp_path_factory.getbasetemp() / "nothing" / "x")}}
    if isinstance(kv, str):
        spec = {**spec, "kvstore": "memory://" + kv}
    with pytest.raises(ConnectomeError):
        open_volume(spec, mode=mode)


def test_a_real_volume_round_trips_through_its_spec(tmp_path):
    from storage.volume import create_volume

    vol = create_volume(f"memory://{tmp_path.name}/v.zarr", shape_zyx=(4, 8, 8), dtype="uint8",
                        voxel_size_xyz_nm=(4, 4, 40), chunk_shape_zyx=(4, 8, 8))
    vol.write(vol.bounds, np.arange(256, dtype=np.uint8).reshape(4, 8, 8))
    again = open_volume(vol.spec)
    np.testing.assert_array_equal(again.read(again.bounds), vol.read(vol.bounds))


# ------------------------------------------------------------------------------------------- query filters

N_SYN = 500


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from storage.store import ConnectomeStore
    from storage.store.synthetic import synthetic_connectome

    tables = synthetic_connectome(50, N_SYN, seed=9)
    s = ConnectomeStore.create(tmp_path_factory.mktemp("fuzz-store") / "c.duckdb", threads=1)
    with s.loading("fuzz") as v:
        for name in ("segments", "cell_types", "id_map", "synapses"):
            getattr(s, f"write_{name}")(tables[name], version=v)
    yield s
    s.close()


filters = st.one_of(values, st.lists(st.integers(-5, 2**64), max_size=5), st.tuples(values, values),
                    st.sampled_from([float("inf"), -float("inf"), math.nan, np.uint64(2**63 + 1), np.int64(-1),
                                     np.float32(3.0), b"bytes", 2**63, 2**64]))


def _ok(call) -> None:
    try:
        result = call()
    except ConnectomeError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(result, pd.DataFrame) and "version" in result.attrs


@SETTINGS
@given(a=filters, b=filters, c=filters)
def test_query_filters_give_results_or_query_errors_and_change_nothing(store, a, b, c):
    _ok(lambda: store.cells(cell_type=a, min_voxels=b, ids=c))
    _ok(lambda: store.cells(ids=a, limit=b, after=c))
    _ok(lambda: store.synapses(pre=a, post=b, min_score=c))
    _ok(lambda: store.synapses(pre_type=a, post_type=b, bbox=c))
    _ok(lambda: store.synapses(limit=a, after=b, version=c))
    _ok(lambda: store.cell_type_counts(classification_system=a, version=b))
    _ok(lambda: store.partners(a, direction=b, min_synapses=c))
    assert int(store.backend.query("SELECT count(*) AS n FROM synapses")["n"].iloc[0]) == N_SYN
