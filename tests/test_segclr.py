"""SegCLR science: cutouts, pairs, loss, model save/load, CSV-ZIP export, aggregation, classifiers + OOD."""

from __future__ import annotations

import hashlib
import math
import zipfile

import numpy as np
import pytest

from segclr.aggregation import aggregate
from segclr.classifiers import Classifier, macro_f1, train_classifier
from segclr.cutouts import downsample_em, downsample_seg, extract_cutout, scale_region
from segclr.export import CsvZipReader, md5_shard, write_csv_zips
from segclr.ood import auroc
from segclr.pairs import PairSampler
from segclr.skeletons import Skeleton
from segclr.training import augment, ntxent_numpy, std_x_sqrtd
from storage.errors import ConnectomeError


def _path_skeleton(n: int, spacing: float = 1000.0) -> Skeleton:
    v = np.stack([np.arange(n) * spacing, np.zeros(n), np.zeros(n)], 1)
    return Skeleton(v, np.stack([np.arange(n - 1), np.arange(1, n)], 1), np.ones(n))


def test_cutout_masks_other_segments_and_pads_outside():
    rng = np.random.default_rng(0)
    em = rng.integers(1, 256, size=(10, 12, 14), dtype=np.uint8)
    seg = np.zeros(em.shape, np.uint64)
    seg[:, :6] = 5
    seg[:, 6:] = 9
    c = extract_cutout(em, seg, (5, 5, 5), (5, 5, 5), 5, ("masked_em", "mask", "em"))
    assert c.shape == (5, 5, 5, 3)
    # cutout covers y 3..7: rows 3,4,5 are segment 5, rows 6,7 are segment 9 (masked to 0)
    np.testing.assert_allclose(c[:, :3, :, 0], em[3:8, 3:6, 3:8] / 255.0, rtol=1e-6)
    assert np.all(c[:, 3:, :, 0] == 0) and np.all(c[:, 3:, :, 1] == 0) and np.all(c[:, :3, :, 1] == 1)
    np.testing.assert_allclose(c[..., 2], em[3:8, 3:8, 3:8] / 255.0, rtol=1e-6)
    # near the corner: outside the array is zero in every channel
    c = extract_cutout(em, seg, (0, 0, 0), (5, 5, 5), 5, ("masked_em", "mask", "em"))
    assert np.all(c[:2] == 0) and np.all(c[:, :2] == 0) and np.all(c[:, :, :2] == 0)
    assert np.all(c[2:, 2:, 2:, 1] == 1)


def test_downsampling_and_nm_mapping():
    em = np.arange(4 * 4 * 4, dtype=np.uint8).reshape(4, 4, 4)
    assert downsample_em(em, (2, 2, 2))[0, 0, 0] == round(em[:2, :2, :2].mean())
    seg = np.arange(64, dtype=np.uint64).reshape(4, 4, 4)
    assert downsample_seg(seg, (2, 2, 2))[1, 1, 1] == seg[3, 3, 3]
    region = scale_region(em, seg, (10, 20, 30), (4.0, 4.0, 40.0), (1, 2, 2))
    # node at voxel (z=11, y=22, x=32) -> nm (x, y, z) = (32*4, 22*4, 11*40) -> index (1, 1, 1)
    np.testing.assert_array_equal(region.nm_to_index([[128.0, 88.0, 440.0]])[0], [1, 1, 1])


def test_positive_pairs_stay_within_geodesic_max():
    # a U-shaped skeleton: the two arms are 500 nm apart in space but far apart along the path
    arm = np.arange(10) * 500.0
    v = np.concatenate([np.stack([arm, np.zeros(10), np.zeros(10)], 1),
                        np.stack([arm[::-1], np.full(10, 500.0), np.zeros(10)], 1)])
    e = np.stack([np.arange(19), np.arange(1, 20)], 1)
    sk = Skeleton(v, e, np.ones(20))
    sampler = PairSampler({3: sk, 4: _path_skeleton(6)}, max_distance_nm=1600.0)
    pairs = sampler.sample(np.random.default_rng(1), 400)
    assert {p.segment_id for p in pairs} == {3, 4}
    for p in pairs:
        assert p.node_a != p.node_b and 0 < p.distance_nm <= 1600.0
        if p.segment_id == 3:  # along the path: |i - j| * 500 nm (the arms' ends are not "near")
            assert p.distance_nm == pytest.approx(abs(p.node_a - p.node_b) * 500.0)
            assert abs(p.node_a - p.node_b) <= 3


