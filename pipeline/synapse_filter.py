"""The synapse candidate filter: a logistic regression on what the maps and the segmentation say about each cleft
candidate, deciding which candidates are synapses.

Why a second stage: the detector's thresholded cleft map finds most synapses (recall 0.86 on validation) but also
fires on mitochondria, dark cytoplasm and contacts of vesicle-filled boutons without a postsynaptic density
(precision 0.68). A candidate's mean cleft score barely separates them; its size, z extent, whether it lies on
the membrane between its two partners (`interface`), how much darker it is than its surroundings, how clearly a
post segment carries the postsynaptic channel, and whether a larger candidate sits next to it (a split cleft) do.
This is the candidate-then-classify design of SynEM and of the CREMI entries, with features any detector's maps
give. A logistic regression (JSON coefficients, no pickle) matched gradient-boosted trees and small MLPs on the
validation volumes (F1 0.814 vs 0.805 / 0.815), so the simplest won.

The filter belongs to the detector weights it was fitted on, so it lives in the detector's model folder
(`candidate_filter.json`) and is refitted whenever the weights change:

    connectome train synapse-filter examples/fit_synapse_filter.json
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from storage.errors import ConfigError

FILTER_FILE = "candidate_filter.json"
# per-candidate evidence from detect() (pipeline/stages/synapses.py) plus the neighbour context from
# `neighbour_context`; counts and distances enter as log(1 + x)
FEATURES = ("size_voxels", "score", "score_max", "z_sections", "pre_side", "post_side", "pre_on_post",
            "post_on_pre", "post_margin", "near_segments", "interface", "darkness", "contrast",
            "nn_nm", "nn_larger", "nn_same_pre")
LOG_FEATURES = ("size_voxels", "nn_nm")
LONELY_NM = 10_000.0  # neighbour distance of a candidate that has none
THRESHOLD_FOLDS = 5  # the filter threshold is chosen on out-of-fold probabilities, volumes split this many ways


@dataclass(frozen=True)
class CandidateFilter:
    """Standardised features -> logistic regression -> keep where probability >= threshold."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    threshold: float
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("features", "mean", "scale", "coef"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.features)
        if not (len(self.mean) == len(self.scale) == len(self.coef) == n):
            raise ConfigError(f"candidate filter: features, mean, scale and coef need the same length ({n})")
        unknown = sorted(set(self.features) - set(FEATURES))
        if unknown:
            raise ConfigError(f"candidate filter: unknown feature(s) {unknown}; known: {', '.join(FEATURES)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"candidate filter: threshold must be in [0, 1], got {self.threshold}")

    def probability(self, candidates: pd.DataFrame) -> np.ndarray:
        x = (feature_matrix(candidates, self.features) - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-(x @ np.asarray(self.coef) + self.intercept)))


def feature_matrix(candidates: pd.DataFrame, features=FEATURES) -> np.ndarray:
    missing = [f for f in features if f not in candidates.columns]
    if missing:
        raise ConfigError(f"candidate filter: candidates lack {missing} (detect() needs the image for darkness and "
                          "contrast; neighbour_context() adds nn_*)")
    x = candidates[list(features)].to_numpy(float).copy()
    for i, name in enumerate(features):
        if name in LOG_FEATURES:
            x[:, i] = np.log1p(np.maximum(x[:, i], 0.0))
    return x


def neighbour_context(candidates: pd.DataFrame, voxel_size_zyx) -> pd.DataFrame:
    """Distance to the nearest other candidate (nm), and whether it is larger and shares the presynaptic segment:
    a small piece next to a large one is usually a cleft split in two. Needs all blocks' candidates (driver)."""
    from scipy.spatial import cKDTree

    n = len(candidates)
    out = candidates.copy()
    if n < 2:
        out["nn_nm"], out["nn_larger"], out["nn_same_pre"] = LONELY_NM, 0, 0
        return out
    pos = candidates[["z", "y", "x"]].to_numpy(float) * np.asarray(voxel_size_zyx, float)
    dist, idx = cKDTree(pos).query(pos, k=2)
    other = idx[:, 1]
    size = candidates["size_voxels"].to_numpy()
    pre = candidates["pre_segment_id"].to_numpy()
    out["nn_nm"] = dist[:, 1]
    out["nn_larger"] = (size[other] > size).astype(int)
    out["nn_same_pre"] = (pre[other] == pre).astype(int)
    return out


def apply_filter(candidates: pd.DataFrame, candidate_filter: CandidateFilter | None, voxel_size_zyx) -> pd.DataFrame:
    """Adds `accepted`; with a filter, `score` becomes its probability (the cleft mean is one of its inputs)."""
    out = candidates.copy()
    if candidate_filter is None or out.empty:
        out["accepted"] = True
        return out
    out = neighbour_context(out, voxel_size_zyx)
    out["score"] = candidate_filter.probability(out)
    out["accepted"] = out["score"] >= candidate_filter.threshold
    return out.drop(columns=["nn_nm", "nn_larger", "nn_same_pre"])


