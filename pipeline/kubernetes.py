"""Kubernetes backend: dask-kubernetes operator resources (DaskCluster, DaskWorkerGroup, DaskJob, PVC) as dicts.

WHY build the manifests ourselves: the same dicts are written to deploy/kubernetes/*.yaml for people who use
kubectl, and submitted by `open_kube_cluster` for `--cluster kubernetes`; one function makes both, and a test
keeps the checked-in YAML equal to it. Only `open_kube_cluster` needs dask-kubernetes and a cluster.

Layout: a DaskCluster with the scheduler and the CPU worker group, plus a DaskWorkerGroup "<name>-gpu" whose pods
request `nvidia.com/gpu`, run on GPU nodes (node selector + toleration) and advertise the Dask resource GPU=1,
so GPU stages land only there. Every pod mounts the data PVC at the same path (or uses an object store via env).
The images' entry point is `connectome`, so containers here set `command` (dask-scheduler / dask-worker).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

from pipeline.cluster import ClusterConfig, KubernetesConfig, WorkerGroupConfig
from storage.errors import ConfigError

API_VERSION = "kubernetes.dask.org/v1"
SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
WORKER_DASHBOARD_PORT = 8788


def _env(k: KubernetesConfig) -> list[dict]:
    return [{"name": name, "value": str(value)} for name, value in sorted(k.env.items())]


def _volumes(k: KubernetesConfig) -> tuple[list[dict], list[dict]]:
    if not k.data_pvc:
        return [], []
    return ([{"name": "data", "persistentVolumeClaim": {"claimName": k.data_pvc}}],
            [{"name": "data", "mountPath": k.data_mount}])


def _threads(group: WorkerGroupConfig) -> int:
    if group.threads:
        return group.threads
    cpu = group.cpu[:-1] if group.cpu.endswith("m") else group.cpu
    value = float(cpu) / (1000 if group.cpu.endswith("m") else 1)
    return max(1, math.ceil(value))


def worker_pod_spec(k: KubernetesConfig, group: WorkerGroupConfig, *, gpu: bool) -> dict:
    """Pod spec of one worker group: resources, GPU limit, node selector, tolerations, data volume."""
    limits = {"cpu": group.cpu, "memory": group.memory}
    if group.gpus:
        limits["nvidia.com/gpu"] = group.gpus
    args = ["--name", "$(DASK_WORKER_NAME)", "--nthreads", str(_threads(group)),
            "--memory-limit", group.memory.replace("Gi", "GiB").replace("Mi", "MiB"),
            "--dashboard", "--dashboard-address", str(WORKER_DASHBOARD_PORT)]
    if group.gpus:
        args += ["--resources", f"GPU={group.gpus}"]
    volumes, mounts = _volumes(k)
    container = {
        "name": "worker",
        "image": group.image or (k.gpu_image if gpu else k.image),
        "imagePullPolicy": k.image_pull_policy,
        "command": ["dask-worker"],
        "args": args,
        "env": _env(k),
        "resources": {"requests": {"cpu": group.cpu, "memory": group.memory}, "limits": limits},
        "ports": [{"name": "http-dashboard", "containerPort": WORKER_DASHBOARD_PORT, "protocol": "TCP"}],
    }
    if mounts:
        container["volumeMounts"] = mounts
    spec: dict = {"containers": [container]}
    if volumes:
        spec["volumes"] = volumes
    if group.node_selector:
        spec["nodeSelector"] = dict(group.node_selector)
    if group.tolerations:
        spec["tolerations"] = [dict(t) for t in group.tolerations]
    return {"replicas": group.replicas, "spec": spec}


def scheduler_spec(k: KubernetesConfig) -> dict:
    volumes, mounts = _volumes(k)
    container = {
        "name": "scheduler",
        "image": k.image,
        "imagePullPolicy": k.image_pull_policy,
        "command": ["dask-scheduler"],
        "args": ["--host", "0.0.0.0"],
        "env": _env(k),
        "resources": {"requests": {"cpu": k.scheduler_cpu, "memory": k.scheduler_memory},
                      "limits": {"cpu": k.scheduler_cpu, "memory": k.scheduler_memory}},
        "ports": [{"name": "tcp-comm", "containerPort": SCHEDULER_PORT, "protocol": "TCP"},
                  {"name": "http-dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"port": "http-dashboard", "path": "/health"},
                           "initialDelaySeconds": 0, "periodSeconds": 1, "timeoutSeconds": 300},
        "livenessProbe": {"httpGet": {"port": "http-dashboard", "path": "/health"},
                          "initialDelaySeconds": 15, "periodSeconds": 20},
    }
    if mounts:
        container["volumeMounts"] = mounts
    pod: dict = {"containers": [container]}
    if volumes:
        pod["volumes"] = volumes
    return {
        "spec": pod,
        "service": {
            "type": k.service_type,
            "selector": {"dask.org/cluster-name": k.name, "dask.org/component": "scheduler"},
            "ports": [{"name": "tcp-comm", "protocol": "TCP", "port": SCHEDULER_PORT, "targetPort": "tcp-comm"},
                      {"name": "http-dashboard", "protocol": "TCP", "port": DASHBOARD_PORT,
                       "targetPort": "http-dashboard"}],
        },
    }


def dask_cluster_manifest(k: KubernetesConfig) -> dict:
    """DaskCluster: scheduler + the CPU worker group."""
    return {
        "apiVersion": API_VERSION,
        "kind": "DaskCluster",
        "metadata": {"name": k.name, "namespace": k.namespace},
        "spec": {"idleTimeout": 0, "worker": worker_pod_spec(k, k.cpu_workers, gpu=False),
                 "scheduler": scheduler_spec(k)},
    }


def gpu_worker_group_manifest(k: KubernetesConfig) -> dict:
    """DaskWorkerGroup '<name>-gpu' attached to the DaskCluster (what KubeCluster.add_worker_group creates)."""
    return {
        "apiVersion": API_VERSION,
        "kind": "DaskWorkerGroup",
        "metadata": {"name": f"{k.name}-gpu", "namespace": k.namespace},
        "spec": {"cluster": k.name, "worker": worker_pod_spec(k, k.gpu_workers, gpu=True)},
    }


def dask_job_manifest(k: KubernetesConfig, config_path: str = "/data/run.yaml") -> dict:
    """DaskJob: a whole run as one object; the operator starts the cluster, runs the job pod, tears down."""
    volumes, mounts = _volumes(k)
    container = {
        "name": "job",
        "image": k.image,
        "imagePullPolicy": k.image_pull_policy,
        "args": ["run", config_path, "--cluster", "address"],  # entry point `connectome`; the operator sets
        "env": _env(k),  # DASK_SCHEDULER_ADDRESS in the job pod, which cluster kind 'address' reads
    }
    if mounts:
        container["volumeMounts"] = mounts
    pod: dict = {"restartPolicy": "Never", "containers": [container]}
    if volumes:
        pod["volumes"] = volumes
    cluster = dask_cluster_manifest(k)
    return {
        "apiVersion": API_VERSION,
        "kind": "DaskJob",
        "metadata": {"name": f"{k.name}-run", "namespace": k.namespace},
        "spec": {"job": {"spec": pod}, "cluster": {"spec": cluster["spec"]}},
    }


def data_pvc_manifest(k: KubernetesConfig, size: str = "1Ti", storage_class: str | None = None) -> dict:
    """ReadWriteMany claim shared by scheduler, workers and job (volumes, ledgers, the DuckDB store)."""
    spec: dict = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": k.data_pvc or "connectome-data", "namespace": k.namespace}, "spec": spec}


def all_manifests(k: KubernetesConfig) -> dict[str, list[dict]]:
    """File name -> documents, as checked in under deploy/kubernetes/."""
    return {
        "pvc.yaml": [data_pvc_manifest(k)],
        "daskcluster.yaml": [dask_cluster_manifest(k), gpu_worker_group_manifest(k)],
        "daskjob.yaml": [dask_job_manifest(k)],
    }


@contextlib.contextmanager
def open_kube_cluster(config: ClusterConfig) -> Iterator[object]:
    """Create the DaskCluster (and GPU group when it has replicas) through the operator; delete it on exit."""
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError:
        raise ConfigError("cluster.kind 'kubernetes' needs dask-kubernetes: "
                          "pip install 'connectome-pipeline[kubernetes]'") from None
    k = config.kubernetes
    cluster = KubeCluster(custom_cluster_spec=dask_cluster_manifest(k), namespace=k.namespace,
                          shutdown_on_close=True)
    try:
        if k.gpu_workers.replicas:
            cluster.add_worker_group("gpu", custom_spec=worker_pod_spec(k, k.gpu_workers, gpu=True))
        yield cluster
    finally:
        cluster.close()


def write_manifests(directory: str, k: KubernetesConfig | None = None) -> list[str]:
    """Write all_manifests() as YAML files (how deploy/kubernetes/*.yaml are made)."""
    from pathlib import Path

    import yaml

    k = k or KubernetesConfig()
    out = []
    for name, docs in all_manifests(k).items():
        path = Path(directory) / name
        header = ("# Generated by `python -m pipeline.kubernetes deploy/kubernetes` from KubernetesConfig defaults;\n"
                  "# edit the config (or this copy) for your cluster. tests/test_kubernetes_spec.py keeps them equal.\n")
        path.write_text(header + yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False))
        out.append(str(path))
    return out


if __name__ == "__main__":
    import sys

    for written in write_manifests(sys.argv[1] if len(sys.argv) > 1 else "deploy/kubernetes"):
        print(written)