def test_ntxent_matches_hand_computed_value():
    import tensorflow as tf

    from segclr.training import ntxent_loss

    z1 = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    z2 = np.array([[2.0, 0.0], [0.0, 3.0]], np.float32)  # same directions -> cos 1 with the partner, 0 otherwise
    # every view: partner logit 1/0.1 = 10, two other views at 0 -> -log(e^10 / (e^10 + 2))
    expected = math.log(1 + 2 * math.exp(-10))
    assert ntxent_numpy(z1, z2, 0.1) == pytest.approx(expected, rel=1e-9)
    loss, top1 = ntxent_loss(tf.constant(z1), tf.constant(z2), 0.1)
    assert float(loss) == pytest.approx(expected, abs=1e-6) and float(top1) == 1.0
    # partners orthogonal, a non-partner parallel: every view -> -log(e^0 / (e^0 + e^0 + e^10))
    z2 = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    expected = math.log(2 + math.exp(10))
    assert ntxent_numpy(z1, z2, 0.1) == pytest.approx(expected, rel=1e-9)
    loss, top1 = ntxent_loss(tf.constant(z1), tf.constant(z2), 0.1)
    assert float(loss) == pytest.approx(expected, rel=1e-5) and float(top1) == 0.0
    # a harder tiny batch against the numpy reference, and the identical-embeddings value log(2B - 1)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32)
    loss, _ = ntxent_loss(tf.constant(a), tf.constant(b), 0.1)
    assert float(loss) == pytest.approx(ntxent_numpy(a, b, 0.1), rel=1e-4)
    same = np.ones((4, 8), np.float32)
    assert ntxent_numpy(same, same, 0.1) == pytest.approx(math.log(7), rel=1e-9)


def test_collapse_monitor_and_augment():
    rng = np.random.default_rng(0)
    assert std_x_sqrtd(rng.normal(size=(2000, 64))) == pytest.approx(1.0, abs=0.05)
    assert std_x_sqrtd(np.ones((100, 64)) + 1e-9 * rng.normal(size=(100, 64))) < 1e-3
    x = np.zeros((3, 5, 5, 5, 2), np.float32)
    x[:, 1:3, 1:4, 2, 0] = 0.5
    x[:, 1:3, 1:4, 2, 1] = 1.0
    y = augment(x, rng, ("masked_em", "mask"))
    # geometry moves the mask and EM together; intensity changes never leak EM outside the mask
    assert np.all((y[..., 0] > 0) <= (y[..., 1] > 0)) and np.all(y[..., 1].sum((1, 2, 3)) == 6)


def test_encoder_save_load_identical_outputs(tmp_path):
    from segclr.embeddings import Embedder
    from segclr.encoder import SegCLRConfig, build_encoder, load_model, save_model

    cfg = SegCLRConfig(cutout_size=(9, 17, 17), stem_filters=4, stage_filters=(4, 8), blocks_per_stage=(1, 1),
                       head_hidden=8, embedding_dim=16, projection_dims=(8, 4))
    enc = build_encoder(cfg)
    x = np.random.default_rng(0).random((5, *cfg.input_shape)).astype(np.float32)
    before = Embedder(enc, cfg, batch_size=2).embed_cutouts(x)
    save_model(enc, cfg, tmp_path / "m")
    enc2, cfg2 = load_model(tmp_path / "m")
    assert cfg2 == cfg
    after = Embedder(enc2, cfg2, batch_size=2).embed_cutouts(x)
    assert before.shape == (5, 16)
    np.testing.assert_array_equal(before, after)  # saved and loaded: bit-identical
    # independent of the batch it ran in, to float32 rounding: oneDNN picks its kernels (and summation order) by
    # batch size and CPU, so batches of 2 and 4 differ by ~2e-8 on some CPUs and not at all on others
    np.testing.assert_allclose(Embedder(enc2, cfg2, batch_size=4).embed_cutouts(x), before, rtol=1e-4, atol=1e-6)
    # the config file is XYZ for people
    import json
    assert json.loads((tmp_path / "m" / "config.json").read_text())["cutout_size_xyz"] == [17, 17, 9]


