"""Where published bytes go: one TensorStore key-value store per output directory.

Every writer in viz/ writes through a TensorStore KvStore, so the same code publishes to a local folder,
``gs://``, ``s3://`` or ``memory://`` without a second code path. Sharded indexes (skeletons, annotations,
multi-resolution meshes) go through TensorStore's ``neuroglancer_uint64_sharded`` kvstore, which writes the
shard files byte-for-byte as Neuroglancer's sharded.md specifies.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterable, Mapping

import tensorstore as ts

from storage.errors import ConnectomeError
from storage.urls import kvstore_spec

_URL_SCHEMES = ("file://", "gs://", "s3://", "memory://", "http://", "https://")


def kvstore_url(path_or_url: str | os.PathLike) -> str:
    """A TensorStore kvstore URL ending in '/', from a local path or a URL (``precomputed://`` prefix dropped)."""
    text = str(path_or_url)
    if text.startswith("precomputed://"):
        text = text[len("precomputed://"):]
    if not text.startswith(_URL_SCHEMES):
        text = "file://" + os.path.abspath(text)
    return text if text.endswith("/") else text + "/"


def local_path(path_or_url: str | os.PathLike) -> str | None:
    """The filesystem path of a local output, or None for remote URLs."""
    url = kvstore_url(path_or_url)
    return url[len("file://"):] if url.startswith("file://") else None


def open_kvstore(path_or_url: str | os.PathLike) -> ts.KvStore:
    url = kvstore_url(path_or_url)
    try:
        return ts.KvStore.open(kvstore_spec(url)).result()
    except Exception as exc:  # TensorStore raises ValueError with a long message
        raise ConnectomeError(f"cannot open output location {url}: {str(exc).splitlines()[0]}") from exc


def join(path_or_url: str | os.PathLike, *parts: str) -> str:
    return kvstore_url(path_or_url) + "/".join(p.strip("/") for p in parts)


def write_json(path_or_url: str | os.PathLike, key: str, obj: Any) -> None:
    open_kvstore(path_or_url).write(key, json.dumps(obj, separators=(",", ":")).encode()).result()


def read_json(path_or_url: str | os.PathLike, key: str = "info") -> Any:
    result = open_kvstore(path_or_url).read(key).result()
    if result.state != "value":
        raise ConnectomeError(f"missing {key} in {kvstore_url(path_or_url)}")
    try:
        return json.loads(result.value)
    except json.JSONDecodeError as exc:
        raise ConnectomeError(f"{kvstore_url(path_or_url)}{key} is not valid JSON: {exc}") from exc


def hashed_sharding(num_keys: int, *, data_encoding: str = "gzip", hash: str = "murmurhash3_x86_128") -> dict:
    """Sharding parameters for uint64-keyed objects (segments, annotations), sized by cloud-volume's rule."""
    from cloudvolume.datasource.precomputed.sharding import compute_shard_params_for_hashed

    shard_bits, minishard_bits, preshift_bits = compute_shard_params_for_hashed(max(1, int(num_keys)))
    return {
        "@type": "neuroglancer_uint64_sharded_v1",
        "preshift_bits": int(preshift_bits),
        "hash": hash,
        "minishard_bits": int(minishard_bits),
        "shard_bits": int(shard_bits),
        "minishard_index_encoding": "gzip",
        "data_encoding": data_encoding,
    }


def write_uint64_index(
    dir_url: str | os.PathLike,
    items: Iterable[tuple[int, bytes]],
    sharding: Mapping[str, Any] | None = None,
) -> int:
    """Write {uint64 id: bytes} in Neuroglancer's uint64 index format: one file per decimal id, or sharded.

    Sharded writes go through one transaction so each shard file is written once. Returns the number written.
    """
    count = 0
    if sharding is None:
        kv = open_kvstore(dir_url)
        futures = []
        for key, value in items:
            futures.append(kv.write(str(int(key)), value))
            count += 1
            if len(futures) >= 256:
                for f in futures:
                    f.result()
                futures.clear()
        for f in futures:
            f.result()
        return count
    kv = ts.KvStore.open(
        {"driver": "neuroglancer_uint64_sharded", "base": kvstore_spec(kvstore_url(dir_url)), "metadata": dict(sharding)}
    ).result()
    with ts.Transaction() as txn:
        tkv = kv.with_transaction(txn)
        for key, value in items:
            tkv.write(struct.pack(">Q", int(key)), value)
            count += 1
    return count
