"""Where blocks run: a Dask client on a local, existing, Slurm or Kubernetes cluster, from one config section.

WHY one factory: stages only ever see a `distributed.Client`; how workers come to exist (processes on this
machine, jobs in a Slurm queue, pods from the dask-kubernetes operator) is configuration. Workers are always
separate processes started with spawn (the nanny default), never forked, because TensorStore and TensorFlow
handles do not survive a fork; stages open their stores inside the workers.

GPU placement: workers that own an accelerator advertise the Dask resource ``GPU=1``; stages that need one submit
with ``resources={"GPU": 1}`` and land only there, while CPU stages use every worker.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Iterator, Literal

import dask
from distributed import Client

from storage.errors import ConfigError

KINDS = ("local", "address", "slurm", "kubernetes")


def _duration_seconds(text: str, what: str) -> float:
    """'55m', '1h', '90s', '01:30:00', '2-00:00:00' -> seconds (Dask and Slurm time formats)."""
    text = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d+)(?::(\d+))?", text)
    if m:
        days, a, b, c = m.groups()
        h, mi, s = (int(a), int(b), int(c)) if c is not None else (0, int(a), int(b))
        return ((int(days or 0) * 24 + h) * 60 + mi) * 60 + s
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|min|minutes?|hours?|seconds?|days?)?", text)
    if not m:
        raise ConfigError(f"{what}: cannot read duration {text!r} (use e.g. '55m', '2h', '01:00:00')")
    unit = (m.group(2) or "s")[0]
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


@dataclass
class SlurmConfig:
    """dask-jobqueue SLURMCluster settings; one Slurm job runs `processes` Dask workers."""

    cores: int = 1  # CPU cores per job
    memory: str = "4GB"  # memory per job
    processes: int = 1  # Dask worker processes per job (cores are split between them)
    walltime: str = "01:00:00"
    queue: str | None = None  # Slurm partition
    account: str | None = None
    job_extra_directives: list[str] = field(default_factory=list)  # extra '#SBATCH' lines, e.g. '--gres=gpu:1'
    job_script_prologue: list[str] = field(default_factory=list)  # shell lines before the worker starts
    local_directory: str | None = None  # worker scratch (spill) directory on the node
    log_directory: str | None = None
    interface: str | None = None  # network interface of workers, e.g. 'ib0'
    scheduler_host: str | None = None  # address the scheduler binds to (e.g. '127.0.0.1' on a one-node test)
    python: str | None = None  # interpreter for workers (default: this one)
    jobs: int = 1  # fixed scaling: number of jobs
    minimum_jobs: int | None = None  # adaptive scaling when maximum_jobs is set
    maximum_jobs: int | None = None
    lifetime: str | None = None  # worker --lifetime, shorter than walltime so a job never dies mid-block
    lifetime_stagger: str = "4m"
    lifetime_restart: bool = False  # restart the worker in the same job after its lifetime (long walltimes)
    gpus_per_job: int = 0  # adds '--gres=gpu:N' and the GPU resource to each worker
    death_timeout: int = 60

    def __post_init__(self) -> None:
        for name in ("cores", "processes", "jobs"):
            if getattr(self, name) < (0 if name == "jobs" else 1):
                raise ConfigError(f"slurm.{name} must be positive, got {getattr(self, name)}")
        if self.cores % self.processes:
            raise ConfigError(f"slurm.cores ({self.cores}) must be a multiple of slurm.processes ({self.processes})")
        if self.maximum_jobs is not None and (self.minimum_jobs or 0) > self.maximum_jobs:
            raise ConfigError(f"slurm.minimum_jobs ({self.minimum_jobs}) exceeds maximum_jobs ({self.maximum_jobs})")
        if self.gpus_per_job and self.gpus_per_job % self.processes and self.processes % self.gpus_per_job:
            raise ConfigError(f"slurm.gpus_per_job ({self.gpus_per_job}) does not split over "
                              f"{self.processes} worker processes")
        wall = _duration_seconds(self.walltime, "slurm.walltime")
        if self.lifetime is not None:
            life = _duration_seconds(self.lifetime, "slurm.lifetime")
            stagger = _duration_seconds(self.lifetime_stagger, "slurm.lifetime_stagger")
            if life + stagger >= wall:
                raise ConfigError(f"slurm.lifetime {self.lifetime} + lifetime_stagger {self.lifetime_stagger} must "
                                  f"be shorter than walltime {self.walltime}, or Slurm kills workers mid-block")


@dataclass
class WorkerGroupConfig:
    """One Kubernetes worker group (pods of the same shape)."""

    replicas: int = 2
    cpu: str = "2"
    memory: str = "8Gi"
    threads: int | None = None  # default: the cpu request rounded up
    gpus: int = 0  # nvidia.com/gpu limit per pod; the group advertises the GPU resource
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    image: str | None = None  # default: KubernetesConfig.image (gpu_image for GPU groups)


def _default_gpu_group() -> WorkerGroupConfig:
    return WorkerGroupConfig(
        replicas=0, cpu="4", memory="24Gi", gpus=1,
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )


@dataclass
class KubernetesConfig:
    """dask-kubernetes operator DaskCluster: a CPU worker group plus an optional GPU worker group."""

    name: str = "connectome"
    namespace: str = "default"
    image: str = "ghcr.io/connectome-pipeline/connectome:0.1.0"
    gpu_image: str = "ghcr.io/connectome-pipeline/connectome-gpu:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    service_type: str = "ClusterIP"
    scheduler_cpu: str = "1"
    scheduler_memory: str = "4Gi"
    cpu_workers: WorkerGroupConfig = field(default_factory=WorkerGroupConfig)
    gpu_workers: WorkerGroupConfig = field(default_factory=_default_gpu_group)
    data_pvc: str | None = "connectome-data"  # PersistentVolumeClaim mounted on every pod (None: object store)
    data_mount: str = "/data"
    env: dict[str, str] = field(default_factory=dict)  # e.g. object-store endpoint/credentials secret names

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", self.name):
            raise ConfigError(f"kubernetes.name {self.name!r} must be a DNS label (lower-case letters, digits, '-')")


@dataclass
class ClusterConfig:
    """Which Dask cluster to use and its size. `kind` picks the backend; the matching section configures it."""

    kind: Literal["local", "address", "slurm", "kubernetes"] = "local"
    workers: int = 2  # local: worker processes
    threads_per_worker: int = 1
    memory_limit: str = "auto"  # per worker: 'auto' (machine memory / workers) or e.g. '4GiB'
    gpu_workers: int = 0  # local: how many of the workers advertise GPU=1 (each sees one CUDA device)
    resources: dict[str, float] = field(default_factory=dict)  # extra resource labels on every worker
    dashboard: bool = True
    dashboard_address: str = ":8787"  # ":0" picks a free port
    address: str | None = None  # kind=address: tcp://host:port of a running scheduler ($DASK_SCHEDULER_ADDRESS)
    timeout: float = 60.0  # seconds to wait for the scheduler / first workers
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"cluster.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.workers < 1 and self.kind == "local":
            raise ConfigError(f"cluster.workers must be at least 1, got {self.workers}")
        if self.threads_per_worker < 1:
            raise ConfigError(f"cluster.threads_per_worker must be at least 1, got {self.threads_per_worker}")
        if not 0 <= self.gpu_workers <= self.workers:
            raise ConfigError(f"cluster.gpu_workers must be between 0 and workers ({self.workers}), "
                              f"got {self.gpu_workers}")
        if self.kind == "address" and not (self.address or os.environ.get("DASK_SCHEDULER_ADDRESS")):
            raise ConfigError("cluster.address is required when cluster.kind is 'address' (e.g. tcp://host:8786; "
                              "or set DASK_SCHEDULER_ADDRESS)")


def _worker_process_defaults() -> None:
    """Spawned worker processes, never forked: TensorStore/TensorFlow handles do not survive fork."""
    dask.config.set({"distributed.worker.multiprocessing-method": "spawn"})


@contextlib.contextmanager
def open_client(config: ClusterConfig | None = None) -> Iterator[Client]:
    """Start (or connect to) the configured cluster; yield a Client; shut down what was started on exit."""
    config = config or ClusterConfig()
    _worker_process_defaults()
    opener = {"local": _open_local, "address": _open_address, "slurm": _open_slurm,
              "kubernetes": _open_kubernetes}[config.kind]
    with opener(config) as client:
        yield client


def _memory_limit(config: ClusterConfig) -> str | int:
    if config.memory_limit != "auto":
        return config.memory_limit
    from distributed.system import MEMORY_LIMIT

    return int(MEMORY_LIMIT / config.workers)


def local_worker_specs(config: ClusterConfig) -> dict[str, dict]:
    """Nanny options per local worker: name -> {'resources', 'env'} (GPU workers first, one CUDA device each)."""
    specs = {}
    for i in range(config.workers):
        resources = dict(config.resources)
        env: dict[str, str] = {}
        if i < config.gpu_workers:
            name = f"gpu-{i}"
            resources["GPU"] = 1
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        else:
            name = f"cpu-{i - config.gpu_workers}"
            if config.gpu_workers:
                env["CUDA_VISIBLE_DEVICES"] = ""  # CPU workers must not grab a GPU behind the scheduler's back
        specs[name] = {"resources": resources, "env": env}
    return specs


@contextlib.contextmanager
def _open_local(config: ClusterConfig) -> Iterator[Client]:
    from distributed import LocalCluster, Nanny

    cluster = LocalCluster(
        n_workers=0, processes=True, threads_per_worker=config.threads_per_worker,
        memory_limit=_memory_limit(config),
        # the scheduler serves /health even without a dashboard; ':0' keeps it off a port someone else uses
        dashboard_address=config.dashboard_address if config.dashboard else ":0",
        scheduler_kwargs=None if config.dashboard else {"dashboard": False},
        host="127.0.0.1",
    )
    try:
        base = cluster.new_spec["options"]
        for name, extra in local_worker_specs(config).items():
            options = dict(base, name=name, resources=extra["resources"] or None)
            if extra["env"]:
                options["env"] = extra["env"]
            cluster.worker_spec[name] = {"cls": Nanny, "options": options}
        cluster.sync(cluster._correct_state)
        with Client(cluster, timeout=config.timeout) as client:
            client.wait_for_workers(config.workers, timeout=config.timeout)
            yield client
    finally:
        cluster.close()


@contextlib.contextmanager
def _open_address(config: ClusterConfig) -> Iterator[Client]:
    address = config.address or os.environ["DASK_SCHEDULER_ADDRESS"]  # set by the operator in DaskJob pods
    try:
        client = Client(address, timeout=config.timeout)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"cannot reach the Dask scheduler at {address} (cluster.address): {exc}") from None
    with client:
        yield client


def slurm_cluster_kwargs(config: ClusterConfig) -> dict:
    """Keyword arguments for dask_jobqueue.SLURMCluster (pure; tested without Slurm)."""
    s = config.slurm
    extra_args: list[str] = []
    if s.lifetime:
        extra_args += ["--lifetime", s.lifetime, "--lifetime-stagger", s.lifetime_stagger]
        if s.lifetime_restart:
            extra_args.append("--lifetime-restart")
    resources = dict(config.resources)
    directives = list(s.job_extra_directives)
    if s.gpus_per_job:
        resources["GPU"] = max(1, s.gpus_per_job // s.processes)
        if not any(d.startswith("--gres") for d in directives):
            directives.append(f"--gres=gpu:{s.gpus_per_job}")
    if resources:
        extra_args += ["--resources", ",".join(f"{k}={v:g}" for k, v in resources.items())]
    kwargs = {
        "cores": s.cores, "memory": s.memory, "processes": s.processes, "walltime": s.walltime,
        "job_extra_directives": directives, "job_script_prologue": list(s.job_script_prologue),
        "worker_extra_args": extra_args, "death_timeout": s.death_timeout,
        "python": s.python or sys.executable,
        # jobqueue has no "off": a random port at least never collides with another scheduler's dashboard
        "scheduler_options": {"dashboard_address": config.dashboard_address if config.dashboard else ":0"},
    }
    optional = {"queue": s.queue, "account": s.account, "local_directory": s.local_directory,
                "log_directory": s.log_directory, "interface": s.interface}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if s.scheduler_host:
        kwargs["scheduler_options"]["host"] = s.scheduler_host
    return kwargs


@contextlib.contextmanager
def _open_slurm(config: ClusterConfig) -> Iterator[Client]:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError("cluster.kind 'slurm' needs dask-jobqueue: pip install 'connectome-pipeline[slurm]'") from None
    s = config.slurm
    cluster = SLURMCluster(**slurm_cluster_kwargs(config))
    try:
        if s.maximum_jobs is not None:
            cluster.adapt(minimum_jobs=s.minimum_jobs or 0, maximum_jobs=s.maximum_jobs)
        else:
            cluster.scale(jobs=s.jobs)
        with Client(cluster, timeout=config.timeout) as client:
            # one worker is enough to start: blocks stream in as more jobs leave the queue
            client.wait_for_workers(1, timeout=max(config.timeout, 120))
            yield client
            with contextlib.suppress(Exception):
                cluster.scale(0)  # retire workers before the jobs are cancelled: clean logs, empty queue
    finally:
        cluster.close()


@contextlib.contextmanager
def _open_kubernetes(config: ClusterConfig) -> Iterator[Client]:
    from pipeline.kubernetes import open_kube_cluster

    with open_kube_cluster(config) as cluster, Client(cluster, timeout=config.timeout) as client:
        yield client