def test_csv_zip_export_import_roundtrip_and_md5_shards(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for sid in (1, 7, 123456789012, 2**40 + 3):
        n = int(rng.integers(1, 6))
        records.append((sid, np.arange(n) * 3, rng.integers(0, 10**6, size=(n, 3)).astype(float),
                        rng.normal(size=(n, 64)).astype(np.float32)))
    write_csv_zips(tmp_path / "emb", records, num_shards=4)
    reader = CsvZipReader(tmp_path / "emb")
    for sid, nodes, xyz, emb in records:
        shard = int.from_bytes(hashlib.md5(sid.to_bytes(8, "little")).digest(), "little") % 4
        assert md5_shard(sid, 4) == shard
        with zipfile.ZipFile(tmp_path / "emb" / f"{shard}.zip") as z:
            text = z.read(f"{sid}.csv").decode()
        first = text.split("\n")[0].split(",")
        assert len(first) == 4 + 64 and int(first[0]) == nodes[0]  # node_id,x,y,z,e0..e63 (published layout)
        n2, xyz2, emb2 = reader[sid]
        np.testing.assert_array_equal(n2, nodes)
        np.testing.assert_array_equal(xyz2, xyz)
        np.testing.assert_array_equal(emb2, emb)  # float32 exact
    assert reader.segment_ids() == sorted(r[0] for r in records)
    # the 2022 releases used bytewidth 64: a different, also reproducible, shard
    assert md5_shard(7, 10_000, bytewidth=64) == int.from_bytes(
        hashlib.md5((7).to_bytes(64, "little")).digest(), "little") % 10_000


def test_aggregation_uses_geodesic_radius_on_toy_graph():
    # path 0-1-2-3-4 (1 um apart) plus vertex 5 hanging off vertex 0 but placed 100 nm from vertex 4 in space
    v = np.array([[0, 0, 0], [1000, 0, 0], [2000, 0, 0], [3000, 0, 0], [4000, 0, 0], [4000, 100, 0]], float)
    e = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [0, 5]])
    sk = Skeleton(v, e, np.ones(6))
    emb = np.arange(6, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    idx = np.arange(6)
    np.testing.assert_array_equal(aggregate(sk, idx, emb, 0.0), emb)
    agg = aggregate(sk, idx, emb, 1000.0)
    assert agg[2, 0] == pytest.approx(2.0)  # mean(1, 2, 3)
    assert agg[4, 0] == pytest.approx(3.5)  # mean(3, 4): vertex 5 is near in space, not along the skeleton
    assert agg[5, 0] == pytest.approx(5.0)  # its path to vertex 0 is 4001 nm long -> alone
    # only embedded vertices are averaged, but paths may run through the others
    sub = aggregate(sk, np.array([0, 2]), emb[[0, 2]], 2000.0)
    np.testing.assert_allclose(sub[:, 0], [1.0, 1.0])


def test_classifier_ood_higher_for_held_out_type_and_save_load(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(4, 16))
    x = np.concatenate([c + rng.normal(size=(60, 16)) for c in centres])
    y = np.repeat(["a", "b", "c", "held_out"], 60)
    train = y != "held_out"
    for kind in ("linear", "resmlp"):
        clf = train_classifier(x[train][::2], y[train][::2], kind=kind, epochs=60)
        labels, conf, ood = clf.predict(x)
        test_in = train.copy()
        test_in[np.flatnonzero(train)[::2]] = False
        assert macro_f1(y[test_in], labels[test_in]) > 0.95
        assert auroc(ood[test_in], ood[~train]) > 0.95
        assert np.all((conf > 0) & (conf <= 1))
        clf.save(tmp_path / kind)
        again = Classifier.load(tmp_path / kind)
        for a, b in zip(again.predict(x), (labels, conf, ood)):
            np.testing.assert_array_equal(a, b)


def test_train_from_config_checkpoints_and_resumes(tmp_path):
    from segclr.encoder import load_model
    from segclr.training import train_from_config
    from storage.volume import create_volume

    rng = np.random.default_rng(0)
    seg = np.zeros((16, 40, 64), np.uint64)
    for i, y in enumerate((8, 20, 32)):
        seg[5:11, y - 2 - i:y + 2 + i, 2:62] = 1 + i
    raw = (100 + 50 * rng.random(seg.shape)).astype(np.uint8)
    for name, arr, kind in (("raw", raw, "image"), ("seg", seg, "segmentation")):
        v = create_volume(str(tmp_path / f"{name}.zarr"), shape_zyx=arr.shape, dtype=arr.dtype,
                          voxel_size_xyz_nm=(16, 16, 16), chunk_shape_zyx=(16, 40, 64), kind=kind)
        v.write(v.bounds, arr)
    config = {
        "model": {"cutout_size_xyz": [9, 9, 9], "downsample_xyz": [2, 2, 1], "stem_filters": 4,
                  "stage_filters": [4, 8], "blocks_per_stage": [1, 1], "head_hidden": 8, "embedding_dim": 8,
                  "projection_dims": [8, 4]},
        "training": {"steps": 3, "batch_size": 4, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 1,
                     "max_pair_distance_nm": 400.0},
        "data": [{"raw": str(tmp_path / "raw.zarr"), "seg": str(tmp_path / "seg.zarr"), "dust_threshold": 5}],
        "output": str(tmp_path / "model"), "workdir": str(tmp_path / "work"),
    }
    first = train_from_config(config)
    assert first["steps"] == 3 and not first["resumed"] and np.isfinite(first["loss"])
    assert 0 <= first["top1"] <= 1 and first["std_x_sqrtd"] > 0
    log = (tmp_path / "work" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 3 and '"std_x_sqrtd"' in log[0] and '"top1"' in log[0]
    config["training"]["steps"] = 5
    second = train_from_config(config)
    assert second["resumed"] and second["steps"] == 5
    encoder, cfg = load_model(tmp_path / "model")
    assert cfg.metadata["figures"]["steps"] == 5 and cfg.cutout_size == (9, 9, 9)

    # warm start: a new workdir seeded from the last checkpoint starts at step 0 with those weights, and pairs
    # respect min_pair_distance_nm
    import keras

    warm = dict(config, workdir=str(tmp_path / "work_warm"), output=str(tmp_path / "model_warm"))
    warm["training"] = dict(config["training"], steps=0, init_from=str(tmp_path / "work" / "checkpoint"),
                            min_pair_distance_nm=100.0)
    third = train_from_config(warm)
    assert third["steps"] == 0 and not third["resumed"]
    warm_encoder, _ = load_model(tmp_path / "model_warm")
    for a, b in zip(encoder.get_weights(), warm_encoder.get_weights()):
        np.testing.assert_array_equal(a, b)
    fresh = dict(warm, workdir=str(tmp_path / "work_fresh"), output=str(tmp_path / "model_fresh"))
    fresh["training"] = dict(warm["training"], init_from="")
    keras.utils.set_random_seed(1)
    train_from_config(fresh)
    fresh_encoder, _ = load_model(tmp_path / "model_fresh")
    assert any(not np.array_equal(a, b) for a, b in zip(encoder.get_weights(), fresh_encoder.get_weights()))
    bad = dict(warm, workdir=str(tmp_path / "work_bad"))
    bad["training"] = dict(warm["training"], init_from=str(tmp_path / "nowhere"))
    with pytest.raises(ConnectomeError, match="init_from"):
        train_from_config(bad)


def test_pair_sampler_min_distance():
    sampler = PairSampler({7: _path_skeleton(20)}, max_distance_nm=5000.0, min_distance_nm=1000.0)
    pairs = sampler.sample(np.random.default_rng(0), 200)
    assert min(p.distance_nm for p in pairs) >= 1000.0 and max(p.distance_nm for p in pairs) <= 5000.0


def test_rotated_cutouts_identity_and_quarter_turn():
    from segclr.cutouts import ScaledRegion
    from segclr.training import rotated_cutouts

    seg = np.zeros((40, 60, 60), np.uint64)
    seg[18:23, 28:33, 5:55] = 5  # a bar along X through the centre
    em = np.full(seg.shape, 200, np.uint8)
    region = ScaledRegion(em, seg, (0, 0, 0), (10.0, 10.0, 20.0), (1, 1, 1))  # anisotropic: Z voxels 2x larger
    xyz = np.array([[300.0, 300.0, 400.0]])

    class FixedQuat:
        def __init__(self, q):
            self.q = np.asarray(q, float)

        def normal(self, size):
            return self.q

    plain = region.cutouts(xyz, np.array([5], np.uint64), (9, 15, 15), ("masked_em", "mask"))
    same = rotated_cutouts(region, xyz, np.array([5], np.uint64), (9, 15, 15), ("masked_em", "mask"),
                           FixedQuat([1, 0, 0, 0]))
    np.testing.assert_array_equal(plain, same)
    # 90 degrees about Z: the bar now runs along Y
    s = np.sqrt(0.5)
    turned = rotated_cutouts(region, xyz, np.array([5], np.uint64), (9, 15, 15), ("masked_em", "mask"),
                             FixedQuat([s, s, 0, 0]))[0, ..., 1]  # quaternion (w, z, y, x): about Z
    assert turned[4, :, 7].all() and turned[4, 7, :].sum() < 8
    # about Y (tilting X into Z): the bar spans the Z extent, which holds half as many voxels per nm
    tilted = rotated_cutouts(region, xyz, np.array([5], np.uint64), (9, 15, 15), ("masked_em", "mask"),
                             FixedQuat([s, 0, s, 0]))[0, ..., 1]
    assert tilted[:, 7, 7].all() and tilted[4, 7, :].sum() <= 11  # its 100 nm Z thickness now lies along X
