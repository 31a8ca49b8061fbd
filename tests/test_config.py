"""Config files -> nested dataclasses; every bad input is one ConfigError naming the field and value."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cluster import ClusterConfig, slurm_cluster_kwargs
from pipeline.config import dump_config, load_config
from storage.errors import ConfigError


@dataclass
class SegmentConfig:
    block_shape: tuple[int, int, int] = (64, 64, 64)
    threshold: float = 0.5
    model: str = "default"
    mode: Literal["fast", "exact"] = "fast"


@dataclass
class RunConfig:
    input: str
    output: Path | None = None
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    stages: list[str] = field(default_factory=lambda: ["segment"])
    resources: dict[str, float] = field(default_factory=dict)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_builds_nested_dataclasses(tmp_path):
    path = write(tmp_path, "run.yaml", """
input: gs://bucket/em
output: /data/out
segment: {block_shape: [32, 64, 64], threshold: 1}
stages: [segment, relabel]
cluster: {kind: local, workers: 4, gpu_workers: 1, resources: {MEM: 2}}
""")
    cfg = load_config(path, RunConfig)
    assert cfg.segment.block_shape == (32, 64, 64)
    assert cfg.segment.threshold == 1.0 and isinstance(cfg.segment.threshold, float)
    assert cfg.segment.model == "default"
    assert cfg.output == Path("/data/out")
    assert cfg.cluster.workers == 4 and cfg.cluster.gpu_workers == 1 and cfg.cluster.resources == {"MEM": 2.0}
    assert load_config(dump_config(cfg), RunConfig) == cfg  # round trip


def test_json_file_and_dict_inputs(tmp_path):
    data = {"input": "a.zarr", "segment": {"mode": "exact"}}
    path = write(tmp_path, "run.json", json.dumps(data))
    assert load_config(path, RunConfig) == load_config(data, RunConfig)
    assert load_config(data, RunConfig).segment.mode == "exact"


def test_unknown_field_names_the_path_and_the_file(tmp_path):
    path = write(tmp_path, "run.yaml", "input: x\nsegment:\n  blok_shape: [1, 2, 3]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, RunConfig)
    assert str(err.value).startswith("unknown field 'segment.blok_shape' in run.yaml (did you mean 'block_shape'?)")


@pytest.mark.parametrize("text, field_path, value", [
    ("input: x\nsegment: {block_shape: [1, 2]}", "segment.block_shape", "[1, 2]"),
    ("input: x\nsegment: {block_shape: [1, two, 3]}", "segment.block_shape[1]", "'two'"),
    ("input: x\nsegment: {threshold: high}", "segment.threshold", "'high'"),
    ("input: x\nsegment: {mode: turbo}", "segment.mode", "'turbo'"),
    ("input: 5", "input", "5"),
    ("input: x\nstages: segment", "stages", "'segment'"),
    ("input: x\ncluster: {workers: true}", "cluster.workers", "True"),
    ("input: x\nsegment: 3", "segment", "3"),
])
def test_wrong_type_names_field_and_value(tmp_path, text, field_path, value):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "run.yaml", text), RunConfig)
    message = str(err.value)
    assert f"field '{field_path}' in run.yaml" in message and value in message and "\n" not in message


def test_missing_required_field_and_file_and_syntax(tmp_path):
    with pytest.raises(ConfigError, match="missing required field 'input' in run.yaml"):
        load_config(write(tmp_path, "run.yaml", "segment: {}"), RunConfig)
    with pytest.raises(ConfigError, match="config file .*nope.yaml not found"):
        load_config(tmp_path / "nope.yaml", RunConfig)
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line 2"):
        load_config(write(tmp_path, "bad.yaml", "input: x\n  segment: [\n"), RunConfig)


def test_validation_in_dataclasses_becomes_config_error(tmp_path):
    with pytest.raises(ConfigError, match="gpu_workers must be between 0 and workers"):
        load_config({"input": "x", "cluster": {"workers": 1, "gpu_workers": 2}}, RunConfig)
    with pytest.raises(ConfigError, match="lifetime .* must be shorter than walltime"):
        load_config({"kind": "slurm", "slurm": {"walltime": "00:30:00", "lifetime": "55m"}}, ClusterConfig)
    with pytest.raises(ConfigError, match="cluster.address is required"):
        load_config({"kind": "address"}, ClusterConfig)


def test_slurm_section_becomes_jobqueue_arguments():
    cfg = load_config({"kind": "slurm", "resources": {"MEM": 1}, "slurm": {
        "cores": 4, "memory": "16GB", "processes": 2, "walltime": "02:00:00", "queue": "gpu", "account": "lab",
        "job_extra_directives": ["--qos=high"], "job_script_prologue": ["module load cuda"],
        "lifetime": "100m", "lifetime_stagger": "5m", "lifetime_restart": True, "gpus_per_job": 2}}, ClusterConfig)
    kw = slurm_cluster_kwargs(cfg)
    assert kw["cores"] == 4 and kw["memory"] == "16GB" and kw["processes"] == 2 and kw["queue"] == "gpu"
    assert kw["account"] == "lab" and kw["walltime"] == "02:00:00"
    assert kw["job_extra_directives"] == ["--qos=high", "--gres=gpu:2"]
    assert kw["job_script_prologue"] == ["module load cuda"]
    assert kw["worker_extra_args"] == ["--lifetime", "100m", "--lifetime-stagger", "5m", "--lifetime-restart",
                                       "--resources", "MEM=1,GPU=1"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["input", "segment", "block_shape", "threshold", "mode", "cluster", "kind",
                                       "workers", "slurm", "stages", "x", "resources"]) | st.text(max_size=5),
                      children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_junk_values_raise_only_config_error(data):
    try:
        load_config(data, RunConfig)
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_junk_files_raise_only_config_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("run.yaml", "run.json"):
            path = Path(tmp) / name
            path.write_text(text, encoding="utf-8")
            try:
                load_config(path, RunConfig)
            except ConfigError:
                pass

