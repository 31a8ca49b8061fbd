"""A synthetic connectome (cells, types, fragments, synapses) for tests and the query benchmark.

Why here: tests, the benchmark and the CLI examples need the same reproducible tables in the store's input
columns; generating them from one seeded function keeps them identical across backends.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

CELL_TYPES = ("pyramidal", "basket", "chandelier", "martinotti", "stellate", "granule", "purkinje", "glia")


def synthetic_connectome(n_cells: int = 200, n_synapses: int = 2000, *, fragments_per_segment: int = 2,
                         seed: int = 0, extent_nm: int = 200_000, points: bool = True) -> dict[str, pa.Table]:
    """Input tables for the writers: segments, cell_types, id_map (if fragments), synapses, skeleton_nodes.

    ``points=False`` leaves out the pre/post points (smaller tables for benchmarks).

    Segment ids are 1..n_cells. With ``fragments_per_segment`` > 0, segment s owns fragments
    s*1000+1 .. s*1000+k and synapses reference fragments; with 0 they reference segment ids directly.
    Presynaptic cells are drawn with a type-dependent preference so connectivity matrices are not uniform.
    """
    rng = np.random.default_rng(seed)
    seg = np.arange(1, n_cells + 1, dtype=np.int64)
    voxels = rng.integers(1_000, 1_000_000, n_cells)
    centre = rng.integers(10_000, extent_nm - 10_000, (n_cells, 3))
    half = rng.integers(1_000, 10_000, (n_cells, 3))
    segments = pa.table({
        "segment_id": seg, "voxel_count": voxels,
        **{f"bbox_min_{a}_nm": (centre[:, i] - half[:, i]).astype(np.int32) for i, a in enumerate("xyz")},
        **{f"bbox_max_{a}_nm": (centre[:, i] + half[:, i]).astype(np.int32) for i, a in enumerate("xyz")},
        **{f"centroid_{a}_nm": centre[:, i].astype(np.int32) for i, a in enumerate("xyz")},
    })
    type_idx = rng.integers(0, len(CELL_TYPES), n_cells)
    typed = rng.random(n_cells) < 0.95  # a few cells stay untyped
    cell_types = pa.table({
        "segment_id": seg[typed], "cell_type": np.array(CELL_TYPES, dtype=object)[type_idx[typed]],
        "confidence": rng.uniform(0.5, 1.0, int(typed.sum())).astype(np.float32),
        "classification_system": ["default"] * int(typed.sum()), "source": ["model:synthetic"] * int(typed.sum()),
    })
    # presynaptic preference: cells of "early" types fire more often
    weight = 1.0 / (1.0 + type_idx)
    pre_seg = rng.choice(seg, n_synapses, p=weight / weight.sum())
    post_seg = rng.choice(seg, n_synapses)
    pos = np.clip(centre[pre_seg - 1] + rng.integers(-8_000, 8_000, (n_synapses, 3)), 0, extent_nm).astype(np.int32)
    syn = {
        "synapse_id": np.arange(1, n_synapses + 1, dtype=np.int64),
        "x_nm": pos[:, 0], "y_nm": pos[:, 1], "z_nm": pos[:, 2],
        "pre_x_nm": pos[:, 0] - 20, "pre_y_nm": pos[:, 1], "pre_z_nm": pos[:, 2],
        "post_x_nm": pos[:, 0] + 20, "post_y_nm": pos[:, 1], "post_z_nm": pos[:, 2],
        "size_voxels": rng.integers(10, 500, n_synapses),
        "score": rng.random(n_synapses).astype(np.float32),
        "valid": rng.random(n_synapses) < 0.97,
    }
    if not points:  # lean tables for large benchmarks
        for k in [k for k in syn if k.startswith(("pre_", "post_"))]:
            del syn[k]
    out = {"segments": segments, "cell_types": cell_types}
    if fragments_per_segment > 0:
        k = fragments_per_segment
        frag = (seg[:, None] * 1000 + np.arange(1, k + 1)[None, :]).ravel()
        fv = np.maximum(1, (voxels[:, None] // k).repeat(k, 1).ravel())
        out["id_map"] = pa.table({"fragment_id": frag, "segment_id": seg.repeat(k), "voxel_count": fv})
        syn["pre_fragment_id"] = pre_seg * 1000 + rng.integers(1, k + 1, n_synapses)
        syn["post_fragment_id"] = post_seg * 1000 + rng.integers(1, k + 1, n_synapses)
    else:
        syn["pre_segment_id"] = pre_seg
        syn["post_segment_id"] = post_seg
    out["synapses"] = pa.table(syn)
    nodes_per = 4
    sk_seg = seg[: min(n_cells, 50)].repeat(nodes_per)
    node = np.tile(np.arange(nodes_per, dtype=np.int64), min(n_cells, 50))
    out["skeleton_nodes"] = pa.table({
        "segment_id": sk_seg, "node_id": node,
        "x_nm": (centre[sk_seg - 1, 0] + node * 100).astype(np.int32),
        "y_nm": centre[sk_seg - 1, 1].astype(np.int32), "z_nm": centre[sk_seg - 1, 2].astype(np.int32),
        "radius_nm": np.full(len(node), 150.0, np.float32),
        "parent_id": pa.array([None if n == 0 else int(n - 1) for n in node], pa.int64()),
        "compartment": ["soma" if n == 0 else "dendrite" for n in node],
    })
    return out


def pandas_reference(tables: dict[str, pa.Table]):
    """The same data as pandas frames with pre/post segment ids resolved (for benchmarks and cross-checks)."""
    syn = tables["synapses"].to_pandas()
    if "id_map" in tables:
        m = tables["id_map"].to_pandas().set_index("fragment_id")["segment_id"]
        syn["pre_segment_id"] = syn["pre_fragment_id"].map(m).fillna(0).astype("int64")
        syn["post_segment_id"] = syn["post_fragment_id"].map(m).fillna(0).astype("int64")
    cells = tables["segments"].to_pandas().merge(tables["cell_types"].to_pandas(), on="segment_id", how="left")
    return cells, syn
