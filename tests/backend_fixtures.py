"""Run code in a subprocess under Keras's JAX backend on a machine made to look as if TensorFlow were not
installed: the GPU nodes this serves (JAX or PyTorch stacks) have none, and Keras imports TensorFlow whenever it
can (e.g. `keras.utils.set_random_seed` seeds it too), so merely checking `sys.modules` afterwards would prove
nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NO_TENSORFLOW = """
import sys
class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
sys.meta_path.insert(0, _NoTensorFlow())
"""
TESTS = Path(__file__).resolve().parent


def run_under_jax_without_tensorflow(code: str, *args: str) -> subprocess.CompletedProcess:
    """`python -c code args...` with KERAS_BACKEND=jax on the CPU, TensorFlow unimportable, tests/ on sys.path;
    fails the calling test with the subprocess's stderr when it exits non-zero."""
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", NO_TENSORFLOW + code, *args], env=env, cwd=TESTS.parent,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run