def load_filter(model_dir: str | os.PathLike) -> CandidateFilter | None:
    """The filter fitted for a detector folder, or None when it has none."""
    path = Path(model_dir) / FILTER_FILE
    if not path.is_file():
        return None
    try:
        return CandidateFilter(**json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except TypeError as exc:
        raise ConfigError(f"{path}: bad candidate filter ({exc})") from None


def save_filter(candidate_filter: CandidateFilter, model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir) / FILTER_FILE
    path.write_text(json.dumps(asdict(candidate_filter), indent=1) + "\n")
    return path


# ---- fitting -------------------------------------------------------------------------------------------------------

def labelled_candidates(model_dir: str | os.PathLike, seeds, shape_zyx, params=None,
                        distance_nm: float = 200.0, segmentations=("gt",)) -> tuple[pd.DataFrame, int]:
    """Valid candidates of generated volumes with their neighbour context and `tp` (matched one-to-one to a true
    synapse within distance_nm, as the benchmark scores), plus the number of true synapses (counted once per
    segmentation, so F1 over the pooled candidates stays a per-run figure).

    `segmentations` names where partners come from: "gt" (the generator's labels) and/or an FFN model (packaged
    name or folder) run on the volume. A filter fitted on ground-truth partners alone learns that a real cleft
    lies between two clean segments; on an FFN's merged and split segments that evidence shifts (on the demo the
    packaged filter, fitted on "gt" alone, moves F1 from 0.72 to 0.63: precision up, recall down). Pooling an FFN's
    partners costs an FFN run per volume (about a minute each for 48x192x192 on 2 cores)."""
    from ffn.inference import segment_volume
    from pipeline.stages.synapses import DetectionParams
    from pipeline.synapse_model import load_model
    from pipeline.synthetic import SynthParams, generate_block
    from storage.box import Box

    params = params or DetectionParams()
    model, config = load_model(model_dir)
    frames, n_true = [], 0
    for seed in seeds:
        sp = SynthParams(seed=int(seed), shape_zyx=tuple(shape_zyx))
        block = generate_block(sp, Box.from_shape(sp.shape_zyx))
        for source in segmentations:
            seg = block.volumes["gt"] if source == "gt" else segment_volume(block.volumes["raw"], source)[0]
            frame, n = _labelled(model, config, block, seg, sp, params, distance_nm)
            n_true += n
            if frame is not None:
                frames.append(frame.assign(seed=int(seed), segmentation=str(source)))
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), n_true


def _labelled(model, config, block, segmentation, sp, params, distance_nm) -> tuple[pd.DataFrame | None, int]:
    from pipeline.stages.synapses import detect_image, merge_duplicates
    from pipeline.synapse_metrics import match_synapses

    df = detect_image(model, config, block.volumes["raw"], segmentation, sp.voxel_size_zyx, params)
    df = merge_duplicates(df, sp.voxel_size_zyx, params.merge_distance_nm)
    true = block.synapses
    if df.empty:
        return None, len(true)
    df = neighbour_context(df, sp.voxel_size_zyx)
    df = df[(df.pre_segment_id != 0) & (df.post_segment_id != 0) & (df.pre_segment_id != df.post_segment_id)]
    df = df.reset_index(drop=True)
    pos = (df[["x", "y", "z"]].to_numpy(float) + 0.5) * np.asarray(sp.voxel_size_xyz_nm, float)
    df["tp"] = 0
    for a, _ in match_synapses(pos, true[["x_nm", "y_nm", "z_nm"]].to_numpy(float), distance_nm):
        df.loc[a, "tp"] = 1
    return df.drop(columns=["pre_zyx", "post_zyx"]), len(true)


def f1_at(prob: np.ndarray, tp: np.ndarray, n_true: int, threshold: float) -> tuple[float, float, float]:
    keep = prob >= threshold
    hits = float(tp[keep].sum())
    precision = hits / max(int(keep.sum()), 1)
    recall = hits / max(n_true, 1)
    return (2 * precision * recall / (precision + recall) if precision + recall else 0.0), precision, recall


def fit_filter(candidates: pd.DataFrame, n_true: int, features=FEATURES, c: float = 1.0,
               folds: int = THRESHOLD_FOLDS) -> CandidateFilter:
    """Logistic regression on standardised features. The threshold maximises F1 (0.05 steps, coarse enough not to
    chase noise) over out-of-fold probabilities: with a `seed` column the volumes are split into `folds` groups and
    each group is scored by a model fitted on the others, so the threshold is chosen on candidates the scoring
    model never saw (in-sample probabilities are overconfident and push the threshold up). Without volumes to
    split, the threshold is chosen in-sample."""
    if candidates.empty or candidates["tp"].nunique() < 2:
        raise ConfigError("candidate filter: the fitting volumes gave no true and false candidates to learn from")
    fitted = _logistic(candidates, features, c)
    tp = candidates["tp"].to_numpy()
    prob = fitted.probability(candidates)
    volumes = candidates["seed"].to_numpy() if "seed" in candidates else np.zeros(len(candidates))
    groups, volume_index = np.unique(volumes, return_inverse=True)
    if len(groups) >= 2:
        fold = volume_index % min(folds, len(groups))
        for k in np.unique(fold):
            train = candidates[fold != k]
            if train["tp"].nunique() == 2:
                prob[fold == k] = _logistic(train, features, c).probability(candidates[fold == k])
    best = max(np.round(np.arange(0.05, 0.96, 0.05), 2), key=lambda t: f1_at(prob, tp, n_true, t)[0])
    return CandidateFilter(fitted.features, fitted.mean, fitted.scale, fitted.coef, fitted.intercept, float(best))


