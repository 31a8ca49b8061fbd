"""Neuroglancer viewer state for a run: EM, segmentation (meshes, skeletons, properties), synapses, fragments.

Two ways to look at a run (layout in viz/publish.py):

- `open_viewer(run)` for a local run: our data server (viz/server.py) serves the run directory, the
  neuroglancer Python package serves its bundled client and holds the live state (so proofreading actions
  can run Python), both on 127.0.0.1 unless remote access is asked for.
- `shareable_state(run)` / `shareable_url(...)` for a run already on gs://, s3:// or http(s)://: the sources
  point straight at the bucket, so the JSON state (or a URL on any Neuroglancer client) needs no server.

``s.dimensions`` is always set from the run's voxel size: without it Neuroglancer picks its own units from the
first source and remote sources can end up in an empty view with a "15 m" scale bar.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import neuroglancer

from storage.errors import ConnectomeError
from viz.kvstore import kvstore_url, local_path, open_kvstore, read_json
from viz.publish import FRAGMENTS, RAW, SEGMENTATION, SYNAPSES

REMOTE_SCHEMES = ("gs://", "s3://", "http://", "https://")
DEFAULT_CLIENT = neuroglancer.url_state.default_neuroglancer_url
SYNAPSE_COLOR = "#ff00ff"  # magenta: not a segment colour one would confuse it with, and easy to find in tests
LAYER_NAMES = {RAW: "em", SEGMENTATION: "segmentation", FRAGMENTS: "fragments", SYNAPSES: "synapses"}


@dataclass
class RunView:
    """What a viewer needs to know about a run: where each layer is and the voxel grid."""

    sources: dict[str, str]  # layer dir name -> neuroglancer source URL
    voxel_size_xyz_nm: tuple[float, float, float]
    bounds_xyz: tuple[tuple[int, int, int], tuple[int, int, int]]  # [start, stop) in voxels
    default_segments: list[int] = field(default_factory=list)


def _has_info(run: str, name: str) -> bool:
    try:
        result = open_kvstore(kvstore_url(run) + name).read("info").result()
    except ConnectomeError:
        return False
    except Exception:
        return False
    return result.state == "value"


def _largest_segments(run: str, n: int) -> list[int]:
    """The n largest segments by voxel_count from the published segment properties (none if absent)."""
    try:
        props = read_json(kvstore_url(run) + f"{SEGMENTATION}/segment_properties")["inline"]
    except ConnectomeError:
        return []
    counts = next((p["values"] for p in props["properties"] if p["id"] == "voxel_count"), None)
    ids = [int(i) for i in props["ids"]]
    if counts is None:
        return ids[:n]
    return [i for _, i in sorted(zip(counts, ids), key=lambda t: (-t[0], t[1]))[:n]]


def describe_run(
    run: str | os.PathLike,
    *,
    data_url: str | None = None,
    voxel_size_xyz_nm: Sequence[float] | None = None,
    default_segments: int = 3,
) -> RunView:
    """Find the run's layers and voxel grid. `data_url` replaces the run location in sources (local server)."""
    run_str = str(run)
    is_remote = run_str.startswith(REMOTE_SCHEMES)
    if not is_remote and not os.path.isdir(run_str):
        raise ConnectomeError(f"run directory {run_str} does not exist")
    base = (data_url or (run_str if is_remote else None))
    if base is None:
        raise ConnectomeError(f"run {run_str} is local: serve it (connectome view) or give a data URL")
    base = base.rstrip("/")
    names = [n for n in (RAW, SEGMENTATION, FRAGMENTS, SYNAPSES) if _has_info(run_str, n)]
    if not names:
        raise ConnectomeError(f"no published layers (raw/, segmentation/, synapses/ with an info file) in {run_str}")
    sources = {n: f"precomputed://{base}/{n}" for n in names}
    grid_layer = next((n for n in (RAW, SEGMENTATION, FRAGMENTS) if n in names), None)
    if grid_layer is not None:
        scale = read_json(kvstore_url(run_str) + grid_layer)["scales"][0]
        voxel = tuple(float(v) for v in scale["resolution"])
        start = tuple(int(v) for v in scale.get("voxel_offset", (0, 0, 0)))
        stop = tuple(s + int(n) for s, n in zip(start, scale["size"]))
    elif voxel_size_xyz_nm is not None:
        info = read_json(kvstore_url(run_str) + SYNAPSES)
        voxel = tuple(float(v) for v in voxel_size_xyz_nm)
        start = tuple(int(lo // v) for lo, v in zip(info["lower_bound"], voxel))
        stop = tuple(int(-(-hi // v)) for hi, v in zip(info["upper_bound"], voxel))
    else:
        raise ConnectomeError(f"run {run_str} has only synapses; give the voxel size (--voxel-size X,Y,Z)")
    if voxel_size_xyz_nm is not None:
        voxel = tuple(float(v) for v in voxel_size_xyz_nm)
    segs = _largest_segments(run_str, default_segments) if SEGMENTATION in names else []
    return RunView(sources, voxel, (start, stop), segs)  # type: ignore[arg-type]


def build_state(
    view: RunView,
    *,
    segments: Sequence[int] | None = None,
    layout: str = "4panel",
    show_fragments: bool = False,
) -> neuroglancer.ViewerState:
    """A ViewerState with every layer the run has; segments default to the largest few."""
    state = neuroglancer.ViewerState()
    state.dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm",
                                                    scales=list(view.voxel_size_xyz_nm))
    (x0, y0, z0), (x1, y1, z1) = view.bounds_xyz
    state.position = [(x0 + x1) / 2, (y0 + y1) / 2, (z0 + z1) / 2]
    # both scales are in units of the finest voxel: fit the whole volume in a ~500 px panel
    finest = min(view.voxel_size_xyz_nm)
    extent = max((b - a) * v / finest for a, b, v in zip(*view.bounds_xyz, view.voxel_size_xyz_nm))
    state.cross_section_scale = extent / 450
    state.projection_scale = extent * 1.4
    chosen = [int(s) for s in (segments if segments is not None else view.default_segments)]
    src = view.sources
    if RAW in src:
        state.layers[LAYER_NAMES[RAW]] = neuroglancer.ImageLayer(source=src[RAW])
    if SEGMENTATION in src:
        state.layers[LAYER_NAMES[SEGMENTATION]] = neuroglancer.SegmentationLayer(source=src[SEGMENTATION],
                                                                                segments=chosen)
    if FRAGMENTS in src:
        state.layers[LAYER_NAMES[FRAGMENTS]] = neuroglancer.SegmentationLayer(source=src[FRAGMENTS])
        state.layers[LAYER_NAMES[FRAGMENTS]].visible = show_fragments
    if SYNAPSES in src:
        seg_layer = LAYER_NAMES[SEGMENTATION] if SEGMENTATION in src else None
        layer = neuroglancer.AnnotationLayer(source=src[SYNAPSES], annotation_color=SYNAPSE_COLOR)
        if seg_layer is not None:
            # selecting a segment lists (and shows) its synapses, as pre- or postsynaptic partner
            layer.linked_segmentation_layer = {"pre_segment": seg_layer, "post_segment": seg_layer}
            layer.filter_by_segmentation = ["pre_segment", "post_segment"]
        state.layers[LAYER_NAMES[SYNAPSES]] = layer
    if SEGMENTATION in src:
        state.selected_layer.layer = LAYER_NAMES[SEGMENTATION]
    state.layout = layout
    return state


def shareable_state(
    run: str, *, voxel_size_xyz_nm: Sequence[float] | None = None, segments: Sequence[int] | None = None
) -> neuroglancer.ViewerState:
    """State for a run on gs://, s3:// or http(s):// (sources point at the bucket; no server needed)."""
    if not str(run).startswith(REMOTE_SCHEMES):
        raise ConnectomeError(
            f"{run} is not on gs://, s3:// or http(s)://; a shareable state needs data others can reach "
            "(publish to a bucket, or use `connectome view RUN` for local data)"
        )
    return build_state(describe_run(run, voxel_size_xyz_nm=voxel_size_xyz_nm), segments=segments)


def shareable_url(state: neuroglancer.ViewerState, client_url: str = DEFAULT_CLIENT) -> str:
    return neuroglancer.to_url(state, prefix=client_url.rstrip("/") + "/")


@dataclass
class ViewerSession:
    """A live viewer on a local run: `url` to open, `close()` to stop the data server."""

    viewer: neuroglancer.Viewer
    server: Any  # viz.server.DataServer
    view: RunView
    run: str

    @property
    def url(self) -> str:
        return str(self.viewer)

    def close(self) -> None:
        self.server.close()

    def __enter__(self) -> "ViewerSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_viewer(
    run: str | os.PathLike,
    *,
    bind_address: str = "127.0.0.1",
    port: int = 0,
    data_port: int = 0,
    allow_remote: bool = False,
    public_host: str | None = None,
    segments: Sequence[int] | None = None,
    layout: str = "4panel",
    token: str | None = None,
    record_requests: bool = False,
) -> ViewerSession:
    """Serve a local run and open a neuroglancer Python viewer on it.

    `bind_address` applies to both the viewer and the data server; anything but loopback needs
    `allow_remote`. `public_host` is the name browsers use to reach this machine (default: the bind address,
    or this host's name when binding all interfaces), because layer sources are fetched by the browser.
    """
    from viz.server import serve

    run_dir = local_path(run)
    if run_dir is None or not os.path.isdir(run_dir):
        raise ConnectomeError(f"run directory {run} does not exist (remote runs: use --state)")
    server = serve(run_dir, host=bind_address, port=data_port, allow_remote=allow_remote,
                   record_requests=record_requests)
    try:
        host = public_host or (os.uname().nodename if bind_address in ("0.0.0.0", "::") else bind_address)
        host = f"[{host}]" if ":" in host else host
        view = describe_run(run_dir, data_url=f"http://{host}:{server.port}")
        neuroglancer.set_server_bind_address(bind_address, bind_port=port)
        viewer = neuroglancer.Viewer(token=token or secrets.token_hex(8))
        state = build_state(view, segments=segments, layout=layout)
        viewer.set_state(state)
    except BaseException:
        server.close()
        raise
    return ViewerSession(viewer, server, view, run_dir)


@contextmanager
def serve_run(
    run: str | os.PathLike,
    *,
    port: int = 0,
    bind_address: str = "127.0.0.1",
    allow_remote: bool = False,
    proofread: bool = True,
    user: str = "viewer",
) -> Iterator[str]:
    """Serve a local run and yield the viewer URL (with proofreading when the run has a store)."""
    session = open_viewer(run, port=port, bind_address=bind_address, allow_remote=allow_remote)
    try:
        if proofread:
            from viz.proofread import attach

            try:
                attach(session, user=user)
            except ConnectomeError:
                pass  # no store: view only
        yield session.url
    finally:
        session.close()
