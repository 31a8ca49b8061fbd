"""FFN training (google/ffn ``compute_partitions`` + ``build_coordinates`` + ``train.py`` in one package).

``partitions`` -> ``coordinates`` (class-balanced centres) -> ``examples`` (patches, soft labels, FOV walks)
-> ``augment`` -> ``loop`` (optimizer steps, checkpoints, scalars, export). Entry point: ``train(config)``.
"""

from ffn.train.config import TrainConfig, config_from_dict, load_train_config
from ffn.train.loop import Trainer, train


def train_from_file(path: str, *, max_steps: int | None = None, output_dir: str | None = None) -> Trainer:
    """What ``connectome train ffn CONFIG`` runs."""
    import dataclasses
    import signal
    import threading

    config = load_train_config(path)
    if output_dir:
        config = dataclasses.replace(config, output_dir=output_dir)
    if threading.current_thread() is threading.main_thread():
        # `kill PID` checkpoints and stops like Ctrl-C, so a killed run resumes where it was
        signal.signal(signal.SIGTERM, _interrupt)
    return train(config, max_steps=max_steps)


def _interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


__all__ = ["TrainConfig", "Trainer", "config_from_dict", "load_train_config", "train", "train_from_file"]
