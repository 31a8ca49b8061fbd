"""The whole pipeline from EM to connectome: segment, synapses, skeletonize, embed, classify, publish.

One `RunConfig` (a YAML file for `connectome run`, or built by `connectome demo`) names the input, the run
directory and each stage's settings. Stages run in order on one Dask client; each is resumable through its own
ledger, and a stage whose outputs are recorded as finished in OUT/run_state.json is skipped on a rerun, so a run
interrupted between stages continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cluster import ClusterConfig
from pipeline.segmentation import SegmentConfig
from pipeline.stages.synapses import SynapseStageConfig
from storage.errors import ConfigError

STAGES = ("segment", "synapses", "skeletonize", "embed", "classify", "publish")


@dataclass
class SkeletonizeConfig:
    block_shape: tuple[int, int, int] = (64, 128, 128)
    dust_threshold: int = 200


@dataclass
class EmbedConfig:
    model: str = "segclr_synth_small"
    spacing_nm: float = 500.0
    batch_size: int = 32


@dataclass
class ClassifyConfig:
    """A packaged/trained classifier folder per target, or `labels_csv` (segment_id,cell_type) to train the
    cell-type classifier on this run's embeddings first (linear probe over `radius_nm` aggregated embeddings)."""

    cell_type_model: str | None = None
    compartment_model: str | None = None
    labels_csv: str | None = None
    radius_nm: float = 1000.0


@dataclass
class PublishConfig:
    meshes: bool = True
    jpeg: bool = False
    jpeg_quality: int | None = None  # with jpeg: 1-100 (None: 75)


@dataclass
class RunConfig:
    input: str = ""
    output: str = ""
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    gpu: bool = False
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    synapses: SynapseStageConfig = field(default_factory=SynapseStageConfig)
    skeletonize: SkeletonizeConfig = field(default_factory=SkeletonizeConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("run config: field 'input' is required (the EM volume URL or path)")
        if not self.output:
            raise ConfigError("run config: field 'output' is required (the run directory)")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"run config: field 'stages' has unknown stage(s) {unknown}; known: {list(STAGES)}")
        self.segment.input, self.segment.output = self.input, self.output
        self.segment.gpu = self.segment.gpu or self.gpu
        self.segment.validate()


class RunState:
    """Which stages finished, with their summaries, in OUT/run_state.json (written atomically after each stage)."""

    def __init__(self, out: Path):
        self.path = out / "run_state.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def done(self, stage: str) -> bool:
        return stage in self.data["stages"]

    def finish(self, stage: str, summary: dict) -> None:
        self.data["stages"][stage] = summary
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def run_pipeline(config: RunConfig, client, *, progress: bool = True, log=print) -> dict:
    """Run the configured stages in order; returns {stage: summary} including seconds per stage."""
    config.validate()
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    state = RunState(out)
    seg_url = f"precomputed://{out / 'segmentation'}"
    store_path = str(out / "connectome.duckdb")
    work = out / "work"
    runners = {
        "segment": lambda: _segment(config, client, progress),
        "synapses": lambda: _synapses(config, client, seg_url, store_path, work, progress),
        "skeletonize": lambda: _skeletonize(config, client, seg_url, store_path, work, progress),
        "embed": lambda: _embed(config, client, seg_url, store_path, work, progress),
        "classify": lambda: _classify(config, store_path, work),
        "publish": lambda: _publish(config, out, store_path, work, client),
    }
    for stage in STAGES:
        if stage not in config.stages:
            continue
        if state.done(stage):
            log(f"[{stage}] already finished (run_state.json); skipping")
            continue
        log(f"[{stage}] starting")
        t0 = time.perf_counter()
        summary = runners[stage]() or {}
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        state.finish(stage, summary)
        log(f"[{stage}] done in {summary['seconds']:.1f} s")
    return state.data["stages"]


def _store(store_path: str):
    from storage.store import ConnectomeStore

    return ConnectomeStore.open(store_path) if Path(store_path).exists() else ConnectomeStore.create(store_path)


def _segment(config: RunConfig, client, progress: bool) -> dict:
    from pipeline.segmentation import run_segmentation

    return run_segmentation(config.segment, client, progress=progress)


