"""Synapse detection: targets, partner assignment, duplicate merging, CREMI-style scores, model save/load,
training resume, and the packaged detector on held-out synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.stages.synapses import DetectionParams, detect, merge_duplicates, synapse_table
from pipeline.synapse_metrics import detection_scores, match_synapses, overlap_id_map
from pipeline.synapse_training import TrainingVolume, isbi_stack, polarity_targets, train
from synapse_fixtures import tiny_training_set, two_cells

VOXEL = (40.0, 8.0, 8.0)  # zyx nm


def test_polarity_targets_mark_each_side():
    seg, clefts = two_cells()
    cleft, pre, post = polarity_targets(seg, clefts, {77: 1}, {77: 2}, (1.0, 3.0, 3.0))
    assert cleft.sum() == (clefts > 0).sum()
    assert pre.any() and post.any()
    assert (seg[pre > 0] == 1).all() and (seg[post > 0] == 2).all()
    far = np.zeros_like(pre, bool)
    far[:, :, :4] = True
    assert not pre[far].any(), "targets stay within the radius of the cleft"


def test_partner_assignment_follows_polarity_and_fragments():
    seg, clefts = two_cells()
    probs = np.zeros((3,) + seg.shape, np.float32)
    probs[0][clefts > 0] = 0.9
    probs[1][:, 6:14, 6:10] = 0.8   # presynaptic side in segment 1
    probs[2][:, 6:14, 10:14] = 0.8  # postsynaptic side in segment 2
    fragments = np.where(seg == 1, 11, 21).astype(np.uint64)
    fragments[:, :, 15:] = 22
    df = detect(probs, seg, VOXEL, DetectionParams(threshold=0.5, min_size=5, partner_radius_nm=40), fragments)
    assert len(df) == 1
    row = df.iloc[0]
    assert (row.pre_segment_id, row.post_segment_id) == (1, 2)
    assert (row.pre_fragment_id, row.post_fragment_id) == (11, 21)
    # swapping polarity swaps partners
    swapped = probs[[0, 2, 1]]
    row = detect(swapped, seg, VOXEL, DetectionParams(threshold=0.5, min_size=5, partner_radius_nm=40)).iloc[0]
    assert (row.pre_segment_id, row.post_segment_id) == (2, 1)


def test_touching_clefts_split_per_partner_pair():
    """One bouton (1) contacting two dendrites (2 above, 3 below) across one continuous cleft: two synapses."""
    seg = np.zeros((5, 30, 20), np.uint64)
    seg[:, :, :10] = 1
    seg[:, :15, 10:] = 2
    seg[:, 15:, 10:] = 3
    probs = np.zeros((3,) + seg.shape, np.float32)
    probs[0][1:4, 4:26, 9:11] = 0.9          # one thresholded component spanning both contacts
    probs[1][:, 4:26, 5:10] = 0.8            # presynaptic side: the bouton
    probs[2][:, 4:26, 10:15] = 0.8           # postsynaptic side: both dendrites
    for votes in (True, False):  # partners by the voxels' votes or by probability mass around each piece
        params = DetectionParams(threshold=0.5, min_size=5, partner_radius_nm=40, partner_votes=votes)
        df = detect(probs, seg, VOXEL, params)
        assert sorted(zip(df.pre_segment_id, df.post_segment_id)) == [(1, 2), (1, 3)], votes
        assert df.size_voxels.sum() == (probs[0] > 0.5).sum()
    params = DetectionParams(threshold=0.5, min_size=5, partner_radius_nm=40, partner_votes=True)
    merged = detect(probs, seg, VOXEL, DetectionParams(threshold=0.5, min_size=5, partner_radius_nm=40,
                                                       split_partners=False))
    assert len(merged) == 1, "without the split the two contacts are one component"
    # label noise: a few cleft voxels that see a third segment stay with their synapse instead of becoming one
    probs[2][2, 20, 10] = 0.0
    seg2 = seg.copy()
    seg2[2, 20, 11] = 4
    probs[2][2, 20, 11] = 0.9
    df = detect(probs, seg2, VOXEL, params)
    assert sorted(zip(df.pre_segment_id, df.post_segment_id)) == [(1, 2), (1, 3)]


def test_boutons_in_a_row_split_per_contact_without_polarity_votes():
    """Two boutons (1 above, 2 below) on one dendrite (3) across one continuous cleft, with presynaptic maps too
    faint to vote (as in a dense row of boutons): the contact of each cleft voxel still splits it in two."""
    from pipeline.stages.synapses import contact_labels

    seg = np.zeros((5, 30, 20), np.uint64)
    seg[:, :15, :10] = 1
    seg[:, 15:, :10] = 2
    seg[:, :, 10:] = 3
    probs = np.zeros((3,) + seg.shape, np.float32)
    probs[0][1:4, 4:26, 9:11] = 0.9
    probs[1][:, 4:26, 5:10] = 0.3            # under side_threshold: no presynaptic votes
    probs[2][:, 4:26, 10:15] = 0.8
    lo, hi = contact_labels((probs[0] > 0.5).astype(np.uint32), seg, VOXEL, 64.0)
    pairs = pd.Series(list(zip(lo[probs[0] > 0.5].tolist(), hi[probs[0] > 0.5].tolist()))).value_counts()
    assert set(pairs.index[:2]) == {(1, 3), (2, 3)}  # the voxels where the boutons meet also see (1, 2)
    assert pairs[(1, 3)] + pairs[(2, 3)] >= 0.8 * pairs.sum()
    assert not lo[probs[0] <= 0.5].any(), "only cleft voxels get a contact"
    params = DetectionParams(threshold=0.5, min_size=5, partner_radius_nm=40)
    df = detect(probs, seg, VOXEL, params)
    assert sorted(zip(df.pre_segment_id, df.post_segment_id)) == [(1, 3), (2, 3)]
    off = detect(probs, seg, VOXEL, DetectionParams(threshold=0.5, min_size=5, partner_radius_nm=40,
                                                    contact_radius_nm=0.0))
    assert len(off) == 1, "without contacts the polarity-less row stays one component"
    with pytest.raises(ValueError, match="contact_radius_nm must be >= 0"):
        DetectionParams(contact_radius_nm=-64.0)


def test_merge_duplicates_and_validity():
    df = pd.DataFrame({
        "z": [1.0, 1.0, 3.0], "y": [5.0, 7.0, 30.0], "x": [5.0, 5.0, 30.0],
        "size_voxels": [10, 30, 12], "score": [0.9, 0.8, 0.7],
        "pre_segment_id": [1, 1, 4], "post_segment_id": [2, 2, 4],
        "pre_zyx": [[1, 5, 4]] * 3, "post_zyx": [[1, 5, 6]] * 3,
    })
    merged = merge_duplicates(df, VOXEL, distance_nm=50.0)
    assert len(merged) == 2
    assert merged.iloc[0].size_voxels == 40  # sizes summed into the kept (largest) detection
    table = synapse_table(merged, (8.0, 8.0, 40.0))
    assert table["synapse_id"].tolist() == [1, 2]
    assert table["valid"].tolist() == [True, False]  # 4 -> 4 is an autapse: kept but invalid
    assert table.loc[0, "x_nm"] == round((5 + 0.5) * 8)


def test_detection_scores_one_to_one():
    true = pd.DataFrame({"x_nm": [0, 1000], "y_nm": [0, 0], "z_nm": [0, 0],
                         "pre_segment_id": [1, 3], "post_segment_id": [2, 4]})
    pred = pd.DataFrame({"x_nm": [10, 20, 5000], "y_nm": [0, 0, 0], "z_nm": [0, 0, 0],
                         "pre_segment_id": [1, 1, 9], "post_segment_id": [2, 2, 9]})
    assert match_synapses(pred[["x_nm", "y_nm", "z_nm"]].to_numpy(), true[["x_nm", "y_nm", "z_nm"]].to_numpy(),
                          100.0) == [(0, 0)]
    s = detection_scores(pred, true, 100.0)
    assert s["precision"] == round(1 / 3, 4) and s["recall"] == 0.5 and s["partner_accuracy"] == 1.0
    seg = np.array([[5, 5, 6]], np.uint64)
    gt = np.array([[1, 1, 2]], np.uint64)
    assert overlap_id_map(seg, gt) == {5: 1, 6: 2}


def test_model_save_load_and_training_resume(tmp_path):
    from pipeline.synapse_model import load_model, predict

    image, vol, config = tiny_training_set()
    out = train([vol], config, tmp_path / "t", steps=4, batch_size=2, patch_shape=(5, 16, 16), checkpoint_every=2,
                log_every=2)
    log = pd.read_csv(tmp_path / "t" / "train_log.csv")
    assert log["step"].tolist() == [2, 4]
    model, loaded = load_model(out)
    assert loaded == config
    p1 = predict(model, loaded, image)
    model2, _ = load_model(out)
    np.testing.assert_array_equal(p1, predict(model2, loaded, image))
    assert p1.shape == (3,) + image.shape
    # resume: a later call with more steps continues from the checkpoint, not from step 0
    train([vol], config, tmp_path / "t", steps=6, batch_size=2, patch_shape=(5, 16, 16), checkpoint_every=2,
          log_every=2)
    assert pd.read_csv(tmp_path / "t" / "train_log.csv")["step"].tolist() == [2, 4, 6]


def test_training_stops_at_max_wall_s_and_resumes(tmp_path):
    """A run given a wall-clock budget (a job's time limit) ends early with a checkpoint and an exported model;
    started again without the budget it continues from there to its last step."""
    _, vol, config = tiny_training_set()
    kw = dict(batch_size=2, patch_shape=(5, 16, 16), checkpoint_every=100, log_every=1)
    out = train([vol], config, tmp_path / "t", steps=50, max_wall_s=0.0, **kw)
    assert json.loads((tmp_path / "t" / "checkpoint" / "state.json").read_text()) == {"step": 1}
    assert (out / "model.weights.h5").is_file()
    train([vol], config, tmp_path / "t", steps=3, **kw)
    assert pd.read_csv(tmp_path / "t" / "train_log.csv")["step"].tolist() == [1, 2, 3]


def test_training_exports_the_moving_average_of_the_weights(tmp_path):
    """With ema_momentum m the exported detector holds avg_1 = w_1, avg_t = m avg_(t-1) + (1 - m) w_t over the
    weights w_t the run trains on (read from its checkpoint after each step); a resumed run continues the average."""
    from pipeline.synapse_model import load_model
    from pipeline.synapse_training import compiled_model

    _, vol, config = tiny_training_set()
    kw = dict(batch_size=2, patch_shape=(5, 16, 16), checkpoint_every=1, log_every=1, learning_rate=0.01,
              ema_momentum=0.5)
    average = None
    for steps in (1, 2, 3):  # one step per call: each resumes from the last checkpoint
        out = train([vol], config, tmp_path / "t", steps=steps, **kw)
        trained = compiled_model(config, 0.01, 8.0, 0.5)
        trained.optimizer.build(trained.trainable_variables)
        trained.load_weights(tmp_path / "t" / "checkpoint" / "model.weights.h5")
        w = trained.get_weights()
        average = w if average is None else [0.5 * a + 0.5 * b for a, b in zip(average, w)]
        for got, want in zip(load_model(out)[0].get_weights(), average):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(average, w))


JAX_TRAINING = """
import json, sys
import numpy as np
from synapse_fixtures import tiny_training_set
import keras
from pipeline.synapse_model import load_model, predict
from pipeline.synapse_training import train
image, vol, config = tiny_training_set()
out = train([vol], config, sys.argv[1], steps=4, batch_size=2, patch_shape=(5, 16, 16), log_every=1,
            ema_momentum=0.9)
model, _ = load_model(out)
np.save(sys.argv[1] + "/probs.npy", predict(model, config, image))
print(json.dumps({"backend": keras.backend.backend()}))
"""


def test_training_runs_under_the_jax_backend_without_tensorflow(tmp_path):
    """GPU nodes whose stack is JAX (or PyTorch) and no TensorFlow train the detector with KERAS_BACKEND=jax; the
    weights it writes (here the moving average) load under TensorFlow and give the same maps."""
    from backend_fixtures import run_under_jax_without_tensorflow
    from pipeline.synapse_model import load_model, predict

    run = run_under_jax_without_tensorflow(JAX_TRAINING, str(tmp_path / "jax"))
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"backend": "jax"}
    log = pd.read_csv(tmp_path / "jax" / "train_log.csv")
    assert log["step"].tolist() == [1, 2, 3, 4] and np.isfinite(log["loss"]).all()
    image, _, _ = tiny_training_set()
    model, config = load_model(tmp_path / "jax" / "model")
    np.testing.assert_allclose(predict(model, config, image), np.load(tmp_path / "jax" / "probs.npy"), atol=1e-4)


def test_synapse_sampling_sees_small_clefts_as_often_as_large():
    """"synapse" positive sampling picks a cleft component first: a 1-voxel cleft next to a 999-voxel one gets
    half the cleft-centred patches instead of 1 in 1,000."""
    cleft = np.zeros((10, 40, 40), np.uint8)
    cleft[0:9, 0:10, 0:10] = 1  # 900 voxels
    cleft[9, 0:9, 0:11] = 1  # 99 more, touching: one 999-voxel component
    cleft[5, 30, 30] = 1  # a lone voxel
    vol = TrainingVolume(np.zeros_like(cleft), cleft, np.zeros_like(cleft), np.zeros_like(cleft))
    rng = np.random.default_rng(0)
    small = {mode: np.mean([tuple(vol.cleft_centre(rng, mode)) == (5, 30, 30) for _ in range(2000)])
             for mode in ("voxel", "synapse")}
    assert small["voxel"] < 0.01 and 0.45 < small["synapse"] < 0.55
    assert all(cleft[tuple(vol.cleft_centre(rng, "synapse"))] for _ in range(200))


def test_unet_detector_any_shape_and_config(tmp_path):
    from pipeline.synapse_model import SynapseModelConfig, build_model, load_model, predict, save_model
    from storage.errors import ConfigError

    config = SynapseModelConfig(arch="unet", features=2, levels=2)
    model = build_model(config)
    image = np.random.default_rng(1).integers(0, 255, (3, 18, 22)).astype(np.uint8)
    p = predict(model, config, image)  # 18 x 22 does not pool evenly twice: padded, then cropped back
    assert p.shape == (3, 3, 18, 22) and np.isfinite(p).all()
    # the crop keeps voxels aligned: a prediction on the padded-size array agrees away from the padded edge
    big = np.pad(image, ((0, 0), (0, 2), (0, 2)), mode="reflect")
    np.testing.assert_allclose(predict(model, config, big)[:, :, :10, :10], p[:, :, :10, :10], atol=1e-5)
    loaded_model, loaded = load_model(save_model(model, config, tmp_path / "u"))
    assert loaded == config
    np.testing.assert_allclose(predict(loaded_model, loaded, image), p, atol=1e-6)
    # configs written before `arch` existed load as the dilated stack
    assert SynapseModelConfig.from_json_dict({"features": 4}).arch == "dilated"
    with pytest.raises(ConfigError, match="arch"):
        SynapseModelConfig(arch="resnet")


@pytest.mark.parametrize("flips", [4, 8, 16])
def test_flip_averaged_maps_follow_the_image_symmetries(flips):
    """Averaging over a group of symmetries makes the maps transform with the image exactly: predicting on a
    reflected or transposed image gives the reflected or transposed maps. A view mapped back wrongly breaks this."""
    from pipeline.synapse_model import SynapseModelConfig, build_model, predict

    config = SynapseModelConfig(arch="unet", features=2, levels=2)
    model = build_model(config)
    image = np.random.default_rng(2).integers(0, 255, (5, 16, 24)).astype(np.uint8)
    p = predict(model, config, image, flips)
    np.testing.assert_allclose(predict(model, config, image[:, ::-1], flips), p[:, :, ::-1], atol=1e-5)
    np.testing.assert_allclose(predict(model, config, image[:, :, ::-1], flips), p[:, :, :, ::-1], atol=1e-5)
    if flips >= 8:
        np.testing.assert_allclose(predict(model, config, image.transpose(0, 2, 1), flips),
                                   p.transpose(0, 1, 3, 2), atol=1e-5)
    if flips == 16:
        np.testing.assert_allclose(predict(model, config, image[::-1], flips), p[:, ::-1], atol=1e-5)
    # a single view does not have this property, so the test can tell
    one = predict(model, config, image)
    assert np.abs(predict(model, config, image[:, ::-1])[:, :, ::-1] - one).max() > 1e-4
    with pytest.raises(ValueError, match="flips"):
        predict(model, config, image, 3)


def test_train_from_config_unet_with_widened_clefts(tmp_path):
    from pipeline.synapse_training import synthetic_volume, train_from_config
    from storage.errors import ConfigError

    narrow = synthetic_volume(301, (16, 96, 96))
    wide = synthetic_volume(301, (16, 96, 96), cleft_dilation_nm=16.0)
    assert narrow.cleft.any() and wide.cleft.sum() > 1.5 * narrow.cleft.sum()
    assert (wide.cleft >= narrow.cleft).all(), "widening only adds target voxels"
    assert (wide.cleft.any(axis=(1, 2)) == narrow.cleft.any(axis=(1, 2))).all(), "in-plane only"
    config = {"out": str(tmp_path / "s"), "steps": 2, "batch_size": 1, "patch_shape_zyx": [4, 16, 16],
              "final_lr_fraction": 0.1, "model": {"arch": "unet", "features": 2, "levels": 1},
              "data": [{"synthetic": {"seed": 301, "shape_zyx": [8, 64, 64], "cleft_dilation_nm": 16.0},
                        "weight": 2.0}]}
    out = train_from_config(config)
    assert (out / "model.weights.h5").is_file()
    # the same config as a file through the CLI, with its overrides
    import json

    from pipeline.cli import main

    path = tmp_path / "train_synapses.json"
    path.write_text(json.dumps(config))
    assert main(["train", "synapses", str(path), "--max-steps", "1", "--output-dir", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "model" / "model.weights.h5").is_file()
    config["data"][0]["weight"] = 0
    with pytest.raises(ConfigError, match="weight"):
        train_from_config(config)
    # a malformed value is one clear line, before any training volume is made; nothing is written
    config["data"][0]["weight"] = 1.0
    for field, bad in (("steps", "many"), ("patch_shape_zyx", [4, "x", 16])):
        with pytest.raises(ConfigError, match="bad value"):
            train_from_config({**config, field: bad, "out": str(tmp_path / "bad")})
    with pytest.raises(ConfigError, match=r"ema_momentum must be in \(0, 1\), got 1.5"):
        train_from_config({**config, "ema_momentum": 1.5, "out": str(tmp_path / "bad")})
    with pytest.raises(ConfigError, match="positive_sampling.*'cleft'"):
        train_from_config({**config, "positive_sampling": "cleft", "out": str(tmp_path / "bad")})
    with pytest.raises(ConfigError, match=r"data\[1\] isbi folder .*nowhere has no raw/"):
        train_from_config({**config, "data": config["data"] + [{"isbi": {"folder": str(tmp_path / "nowhere"),
                                                                         "first": 0, "stop": 2}}],
                           "out": str(tmp_path / "bad")})
    with pytest.raises(ConfigError, match="init_from synapses_small is another model"):
        train_from_config({**config, "init_from": "synapses_small", "out": str(tmp_path / "bad")})
    assert not (tmp_path / "bad").exists()
    # a warm start: at learning rate 0 the run exports exactly the weights it started from
    warm = train_from_config({**config, "init_from": str(out), "learning_rate": 0.0, "out": str(tmp_path / "warm")})
    from pipeline.synapse_model import load_model

    for a, b in zip(load_model(out)[0].get_weights(), load_model(warm)[0].get_weights()):
        np.testing.assert_array_equal(a, b)
    proc_path = tmp_path / "broken.json"
    proc_path.write_text(json.dumps({**config, "steps": "many"}))
    assert main(["train", "synapses", str(proc_path)]) == 2


def test_equalize_sections_undoes_a_brightness_jump():
    from pipeline.synapse_model import equalize_sections

    rng = np.random.default_rng(2)
    image = np.clip(rng.normal(150, 30, (7, 40, 40)), 0, 255)
    jumped = image.copy()
    jumped[3] = jumped[3] * 0.75 - 12  # one dark, low-contrast section
    out = equalize_sections(jumped.astype(np.uint8))
    assert abs(out[3].mean() - image[3].mean()) < 3 and abs(out[3].std() - image[3].std()) < 3
    assert np.abs(out[[0, 1, 5]] - image[[0, 1, 5]].astype(np.uint8)).mean() < 2, "ordinary sections stay put"
    assert abs(jumped[3].mean() - image[3].mean()) > 40


def test_isbi_sections_load(shared_data):
    raw, cleft = isbi_stack(shared_data / "isbi2012_vnc_sstem", range(24, 26))
    assert raw.shape == (2, 256, 256) and raw.dtype == np.uint8
    assert 0 < cleft.mean() < 0.2
