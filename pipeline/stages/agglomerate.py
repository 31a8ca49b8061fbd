"""agglomerate: merge over-segmented neighbours on a boundary-score region adjacency graph.

FFN stops flooding where its own prediction drops, not only at membranes, so one neurite can end up as several
segments that meet in bright cytoplasm. Two segments whose contact surface is as bright as cytoplasm are very
likely one object; a real boundary between cells is a dark membrane. Each block grows its segments a few voxels
into the unlabelled gap between them (so FFN's membrane-wide gaps become contacts), measures, for every touching
pair, the contact area and the mean EM intensity across it, and returns those edges; the driver sums edges over
blocks and merges pairs whose contact is bright enough with one union-find, which only updates the lookup table.

"Bright enough" is relative by default: the contact's mean intensity over the mean interior intensity of the two
segments (`min_ratio`), so one setting serves datasets (and parts of one dataset) of different brightness; the
absolute `min_intensity` rule remains for callers without segment intensities.

Whether it helps depends on the FFN model, so each packaged model records its own rule and whether it is on
(`rule_for_model`). Measured with benchmarks/segment_quality.py (2x2x2 blocks; rules chosen on training volumes
with --tune, then checked held out, blockwise VOI off -> on):
- synthetic_small (100k steps): chosen min_ratio 0.95 / min_contact 300 on seed 3 (4.868 -> 4.835); held out,
  seed 11 3.322 -> 3.684, seed 12 4.199 -> 4.175. Recorded off.
- medulla_small: chosen min_ratio 0.9 / min_contact 30 on z 60-109 (3.790 -> 3.125 at 128x128); held out,
  z 120-169 at 128x128 2.441 -> 2.666 (the library default rule: 2.541). Recorded off.
With the earlier, weaker models (which labelled 35-45 % of the voxels) the library default rule (min_ratio 1.0,
min_contact 100) took medulla z 120-169 from 4.29 to 3.60; a model that records nothing gets that rule, on.
FFN resegmentation at decision points (google/ffn) is the next step if merges of the bright-contact rule remain
the dominant error.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import scipy.ndimage as ndi

from pipeline.stages.reconcile import build_lookup
from storage.box import Block
from storage.errors import ConfigError
from storage.volume import open_volume


@dataclass(frozen=True)
class AgglomerationParams:
    """expand_voxels: how far segments grow into unlabelled voxels before contacts are measured.
    min_intensity: mean raw intensity (0-255) across a contact above which two segments are merged.
    min_contact: contact faces needed before a pair is considered at all (noise floor).
    min_ratio: when set, the rule is relative instead: merge when the contact's mean intensity is at least this
        fraction of the mean interior intensity of the two segments (robust to the dataset's brightness/contrast,
        which an absolute `min_intensity` is not).
    """

    expand_voxels: int = 3
    min_intensity: float = 150.0
    min_contact: int = 100
    min_ratio: float | None = 1.0


@dataclass(frozen=True)
class ModelRule:
    """Whether and how to agglomerate the output of one FFN model; `source`: "model" (its config.json says) or
    "default" (it says nothing: on, with AgglomerationParams())."""

    enabled: bool
    params: AgglomerationParams
    source: str


def rule_for_model(metadata: dict, where: str = "FFN model metadata") -> ModelRule:
    """The agglomeration rule recorded with an FFN model (config.json ``metadata.agglomeration``: ``enabled`` and
    ``params``), else the library default.

    Why per model: the rule decides which of the FFN's own splits to undo, so whether it helps depends on how that
    FFN splits and merges; a model is packaged with the decision measured for it (benchmarks/segment_quality.py:
    the rule chosen on training volumes with --tune, kept on only if it also helps the held-out volumes)."""
    recorded = (metadata or {}).get("agglomeration")
    if not recorded:
        return ModelRule(True, AgglomerationParams(), "default")
    tuned = recorded.get("params", {})
    unknown = sorted(set(tuned) - {f.name for f in fields(AgglomerationParams)})
    if unknown:
        raise ConfigError(f"{where}: metadata.agglomeration.params has unknown parameter(s) {unknown}")
    return ModelRule(bool(recorded.get("enabled", True)), AgglomerationParams(**tuned), "model")


def expand_labels(labels: np.ndarray, distance: int) -> np.ndarray:
    """Grow labels into background up to `distance` voxels (nearest label wins)."""
    if distance <= 0 or not (labels == 0).any() or not labels.any():
        return labels
    dist, (iz, iy, ix) = ndi.distance_transform_edt(labels == 0, return_indices=True)
    grown = labels[iz, iy, ix]
    return np.where((labels == 0) & (dist > distance), 0, grown)


def contact_edges(labels: np.ndarray, image: np.ndarray, inside: tuple[slice, slice, slice]) -> pd.DataFrame:
    """Touching pairs (a < b) with contact face count and summed intensity of both voxels of each face.

    Only faces whose first voxel lies in `inside` (the write box) are counted, so blocks never count a face twice.
    """
    mask_inside = np.zeros(labels.shape, bool)
    mask_inside[inside] = True
    image = image.astype(np.float64)
    frames = []
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        a, b = labels[tuple(lo)], labels[tuple(hi)]
        sel = (a != b) & (a != 0) & (b != 0) & mask_inside[tuple(lo)]
        if not sel.any():
            continue
        u, v = a[sel], b[sel]
        frames.append(pd.DataFrame({
            "a": np.minimum(u, v), "b": np.maximum(u, v),
            "intensity": image[tuple(lo)][sel] + image[tuple(hi)][sel],
        }))
    if not frames:
        return pd.DataFrame({"a": np.zeros(0, np.uint64), "b": np.zeros(0, np.uint64),
                             "contact": np.zeros(0, np.int64), "intensity_sum": np.zeros(0)})
    df = pd.concat(frames, ignore_index=True)
    out = df.groupby(["a", "b"], sort=True).agg(contact=("intensity", "size"), intensity_sum=("intensity", "sum"))
    return out.reset_index()


def edges_block(block: Block, *, fragments_spec: dict, image_spec: dict, lookup_path: str,
                expand_voxels: int, fill_missing: bool = False, lookup_digest: str = "") -> dict:
    """Contact edges between reconciled segments whose faces start in this write box (`lookup_digest` keys the
    ledger to the reconcile table's content)."""
    from pipeline.stages.relabel import apply_lookup, load_lookup

    fragments, segments = load_lookup(lookup_path)
    labels = apply_lookup(open_volume(fragments_spec).read(block.read), fragments, segments)
    image = open_volume(image_spec, fill_missing=fill_missing).read(block.read)
    grown = expand_labels(labels, expand_voxels)
    inside = block.write.relative_to(block.read).slices
    edges = contact_edges(grown, image, inside)
    return {"edges": edges.to_dict(orient="list"),
            "segments": segment_intensity(labels[inside], image[inside]).to_dict(orient="list")}


def segment_intensity(labels: np.ndarray, image: np.ndarray) -> pd.DataFrame:
    """Per segment: voxel count and summed raw intensity (its interior brightness, for the relative rule)."""
    ids, inverse, counts = np.unique(labels.ravel(), return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=image.ravel().astype(np.float64), minlength=len(ids))
    keep = ids != 0
    return pd.DataFrame({"segment_id": ids[keep].astype(np.uint64), "voxels": counts[keep].astype(np.int64),
                         "intensity_sum": sums[keep]})


def score_edges(edges: pd.DataFrame, segments: pd.DataFrame | None = None) -> pd.DataFrame:
    """Sum per-block edges: a, b, contact, mean_intensity (= sum / (2 * faces)) and, given per-block segment
    intensities, ratio = mean_intensity / mean interior intensity of a and b."""
    total = edges.groupby(["a", "b"], sort=True)[["contact", "intensity_sum"]].sum().reset_index()
    total["mean_intensity"] = total["intensity_sum"] / (2.0 * np.maximum(total["contact"], 1))
    if segments is not None and len(segments):
        seg = segments.groupby("segment_id")[["voxels", "intensity_sum"]].sum()
        interior = seg["intensity_sum"] / np.maximum(seg["voxels"], 1)
        ia = interior.reindex(total["a"].to_numpy()).to_numpy()
        ib = interior.reindex(total["b"].to_numpy()).to_numpy()
        total["ratio"] = total["mean_intensity"] / np.maximum(np.nan_to_num((ia + ib) / 2.0, nan=np.inf), 1e-6)
    return total


def merge_decisions(edges: pd.DataFrame, params: AgglomerationParams,
                    segments: pd.DataFrame | None = None) -> pd.DataFrame:
    """Sum per-block edges and keep the pairs to merge: contact >= min_contact and the contact bright enough:
    relative `min_ratio` when set and segment intensities are known (`segments`, or a scored table), else the
    absolute `min_intensity`."""
    if edges.empty:
        return edges.assign(mean_intensity=[])
    total = edges if "mean_intensity" in edges else score_edges(edges, segments)
    keep = total["contact"] >= params.min_contact
    if params.min_ratio is not None and "ratio" in total:
        keep &= total["ratio"] >= params.min_ratio
    else:
        keep &= total["mean_intensity"] >= params.min_intensity
    return total[keep].reset_index(drop=True)


def agglomerated_lookup(lookup: pd.DataFrame, merges: pd.DataFrame) -> pd.DataFrame:
    """Compose fragment -> segment with segment -> merged segment (dense ids again, deterministic)."""
    seg_ids = np.unique(lookup["segment_id"].to_numpy(np.uint64))
    pairs = merges[["a", "b"]].to_numpy(np.uint64) if len(merges) else np.zeros((0, 2), np.uint64)
    second = build_lookup(seg_ids, pairs)
    mapping = pd.Series(second["segment_id"].to_numpy(), index=second["fragment_id"].to_numpy())
    out = lookup.copy()
    out["segment_id"] = mapping.reindex(out["segment_id"].to_numpy(np.uint64)).to_numpy(np.uint64)
    return out
