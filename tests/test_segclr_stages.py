"""skeletonize -> embed -> classify stage drivers on a real Dask cluster and a real store (tiny model, toy volume)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _toy(tmp_path):
    from storage.volume import create_volume

    rng = np.random.default_rng(0)
    seg = np.zeros((24, 64, 96), np.uint64)
    for i, (y, r) in enumerate([(10, 2), (22, 4), (36, 2), (50, 4)]):
        seg[12 - r:12 + r, y - r:y + r, 4:92] = 100 + i  # thin (100, 102) and thick (101, 103) tubes along x
    raw = (120 + 20 * rng.random(seg.shape)).astype(np.uint8)
    raw[seg > 0] += 80
    vols = {}
    for name, arr, kind in (("raw", raw, "image"), ("seg", seg, "segmentation")):
        v = create_volume(str(tmp_path / f"{name}.zarr"), shape_zyx=arr.shape, dtype=arr.dtype,
                          voxel_size_xyz_nm=(16, 16, 16), chunk_shape_zyx=(24, 64, 48), kind=kind)
        v.write(v.bounds, arr)
        vols[name] = str(tmp_path / f"{name}.zarr")
    return vols


def test_skeleton_nodes_record_the_fragment_under_them(tmp_path):
    """With the fragments volume, every node gets the fragment at its voxel, read by the block that made it."""
    from pipeline.cluster import ClusterConfig, open_client
    from pipeline.stages.skeletonize import run_skeletonize
    from storage.volume import create_volume, open_volume

    vols = _toy(tmp_path)
    seg = open_volume(vols["seg"]).read(open_volume(vols["seg"]).bounds)
    frag = np.where(seg > 0, seg * 10 + (np.arange(96) >= 40)[None, None, :], 0).astype(np.uint64)  # 2 per tube
    fv = create_volume(str(tmp_path / "frag.zarr"), shape_zyx=frag.shape, dtype=frag.dtype,
                       voxel_size_xyz_nm=(16, 16, 16), chunk_shape_zyx=(24, 64, 48), kind="segmentation")
    fv.write(fv.bounds, frag)
    with open_client(ClusterConfig(workers=1, threads_per_worker=1, dashboard=False)) as client:
        nodes = run_skeletonize(vols["seg"], tmp_path / "work", client=client, block_shape_zyx=(24, 64, 48),
                                dust_threshold=10, progress=False, fragments_url=str(tmp_path / "frag.zarr"))
    assert nodes["fragment_id"].notna().all()
    expected = nodes["segment_id"] * 10 + (nodes["x_nm"] // 16 >= 40)
    assert (nodes["fragment_id"].astype(int) == expected).all()
    assert set(nodes["fragment_id"].astype(int)) == {1000, 1001, 1010, 1011, 1020, 1021, 1030, 1031}


def test_embed_and_classify_stages(tmp_path):
    from pipeline.cluster import ClusterConfig, open_client
    from pipeline.stages.classify import run_classify, train_cell_type_classifier
    from pipeline.stages.embed import run_embed
    from pipeline.stages.skeletonize import run_skeletonize
    from segclr.encoder import SegCLRConfig, build_encoder, save_model
    from segclr.export import CsvZipReader
    from storage.store import ConnectomeStore

    vols = _toy(tmp_path)
    cfg = SegCLRConfig(cutout_size=(9, 9, 9), downsample=(1, 2, 2), stem_filters=4, stage_filters=(4, 8),
                       blocks_per_stage=(1, 1), head_hidden=8, embedding_dim=8, projection_dims=(8, 4))
    save_model(build_encoder(cfg), cfg, tmp_path / "model")
    store = ConnectomeStore.create(tmp_path / "c.duckdb")
    work = tmp_path / "work"
    with open_client(ClusterConfig(workers=1, threads_per_worker=1, dashboard=False)) as client:
        skel = run_skeletonize(vols["seg"], work, client=client, block_shape_zyx=(24, 64, 48), dust_threshold=10,
                               store=store, progress=False)
        emb = run_embed(vols["raw"], vols["seg"], work, model=str(tmp_path / "model"), client=client,
                        spacing_nm=160.0, block_shape_zyx=(24, 64, 48), store=store, export_dir=tmp_path / "csvzip",
                        num_shards=3, progress=False)
    # skeletonize: 2 blocks along x, pieces merged into one connected skeleton per segment, rows in the store
    from segclr.skeletons import table_to_skeletons

    assert len(list((work / "skeleton_pieces").glob("block_*.npz"))) == 2
    skels = table_to_skeletons(skel)
    assert sorted(skels) == [100, 101, 102, 103] and all(s.num_components() == 1 for s in skels.values())
    assert all(s.vertices[:, 0].min() < 48 * 16 < s.vertices[:, 0].max() for s in skels.values())
    rows = store.backend.query("SELECT segment_id, count(*) AS n FROM skeleton_nodes GROUP BY segment_id "
                               "ORDER BY segment_id")
    assert rows["n"].tolist() == [len(skels[s]) for s in (100, 101, 102, 103)]
    assert sorted(emb["segment_id"].unique()) == [100, 101, 102, 103] and emb.shape[1] == 5 + 8
    # every embedded node is a skeleton node, nodes from both blocks are there
    merged = emb.merge(skel, on=["segment_id", "node_id"])
    assert len(merged) == len(emb) and emb["x_nm"].min() < 48 * 16 <= emb["x_nm"].max()
    reader = CsvZipReader(tmp_path / "csvzip")
    nodes, xyz, vec = reader[101]
    mine = emb[emb["segment_id"] == 101]
    np.testing.assert_array_equal(nodes, mine["node_id"].to_numpy())
    np.testing.assert_array_equal(vec, mine[[f"e{i}" for i in range(8)]].to_numpy(np.float32))
    n_store = store.backend.query("SELECT count(*) AS n FROM embeddings")["n"][0]
    assert n_store == len(emb)

    labels = pd.DataFrame({"segment_id": [100, 101, 102, 103], "cell_type": ["thin", "thick", "thin", "thick"]})
    clf = train_cell_type_classifier(emb, skel, labels, radius_nm=500.0)
    clf.save(tmp_path / "ct")
    comp_clf = train_cell_type_classifier(emb, skel, labels.assign(cell_type=["axon", "dendrite"] * 2),
                                          radius_nm=0.0)
    comp_clf.save(tmp_path / "comp")
    out = run_classify(work, cell_type_model=tmp_path / "ct", compartment_model=tmp_path / "comp", store=store)
    assert out["cell_types"] == 4 and out["compartment_nodes"] == len(skel)
    ct = pd.read_parquet(work / "cell_types.parquet")
    assert set(ct.columns) >= {"segment_id", "cell_type", "confidence", "ood_score"}
    assert ct["confidence"].between(0, 1).all()
    rows = store.backend.query("SELECT segment_id, cell_type, source FROM cell_types ORDER BY segment_id")
    assert rows["segment_id"].tolist() == [100, 101, 102, 103] and (rows["source"] == "model:ct").all()
    comp = store.backend.query("SELECT count(*) AS n FROM skeleton_nodes WHERE compartment IS NOT NULL")
    assert comp["n"][0] >= len(skel)
