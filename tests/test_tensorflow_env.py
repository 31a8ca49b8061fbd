"""The project's TensorFlow settings hold in a fresh process that imports one of its packages first."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ONEDNN_STATE = "from storage.tensorflow_env import onednn_enabled; print(int(onednn_enabled()))"


def _onednn_after_importing(package: str, env_value: str | None) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if env_value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = env_value
    out = subprocess.run([sys.executable, "-c", f"import {package}; {ONEDNN_STATE}"], env=env, check=True,
                         capture_output=True, text=True, timeout=300)
    return out.stdout.strip().splitlines()[-1] == "1"


@pytest.mark.parametrize("package", ["ffn", "segclr", "pipeline"])
def test_importing_a_package_turns_onednn_on(package):
    # without it TensorFlow uses Eigen on AVX2 CPUs, several times slower (storage/tensorflow_env.py)
    assert _onednn_after_importing(package, None)


def test_a_users_onednn_setting_wins():
    assert not _onednn_after_importing("ffn", "0")
