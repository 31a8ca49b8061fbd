"""Volume URLs -> (format, TensorStore kvstore spec).

People paste URLs from Neuroglancer and CloudVolume (`precomputed://gs://bucket/x`, `zarr://s3://...`,
`n5://...`, plain `gs://bucket/x`, plain paths). This module turns those strings into a format name and a
TensorStore kvstore JSON spec without touching the network, so the parsing is testable offline and the same
string means the same thing everywhere (CLI, config files, worker specs).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from storage.errors import VolumeError

# URL prefix -> format name. `zarr://` auto-detects v2/v3 on open (like Neuroglancer) and means v2 on create.
FORMAT_PREFIXES: dict[str, str] = {
    "precomputed": "neuroglancer_precomputed",
    "zarr": "zarr",
    "zarr2": "zarr",
    "zarr3": "zarr3",
    "n5": "n5",
}
FORMATS = ("zarr", "zarr3", "n5", "neuroglancer_precomputed")
KVSTORE_SCHEMES = ("file", "memory", "gs", "s3", "http", "https")

_PREFIX_RE = re.compile(r"^([a-z0-9]+)://(.*)$")


@dataclass(frozen=True)
class ParsedUrl:
    """What a volume URL says: an explicit format (None = detect from metadata/suffix) and where the bytes are."""

    url: str
    format: str | None
    kvstore: dict
    auto_zarr: bool = False  # `zarr://` on open: v2 or v3, whichever metadata exists

    @property
    def path(self) -> str:
        return self.kvstore.get("path", "")

    def tensorstore_spec(self) -> dict:
        """The TensorStore spec this URL names (no network). Needs a known format (prefix or suffix).

        For zarr the location is our multiscale group; `open_volume` resolves the level array inside it.
        """
        if self.format is None:
            raise VolumeError(f"cannot tell the format of {self.url!r} without reading it; prefix it with "
                              "precomputed://, zarr://, zarr3:// or n5://")
        return {"driver": self.format, "kvstore": dict(self.kvstore)}


def parse_url(url: str) -> ParsedUrl:
    """Parse a volume URL. Raises VolumeError for an unknown scheme."""
    if not isinstance(url, str) or not url.strip():
        raise VolumeError(f"volume URL must be a non-empty string, got {url!r}")
    original = url
    url = url.strip()
    fmt: str | None = None
    auto_zarr = False
    m = _PREFIX_RE.match(url)
    if m and m.group(1) in FORMAT_PREFIXES:
        fmt = FORMAT_PREFIXES[m.group(1)]
        auto_zarr = m.group(1) == "zarr"
        url = m.group(2)
        if not url:
            raise VolumeError(f"volume URL {original!r} names a format but no location")
    # Neuroglancer also writes the format after a pipe: `gs://bucket/x|zarr3:`
    if "|" in url:
        url, _, tail = url.partition("|")
        name = tail.rstrip(":").split(":")[0]
        if name not in FORMAT_PREFIXES:
            raise VolumeError(f"unknown format {name!r} in volume URL {original!r}")
        fmt = FORMAT_PREFIXES[name]
        auto_zarr = name == "zarr"
    kvstore = kvstore_spec(url, original)
    if fmt is None:
        fmt = format_from_suffix(kvstore.get("path", ""))
    return ParsedUrl(original, fmt, kvstore, auto_zarr)


def kvstore_spec(location: str, original: str | None = None) -> dict:
    """TensorStore kvstore spec for `gs://b/p`, `s3://b/p`, `http(s)://h/p`, `memory://p`, `file://p` or a path.

    Paths always end in "/" because every volume is a directory of keys (metadata + chunks).
    """
    original = original or location
    m = _PREFIX_RE.match(location)
    if not m:
        if "://" in location:
            raise VolumeError(f"unknown URL scheme in {original!r}; use one of {', '.join(KVSTORE_SCHEMES)}")
        return {"driver": "file", "path": _dir(os.path.abspath(os.path.expanduser(location)))}
    scheme, rest = m.group(1), m.group(2)
    if scheme == "file":
        return {"driver": "file", "path": _dir(os.path.abspath(os.path.expanduser(rest)))}
    if scheme == "memory":
        return {"driver": "memory", "path": _dir(rest)}
    if scheme in ("gs", "s3"):
        bucket, _, path = rest.partition("/")
        if not bucket:
            raise VolumeError(f"no bucket in {original!r}")
        driver = "gcs" if scheme == "gs" else "s3"
        return {"driver": driver, "bucket": bucket, "path": _dir(path)}
    if scheme in ("http", "https"):
        try:
            parts = urlsplit(location)
        except ValueError as exc:  # e.g. "http://[": an unclosed IPv6 host
            raise VolumeError(f"malformed URL {original!r}: {exc}") from None
        if not parts.netloc:
            raise VolumeError(f"no host in {original!r}")
        return {"driver": "http", "base_url": f"{scheme}://{parts.netloc}", "path": _dir(parts.path or "/")}
    raise VolumeError(f"unknown URL scheme {scheme!r} in {original!r}; use one of {', '.join(KVSTORE_SCHEMES)}")


def format_from_suffix(path: str) -> str | None:
    """`.zarr` -> zarr3 (our default zarr flavour), `.n5` -> n5, else None (decide from metadata)."""
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    if name.endswith(".n5"):
        return "n5"
    if name.endswith(".zarr") or name.endswith(".zarr3"):
        return "zarr3"
    if name.endswith(".zarr2"):
        return "zarr"
    return None


def kvstore_join(kvstore: dict, *parts: str) -> dict:
    """The kvstore spec of a sub-directory (e.g. an NGFF level `0/`)."""
    path = kvstore.get("path", "")
    for part in parts:
        part = part.strip("/")
        if part:
            path = _dir(path) + part
    return {**kvstore, "path": _dir(path)}


def kvstore_parent(kvstore: dict) -> tuple[dict, str] | None:
    """(parent directory spec, last path component), or None at the root."""
    path = kvstore.get("path", "").rstrip("/")
    if not path:
        return None
    head, _, name = path.rpartition("/")
    parent = _dir(head) if head else ("/" if path.startswith("/") else "")
    return {**kvstore, "path": parent}, name


def kvstore_url(kvstore: dict) -> str:
    """A short human-readable location for error messages and `info`."""
    driver = kvstore.get("driver")
    path = kvstore.get("path", "")
    if driver == "file":
        return path.rstrip("/") or "/"
    if driver == "memory":
        return f"memory://{path.rstrip('/')}"
    if driver == "gcs":
        return f"gs://{kvstore.get('bucket')}/{path.rstrip('/')}"
    if driver == "s3":
        return f"s3://{kvstore.get('bucket')}/{path.rstrip('/')}"
    if driver == "http":
        return f"{kvstore.get('base_url', '').rstrip('/')}/{path.lstrip('/').rstrip('/')}"
    return str(kvstore)


def _dir(path: str) -> str:
    return path if not path or path.endswith("/") else path + "/"