def _logistic(candidates: pd.DataFrame, features, c: float) -> CandidateFilter:
    from sklearn.linear_model import LogisticRegression

    x = feature_matrix(candidates, features)
    mean, scale = x.mean(0), x.std(0) + 1e-9
    lr = LogisticRegression(C=c, max_iter=5000).fit((x - mean) / scale, candidates["tp"].to_numpy())
    return CandidateFilter(tuple(features), tuple(mean), tuple(scale), tuple(lr.coef_[0]), float(lr.intercept_[0]),
                           0.5)


def fit_from_config(config: str | os.PathLike | dict) -> Path:
    """`connectome train synapse-filter CONFIG`: {"model": detector folder or packaged name, "fit_seeds": [first,
    stop), "validation_seeds": [first, stop), "shape_zyx", "c", "segmentations": ["gt", FFN model, ...],
    "detection": {DetectionParams fields, e.g. "threshold", "flips"}}. Writes candidate_filter.json into the model
    folder with the fitting and validation figures and the detection settings it was fitted for (its evidence is
    only calibrated for candidates made that way)."""
    from pipeline.config import read_config_file
    from pipeline.stages.synapses import DetectionParams
    from pipeline.synapse_model import resolve_model

    where = "synapse filter config"
    if not isinstance(config, dict):
        where = f"synapse filter config {config}"  # every error below names the file
        config = read_config_file(Path(config))
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: expected a mapping at the top level")
    try:
        model_dir = resolve_model(config["model"])
        fit_seeds = range(*(int(s) for s in config["fit_seeds"]))
        val_seeds = range(*(int(s) for s in config["validation_seeds"]))
        shape = tuple(int(n) for n in config.get("shape_zyx", (48, 192, 192)))
        c = float(config.get("c", 1.0))
        segmentations = tuple(str(v) for v in config.get("segmentations", ["gt"]))
        detection = DetectionParams(**config.get("detection", {}))
    except KeyError as exc:
        raise ConfigError(f"{where}: missing field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: bad value ({exc})") from None
    t0 = time.time()
    fit_set, fit_true = labelled_candidates(model_dir, fit_seeds, shape, detection, segmentations=segmentations)
    fitted = fit_filter(fit_set, fit_true, c=c)
    val_set, val_true = labelled_candidates(model_dir, val_seeds, shape, detection, segmentations=segmentations)
    before = f1_at(np.ones(len(val_set)), val_set["tp"].to_numpy(), val_true, 0.5)
    after = f1_at(fitted.probability(val_set), val_set["tp"].to_numpy(), val_true, fitted.threshold)
    figures = lambda f: {"f1": round(f[0], 3), "precision": round(f[1], 3), "recall": round(f[2], 3)}  # noqa: E731
    per_source = {}
    for source in segmentations:
        part = val_set[val_set["segmentation"] == source]
        n = val_true // len(segmentations)
        per_source[source] = {"without_filter": figures(f1_at(np.ones(len(part)), part["tp"].to_numpy(), n, 0.5)),
                              "with_filter": figures(f1_at(fitted.probability(part), part["tp"].to_numpy(), n,
                                                           fitted.threshold))}
    metadata = {
        "fit_seeds": [fit_seeds.start, fit_seeds.stop], "validation_seeds": [val_seeds.start, val_seeds.stop],
        "shape_zyx": list(shape), "segmentations": list(segmentations), "detection": asdict(detection),
        "fit_candidates": int(len(fit_set)), "fit_true_synapses": int(fit_true),
        "threshold_chosen_on": f"out-of-fold probabilities of the fit volumes ({THRESHOLD_FOLDS} folds by volume)",
        "validation_without_filter": figures(before), "validation_with_filter": figures(after),
        "validation_per_segmentation": per_source,
        "seconds": round(time.time() - t0, 1),
        "command": "connectome train synapse-filter CONFIG (see pipeline/synapse_filter.py)",
    }
    fitted = CandidateFilter(fitted.features, fitted.mean, fitted.scale, fitted.coef, fitted.intercept,
                             fitted.threshold, metadata)
    path = save_filter(fitted, model_dir)
    print(json.dumps({"filter": str(path), "threshold": fitted.threshold, **metadata}))
    return path
