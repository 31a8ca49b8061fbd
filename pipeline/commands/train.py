"""`connectome train ffn|segclr|synapses|synapse-filter CONFIG`: train a model from a YAML/JSON config.

The science lives in ``ffn/`` and ``segclr/``; this command only picks the trainer by the first argument and
hands it the config path. A trainer is ``module:function`` taking ``(config_path, **overrides)``; the
``--max-steps`` / ``--output-dir`` overrides are passed only when given and only to trainers that accept them.
"""

from __future__ import annotations

import argparse
import importlib
import inspect

from storage.errors import ConnectomeError

HELP = "Train a model (ffn, segclr, synapses or synapse-filter) from a YAML/JSON config; resumes from the config's output_dir."

# kind -> "module:function" taking (config_path, **overrides)
TRAINERS: dict[str, str] = {
    "ffn": "ffn.train:train_from_file",
    "segclr": "segclr.training:train_from_config",
    "synapses": "pipeline.synapse_training:train_from_config",
    "synapse-filter": "pipeline.synapse_filter:fit_from_config",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=sorted(TRAINERS), help="which model to train")
    parser.add_argument("config", metavar="CONFIG", help="training config (YAML or JSON); see examples/train_*.yaml")
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps (total)")
    parser.add_argument("--output-dir", default=None, help="override the config's output_dir")


def run(args: argparse.Namespace) -> int:
    module_name, func_name = TRAINERS[args.kind].split(":")
    try:
        module = importlib.import_module(module_name)
        trainer = getattr(module, func_name)
    except (ImportError, AttributeError) as exc:
        raise ConnectomeError(f"train {args.kind}: trainer {TRAINERS[args.kind]} is not available ({exc})") from None
    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("output_dir", args.output_dir)) if v is not None}
    accepted = inspect.signature(trainer).parameters
    for key in overrides:
        if key not in accepted:
            flag = "--" + key.replace("_", "-")
            raise ConnectomeError(f"train {args.kind}: {flag} is not supported; set it in the config {args.config}")
    trainer(args.config, **overrides)
    return 0
