"""The local data server: ranges, CORS, pre-compressed files, confinement to its root, size limits, binding."""

from __future__ import annotations

import gzip
import http.client
import os

import numpy as np
import pytest

from storage.errors import ConnectomeError
from viz.server import serve


@pytest.fixture()
def served(tmp_path):
    root = tmp_path / "run"
    (root / "layer").mkdir(parents=True)
    (root / "layer" / "info").write_text('{"type": "image"}')
    blob = bytes(range(256)) * 4
    (root / "layer" / "0.shard").write_bytes(blob)
    (root / "layer" / "chunk.gz").write_bytes(gzip.compress(b"hello chunk " * 20))
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", root / "layer" / "escape")
    with serve(root) as server:
        yield server, blob


def request(server, method, path, headers=None):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def test_get_with_cors_and_json_type(served):
    server, _ = served
    assert server.url.startswith("http://127.0.0.1:")
    resp, body = request(server, "GET", "/layer/info")
    assert resp.status == 200 and body == b'{"type": "image"}'
    assert resp.getheader("Access-Control-Allow-Origin") == "*"
    assert resp.getheader("Content-Type") == "application/json"
    assert resp.getheader("Accept-Ranges") == "bytes"
    resp, body = request(server, "HEAD", "/layer/info")
    assert resp.status == 200 and body == b"" and resp.getheader("Content-Length") == "17"
    resp, _ = request(server, "OPTIONS", "/layer/info", {"Origin": "http://x", "Access-Control-Request-Headers": "range"})
    assert resp.status == 204 and "Range" in resp.getheader("Access-Control-Allow-Headers")


def test_byte_ranges(served):
    server, blob = served
    resp, body = request(server, "GET", "/layer/0.shard", {"Range": "bytes=10-19"})
    assert resp.status == 206 and body == blob[10:20]
    assert resp.getheader("Content-Range") == f"bytes 10-19/{len(blob)}"
    resp, body = request(server, "GET", "/layer/0.shard", {"Range": "bytes=-5"})
    assert resp.status == 206 and body == blob[-5:]
    resp, body = request(server, "GET", "/layer/0.shard", {"Range": "bytes=1000-"})
    assert resp.status == 206 and body == blob[1000:]
    resp, _ = request(server, "GET", "/layer/0.shard", {"Range": f"bytes={len(blob)}-"})
    assert resp.status == 416 and resp.getheader("Content-Range") == f"bytes */{len(blob)}"
    resp, _ = request(server, "GET", "/layer/0.shard", {"Range": "bytes=0-1,5-6"})
    assert resp.status == 416


def test_precompressed_files_served_with_content_encoding(served):
    server, _ = served
    plain = b"hello chunk " * 20
    resp, body = request(server, "GET", "/layer/chunk", {"Accept-Encoding": "gzip, deflate"})
    assert resp.status == 200 and resp.getheader("Content-Encoding") == "gzip"
    assert gzip.decompress(body) == plain
    resp, body = request(server, "GET", "/layer/chunk")  # client without gzip support
    assert resp.getheader("Content-Encoding") is None and body == plain
    resp, body = request(server, "GET", "/layer/chunk", {"Accept-Encoding": "gzip", "Range": "bytes=6-10"})
    assert resp.status == 206 and body == plain[6:11] and resp.getheader("Content-Encoding") is None


@pytest.mark.parametrize("path", ["/../secret.txt", "/layer/../../secret.txt", "/%2e%2e/secret.txt", "/layer/escape"])
def test_refuses_paths_outside_root(served, path):
    server, _ = served
    resp, body = request(server, "GET", path)
    assert resp.status == 403 and b"outside" not in body.replace(b"path outside", b"")


def test_missing_directories_methods_and_oversized_requests(served):
    server, _ = served
    assert request(server, "GET", "/layer/nothing")[0].status == 404
    assert request(server, "GET", "/layer/")[0].status == 404  # no directory listings
    assert request(server, "POST", "/layer/info")[0].status == 405
    assert request(server, "GET", "/layer/info?" + "a" * 5000)[0].status == 414
    assert request(server, "GET", "/layer/info", {"X-Big": "b" * 20000})[0].status == 431
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/layer/info", body=b"x" * 10)
    assert conn.getresponse().status == 413
    conn.close()


def test_binding_beyond_loopback_needs_explicit_permission(tmp_path):
    with pytest.raises(ConnectomeError, match="loopback"):
        serve(tmp_path, host="0.0.0.0")
    with serve(tmp_path, host="0.0.0.0", allow_remote=True) as server:
        assert server.port > 0
    with pytest.raises(ConnectomeError, match="not a directory"):
        serve(tmp_path / "missing")


def test_readers_load_sharded_layers_through_the_server(tmp_path):
    """cloud-volume (sharded segmentation) and TensorStore's http kvstore (annotations) over HTTP ranges."""
    from cloudvolume import CloudVolume
    from neuroglancer.read_precomputed_annotations import AnnotationReader

    import viz_sample
    from viz.annotations import AnnotationOptions, write_synapse_annotations
    from viz.precomputed_volume import PyramidSpec, write_pyramid

    _, seg, _ = viz_sample.make_volumes()
    write_pyramid(tmp_path / "seg", seg, PyramidSpec("segmentation", (8, 8, 8), chunk_size_xyz=(32, 32, 32),
                                                     sharded=True))
    syn = viz_sample.synapses()
    write_synapse_annotations(tmp_path / "syn", syn, AnnotationOptions(sharded=True))
    with serve(tmp_path) as server:
        vol = CloudVolume(f"precomputed://{server.url}/seg", progress=False, fill_missing=True)
        np.testing.assert_array_equal(np.asarray(vol[:, :, :])[..., 0].T, seg)
        reader = AnnotationReader(f"{server.url}/syn/")
        assert [int(a.id) for a in reader.relationships["pre_segment"][22]] == [2]
