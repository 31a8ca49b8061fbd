"""synapses: blockwise cleft detection, components, partner assignment, then duplicate merging on the driver.

A block predicts over its read box (write box + the network's receptive-field halo + the largest cleft we expect),
labels cleft components with cc3d and keeps a component only if its centroid lies in the block's write box, so a
cleft is reported by exactly one block. Partners come from the segmentation around the cleft: each cleft voxel
votes for the segment of its nearest presynaptic-side voxel and of its nearest postsynaptic-side voxel (side
probability >= 0.5 and above the other side's, within `partner_radius`); a component is split into the connected
pieces of one (pre, post) pair, because touching clefts of neighbouring synapses (one bouton on two dendrites,
boutons in a row on one dendrite) threshold into one component; each piece takes the pair most of its voxels vote
for. A component without votes falls back to probability mass: the segment holding the most presynaptic over
postsynaptic probability within `partner_radius` of the cleft is pre, the one with the most postsynaptic
probability (other than pre) is post. Detections that end up closer than `merge_distance_nm` with the same
partners are merged on the driver (a cleft split into two components is one synapse). Each candidate also carries
evidence (size, z extent, whether it lies on the membrane between its partners, darkness, polarity on each side);
the detector folder's candidate filter (pipeline/synapse_filter.py) turns it into the row's score and verdict.
Autapses, partner 0 and rejected candidates are kept in the table but marked invalid, so the valid view excludes
them without losing evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np
import pandas as pd
import scipy.ndimage as ndi

from storage.box import Block
from storage.errors import VolumeError
from storage.volume import open_volume

_MODEL_CACHE: dict = {}


# the detection settings that shape the candidates the filter sees; a filter is fitted for one value of each
FILTER_CALIBRATION = ("threshold", "flips", "merge_distance_nm")


@dataclass(frozen=True)
class DetectionParams:
    """Defaults chosen for the packaged `synapses_small` on validation volumes (synthetic seeds 301-312 and
    503-530, never the benchmark's held-out 201-224); see pipeline/models/synapses_small/TRAINING.md. The averaged
    maps of 16 views are smoother and less confident than one view's, hence the lower cleft threshold; the
    candidate filter is fitted for the settings in `FILTER_CALIBRATION` (its file records them)."""

    threshold: float = 0.8
    min_size: int = 20
    partner_radius_nm: float = 160.0
    merge_distance_nm: float = 300.0  # pieces of one cleft lie up to a cleft diameter apart (<= 280 nm here);
                                      # 150 left split pieces as false positives (validation F1 0.872 -> 0.881)
    split_partners: bool = True    # cut components per (pre, post) pair of nearest side voxels and per contact
    side_threshold: float = 0.5
    contact_radius_nm: float = 64.0  # also split per contact (`contact_labels`; 0 = off). Validation seeds 301-312
                                     # and 503-530 (643 synapses), same filter: F1 0.888 -> 0.895, partner accuracy
                                     # 0.918 -> 0.942; on 301-312 alone 0.906 at 64 nm, 0.903 at 96
    partner_votes: bool = False    # pre/post by the voxels' votes (exact with clean polarity; the packaged model's
                                   # polarity is noisy, and probability mass around each piece does better with it)
    candidate_filter: bool = True  # the model folder's candidate_filter.json, when it has one, decides which
                                   # candidates are synapses (pipeline/synapse_filter.py)
    flips: int = 16                # average the maps over this many image symmetries (1 = off; see `predict`)

    def __post_init__(self) -> None:
        from pipeline.synapse_model import check_flips

        check_flips(self.flips)
        if self.contact_radius_nm < 0:
            raise ValueError(f"contact_radius_nm must be >= 0 (0 turns the contact split off), got "
                             f"{self.contact_radius_nm}")


def _model(model_dir: str):
    if model_dir not in _MODEL_CACHE:
        from pipeline.synapse_model import load_model

        _MODEL_CACHE[model_dir] = load_model(model_dir)
    return _MODEL_CACHE[model_dir]


def assign_partners(components: np.ndarray, probs: np.ndarray, segmentation: np.ndarray,
                    voxel_size_zyx: tuple[float, float, float], radius_nm: float,
                    fragments: np.ndarray | None = None,
                    sides: tuple[np.ndarray, np.ndarray] | None = None,
                    image: np.ndarray | None = None) -> pd.DataFrame:
    """One row per component: centroid (voxels, zyx), size, score, pre/post segment ids and positions.

    With `sides` (per-voxel nearest pre-side and post-side segment, from `side_labels`), pre and post are the
    segments most of the component's voxels vote for; a component with no vote on a side falls back to the
    probability-mass rule below.

    With `fragments` (the pre-agglomeration supervoxels), each side also gets the fragment of its segment that
    carries the most of that side's probability, so a later proofreading split re-attributes the synapse."""
    rows = []
    objects = ndi.find_objects(components)
    pad = [int(np.ceil(radius_nm / v)) for v in voxel_size_zyx]
    for label, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        outer = tuple(slice(max(0, s.start - p), min(dim, s.stop + p))
                      for s, p, dim in zip(sl, pad, components.shape))
        comp = components[outer] == label
        dist = ndi.distance_transform_edt(~comp, sampling=voxel_size_zyx)
        near = dist <= radius_nm
        seg = segmentation[outer]
        pre_p, post_p, cleft_p = probs[1][outer], probs[2][outer], probs[0][outer]
        cand = near & (seg != 0)
        pre_id = post_id = 0
        if cand.any():
            ids, inv = np.unique(seg[cand], return_inverse=True)
            # pre: the segment carrying the most presynaptic over postsynaptic probability (both channels light
            # up around every cleft; their difference is what singles out the vesicle side); post: the segment
            # other than pre with the most postsynaptic probability (measured best on held-out synthetic data)
            pre_score = np.bincount(inv, weights=pre_p[cand] - post_p[cand], minlength=len(ids))
            post_score = np.bincount(inv, weights=post_p[cand], minlength=len(ids))
            pre_idx = int(np.argmax(pre_score))
            pre_id = int(ids[pre_idx])
            post_score[pre_idx] = -np.inf
            if len(ids) > 1:
                post_id = int(ids[int(np.argmax(post_score))])
        if sides is not None:
            votes_pre, votes_post = sides[0][outer][comp], sides[1][outer][comp]
            vp, vq = votes_pre[votes_pre != 0], votes_post[votes_post != 0]
            if len(vp):
                u, c = np.unique(vp, return_counts=True)
                pre_id = int(u[np.argmax(c)])
            vq = vq[vq != pre_id]
            if len(vq):
                u, c = np.unique(vq, return_counts=True)
                post_id = int(u[np.argmax(c)])
            elif pre_id == post_id:
                post_id = 0
        coords = np.argwhere(comp) + [s.start for s in outer]
        centroid = coords.mean(axis=0)

        def side_centroid(seg_id, weight):
            mask = cand & (seg == seg_id)
            if seg_id == 0 or not mask.any():
                return centroid
            w = weight[mask] + 1e-6
            return (np.argwhere(mask) * w[:, None]).sum(0) / w.sum() + [s.start for s in outer]

        frag_ids = {}
        if fragments is not None:
            frag = fragments[outer]
            for side, seg_id, weight in (("pre", pre_id, pre_p), ("post", post_id, post_p)):
                mask = cand & (seg == seg_id) & (frag != 0)
                if seg_id == 0 or not mask.any():
                    frag_ids[side] = 0
                    continue
                f_ids, f_inv = np.unique(frag[mask], return_inverse=True)
                frag_ids[side] = int(f_ids[np.argmax(np.bincount(f_inv, weights=weight[mask] + 1e-6))])
        rows.append({
            **({"pre_fragment_id": frag_ids["pre"], "post_fragment_id": frag_ids["post"]} if frag_ids else {}),
            "z": centroid[0], "y": centroid[1], "x": centroid[2],
            "size_voxels": int(comp.sum()),
            "score": float(cleft_p[comp].mean()),
            **candidate_evidence(comp, cand, seg, pre_id, post_id, cleft_p, pre_p, post_p, voxel_size_zyx,
                                 None if image is None else image[outer]),
            "pre_segment_id": pre_id, "post_segment_id": post_id,
            "pre_zyx": side_centroid(pre_id, pre_p), "post_zyx": side_centroid(post_id, post_p),
        })
    return pd.DataFrame(rows)


INTERFACE_NM = 40.0  # "on the membrane between the partners": within this of both


def candidate_evidence(comp, near, seg, pre_id: int, post_id: int, cleft_p, pre_p, post_p, voxel_size_zyx,
                       image=None) -> dict:
    """What the maps say about one candidate beyond its mean cleft score, for the candidate classifier
    (pipeline/synapse_filter.py): peak score, z extent, mean presynaptic probability on the pre segment and
    postsynaptic probability on the post segment near the cleft, the same channels on the wrong sides (vesicles on
    both sides of an axon-axon contact; a PSD on neither), how clearly the post segment wins over the runner-up, and
    how many segments touch the neighbourhood."""

    def mean_on(seg_id, channel):
        mask = near & (seg == seg_id)
        return float(channel[mask].mean()) if seg_id and mask.any() else 0.0

    def within(seg_id, nm):
        if not seg_id:
            return np.zeros(comp.shape, bool)
        return ndi.distance_transform_edt(seg != seg_id, sampling=voxel_size_zyx) <= nm

    # a cleft lies on the membrane between its partners; mitochondria and dark cytoplasm lie inside one segment
    interface = float((within(pre_id, INTERFACE_NM) & within(post_id, INTERFACE_NM))[comp].mean())
    ids = np.unique(seg[near]) if near.any() else np.zeros(0, seg.dtype)
    others = [i for i in ids.tolist() if i not in (0, pre_id)]
    post_means = sorted((mean_on(i, post_p) for i in others), reverse=True)
    return {
        "score_max": float(cleft_p[comp].max()),
        "z_sections": int(np.any(comp, axis=(1, 2)).sum()),
        "pre_side": mean_on(pre_id, pre_p),
        "post_side": mean_on(post_id, post_p),
        "pre_on_post": mean_on(post_id, pre_p),
        "post_on_pre": mean_on(pre_id, post_p),
        "post_margin": (post_means[0] - post_means[1]) if len(post_means) > 1 else (post_means[0] if post_means else 0.0),
        "near_segments": int(len(ids) - (0 in ids)),
        "interface": interface,
        **({} if image is None else {"darkness": float(image[near].mean() - image[comp].mean()),
                                     "contrast": float(image[comp].std())}),
    }


def side_labels(probs: np.ndarray, segmentation: np.ndarray, voxel_size_zyx, radius_nm: float,
                threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel, the segment of the nearest presynaptic-side voxel and of the nearest postsynaptic-side voxel
    (0 beyond `radius_nm`). A side voxel is a segmented voxel whose side probability is >= `threshold` and above
    the other side's, so a voxel is never counted for both."""
    seg = segmentation.astype(np.uint64, copy=False)
    out = []
    for mine, other in ((probs[1], probs[2]), (probs[2], probs[1])):
        side = (mine >= threshold) & (mine > other) & (seg != 0)
        if not side.any():
            out.append(np.zeros(seg.shape, np.uint64))
            continue
        dist, idx = ndi.distance_transform_edt(~side, sampling=voxel_size_zyx, return_indices=True)
        lab = seg[tuple(idx)]
        lab[dist > radius_nm] = 0
        out.append(lab)
    return out[0], out[1]


def contact_labels(components: np.ndarray, segmentation: np.ndarray, voxel_size_zyx, radius_nm: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per cleft voxel, the contact it lies on: the nearest segment and the nearest other segment within
    `radius_nm`, as (smaller id, larger id) so the pair has no direction (0 where fewer than two are that near).

    Unlike the side labels this reads only the segmentation, not the noisy polarity maps: boutons in a row along
    one dendrite share the post segment and their vesicle clouds blur together, but each cleft voxel still sits
    between the dendrite and its own bouton."""
    fg = np.argwhere(components != 0)
    lo = np.zeros(components.shape, np.uint64)
    hi = np.zeros(components.shape, np.uint64)
    if not len(fg):
        return lo, hi
    v = np.asarray(voxel_size_zyx, float)
    reach = np.floor(radius_nm / v).astype(int)
    offsets = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1).reshape(-1, 3)
    dist = np.linalg.norm(offsets * v, axis=1)
    order = np.argsort(dist, kind="stable")
    offsets = offsets[order][dist[order] <= radius_nm]  # nearest first
    shape = np.asarray(segmentation.shape)
    seg = segmentation.astype(np.uint64, copy=False)
    for start in range(0, len(fg), 4096):  # bounded memory (~150 MB): 4096 voxels x offsets at a time
        at = fg[start:start + 4096]
        p = at[:, None, :] + offsets[None]
        inside = np.all((p >= 0) & (p < shape), axis=2)
        p = np.clip(p, 0, shape - 1)
        labels = np.where(inside, seg[p[..., 0], p[..., 1], p[..., 2]], np.uint64(0))
        rows = np.arange(len(at))
        seen = labels != 0
        first = np.where(seen.any(1), labels[rows, np.argmax(seen, axis=1)], np.uint64(0))
        other = seen & (labels != first[:, None])
        second = np.where(other.any(1), labels[rows, np.argmax(other, axis=1)], np.uint64(0))
        pair_known = second != 0
        idx = tuple(at.T)
        lo[idx] = np.where(pair_known, np.minimum(first, second), 0)
        hi[idx] = np.where(pair_known, np.maximum(first, second), 0)
    return lo, hi


def split_by_partners(components: np.ndarray, labels, min_size: int) -> np.ndarray:
    """Split cleft components so each piece lies between one pair of segments.

    Clefts of neighbouring synapses touch (a bouton contacting two dendrites, boutons in a row along one dendrite);
    thresholding merges them into one component. Every cleft voxel carries per-voxel labels (the nearest
    presynaptic-side and postsynaptic-side segments of `side_labels`, and the contact of `contact_labels`); a
    component is cut into the connected pieces that agree on all of them. Pieces smaller than `min_size` (edge
    voxels that see a third segment) go back to the largest piece of their component, so a real synapse is never
    split by label noise."""
    fg = components != 0
    if not fg.any():
        return components
    comp = components[fg].astype(np.int64)
    _, pair = np.unique(np.stack([comp, *(lab[fg].astype(np.int64) for lab in labels)]),
                        axis=1, return_inverse=True)
    keyed = np.zeros(components.shape, np.uint32)
    keyed[fg] = pair.reshape(-1).astype(np.uint32) + 1
    pieces = cc3d.connected_components(keyed, connectivity=26, out_dtype=np.uint32)
    piece = pieces[fg].astype(np.int64)
    sizes = np.bincount(piece)
    small = sizes[piece] < min_size
    if small.any():
        # the largest piece of each component takes that component's small pieces
        order = np.lexsort((-sizes[piece], comp))
        first = np.ones(len(order), bool)
        first[1:] = comp[order][1:] != comp[order][:-1]
        best = np.zeros(int(comp.max()) + 1, np.int64)
        best[comp[order][first]] = piece[order][first]
        piece = np.where(small, best[comp], piece)
    out = np.zeros(components.shape, np.int64)
    out[fg] = piece
    return out


def detect(probs: np.ndarray, segmentation: np.ndarray, voxel_size_zyx, params: DetectionParams,
           fragments: np.ndarray | None = None, image: np.ndarray | None = None) -> pd.DataFrame:
    """Components of thresholded cleft probability, split per partner pair, with their partners (whole arrays;
    no block logic)."""
    mask = probs[0] >= params.threshold
    components = cc3d.connected_components(mask, connectivity=26)
    components = cc3d.dust(components, threshold=params.min_size, connectivity=26)
    sides = None
    if params.split_partners and components.any() and segmentation.any():
        sides = side_labels(probs, segmentation, voxel_size_zyx, params.partner_radius_nm, params.side_threshold)
        contacts = contact_labels(components, segmentation, voxel_size_zyx, params.contact_radius_nm) \
            if params.contact_radius_nm > 0 else ()
        components = split_by_partners(components, (*sides, *contacts), params.min_size)
    components, _ = _renumber(components)
    return assign_partners(components, probs, segmentation, voxel_size_zyx, params.partner_radius_nm, fragments,
                           sides if params.partner_votes else None, image)


def detect_image(model, config, image: np.ndarray, segmentation: np.ndarray, voxel_size_zyx,
                 params: DetectionParams, fragments: np.ndarray | None = None) -> pd.DataFrame:
    """The detector's maps of `image`, then `detect`, with the normalised image for the candidates' darkness and
    contrast (the candidate filter's inputs)."""
    from pipeline.synapse_model import normalize, predict

    probs = predict(model, config, image, params.flips)
    return detect(probs, segmentation, voxel_size_zyx, params, fragments, normalize(image, config)[0, ..., 0])


def _renumber(labels: np.ndarray):
    import fastremap

    return fastremap.renumber(labels, in_place=False)


def detect_block(block: Block, *, image_spec: dict, segmentation_spec: dict, model_dir: str, params: dict,
                 fragments_spec: dict | None = None, fill_missing: bool = False) -> dict:
    model, config = _model(model_dir)
    image_vol = open_volume(image_spec, fill_missing=fill_missing)
    image = image_vol.read(block.read)
    segmentation = open_volume(segmentation_spec).read(block.read)
    fragments = open_volume(fragments_spec).read(block.read) if fragments_spec else None
    voxel_size_zyx = tuple(float(v) for v in reversed(image_vol.voxel_size))
    df = detect_image(model, config, image, segmentation, voxel_size_zyx, DetectionParams(**params), fragments)
    if df.empty:
        return {"rows": {}}
    origin = np.array(block.read.start)
    centroid = df[["z", "y", "x"]].to_numpy() + origin
    inside = np.all((centroid >= block.write.start) & (centroid < block.write.stop), axis=1)
    df = df[inside].copy()
    df[["z", "y", "x"]] = centroid[inside]
    df["pre_zyx"] = [list(np.asarray(p) + origin) for p in df["pre_zyx"]]
    df["post_zyx"] = [list(np.asarray(p) + origin) for p in df["post_zyx"]]
    df["block_id"] = block.block_id
    return {"rows": df.reset_index(drop=True).to_dict(orient="list")}


def merge_duplicates(df: pd.DataFrame, voxel_size_zyx, distance_nm: float) -> pd.DataFrame:
    """Merge detections with the same (pre, post) whose centroids are within distance_nm (largest one kept)."""
    if df.empty:
        return df
    from scipy.spatial import cKDTree

    pos = df[["z", "y", "x"]].to_numpy(float) * np.asarray(voxel_size_zyx, float)
    pairs = cKDTree(pos).query_pairs(distance_nm, output_type="ndarray")
    same = (df["pre_segment_id"].to_numpy()[pairs[:, 0]] == df["pre_segment_id"].to_numpy()[pairs[:, 1]]) & (
        df["post_segment_id"].to_numpy()[pairs[:, 0]] == df["post_segment_id"].to_numpy()[pairs[:, 1]])
    pairs = pairs[same]
    import scipy.sparse
    import scipy.sparse.csgraph

    n = len(df)
    graph = scipy.sparse.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = scipy.sparse.csgraph.connected_components(graph, directed=False)
    df = df.assign(_group=comp, _order=np.arange(n))
    df = df.sort_values(["_group", "size_voxels", "_order"], ascending=[True, False, True])
    sizes = df.groupby("_group")["size_voxels"].transform("sum")
    df = df.assign(size_voxels=sizes).drop_duplicates("_group").sort_values("_order")
    return df.drop(columns=["_group", "_order"]).reset_index(drop=True)


def synapse_table(df: pd.DataFrame, voxel_size_xyz) -> pd.DataFrame:
    """Store rows (XYZ integer nm), sorted by position so synapse ids do not depend on block completion order."""
    vx, vy, vz = (float(v) for v in voxel_size_xyz)
    if df.empty:
        return pd.DataFrame(columns=["synapse_id", "pre_segment_id", "post_segment_id", "x_nm", "y_nm", "z_nm",
                                     "pre_x_nm", "pre_y_nm", "pre_z_nm", "post_x_nm", "post_y_nm", "post_z_nm",
                                     "size_voxels", "score", "valid"])
    df = df.sort_values(["z", "y", "x"]).reset_index(drop=True)
    pre = np.stack(df["pre_zyx"].to_numpy())
    post = np.stack(df["post_zyx"].to_numpy())

    def nm(values, v):
        return np.round((np.asarray(values, float) + 0.5) * v).astype(np.int32)

    out = pd.DataFrame({
        "synapse_id": np.arange(1, len(df) + 1, dtype=np.int64),
        "pre_segment_id": df["pre_segment_id"].astype(np.int64),
        "post_segment_id": df["post_segment_id"].astype(np.int64),
        "x_nm": nm(df["x"], vx), "y_nm": nm(df["y"], vy), "z_nm": nm(df["z"], vz),
        "pre_x_nm": nm(pre[:, 2], vx), "pre_y_nm": nm(pre[:, 1], vy), "pre_z_nm": nm(pre[:, 0], vz),
        "post_x_nm": nm(post[:, 2], vx), "post_y_nm": nm(post[:, 1], vy), "post_z_nm": nm(post[:, 0], vz),
        "size_voxels": df["size_voxels"].astype(np.int64),
        "score": df["score"].astype(np.float32),
    })
    if "pre_fragment_id" in df.columns:
        out["pre_fragment_id"] = df["pre_fragment_id"].astype(np.int64).to_numpy()
        out["post_fragment_id"] = df["post_fragment_id"].astype(np.int64).to_numpy()
    out["valid"] = (out["pre_segment_id"] != 0) & (out["post_segment_id"] != 0) & (
        out["pre_segment_id"] != out["post_segment_id"])
    if "accepted" in df.columns:  # rejected candidates stay in the table as evidence, outside the valid view
        out["valid"] &= df["accepted"].astype(bool).to_numpy()
    return out


def synapses_from_candidates(candidates: pd.DataFrame, model_dir: str, params: DetectionParams, voxel_size_xyz
                             ) -> pd.DataFrame:
    """All blocks' candidates -> store rows: duplicates merged, then the model's candidate filter (when it has one
    and `params.candidate_filter`) sets each row's score and verdict."""
    from pipeline.synapse_filter import apply_filter, load_filter

    voxel_size_zyx = tuple(float(v) for v in reversed(voxel_size_xyz))
    df = merge_duplicates(candidates, voxel_size_zyx, params.merge_distance_nm)
    fitted = load_filter(model_dir) if params.candidate_filter else None
    if fitted is not None:
        _warn_if_fitted_for_other_candidates(fitted.metadata.get("detection", {}), params, model_dir)
    df = apply_filter(df, fitted, voxel_size_zyx)
    return synapse_table(df, voxel_size_xyz)


def _warn_if_fitted_for_other_candidates(fitted_for: dict, params: DetectionParams, model_dir: str) -> None:
    """The filter's evidence is calibrated for candidates made at one cleft threshold, flip averaging and merge
    distance; other settings still run (a user may be exploring) but their scores are out of calibration, so say so."""
    import warnings

    differ = {k: (v, getattr(params, k)) for k, v in fitted_for.items()
              if k in FILTER_CALIBRATION and v != getattr(params, k)}
    if differ:
        said = ", ".join(f"{k} {a} (running with {b})" for k, (a, b) in differ.items())
        warnings.warn(f"{model_dir}: its candidate filter was fitted for {said}; scores may be off", stacklevel=3)


@dataclass
class SynapseStageConfig:
    """Shapes are Z Y X voxels. `model` is a packaged synapse model name or a model directory."""

    model: str = "synapses_small"
    block_shape: tuple[int, int, int] = (64, 128, 128)
    detection: DetectionParams = DetectionParams()
    fill_missing: bool = False
    restart: bool = False


def run_synapse_stage(image_url: str, segmentation_url: str, store_path: str, config: SynapseStageConfig, client,
                      *, ledger_dir: str, fragments_url: str | None = None, progress: bool = True) -> pd.DataFrame:
    """Detect synapses blockwise, merge duplicates, write one store version; returns the synapse table."""
    from dataclasses import asdict

    from pipeline.runner import run_blockwise
    from pipeline.synapse_model import load_model, resolve_model
    from storage.box import BlockGrid
    from storage.store import ConnectomeStore

    model_dir = str(resolve_model(config.model))
    _, model_config = load_model(model_dir)
    image = open_volume(image_url, fill_missing=config.fill_missing)
    segmentation = open_volume(segmentation_url)
    if segmentation.shape != image.shape:
        raise VolumeError(f"segmentation {segmentation_url} shape {segmentation.shape} differs from image "
                         f"{image_url} shape {image.shape} (zyx)")
    halo = tuple(h + int(np.ceil(config.detection.partner_radius_nm / v)) + 8
                 for h, v in zip(model_config.halo_zyx, reversed(image.voxel_size)))
    grid = BlockGrid(image.bounds, tuple(config.block_shape), halo)
    results = run_blockwise("synapses", grid, detect_block, params=dict(
        image_spec=image.spec, segmentation_spec=segmentation.spec, model_dir=model_dir,
        params=asdict(config.detection), fill_missing=config.fill_missing,
        fragments_spec=open_volume(fragments_url).spec if fragments_url else None,
    ), client=client, ledger_dir=ledger_dir, restart=config.restart, progress=progress)
    frames = [pd.DataFrame(r["rows"]) for _, r in sorted(results.items()) if r["rows"]]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    table = synapses_from_candidates(df, model_dir, config.detection, image.voxel_size)
    store = ConnectomeStore.open(store_path) if Path(store_path).exists() else ConnectomeStore.create(store_path)
    with store.loading("synapses") as version:
        store.write_synapses(table, version=version)
    return table
