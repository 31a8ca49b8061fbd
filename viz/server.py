"""A small HTTP server for a run directory, so the browser viewer can read precomputed layers.

Why not ``python -m http.server``: Neuroglancer needs CORS headers (the viewer page comes from another
port), byte ranges (sharded files are read by range), and files pre-compressed on disk (``chunk.gz``, as
cloud-volume writes them) served with ``Content-Encoding: gzip`` under their plain name. It also must not
expose more than the run: paths are resolved (symlinks included) and anything outside the root is
refused, directories are not listed, only GET/HEAD/OPTIONS are accepted, and request lines, headers and
multi-range requests beyond fixed limits are rejected. It binds 127.0.0.1 unless `allow_remote` is set.
"""

from __future__ import annotations

import gzip
import http.server
import ipaddress
import mimetypes
import os
import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from storage.errors import ConnectomeError

MAX_URL_BYTES = 4096
MAX_HEADER_BYTES = 16384
MAX_RANGE_PARTS = 1
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "connectome-viz"
    protocol_version = "HTTP/1.1"
    root: Path  # set on the subclass built per server

    # -- plumbing ------------------------------------------------------------------------------
    def log_message(self, format: str, *args) -> None:  # keep test output and terminals quiet
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def _cors(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Range, Content-Type")
        self.send_header(
            "Access-Control-Expose-Headers", "Content-Range, Content-Length, Content-Encoding, Accept-Ranges, ETag"
        )

    def send_response(self, code: int, message: str | None = None) -> None:
        log = getattr(self.server, "requests", None)
        if log is not None:
            log.append((urllib.parse.urlsplit(self.path).path if hasattr(self, "path") else "", code))
        super().send_response(code, message)

    def _error(self, code: int, message: str) -> None:
        body = (message + "\n").encode()
        self.send_response(code)
        self._cors()
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def parse_request(self) -> bool:  # size limits before anything else looks at the request
        if len(self.raw_requestline) > MAX_URL_BYTES:
            self.requestline = ""
            self.request_version = "HTTP/1.1"
            self.command = "GET"
            self.close_connection = True
            self._error(414, "request line too long")
            return False
        if not super().parse_request():
            return False
        header_bytes = sum(len(k) + len(v) + 4 for k, v in self.headers.items())
        if header_bytes > MAX_HEADER_BYTES:
            self._error(431, "request headers too large")
            return False
        if int(self.headers.get("Content-Length", "0") or 0) > 0:
            self._error(413, "request bodies are not accepted")
            return False
        return True

    # -- path resolution -----------------------------------------------------------------------
    def _resolve(self) -> Path | None:
        raw = urllib.parse.urlsplit(self.path).path
        rel = urllib.parse.unquote(raw).lstrip("/")
        if "\x00" in rel or any(part == ".." for part in rel.split("/")):
            return None
        candidate = (self.root / rel).resolve()
        try:
            candidate.relative_to(self.root)
        except ValueError:
            return None
        return candidate

    # -- methods -------------------------------------------------------------------------------
    def do_OPTIONS(self) -> None:
        self.send_response(204)
        self._cors()
        self.send_header("Access-Control-Max-Age", "86400")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _refuse_method(self) -> None:
        self._error(405, "only GET, HEAD and OPTIONS are supported")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse_method

    def _serve(self, send_body: bool) -> None:
        path = self._resolve()
        if path is None:
            self._error(403, "path outside the served directory")
            return
        encoded_gzip = False
        if not path.is_file():
            gz = path.with_name(path.name + ".gz")
            if gz.is_file() and gz.resolve().is_relative_to(self.root):
                path, encoded_gzip = gz, True
            else:
                self._error(404, "not found")
                return
        data_len = path.stat().st_size
        range_header = self.headers.get("Range")
        accepts_gzip = "gzip" in (self.headers.get("Accept-Encoding") or "")
        if encoded_gzip and (range_header or not accepts_gzip):
            # ranges address the decoded bytes; a client that cannot decode gets them plain
            payload = gzip.decompress(path.read_bytes())
            encoded_gzip = False
        else:
            payload = None

        total = len(payload) if payload is not None else data_len
        start, stop, status = 0, total, 200
        if range_header:
            parsed = self._parse_range(range_header, total)
            if parsed is None:
                self.send_response(416)
                self._cors()
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, stop = parsed
            status = 206

        self.send_response(status)
        self._cors()
        self.send_header("Accept-Ranges", "bytes")
        ctype = "application/json" if path.name == "info" else (mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.send_header("Content-Type", ctype if not encoded_gzip else "application/octet-stream")
        if encoded_gzip:
            self.send_header("Content-Encoding", "gzip")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{total}")
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if not send_body:
            return
        if payload is not None:
            self.wfile.write(payload[start:stop])
            return
        with open(path, "rb") as f:
            f.seek(start)
            remaining = stop - start
            while remaining > 0:
                chunk = f.read(min(1 << 20, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)

    @staticmethod
    def _parse_range(header: str, total: int) -> tuple[int, int] | None:
        """Single byte range -> [start, stop); None if unsatisfiable or more parts than allowed."""
        if header.count(",") + 1 > MAX_RANGE_PARTS:
            return None
        m = _RANGE.match(header.strip())
        if not m or (m.group(1) == "" and m.group(2) == ""):
            return None
        first, last = m.group(1), m.group(2)
        if first == "":  # suffix: last N bytes
            n = int(last)
            if n == 0:
                return None
            return max(0, total - n), total
        start = int(first)
        stop = total if last == "" else min(total, int(last) + 1)
        if start >= total or stop <= start:
            return None
        return start, stop


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class DataServer:
    """A running server: `url` to put in layer sources, `close()` to stop it."""

    root: Path
    host: str
    port: int
    _httpd: _Server
    _thread: threading.Thread

    @property
    def requests(self) -> list[tuple[str, int]] | None:
        """(path, status) of every response, when started with record_requests=True."""
        return getattr(self._httpd, "requests", None)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "DataServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(
    root: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    allow_remote: bool = False,
    verbose: bool = False,
    record_requests: bool = False,
) -> DataServer:
    """Serve `root` read-only in a background thread; port 0 picks a free port.

    Binding a non-loopback address exposes the run to the network, so it needs `allow_remote=True`
    (the CLI's explicit ``--bind`` flag).
    """
    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise ConnectomeError(f"cannot serve {root}: not a directory")
    if not _is_loopback(host) and not allow_remote:
        raise ConnectomeError(
            f"refusing to serve {root_path} on {host}: only loopback addresses unless remote access is asked for (--bind)"
        )
    handler = type("Handler", (_Handler,), {"root": root_path})
    server_cls = type("Server6", (_Server,), {"address_family": socket.AF_INET6}) if ":" in host else _Server
    try:
        httpd = server_cls((host, port), handler)
    except OSError as exc:
        raise ConnectomeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    httpd.verbose = verbose  # type: ignore[attr-defined]
    httpd.requests = [] if record_requests else None  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"viz-server-{root_path.name}", daemon=True)
    thread.start()
    return DataServer(root_path, host, httpd.server_address[1], httpd, thread)
