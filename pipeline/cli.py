"""The `connectome` command line.

Each subcommand lives in `pipeline/commands/<module>.py` and defines ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their command runs (TensorFlow alone takes seconds to
import), except for building the parser, which needs every module's arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from storage.errors import ConnectomeError

# name -> module under pipeline.commands (keep sorted)
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "evaluate": "evaluate",
    "import": "import_volume",
    "import-ffn": "import_ffn",
    "info": "info",
    "plan": "plan",
    "publish": "publish",
    "query": "query",
    "run": "run",
    "segment": "segment",
    "synth": "synth",
    "train": "train",
    "view": "view",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connectome",
        description="EM volumes to a queryable connectome (FFN segmentation on Dask, synapses, SegCLR, Neuroglancer).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"pipeline.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except ConnectomeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
