"""SegCLR quality on synthetic held-out cells: does the trained encoder beat random init and hand features?

Protocol (../shared/notes/segclr.md, "CPU test plan"): fresh synthetic volumes (seeds never used in training)
-> model-scale skeletons -> nodes every ``--spacing-nm`` -> embeddings with the trained encoder and with the same
architecture at random initialisation. Segments are split in two halves by segment id (md5 of the id, so the
split does not depend on anything the model saw); everything is fitted on the first half and scored on the other.

1. Linear-probe macro-F1 of cell type (segment = mean of its node embeddings) with 1, 5, 20 and all labelled
   segments per class, ``--draws`` random draws each (the same draws for every method; the margins trained -
   hand features and trained - random init are reported draw by draw, mean +- standard error): trained, random_init,
   hand_features (log size, skeleton radius statistics, cable length, branchiness, mask moments), shuffled
   (trained features, permuted labels: must sit at chance); plus a separate row trained_plus_hand (the two feature
   sets concatenated: what a user with both would fit; not the 'trained' figure). Every method gets the same
   probe: features standardised with the probe-training statistics, class-balanced L2 (1e-1) multinomial
   logistic regression; scored on the other half of the segments (macro-F1).
2. Compartment (axon/dendrite/soma/glia) accuracy per node (linear, node embeddings aggregated over 1 um).
3. Node-level cell-type accuracy against the aggregation radius R (PNG: benchmarks/segclr_accuracy_vs_radius.png).
4. OOD: each cell type held out in turn from a linear classifier; AUROC of the Mahalanobis score of held-out-type
   segments vs in-distribution test segments (``ood_auroc`` = mean over held-out types).
5. Invariance: cosine similarity of a node's embedding with its flipped/permuted cutout vs random node pairs.

Last stdout line: one JSON object with linear_probe_f1_at_5 {trained, random_init, hand_features, shuffled},
compartment_accuracy, ood_auroc and the rest of the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from segclr.aggregation import aggregate  # noqa: E402
from segclr.classifiers import macro_f1, train_classifier  # noqa: E402
from segclr.skeletons import subsample_nodes  # noqa: E402
from segclr.training import training_volume_from_arrays  # noqa: E402

COMPARTMENT_NAMES = {1: "axon", 2: "dendrite", 3: "soma", 4: "glia"}
PLOT = Path(__file__).resolve().parent / "segclr_accuracy_vs_radius.png"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synthetic_volume(seed: int, shape_zyx, downsample, cache_dir: str | None = None):
    """One synthetic eval volume at the model scale (benchmarks/segclr_data.py), cached as .npz when asked."""
    import pandas as pd

    from segclr_data import generate_downsampled

    f = "x".join(map(str, downsample))
    path = Path(cache_dir) / f"eval_seed{seed}_{'x'.join(map(str, shape_zyx))}_ds{f}.npz" if cache_dir else None
    if path is not None and path.is_file():
        z = np.load(path, allow_pickle=False)
        types = pd.DataFrame({"segment_id": z["type_ids"], "cell_type": z["type_names"].astype(str)})
        return z["em"], z["seg"], z["comp"], types, tuple(z["vs"].tolist())
    em, seg, comp, types, vs = generate_downsampled(seed, shape_zyx, downsample, log=log)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(str(path) + ".tmp.npz", em=em, seg=seg, comp=comp, vs=np.array(vs),
                 type_ids=types["segment_id"].to_numpy(np.uint64), type_names=types["cell_type"].to_numpy(str))
        os.replace(str(path) + ".tmp.npz", path)
    return em, seg, comp, types, vs


def hand_features(sk, seg_ds, sid, voxel_nm_model) -> np.ndarray:
    """Size, radius statistics, cable length, branchiness and mask moments of one segment (model scale)."""
    zz, yy, xx = np.nonzero(seg_ds == sid)
    pts = np.stack([xx, yy, zz], 1) * np.asarray(voxel_nm_model)
    ev = np.sort(np.linalg.eigvalsh(np.cov(pts.T) + 1e-6 * np.eye(3)))[::-1] if len(pts) > 3 else np.zeros(3)
    r = sk.radii if len(sk) else np.zeros(1)
    deg = np.bincount(sk.edges.ravel(), minlength=len(sk)) if len(sk.edges) else np.zeros(1)
    cable = max(sk.cable_length(), 1.0)
    return np.array([np.log1p(len(pts)), r.mean(), np.median(r), r.std(), np.percentile(r, 90), r.max(),
                     np.log1p(cable), (deg > 2).sum() / cable * 1000.0, (deg == 1).sum() / cable * 1000.0,
                     *np.sqrt(np.maximum(ev, 0)), len(pts) / cable])


def build_dataset(seeds, shape, downsample, spacing_nm, min_nodes, models, cache_dir=None):
    """-> dict of per-node arrays and per-segment tables for all eval volumes."""
    nodes = {"seg": [], "xyz": [], "comp": [], "vertex": [], "emb": {k: [] for k in models}, "vol": []}
    segs = {"key": [], "type": [], "hand": [], "vol": []}
    skeletons = {}
    cutout_cache = []
    for vi, seed in enumerate(seeds):
        t0 = time.time()
        em, seg, comp, types, vs = synthetic_volume(seed, shape, downsample, cache_dir)
        type_of = dict(zip(types["segment_id"].astype(np.uint64).tolist(), types["cell_type"].tolist()))
        tv = training_volume_from_arrays(em, seg, (0, 0, 0), vs, downsample, dust_threshold=20)
        vs_model = np.asarray(vs) * np.asarray(downsample)[::-1]
        log(f"volume seed {seed}: {len(tv.skeletons)} skeletons ({time.time() - t0:.0f} s)")
        for sid, sk in sorted(tv.skeletons.items()):
            if sid not in type_of:
                continue
            keep = subsample_nodes(sk, spacing_nm)
            if len(keep) < min_nodes:
                continue
            key = (vi, sid)
            skeletons[key] = sk
            idx = tv.region.nm_to_index(sk.vertices[keep])
            inside = np.all((idx >= 0) & (idx < np.asarray(comp.shape)), 1)
            c = np.zeros(len(keep), np.uint8)
            c[inside] = comp[tuple(idx[inside].T)]
            segs["key"].append(key)
            segs["type"].append(type_of[sid])
            segs["hand"].append(hand_features(sk, seg, sid, vs_model))
            segs["vol"].append(vi)
            nodes["seg"].append(np.full(len(keep), len(segs["key"]) - 1))
            nodes["xyz"].append(sk.vertices[keep])
            nodes["comp"].append(c)
            nodes["vertex"].append(keep)
            nodes["vol"].append(np.full(len(keep), vi))
        cutout_cache.append(tv.region)
    for k in ("seg", "comp", "vertex", "vol"):
        nodes[k] = np.concatenate(nodes[k])
    nodes["xyz"] = np.concatenate(nodes["xyz"])
    segs["type"] = np.array(segs["type"])
    segs["hand"] = np.stack(segs["hand"])
    segs["vol"] = np.array(segs["vol"])
    for name, embedder in models.items():
        t0 = time.time()
        parts = []
        for vi, region in enumerate(cutout_cache):
            m = nodes["vol"] == vi
            sids = np.array([segs["key"][s][1] for s in nodes["seg"][m]], np.uint64)
            parts.append((np.flatnonzero(m), embedder.embed_nodes(region, nodes["xyz"][m], sids)))
        emb = np.zeros((len(nodes["seg"]), embedder.config.embedding_dim), np.float32)
        for rows, e in parts:
            emb[rows] = e
        nodes["emb"][name] = emb
        log(f"embedded {len(emb)} nodes with {name} ({time.time() - t0:.0f} s)")
    return nodes, segs, skeletons, cutout_cache


def split_by_id(keys, types) -> np.ndarray:
    """True = probe-training half. Within each class, segments are ordered by md5 of (volume, segment id) and
    alternate between the halves: balanced halves, decided by the ids alone (nothing the model saw)."""
    keys = list(keys)
    h = np.array([int(hashlib.md5(f"{v}:{s}".encode()).hexdigest(), 16) % (1 << 60) for v, s in keys])
    out = np.zeros(len(keys), bool)
    for c in sorted(set(types.tolist())):
        idx = np.flatnonzero(types == c)
        out[idx[np.argsort(h[idx])][::2]] = True
    return out


def segment_means(x_nodes: np.ndarray, node_seg: np.ndarray, n_seg: int) -> np.ndarray:
    out = np.zeros((n_seg, x_nodes.shape[1]))
    np.add.at(out, node_seg, x_nodes)
    return out / np.bincount(node_seg, minlength=n_seg)[:, None]


def probe_f1(x, y, train_mask, n_per_class, draws, seed, shuffle=False) -> np.ndarray:
    """Macro-F1 of each of ``draws`` draws of ``n_per_class`` probe-training segments per class (one value when
    all are labelled). The draws depend on ``seed`` only, so every method is scored on the very same labelled
    subsets and two methods can be compared draw by draw (``paired_difference``)."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(y.tolist()))
    test = ~train_mask
    scores = []
    for _ in range(draws):
        chosen = []
        for c in classes:
            pool = np.flatnonzero(train_mask & (y == c))
            k = len(pool) if n_per_class is None else min(n_per_class, len(pool))
            chosen += list(rng.choice(pool, size=k, replace=False))
        chosen = np.array(chosen)
        labels = y[chosen].copy()
        if shuffle:
            labels = rng.permutation(labels)
        if len(set(labels.tolist())) < 2:
            scores.append(1.0 / len(classes))
            continue
        clf = train_classifier(x[chosen], labels, kind="linear", l2=1e-1)
        pred, _, _ = clf.predict(x[test])
        scores.append(macro_f1(y[test], pred, classes))
        if n_per_class is None and not shuffle:
            break  # deterministic: one fit is all
    return np.asarray(scores)


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean of a - b over the shared draws with its standard error: the margin between two methods without the
    draw-to-draw spread that both share (an easy labelled subset is easy for every method)."""
    d = np.asarray(a) - np.asarray(b)
    se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"mean": round(float(d.mean()), 4), "se": round(se, 4), "draws_won": int((d > 0).sum()), "draws": len(d)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="segclr_synth_small", help="trained SegCLR model (name or folder)")
    ap.add_argument("--seeds", default="101,102,103,104,105,106,107,108",
                    help="synthetic seeds of the evaluation volumes (never trained on; segclr_synth_small: 1-5,7-12 train, 6,201-207 validation)")
    ap.add_argument("--shape-xyz", default="512,512,96", help="size of each eval volume (scale-0 voxels, XYZ)")
    ap.add_argument("--cache-dir", default=None, help="keep generated eval volumes here (.npz) for reruns")
    ap.add_argument("--spacing-nm", type=float, default=400.0)
    ap.add_argument("--min-nodes", type=int, default=3)
    ap.add_argument("--draws", type=int, default=100,
                    help="random labelled subsets per (method, n); 20 left a paired standard error of 0.015 in "
                         "trained - hand features at 5 labels, too coarse for a comparison decided by ~0.01")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", default=str(PLOT))
    args = ap.parse_args(argv)

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    from segclr.embeddings import Embedder
    from segclr.encoder import build_encoder, load_model
    from segclr.ood import auroc

    t_start = time.time()
    encoder, cfg = load_model(args.model)
    keras.utils.set_random_seed(12345)
    random_encoder = build_encoder(cfg)
    models = {"trained": Embedder(encoder, cfg, 64), "random_init": Embedder(random_encoder, cfg, 64)}
    seeds = [int(s) for s in args.seeds.split(",")]
    shape = tuple(int(v) for v in args.shape_xyz.split(","))[::-1]
    nodes, segs, skeletons, regions = build_dataset(seeds, shape, cfg.downsample, args.spacing_nm,
                                                    args.min_nodes, models, args.cache_dir)
    n_seg = len(segs["key"])
    y = segs["type"]
    train_mask = split_by_id(segs["key"], y)
    counts = {c: [int(((y == c) & train_mask).sum()), int(((y == c) & ~train_mask).sum())]
              for c in sorted(set(y.tolist()))}
    log(f"{n_seg} segments, {len(nodes['seg'])} nodes; per class [probe-train, test]: {counts}")

    feats = {name: segment_means(nodes["emb"][name], nodes["seg"], n_seg) for name in models}
    feats["hand_features"] = segs["hand"]
    feats["trained_plus_hand"] = np.concatenate([feats["trained"], segs["hand"]], 1)
    probe = {}
    for n in (1, 5, 20, None):
        key = "all" if n is None else str(n)
        seed = 1000 + (0 if n is None else n)
        probe[key] = {}
        for name in ("trained", "random_init", "hand_features"):
            probe[key][name] = probe_f1(feats[name], y, train_mask, n, args.draws, seed)
        probe[key]["shuffled"] = probe_f1(feats["trained"], y, train_mask, n, args.draws, seed, shuffle=True)
        probe[key]["trained_plus_hand"] = probe_f1(feats["trained_plus_hand"], y, train_mask, n, args.draws, seed)
    margins = {key: {"trained_minus_hand_features": paired_difference(row["trained"], row["hand_features"]),
                     "trained_minus_random_init": paired_difference(row["trained"], row["random_init"])}
               for key, row in probe.items()}
    log("linear-probe macro-F1 (mean, sd over draws):")
    for key, row in probe.items():
        log(f"  {key:>3} labels/class: " + "  ".join(f"{k} {v.mean():.3f}+-{v.std():.3f}" for k, v in row.items())
            + f"  | trained - hand {margins[key]['trained_minus_hand_features']}")

    # node-level: aggregated embeddings, train on probe-train segments' nodes, test on the others
    node_train = train_mask[nodes["seg"]]
    node_type = y[nodes["seg"]]

    def node_aggregate(name, radius):
        out = np.empty_like(nodes["emb"][name])
        for s in range(n_seg):
            rows = np.flatnonzero(nodes["seg"] == s)
            out[rows] = aggregate(skeletons[segs["key"][s]], nodes["vertex"][rows], nodes["emb"][name][rows], radius)
        return out

    # compartments per node
    comp = nodes["comp"]
    valid = comp > 0
    comp_names = np.array([COMPARTMENT_NAMES.get(int(c), "none") for c in comp])
    compartment = {}
    for name in models:
        x = node_aggregate(name, 1000.0)
        tr, te = valid & node_train, valid & ~node_train
        clf = train_classifier(x[tr], comp_names[tr], kind="linear", l2=1e-1)
        pred, _, _ = clf.predict(x[te])
        compartment[name] = {"accuracy": float(np.mean(pred == comp_names[te])),
                             "macro_f1": macro_f1(comp_names[te], pred)}
    log(f"compartment per node: {compartment}")

    # accuracy vs aggregation radius
    radii = [0.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0]
    curve = {name: [] for name in models}
    for name in models:
        for r in radii:
            x = node_aggregate(name, r)
            clf = train_classifier(x[node_train], node_type[node_train], kind="linear", l2=1e-1)
            pred, _, _ = clf.predict(x[~node_train])
            curve[name].append(float(np.mean(pred == node_type[~node_train])))
    log(f"node cell-type accuracy vs R {radii}: {curve}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, acc in curve.items():
            ax.plot(np.array(radii) / 1000.0, acc, marker="o", label=name)
        ax.axhline(1.0 / len(counts), color="grey", ls="--", label="chance")
        ax.set_xlabel("aggregation radius R (um, geodesic)")
        ax.set_ylabel("node cell-type accuracy (held-out cells)")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("SegCLR (synthetic): accuracy vs aggregation radius")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        log(f"plot: {args.plot}")
    except Exception as exc:  # noqa: BLE001 - the figures matter more than the plot
        log(f"plot failed: {exc}")

    # OOD: hold out each type in turn
    ood = {}
    x = feats["trained"]
    for held in sorted(counts):
        tr = train_mask & (y != held)
        if len(set(y[tr].tolist())) < 2:
            continue
        clf = train_classifier(x[tr], y[tr], kind="linear", l2=1e-1)
        s = clf.ood_score(x[~train_mask])
        is_out = y[~train_mask] == held
        ood[held] = auroc(s[~is_out], s[is_out])
    log(f"OOD AUROC per held-out type (trained, Mahalanobis): {ood}")

    # invariance: flips / permutations of the cutout; cosine after centring on each model's mean embedding
    # (uncentred cosines of ReLU-fed embeddings are all close to 1 and say nothing)
    rng_inv = np.random.default_rng(1)
    pick = rng_inv.choice(len(nodes["seg"]), size=min(256, len(nodes["seg"])), replace=False)
    invariance = {}
    for name, embedder in models.items():
        same, rand = [], []
        for vi, region in enumerate(regions):
            rows = pick[nodes["vol"][pick] == vi]
            if len(rows) == 0:
                continue
            sids = np.array([segs["key"][s][1] for s in nodes["seg"][rows]], np.uint64)
            c = region.cutouts(nodes["xyz"][rows], sids, cfg.cutout_size, cfg.channels)
            flips = [ax_ for ax_ in (1, 2, 3) if rng_inv.random() < 0.5] or [3]
            t = np.flip(c, axis=flips)
            if cfg.cutout_size[1] == cfg.cutout_size[2]:
                t = np.swapaxes(t, 2, 3)
            mu = nodes["emb"][name].mean(0)
            e1 = embedder.embed_cutouts(c) - mu
            e2 = embedder.embed_cutouts(np.ascontiguousarray(t)) - mu
            e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
            e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
            same.append((e1 * e2).sum(1))
            perm = rng_inv.permutation(len(e1))
            other = nodes["seg"][rows][perm] != nodes["seg"][rows]  # random pairs: different segments
            rand.append((e1 * e1[perm]).sum(1)[other])
        invariance[name] = {"augmented_pair": float(np.mean(np.concatenate(same))),
                            "random_pair": float(np.mean(np.concatenate(rand)))}
    log(f"invariance cosine: {invariance}")

    f5 = probe["5"]
    result = {
        "benchmark": "segclr_quality",
        "model": str(args.model),
        "linear_probe_f1_at_5": {k: round(float(f5[k].mean()), 4)
                                 for k in ("trained", "random_init", "hand_features", "shuffled")},
        "linear_probe_f1_at_5_sd": {k: round(float(v.std()), 4) for k, v in f5.items()},
        "linear_probe_margin_at_5": margins["5"],
        "trained_plus_hand_f1_at_5": round(float(f5["trained_plus_hand"].mean()), 4),
        "draws": args.draws,
        "linear_probe_f1": {k: {n: round(float(v.mean()), 4) for n, v in row.items()} for k, row in probe.items()},
        "linear_probe_margin": margins,
        "compartment_accuracy": round(compartment["trained"]["accuracy"], 4),
        "compartment": compartment,
        "ood_auroc": round(float(np.mean(list(ood.values()))), 4) if ood else None,
        "ood_auroc_per_held_out_type": {k: round(v, 4) for k, v in ood.items()},
        "accuracy_vs_radius_nm": {"radius_nm": radii, **curve},
        "invariance_cosine": invariance,
        "segments": n_seg, "nodes": int(len(nodes["seg"])), "per_class_train_test": counts,
        "target_met": bool(f5["trained"].mean() >= f5["random_init"].mean() + 0.10
                           and f5["trained"].mean() >= f5["hand_features"].mean()),
        "plot": str(args.plot), "wall_s": round(time.time() - t_start, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
