"""run_blockwise with its Dask workers as jobs of a real (throw-away, single-node) Slurm cluster.

The session fixture starts munge, slurmctld and slurmd with deploy/slurm/cluster.sh on free ports in a temp
directory and stops exactly those processes afterwards. Needs root and the Debian packages
slurmctld slurmd slurm-client munge (`deploy/slurm/cluster.sh install`); skipped without them unless
CONNECTOME_REQUIRE_SLURM=1, which turns the skip into a failure (CI).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts

import runner_blocks as rb
from pipeline.cluster import ClusterConfig, SlurmConfig, open_client
from pipeline.runner import run_blockwise

pytestmark = pytest.mark.slurm

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "slurm" / "cluster.sh"
TESTS = Path(__file__).resolve().parent
SEED = 11


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the throw-away Slurm cluster needs root"
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey") if shutil.which(b) is None]
    if missing:
        return f"Slurm/munge not installed (missing {', '.join(missing)}; run deploy/slurm/cluster.sh install)"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = _unavailable()
    if reason:
        if os.environ.get("CONNECTOME_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    # not under pytest's tmp dir: that is private to root (0700) and munged runs as the munge user
    state = Path(tempfile.mkdtemp(prefix="connectome-slurm-"))
    state.chmod(0o755)
    env = dict(os.environ, SLURM_CI_DIR=str(state), SLURM_CI_CPUS="8",
               SLURM_CI_CTLD_PORT=str(_free_port()), SLURM_CI_SLURMD_PORT=str(_free_port()))
    old = os.environ.get("SLURM_CONF")
    up = subprocess.run([str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        os.environ["SLURM_CONF"] = str(state / "etc" / "slurm.conf")  # the jobs inherit it (--export=ALL)
        yield state
    finally:
        subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=180)
        shutil.rmtree(state, ignore_errors=True)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def slurm_config(state: Path, jobs: int = 2) -> ClusterConfig:
    return ClusterConfig(kind="slurm", dashboard=False, slurm=SlurmConfig(
        cores=1, memory="2GB", processes=1, jobs=jobs, walltime="00:15:00", queue="debug",
        log_directory=str(state / "jobs" / "dask-logs"), scheduler_host="127.0.0.1",
        lifetime="10m", lifetime_stagger="1m",
        # the test's block functions live in tests/runner_blocks.py, not in the installed package
        job_script_prologue=["export OMP_NUM_THREADS=1", f"export PYTHONPATH={TESTS}:${{PYTHONPATH:-}}"]))


def queue(*args: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", *args], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def wait_for_empty_queue(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while queue("-o", "%i"):
        assert time.monotonic() < deadline, f"jobs still queued: {queue()}"
        time.sleep(0.25)


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The same stage on a LocalCluster: the bytes the Slurm runs must reproduce."""
    root = tmp_path_factory.mktemp("local")
    spec = rb.create_volume(root / "out.zarr")
    with open_client(ClusterConfig(workers=1, dashboard=False)) as client:
        run_blockwise("write", rb.grid(), rb.write_block, params={"spec": spec, "seed": SEED}, client=client,
                      ledger_dir=root / "ledger", progress=False)
    return root / "out.zarr"


def test_blocks_run_as_slurm_jobs_and_match_local_cluster(slurm, local_reference, tmp_path):
    spec = rb.create_volume(tmp_path / "out.zarr")
    with open_client(slurm_config(slurm)) as client:
        client.wait_for_workers(2, timeout=120)
        job_ids = set(client.run(lambda: os.environ.get("SLURM_JOB_ID")).values())
        assert len(job_ids) == 2 and None not in job_ids  # the workers really are Slurm jobs
        assert set(queue("-o", "%i")) >= job_ids
        results = run_blockwise("write", rb.grid(), rb.write_block, params={"spec": spec, "seed": SEED},
                                client=client, ledger_dir=tmp_path / "ledger", progress=False)
    assert len(results) == 1000
    assert tree_bytes(tmp_path / "out.zarr") == tree_bytes(local_reference)
    wait_for_empty_queue()


def test_scancel_of_a_worker_job_mid_run_retries_its_blocks(slurm, local_reference, tmp_path):
    spec = rb.create_volume(tmp_path / "out.zarr")
    cancelled = []
    with open_client(slurm_config(slurm)) as client:
        client.wait_for_workers(2, timeout=120)
        jobs = client.run(lambda: os.environ["SLURM_JOB_ID"])
        victim = sorted(jobs.values())[0]

        def cancel_once(done: int, total: int) -> None:
            if not cancelled and done >= 200:
                cancelled.append(done)
                subprocess.run(["scancel", victim], check=True)

        results = run_blockwise("write", rb.grid(), rb.write_block,
                                params={"spec": spec, "seed": SEED, "sleep": 0.004}, client=client,
                                ledger_dir=tmp_path / "ledger", progress=cancel_once, max_in_flight=64)
        survivors = set(client.run(lambda: os.environ["SLURM_JOB_ID"]).values())
    assert cancelled and cancelled[0] < 1000
    assert victim not in survivors  # the cancelled job's worker really went away during the run
    assert len(results) == 1000
    assert tree_bytes(tmp_path / "out.zarr") == tree_bytes(local_reference)
    np.testing.assert_array_equal(ts.open(spec, open=True).result().read().result(), rb.expected_volume(SEED))
    wait_for_empty_queue()