def _synapses(config: RunConfig, client, seg_url: str, store_path: str, work: Path, progress: bool) -> dict:
    from pipeline.stages.synapses import run_synapse_stage

    table = run_synapse_stage(config.input, seg_url, store_path, config.synapses, client,
                              ledger_dir=str(work / "ledgers"), progress=progress, fragments_url=_fragments(config))
    table.to_parquet(work / "synapses.parquet", index=False)
    return {"synapses": int(len(table)), "valid": int(table["valid"].sum()) if len(table) else 0}


def _fragments(config: RunConfig) -> str | None:
    """RUN/fragments (the pre-agglomeration supervoxels) when the segment stage wrote them."""
    fragments = Path(config.output) / "fragments"
    return f"precomputed://{fragments}" if (fragments / "info").exists() else None


def _skeletonize(config: RunConfig, client, seg_url: str, store_path: str, work: Path, progress: bool) -> dict:
    from pipeline.stages.skeletonize import run_skeletonize

    nodes = run_skeletonize(seg_url, work / "skeletons", client=client,
                            block_shape_zyx=tuple(config.skeletonize.block_shape),
                            dust_threshold=config.skeletonize.dust_threshold, store=_store(store_path),
                            restart=config.segment.restart, progress=progress, fragments_url=_fragments(config))
    return {"nodes": int(len(nodes)), "skeletons": int(nodes["segment_id"].nunique()) if len(nodes) else 0}


def _embed(config: RunConfig, client, seg_url: str, store_path: str, work: Path, progress: bool) -> dict:
    from pipeline.stages.embed import run_embed

    table = run_embed(config.input, seg_url, work / "skeletons", model=config.embed.model, client=client,
                      spacing_nm=config.embed.spacing_nm, batch_size=config.embed.batch_size, gpu=config.gpu,
                      store=_store(store_path), restart=config.segment.restart, progress=progress)
    return {"embeddings": int(len(table))}


def _classify(config: RunConfig, store_path: str, work: Path) -> dict:
    from pipeline.stages.classify import run_classify

    cell_type_model = _classifier(config.classify.cell_type_model)
    if cell_type_model is None and config.classify.labels_csv:
        cell_type_model = _train_cell_types(config.classify, work / "skeletons")
    if cell_type_model is None and config.classify.compartment_model is None:
        return {"skipped": "no classifier and no labels_csv configured"}
    return run_classify(work / "skeletons", cell_type_model=cell_type_model,
                        compartment_model=_classifier(config.classify.compartment_model), store=_store(store_path))


def _train_cell_types(config: ClassifyConfig, work: Path) -> Path:
    """Train the cell-type classifier on this run's embeddings of the labelled segments."""
    import pandas as pd

    from pipeline.stages.classify import read_labels_csv, train_cell_type_classifier
    from pipeline.stages.embed import EMBEDDINGS_FILE
    from pipeline.stages.skeletonize import SKELETONS_FILE

    labels = read_labels_csv(config.labels_csv)
    clf = train_cell_type_classifier(pd.read_parquet(work / EMBEDDINGS_FILE), pd.read_parquet(work / SKELETONS_FILE),
                                     labels, radius_nm=config.radius_nm)
    return clf.save(work / "cell_type_classifier")


def _classifier(name: str | None) -> Path | None:
    """A classifier folder: a path, or a name packaged under segclr/models/."""
    if not name:
        return None
    from segclr.encoder import MODELS_DIR
    from storage.errors import ConnectomeError

    for candidate in (Path(name), Path(MODELS_DIR) / name):
        if candidate.is_dir():
            return candidate
    raise ConnectomeError(f"classifier {name!r} not found (neither a folder nor a model in {MODELS_DIR})")


def _publish(config: RunConfig, out: Path, store_path: str, work: Path, client) -> dict:
    from viz.publish import PublishOptions, publish_run

    return publish_run(out, image=config.input, store=store_path, skeletons_dir=work / "skeletons",
                       meshes=config.publish.meshes, client=client,
                       options=PublishOptions(image_encoding="jpeg" if config.publish.jpeg else "raw",
                                              jpeg_quality=config.publish.jpeg_quality))
