"""deploy/kubernetes/*.yaml parse, carry what the dask-kubernetes operator needs, and equal the Python path.

No Kubernetes cluster runs here; the operator's own spec builder (dask_kubernetes.operator.make_cluster_spec)
is the reference for the fields it relies on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.cluster import ClusterConfig, KubernetesConfig
from pipeline.config import load_config
from pipeline.kubernetes import (all_manifests, dask_cluster_manifest, dask_job_manifest,
                                 gpu_worker_group_manifest)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


def load_docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / name).read_text()))


def test_checked_in_manifests_equal_what_python_builds():
    for name, docs in all_manifests(KubernetesConfig()).items():
        assert load_docs(name) == docs, f"deploy/kubernetes/{name} is stale: python -m pipeline.kubernetes"


def test_daskcluster_has_the_fields_the_operator_uses():
    operator = pytest.importorskip("dask_kubernetes.operator")
    ours = load_docs("daskcluster.yaml")[0]
    ref = operator.make_cluster_spec(name=ours["metadata"]["name"], image="img", n_workers=2)
    assert ours["apiVersion"] == ref["apiVersion"] == "kubernetes.dask.org/v1"
    assert ours["kind"] == ref["kind"] == "DaskCluster"
    assert set(ref["spec"]) <= set(ours["spec"])
    assert isinstance(ours["spec"]["worker"]["replicas"], int)
    worker, ref_worker = ours["spec"]["worker"]["spec"]["containers"][0], ref["spec"]["worker"]["spec"]["containers"][0]
    # our images' entry point is `connectome`, so the command is explicit; together it is the operator's command line
    assert (worker["command"] + worker["args"])[:3] == ref_worker["args"][:3] == ["dask-worker", "--name",
                                                                                     "$(DASK_WORKER_NAME)"]
    assert {p["name"] for p in worker["ports"]} == {p["name"] for p in ref_worker["ports"]}
    sched, ref_sched = ours["spec"]["scheduler"], ref["spec"]["scheduler"]
    assert sched["service"]["selector"] == ref_sched["service"]["selector"]
    assert sched["service"]["ports"] == ref_sched["service"]["ports"]
    container, ref_container = sched["spec"]["containers"][0], ref_sched["spec"]["containers"][0]
    assert container["command"] + container["args"] == ref_container["args"]
    assert container["ports"] == ref_container["ports"]
    assert container["readinessProbe"] == ref_container["readinessProbe"]


def test_gpu_worker_group_requests_gpus_on_gpu_nodes_and_advertises_the_resource():
    group = load_docs("daskcluster.yaml")[1]
    cluster = load_docs("daskcluster.yaml")[0]
    assert group["kind"] == "DaskWorkerGroup" and group["spec"]["cluster"] == cluster["metadata"]["name"]
    pod = group["spec"]["worker"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("connectome-gpu:0.1.0")
    assert "--resources" in container["args"] and container["args"][container["args"].index("--resources") + 1] \
        == "GPU=1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    cpu = cluster["spec"]["worker"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"] and "nodeSelector" not in cpu


def test_daskjob_wraps_the_same_cluster_and_pvc_is_shared():
    job = load_docs("daskjob.yaml")[0]
    cluster = load_docs("daskcluster.yaml")[0]
    assert job["kind"] == "DaskJob" and job["spec"]["cluster"]["spec"] == cluster["spec"]
    container = job["spec"]["job"]["spec"]["containers"][0]
    assert container["name"] == "job" and container["args"][:1] == ["run"]
    pvc = load_docs("pvc.yaml")[0]
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in (job["spec"]["job"]["spec"], cluster["spec"]["worker"]["spec"], cluster["spec"]["scheduler"]["spec"]):
        assert pod["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}}]


def test_config_file_drives_the_spec(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("""
kind: kubernetes
kubernetes:
  name: hippocampus
  image: registry.example.org/connectome:1.2
  data_pvc: null
  env: {CONNECTOME_OUTPUT: "gs://bucket/run1"}
  cpu_workers: {replicas: 40, cpu: "8", memory: 32Gi}
  gpu_workers:
    replicas: 8
    gpus: 1
    node_selector: {cloud.google.com/gke-accelerator: nvidia-l4}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
""")
    k = load_config(path, ClusterConfig).kubernetes
    cluster, group = dask_cluster_manifest(k), gpu_worker_group_manifest(k)
    worker = cluster["spec"]["worker"]
    assert cluster["metadata"]["name"] == "hippocampus" and worker["replicas"] == 40
    assert worker["spec"]["containers"][0]["args"][3] == "8"  # --nthreads from the cpu request
    assert worker["spec"]["containers"][0]["env"] == [{"name": "CONNECTOME_OUTPUT", "value": "gs://bucket/run1"}]
    assert "volumes" not in worker["spec"]  # object store instead of a PVC
    assert group["spec"]["worker"]["replicas"] == 8
    assert group["spec"]["worker"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert dask_job_manifest(k)["spec"]["cluster"]["spec"] == cluster["spec"]


def test_bad_cluster_name_is_a_config_error():
    from storage.errors import ConfigError

    with pytest.raises(ConfigError, match="kubernetes.name 'Bad_Name' must be a DNS label"):
        load_config({"kind": "kubernetes", "kubernetes": {"name": "Bad_Name"}}, ClusterConfig)
