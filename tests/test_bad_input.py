"""Bad input through the command line, as a person meets it: every case exits with status 2, prints exactly one
``error:`` line naming the thing and the place, no traceback, and leaves nothing that looks finished (no
run_state.json entry, no ledger completion, no synth.json, no half-imported volume).

Corrupt and missing input chunks, wrong dtype, wrong voxel size, malformed configs, unknown segment ids and
hostile filter values in queries go through `python -m pipeline.cli` in a subprocess (the real entry point);
the data server's path and size checks go through HTTP.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_faults import config_file, run_config, tiny_ffn_model, write_input

REPO = Path(__file__).resolve().parents[1]
HOSTILE = "x'; DROP TABLE synapses; --"
CHUNK_KEY = "c/0/0/1"  # zarr3 key of the input chunk z0 y0 x1 (both blocks read it)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def one_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The single `error:` line of a failed command, checked for status 2, no traceback and the needles."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def nothing_finished(out: Path, stage: str = "segment") -> None:
    from storage.ledger import read_done_count

    state = out / "run_state.json"
    assert not state.exists() or f'"{stage}"' not in state.read_text()
    assert not (out / "segment_summary.json").exists()
    ledgers = out / "work" / "ledgers"
    if ledgers.exists():
        assert read_done_count(ledgers, stage) < 2  # 2 blocks: never all of them


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad-inputs")
    return {"root": root, "raw": write_input(root), "ffn": tiny_ffn_model(root / "ffn"), "synapses": "unused"}


def _damaged_copy(inputs: dict, name: str) -> Path:
    dst = inputs["root"] / name
    shutil.copytree(inputs["raw"], dst)
    return dst


def _segment_only(inputs: dict, raw: Path, tmp_path: Path, **segment) -> tuple[Path, Path]:
    config = run_config({**inputs, "raw": str(raw)}, tmp_path / "run", stages=["segment"])
    for key, value in segment.items():
        setattr(config.segment, key, value)
    return config_file(config, tmp_path / "run.yaml", workers=1), tmp_path / "run"


# ------------------------------------------------------------------------------------------- input volumes

def test_corrupt_input_chunk_names_block_volume_and_key(inputs, tmp_path):
    raw = _damaged_copy(inputs, "corrupt.zarr")
    (raw / "0" / CHUNK_KEY).write_bytes(b"not a chunk at all" * 4)
    cfg, out = _segment_only(inputs, raw, tmp_path)
    line = one_error(cli("run", cfg), "stage 'segment' block", "corrupt.zarr", CHUNK_KEY)
    assert re.search(r"block \d+ \[\d+,\d+,\d+ : \d+,\d+,\d+\) \(xyz\)", line)  # the block's write box
    nothing_finished(out)


def test_missing_input_chunk_is_an_error_unless_fill_missing(inputs, tmp_path):
    raw = _damaged_copy(inputs, "holes.zarr")
    (raw / "0" / CHUNK_KEY).unlink()
    cfg, out = _segment_only(inputs, raw, tmp_path)
    one_error(cli("run", cfg), "block", "holes.zarr", CHUNK_KEY, "missing")
    nothing_finished(out)

    # with fill_missing the same input segments, and the run says that missing chunks became zeros
    filled = cli("segment", "--input", raw, "--output", tmp_path / "filled", "--model", inputs["ffn"],
                 "--block-shape", *BLOCK_ARGS, "--overlap", *OVERLAP_ARGS, "--workers", "1", "--fill-missing")
    assert filled.returncode == 0, filled.stderr[-3000:]
    assert "fill_missing is on" in filled.stderr and "holes.zarr" in filled.stderr
    assert (tmp_path / "filled" / "segment_summary.json").exists()


BLOCK_ARGS = ("16", "64", "32")
OVERLAP_ARGS = ("4", "8", "8")


def test_wrong_dtype_names_input_and_dtype(inputs, tmp_path):
    from storage.volume import create_volume

    url = str(tmp_path / "float.zarr")
    vol = create_volume(url, shape_zyx=(16, 64, 64), dtype="float32", voxel_size_xyz_nm=(8, 8, 40),
                        chunk_shape_zyx=(16, 32, 32))
    vol.write(vol.bounds, np.ones((16, 64, 64), np.float32))
    cfg, out = _segment_only(inputs, Path(url), tmp_path)
    one_error(cli("run", cfg), "float.zarr", "float32", "uint8")
    nothing_finished(out)


def test_missing_or_array_file_input_leaves_no_output(inputs, tmp_path):
    """`segment --input` that is not a chunked volume: one line naming it (for an HDF5 file, how to import it),
    and no output folder."""
    import h5py

    one_error(cli("segment", "--input", tmp_path / "nope.zarr", "--output", tmp_path / "out1", "--model",
                  inputs["ffn"]), "no volume at", "nope.zarr")
    with h5py.File(tmp_path / "em.h5", "w") as f:
        f["raw"] = np.zeros((4, 8, 8), np.uint8)
    one_error(cli("segment", "--input", f"{tmp_path}/em.h5:raw", "--output", tmp_path / "out2", "--model",
                  inputs["ffn"]), "em.h5:raw", "an array file", "connectome import")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_wrong_voxel_size_is_refused_before_anything_is_written(tmp_path):
    one_error(cli("synth", tmp_path / "synth", "--shape", "8", "32", "32", "--voxel-size", "0", "8", "40",
                  "--workers", "1"), "voxel")
    assert not (tmp_path / "synth" / "synth.json").exists()

    # a mistyped size that cannot fit on the disk: refused up front, not after filling it
    one_error(cli("synth", tmp_path / "huge", "--shape", "100000", "100000", "100000", "--workers", "1"),
              "100000", "GB free")
    assert not (tmp_path / "huge").exists()

    np.save(tmp_path / "img.npy", np.zeros((4, 8, 8), np.uint8))
    one_error(cli("import", tmp_path / "img.npy", tmp_path / "img.zarr", "--voxel-size", "-4", "4", "40"),
              "voxel_size", "-4")
    assert not (tmp_path / "img.zarr").exists()


# ------------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("mutate, needles", [
    (lambda d: d["segment"].__setitem__("block_shape", [16, "big", 32]), ["segment.block_shape[1]", "'big'"]),
    (lambda d: d.__setitem__("segmnet", {}), ["segmnet", "did you mean 'segment'"]),
    (lambda d: d["segment"].__setitem__("overlap", [4, 8]), ["segment.overlap", "[4, 8]"]),
    (lambda d: d.__setitem__("stages", ["segment", "teleport"]), ["stages", "teleport"]),
    (lambda d: d["cluster"].__setitem__("workers", 0), ["workers", "0"]),
    (lambda d: d["segment"].__setitem__("match_band", 7.5), ["match_band", "7.5"]),
])
def test_malformed_config_names_field_and_value(inputs, tmp_path, mutate, needles):
    cfg, out = _segment_only(inputs, Path(inputs["raw"]), tmp_path)
    data = yaml.safe_load(cfg.read_text())
    mutate(data)
    cfg.write_text(yaml.safe_dump(data))
    one_error(cli("run", cfg), *needles)
    assert not out.exists() or not (out / "run_state.json").exists()


def test_unparseable_config_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("input: raw.zarr\nsegment:\n  block_shape: [16, 64\n  overlap: 4\n")
    one_error(cli("run", bad), "broken.yaml", "line")


# ------------------------------------------------------------------------------------------- queries

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    import pandas as pd

    from storage.store import ConnectomeStore
    from storage.store.synthetic import synthetic_connectome

    path = tmp_path_factory.mktemp("bad-query") / "connectome.duckdb"
    tables = synthetic_connectome(40, 400, seed=5)
    with ConnectomeStore.create(path, threads=1) as s:
        with s.loading("synthetic") as v:
            for name in ("segments", "cell_types", "id_map", "synapses"):
                getattr(s, f"write_{name}")(tables[name], version=v)
        # a cell type that looks like SQL is data like any other
        with s.loading("hostile type") as v:
            s.write_cell_types(pd.DataFrame({"segment_id": [3], "cell_type": [HOSTILE], "confidence": [1.0]}),
                               version=v)
    return path


def _counts(path: Path) -> dict:
    from storage.store import Connectome

    with Connectome.open(path, read_only=True) as c:
        return {t: int(c.backend.query(f"SELECT count(*) AS n FROM {t}")["n"].iloc[0])
                for t in ("segments", "synapses", "cell_types", "id_map", "versions")}


@pytest.mark.parametrize("args, needles", [
    (["cells", "--ids", "999999"], ["unknown", "999999"]),
    (["synapses", "--pre", "424242"], ["unknown pre", "424242"]),
    (["partners", "--id", "777777"], ["777777"]),
    (["skeleton", "--id", "888888"], ["unknown skeleton segment", "888888"]),
    (["skeleton"], ["skeleton needs --id"]),
    (["cells", "--type", "x' OR '1'='1"], ["unknown cell type", "x' OR '1'='1"]),
    (["synapses", "--post-type", "'); DELETE FROM segments; --"], ["unknown post_type"]),
    (["cells", "--ids", "1); DROP TABLE segments; --"], ["ids must be integers"]),
    (["types", "--system", "default' UNION SELECT 1 --"], ["unknown classification_system"]),
    (["synapses", "--bbox", "0,0,0,10,10"], ["bbox"]),
    (["cells", "--version", "99"], ["unknown version 99"]),
])
def test_bad_and_hostile_queries_are_one_error_and_change_nothing(store, args, needles):
    before = _counts(store)
    one_error(cli("query", store, *args), *needles)
    assert _counts(store) == before


def test_hostile_value_that_exists_is_returned_as_data(store):
    before = _counts(store)
    result = cli("query", store, "cells", "--type", HOSTILE)
    assert result.returncode == 0, result.stderr
    assert "# 1 rows" in result.stderr and HOSTILE in result.stdout
    assert _counts(store) == before


# ------------------------------------------------------------------------------------------- data server

def _get(server, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_data_server_refuses_paths_outside_its_root_and_oversized_requests(tmp_path):
    from viz.server import serve

    run = tmp_path / "run"
    (run / "layer").mkdir(parents=True)
    (run / "layer" / "info").write_text('{"ok": true}')
    (tmp_path / "secret.txt").write_text("private")
    (run / "layer" / "link").symlink_to(tmp_path / "secret.txt")
    with serve(run) as server:
        assert _get(server, "/layer/info")[0] == 200
        for path in ("/../secret.txt", "/layer/../../secret.txt", "/%2e%2e/secret.txt", "/layer/%2E%2E/%2E%2E/secret.txt",
                     "/layer/link", "//etc/passwd", "/layer/..%2f..%2fsecret.txt"):
            status, body = _get(server, path)
            assert status in (403, 404), (path, status)
            assert b"private" not in body and b"root:" not in body
        assert _get(server, "/layer/info?" + "a" * 10_000)[0] == 414
        assert _get(server, "/layer/info", {"X-Pad": "b" * 40_000})[0] == 431
        status, _ = _get(server, "/layer/info", {"Range": ",".join(f"bytes={i}-{i}" for i in range(200))})
        assert status in (200, 416)  # never a multipart answer built from 200 ranges
        assert _get(server, "/layer/info", {"Range": "bytes=999999-"})[0] == 416
        assert _get(server, "/layer/info")[0] == 200  # still serving
