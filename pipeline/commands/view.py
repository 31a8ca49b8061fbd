"""`connectome view RUN`: look at a run in Neuroglancer (and proofread it), or print a shareable state."""

from __future__ import annotations

import argparse
import json
import sys
import time

HELP = ("Open a run in Neuroglancer (EM, segmentation with meshes/skeletons/properties, synapses; proofreading "
        "keys alt+m/alt+x/alt+z) and print the URL; --state prints a shareable state/URL for a run on gs/s3/http.")


def _xyz(text: str) -> tuple[float, float, float]:
    parts = [float(v) for v in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def _ids(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated segment ids, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory, or gs://, s3://, http(s):// URL of a published run")
    parser.add_argument("--state", action="store_true",
                        help="print a shareable viewer state (JSON) and URL for a run on gs://, s3:// or http(s)://")
    parser.add_argument("--bind", metavar="ADDR", default=None,
                        help="address to listen on (default 127.0.0.1; anything else exposes the run to the network)")
    parser.add_argument("--port", type=int, default=0, help="viewer port (default: any free port)")
    parser.add_argument("--data-port", type=int, default=0, help="data server port (default: any free port)")
    parser.add_argument("--public-host", default=None, help="host name browsers use to reach this machine")
    parser.add_argument("--segments", type=_ids, default=None, metavar="ID,ID,...",
                        help="segments to show (default: the 3 largest)")
    parser.add_argument("--layout", default="4panel", help="neuroglancer layout (4panel, xy-3d, 3d, ...)")
    parser.add_argument("--no-proofread", action="store_true", help="do not attach the store's proofreading actions")
    parser.add_argument("--store", default=None, help="connectome store (default RUN/connectome.duckdb)")
    parser.add_argument("--user", default="viewer", help="name recorded with edits")
    parser.add_argument("--voxel-size", type=_xyz, default=None, metavar="X,Y,Z",
                        help="voxel size in nm when the run has no volume to read it from")
    parser.add_argument("--client-url", default=None, help="Neuroglancer client for the --state URL")


def run(args: argparse.Namespace) -> int:
    from storage.errors import ConnectomeError
    from viz.viewer import DEFAULT_CLIENT, open_viewer, shareable_state, shareable_url

    if args.state:
        state = shareable_state(args.run, voxel_size_xyz_nm=args.voxel_size, segments=args.segments)
        print(json.dumps(state.to_json(), indent=1))
        print(shareable_url(state, args.client_url or DEFAULT_CLIENT))
        return 0
    bind = args.bind or "127.0.0.1"
    session = open_viewer(args.run, bind_address=bind, port=args.port, data_port=args.data_port,
                          allow_remote=args.bind is not None, public_host=args.public_host,
                          segments=args.segments, layout=args.layout)
    try:
        if not args.no_proofread:
            from viz.proofread import attach

            try:
                attach(session, store=args.store, user=args.user)
            except ConnectomeError as exc:
                if args.store:
                    raise
                print(f"note: proofreading off ({exc})", file=sys.stderr)
        print(session.url, flush=True)
        print(f"data: {session.server.url}  (Ctrl-C to stop)", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0
    finally:
        session.close()
