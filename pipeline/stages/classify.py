"""classify: cell type per segment and compartment per skeleton node from SegCLR embeddings.

Per-segment work on small vectors, so it runs on the driver (no blockwise step): for every segment, node
embeddings are aggregated over the classifier's geodesic radius (segclr.aggregation), classified per node, and
- cell type = the class with the highest mean node probability; confidence = that mean probability;
- compartment per embedded node, spread to every skeleton node from its geodesically nearest embedded node;
each with the classifier's out-of-distribution score (segclr.ood; median over a segment's nodes).
Writes ``<work_dir>/cell_types.parquet`` and ``<work_dir>/compartments.parquet`` (with the OOD scores, which the
store has no column for), and the store's ``cell_types`` / ``skeleton_nodes`` rows with the classifier's name
as source. Training: ``train_cell_type_classifier`` (labels from the synthetic ground truth or a user CSV of
segment_id,cell_type) and ``train_compartment_classifier`` (labels per node).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse.csgraph import dijkstra

from segclr.aggregation import aggregate_table
from segclr.classifiers import Classifier, train_classifier
from segclr.skeletons import table_to_skeletons
from storage.errors import ConnectomeError


def read_labels_csv(path: str | Path) -> pd.DataFrame:
    """A user's labels: CSV with columns segment_id,cell_type."""
    try:
        df = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001
        raise ConnectomeError(f"labels {path}: cannot read CSV ({exc})") from None
    missing = {"segment_id", "cell_type"} - set(df.columns)
    if missing:
        raise ConnectomeError(f"labels {path}: missing column(s) {sorted(missing)} (need segment_id,cell_type)")
    return df[["segment_id", "cell_type"]].astype({"segment_id": np.int64, "cell_type": str})


def train_cell_type_classifier(embeddings: pd.DataFrame, skeleton_table: pd.DataFrame, labels: pd.DataFrame, *,
                               radius_nm: float, kind: str = "linear", **kw) -> Classifier:
    skels = table_to_skeletons(skeleton_table)
    emb = embeddings[embeddings["segment_id"].isin(labels["segment_id"])].reset_index(drop=True)
    if emb.empty:
        raise ConnectomeError("cell-type training: none of the labelled segments has embeddings")
    x = aggregate_table(emb, skels, radius_nm)
    y = emb["segment_id"].map(dict(zip(labels["segment_id"], labels["cell_type"]))).to_numpy()
    clf = train_classifier(x, y, kind=kind, **kw)
    clf.settings.update(aggregation_radius_nm=float(radius_nm), target="cell_type")
    return clf


def train_compartment_classifier(embeddings: pd.DataFrame, skeleton_table: pd.DataFrame, node_labels, *,
                                 radius_nm: float, kind: str = "linear", **kw) -> Classifier:
    """``node_labels``: one compartment name per row of ``embeddings``."""
    x = aggregate_table(embeddings, table_to_skeletons(skeleton_table), radius_nm)
    clf = train_classifier(x, np.asarray(node_labels), kind=kind, **kw)
    clf.settings.update(aggregation_radius_nm=float(radius_nm), target="compartment")
    return clf


def predict_cell_types(clf: Classifier, embeddings: pd.DataFrame, skeletons: dict) -> pd.DataFrame:
    x = aggregate_table(embeddings, skeletons, clf.settings.get("aggregation_radius_nm", 0.0))
    proba = clf.predict_proba(x)
    ood = clf.ood_score(x)
    rows = []
    for sid, idx in embeddings.groupby("segment_id", sort=True).indices.items():
        p = proba[idx].mean(0)
        k = int(p.argmax())
        rows.append({"segment_id": int(sid), "cell_type": clf.classes[k], "confidence": float(p[k]),
                     "ood_score": float(np.median(ood[idx])), "nodes": len(idx)})
    return pd.DataFrame(rows)


def predict_compartments(clf: Classifier, embeddings: pd.DataFrame, skeleton_table: pd.DataFrame) -> pd.DataFrame:
    """Every skeleton node gets the compartment of its geodesically nearest embedded node."""
    skels = table_to_skeletons(skeleton_table)
    x = aggregate_table(embeddings, skels, clf.settings.get("aggregation_radius_nm", 0.0))
    labels, conf, ood = clf.predict(x)
    parts = []
    for sid, idx in embeddings.groupby("segment_id", sort=True).indices.items():
        sk = skels[int(sid)]
        node_ids = sk.attributes["node_id"]
        pos = {int(n): i for i, n in enumerate(node_ids)}
        src = np.array([pos[int(n)] for n in embeddings["node_id"].to_numpy()[idx]])
        _, _, nearest = dijkstra(sk.graph(), directed=False, indices=src, min_only=True, return_predecessors=True)
        lookup = np.full(len(sk), -1, np.int64)
        lookup[src] = np.arange(len(src))
        reach = nearest >= 0
        k = np.where(reach, lookup[np.maximum(nearest, 0)], 0)
        parts.append(pd.DataFrame({"segment_id": int(sid), "node_id": node_ids,
                                   "compartment": labels[idx][k],
                                   "compartment_confidence": np.where(reach, conf[idx][k], np.float32(0)),
                                   "ood_score": ood[idx][k]}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def run_classify(work_dir: str | Path, *, cell_type_model: str | Path | None = None,
                 compartment_model: str | Path | None = None, store=None) -> dict:
    from pipeline.stages.embed import EMBEDDINGS_FILE
    from pipeline.stages.skeletonize import SKELETONS_FILE

    work_dir = Path(work_dir)
    for f in (EMBEDDINGS_FILE, SKELETONS_FILE):
        if not (work_dir / f).is_file():
            raise ConnectomeError(f"classify: {work_dir / f} not found; run skeletonize and embed first")
    emb = pd.read_parquet(work_dir / EMBEDDINGS_FILE)
    skel_table = pd.read_parquet(work_dir / SKELETONS_FILE)
    out = {}
    if cell_type_model is not None:
        clf = Classifier.load(cell_type_model)
        ct = predict_cell_types(clf, emb, table_to_skeletons(skel_table))
        ct.to_parquet(work_dir / "cell_types.parquet", index=False)
        out["cell_types"] = len(ct)
        if store is not None:
            rows = ct[["segment_id", "cell_type", "confidence"]].assign(
                classification_system="segclr", source=f"model:{Path(cell_type_model).name}")
            with store.loading("classify cell types") as v:
                store.write_cell_types(rows.astype({"confidence": np.float32}), version=v)
    if compartment_model is not None:
        clf = Classifier.load(compartment_model)
        comp = predict_compartments(clf, emb, skel_table)
        comp.to_parquet(work_dir / "compartments.parquet", index=False)
        out["compartment_nodes"] = len(comp)
        if store is not None:
            rows = skel_table.merge(comp[["segment_id", "node_id", "compartment", "compartment_confidence"]],
                                    on=["segment_id", "node_id"], how="left")
            with store.loading("classify compartments") as v:
                store.write_skeleton_nodes(rows.astype({"compartment_confidence": np.float32}), version=v)
    return out
