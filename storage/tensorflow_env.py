"""TensorFlow's process settings, set before TensorFlow is imported (it reads them once, when it loads).

Why: TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512 VNNI/BF16 or AMX. On AVX2
machines (AMD EPYC nodes, common on clusters) it falls back to Eigen. On the 2-core AMD development machine
(2026-11-30, three runs of `python benchmarks/tensorflow_backend.py`) Eigen was slower than oneDNN by 1.7-2.2x
for a batch-4 FFN forward pass, 2.4-3.4x for an FFN training step, 1.1-2.3x for the FIB-25 model and 2.6-3.9x
for the synapse U-Net.
So the project asks for oneDNN everywhere. A user's own `TF_ENABLE_ONEDNN_OPTS` (0 to compare, or to reproduce
Eigen's rounding) wins. TensorFlow's C++ info lines are quieted the same way (all but its "oneDNN custom
operations are on" notice, which it prints whatever the level says).

Every package that imports TensorFlow (ffn, segclr, pipeline) calls `configure()` from its `__init__`, so the
settings hold in the driver, in Dask workers (they import a package before running its tasks) and in Slurm or
Kubernetes jobs alike. It lives in storage because that is the one package every other imports and that imports
none of them.
"""

from __future__ import annotations

import os

DEFAULTS = {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def configure() -> None:
    """Set each of `DEFAULTS` unless the environment already has it. Too late once TensorFlow is loaded."""
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)


def onednn_enabled() -> bool:
    """TensorFlow's own answer (imports TensorFlow): are its oneDNN kernels on in this process?"""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())
