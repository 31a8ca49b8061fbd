"""FFN training: partitions, balanced coordinates, augmentation, FOV walks, the loop, checkpoint/resume, CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest

from ffn.model import logit
from ffn.train.augment import AugmentConfig, augment_patch
from ffn.train.coordinates import BalancedSampler
from ffn.train.examples import Example, fixed_shifts, soft_labels, walk
from ffn.train.partitions import EXCLUDED, compute_partitions


def halves_volume() -> np.ndarray:
    """20^3: id 1 for x < 10, id 2 for x >= 10, a 1-voxel line of id 3 along z at (y, x) = (15, 15),
    a 2-voxel speck of id 4 (dust) and a background slab at y = 16..17."""
    lab = np.ones((20, 20, 20), np.uint64)
    lab[:, :, 10:] = 2
    lab[:, 15, 15] = 3
    lab[10, 4, 3:5] = 4
    lab[:, 16:18, :] = 0
    return lab


def test_partitions_classes_on_hand_made_volume():
    lab = halves_volume()
    part = compute_partitions(lab, lom_radius=(2, 2, 2), thresholds=(0.3, 0.7), min_size=5)
    assert part.dtype == np.uint8
    # border of width 2 cannot hold the 5^3 box
    assert (part[:2] == EXCLUDED).all() and (part[:, :, -2:] == EXCLUDED).all()
    assert part[10, 10, 4] == 3  # deep inside id 1: fraction 1.0 > 0.7
    assert part[10, 10, 9] == 2  # last column of id 1: 3 of 5 columns -> 0.6 in [0.3, 0.7)
    assert part[10, 15, 15] == 1  # thin line: 5 of 125 voxels -> 0.04 < 0.3
    assert part[10, 4, 3] == part[10, 4, 4] == 0  # dust (2 voxels < min_size) counts as background
    assert part[10, 4, 6] == 3  # its neighbour of id 1: 124 of 125
    assert (part[5:15, 16:18, 5:15] == 0).all()  # unlabelled voxels: background class
    assert part[10, 15, 12] == 2  # labelled voxel next to background: 3 of 5 rows are its id -> 0.6
    # dust is background (class 0), not a thin object
    lab2 = np.ones((12, 12, 12), np.uint64)
    lab2[6, 6, 6] = 9
    p2 = compute_partitions(lab2, (2, 2, 2), (0.3, 0.7), min_size=2)
    assert p2[6, 6, 6] == 0
    p3 = compute_partitions(lab2, (2, 2, 2), (0.3, 0.7), min_size=1)
    assert p3[6, 6, 6] == 1


def test_coordinates_are_class_balanced_and_inside_margin():
    lab = halves_volume()
    part = compute_partitions(lab, (2, 2, 2), (0.3, 0.7), min_size=1)
    second = np.full((16, 16, 16), 3, np.uint8)
    second[8, 8, 8] = 1  # a single voxel of class 1 in volume 2
    sampler = BalancedSampler([part, second], margin=(3, 3, 3))
    counts = sampler.class_counts()
    assert counts[3] > 20 * counts[1]  # raw frequencies are very unequal
    rng = np.random.default_rng(0)
    drawn = [sampler.sample(rng) for _ in range(4000)]
    classes = np.array([c for c, _ in drawn])
    freq = np.bincount(classes, minlength=4)[sampler.classes] / len(drawn)
    assert np.all(np.abs(freq - 1 / len(sampler.classes)) < 0.03), freq
    for cls, coord in drawn[:500]:
        p = [part, second][coord.volume]
        assert p[coord.center] == cls
        assert all(3 <= c < n - 3 for c, n in zip(coord.center, p.shape))
    assert {coord.volume for _, coord in drawn} == {0, 1}


@pytest.mark.parametrize("axes", ["zyx", "yx"])
def test_augmentation_keeps_image_and_labels_together(axes):
    rng = np.random.default_rng(3)
    shape = (9, 9, 9) if axes == "zyx" else (7, 9, 9)  # anisotropic patches only permute y and x
    lab = rng.integers(1, 200, size=shape).astype(np.uint64)
    image = (lab.astype(np.float32) * 0.5 - 3.0)
    cfg = AugmentConfig(permute_axes=axes, reflect="zyx", shifted_section_prob=1.0, max_shift=3)
    changed = 0
    for _ in range(20):
        im2, lab2 = augment_patch(image, lab, cfg, rng)
        assert im2.shape == image.shape and lab2.shape == lab.shape
        np.testing.assert_array_equal(im2, lab2.astype(np.float32) * 0.5 - 3.0)
        assert sorted(np.unique(lab2)) == sorted(np.unique(lab))  # nothing invented or lost
        changed += int(not np.array_equal(lab2, lab))
    assert changed >= 15  # it does augment
    # intensity-only augmentations leave labels untouched and change the image
    cfg2 = AugmentConfig(permute_axes="", reflect="", missing_section_prob=1.0, brightness=0.5, contrast=0.2)
    im3, lab3 = augment_patch(image, lab, cfg2, rng)
    np.testing.assert_array_equal(lab3, lab)
    assert not np.allclose(im3, image)
    blank = [z for z in range(im3.shape[0]) if np.ptp(im3[z]) == 0]
    assert len(blank) == 1  # the missing section is uniform


def test_soft_labels_and_fov_walks():
    lab = np.zeros((13, 13, 13), np.uint64)
    lab[:, :, :8] = 5
    t = soft_labels(lab)
    assert t[6, 6, 6] == np.float32(0.95) and t[6, 6, 10] == np.float32(0.05)
    assert np.all(soft_labels(np.zeros_like(lab)) == np.float32(0.05))  # background centre: nothing to fill
    ex = Example.from_patch(np.zeros(lab.shape, np.float32), lab, seed_pad=0.05)
    assert ex.seed[6, 6, 6] == pytest.approx(logit(0.95)) and ex.seed[0, 0, 0] == pytest.approx(logit(0.05))
    shifts = fixed_shifts((2, 2, 2), 1, np.random.default_rng(0))
    assert len(shifts) == 26 and (0, 0, 0) not in shifts
    # fixed: only the centre while the seed elsewhere stays low
    assert list(walk(ex, (9, 9, 9), (2, 2, 2), "fixed", 0.9, shifts)) == [(6, 6, 6)]
    # fixed: after a confident prediction on the x < 8 side, exactly the offsets whose seed is high are visited
    ex.seed[:, :, :8] = logit(0.99)
    visited = list(walk(ex, (9, 9, 9), (2, 2, 2), "fixed", 0.9, shifts))
    assert visited[0] == (6, 6, 6) and len(visited) == 18  # x offset in {-2, 0}: 2 * 9
    assert all(p[2] <= 6 for p in visited)
    # max_pred: breadth-first along the face maxima, never leaving the patch or revisiting
    ex.seed[:] = logit(0.05)
    ex.seed[6, 6, 6] = logit(0.95)
    gen = walk(ex, (9, 9, 9), (2, 2, 2), "max_pred", 0.9)
    first = next(gen)
    assert first == (6, 6, 6)
    ex.seed[6, 6, 4] = logit(0.99)  # the -x face max is confident -> move there
    rest = list(gen)
    assert rest == [(6, 6, 4)]


def _tiny_volume(path):
    """32^3 slabs of 4 objects with dark boundaries (an h5 file, like much labelled EM data)."""
    lab = np.zeros((32, 32, 32), np.uint64)
    lab[:, :16, :16], lab[:, :16, 16:], lab[:, 16:, :16], lab[:, 16:, 16:] = 1, 2, 3, 4
    lab[:, 8:24, 8:24][lab[:, 8:24, 8:24] == 4] = 5
    img = np.full(lab.shape, 180, np.float32)
    edge = np.zeros(lab.shape, bool)
    for ax in (1, 2):
        edge |= np.diff(lab, axis=ax, prepend=lab.take([0], axis=ax)) != 0
    img[edge] = 60
    img += np.random.default_rng(0).normal(0, 10, lab.shape)
    with h5py.File(path, "w") as f:
        f["raw"] = np.clip(img, 0, 255).astype(np.uint8)
        f["gt"] = lab
    return path


def _config(tmp_path, h5, **kw):
    from ffn.train import config_from_dict

    data = {
        "model": {"depth": 2, "features": 8, "fov_size_xyz": [9, 9, 9], "deltas_xyz": [2, 2, 2]},
        "volumes": [{"image": f"{h5}:raw", "labels": f"{h5}:gt", "box_start_xyz": [0, 0, 0],
                     "box_stop_xyz": [32, 32, 28]}],
        "output_dir": str(tmp_path / "run"), "export_dir": str(tmp_path / "model"),
        "batch_size": 2, "max_steps": 10, "checkpoint_every": 5, "log_every": 10, "threads": 1,
        "partitions": {"min_size": 10}, "optimizer": {"name": "adam", "learning_rate": 0.003},
        "augment": {"permute_axes": "zyx"},
    }
    data.update(kw)
    return config_from_dict(data)


def test_training_decreases_loss_and_resumes_exactly(tmp_path):
    from ffn.model import load_model
    from ffn.train import Trainer

    h5 = _tiny_volume(tmp_path / "tiny.h5")
    cfg = _config(tmp_path, h5, max_steps=120, checkpoint_every=60, log_every=20)
    trainer = Trainer(cfg, log=lambda s: None)
    assert trainer.restore() is False
    trainer.run()
    rows = list(csv.DictReader(open(tmp_path / "run" / "scalars.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert len(rows) == 6 and int(rows[-1]["step"]) == 120
    assert losses[-1] < 0.7 * losses[0], losses
    assert 0.0 <= float(rows[-1]["f1"]) <= 1.0
    # checkpoint at the last step; the export folder loads as a model with the training's thresholds
    assert trainer.latest_checkpoint().name == "ckpt-000000120"
    model, fc = load_model(tmp_path / "model")
    assert fc.pad_value == 0.05 and fc.move_threshold == 0.9 and fc.metadata["training"]["steps"] == 120
    x = np.random.default_rng(1).normal(size=(1, 9, 9, 9, 2)).astype(np.float32)
    np.testing.assert_array_equal(model(x).numpy(), trainer.model(x).numpy())
    # resume: same step, same weights, same optimizer state, then it continues counting
    resumed = Trainer(_config(tmp_path, h5, max_steps=130, checkpoint_every=60, log_every=5), log=lambda s: None)
    assert resumed.restore() is True and resumed.step == 120
    for a, b in zip(resumed.model.get_weights(), trainer.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(resumed.optimizer.variables, trainer.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    resumed.run()
    assert resumed.step == 130
    # warm start from a model folder: same layer names and shapes -> same weights, fresh counters
    warm = Trainer(_config(tmp_path, h5, output_dir=str(tmp_path / "warm"), export_dir=None,
                           init_from=str(tmp_path / "model")), log=lambda s: None)
    assert warm.step == 0
    for a, b in zip(warm.model.get_weights(), resumed.model.get_weights()):  # the export of step 130
        np.testing.assert_array_equal(a, b)
    rows = list(csv.DictReader(open(tmp_path / "run" / "scalars.csv")))
    assert [int(r["step"]) for r in rows][-2:] == [125, 130]
    assert resumed.latest_checkpoint().name == "ckpt-000000130"


def check_exported_weights_are_the_moving_average(tmp: Path) -> None:
    """With ema_momentum m the export holds avg_1 = w_1, avg_t = m avg_(t-1) + (1 - m) w_t over the training
    weights w_t after each step; the model keeps training on w_t; a checkpoint carries the average into a resume.
    Shared by the TensorFlow test and the JAX-backend script."""
    from ffn.model import load_model
    from ffn.train import Trainer

    h5 = _tiny_volume(tmp / "tiny.h5")
    cfg = _config(tmp, h5, output_dir=str(tmp / "ema_run"), export_dir=None, ema_momentum=0.5)
    trainer = Trainer(cfg, log=lambda s: None)
    trainer.export(tmp / "ema_step0")  # before any step there is no average: the export is the initial weights
    for got, want in zip(load_model(tmp / "ema_step0")[0].get_weights(), trainer.model.get_weights()):
        np.testing.assert_array_equal(got, want)
    average = None
    for _ in range(5):
        x, y = trainer.next_batch()
        trainer.write_back(trainer._train_step(x, y)[1])
        trainer.step += 1
        trainer._train_step.sync()
        w = [np.asarray(v) for v in trainer.model.get_weights()]
        average = w if average is None else [0.5 * a + 0.5 * b for a, b in zip(average, w)]
    trainer.export(tmp / "ema_model")
    exported, fc = load_model(tmp / "ema_model")
    assert fc.metadata["training"]["weights"] == "ema 0.5"
    for got, want in zip(exported.get_weights(), average):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(trainer.model.get_weights(), w):  # training goes on from the last step's weights
        np.testing.assert_array_equal(got, want)
    assert not all(np.allclose(a, b) for a, b in zip(average, w))
    trainer.save()
    resumed = Trainer(cfg, log=lambda s: None)
    assert resumed.restore() and resumed.step == 5
    resumed.export(tmp / "ema_resumed")
    for got, want in zip(load_model(tmp / "ema_resumed")[0].get_weights(), average):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_exported_weights_are_the_moving_average(tmp_path):
    check_exported_weights_are_the_moving_average(tmp_path)


def test_training_reads_volumes_at_the_models_scale(tmp_path):
    """A model declared at XY scale 2 trains on its volumes downsampled as inference will see them (image means,
    label picks), and the exported model carries the scale."""
    from ffn.model import load_config
    from ffn.train import Trainer

    h5 = _tiny_volume(tmp_path / "tiny.h5")
    model = {"depth": 2, "features": 8, "fov_size_xyz": [9, 9, 9], "deltas_xyz": [1, 1, 1], "scale_xyz": [2, 2, 1]}
    trainer = Trainer(_config(tmp_path, h5, model=model, max_steps=4, checkpoint_every=4), log=lambda m: None)
    assert trainer.images[0].shape == trainer.labels[0].shape == (28, 16, 16)
    assert set(np.unique(trainer.labels[0]).tolist()) == {1, 2, 3, 4, 5}
    with h5py.File(h5, "r") as f:
        raw = f["raw"][:28].astype(np.float32)
    np.testing.assert_allclose(trainer.images[0], trainer.ffn_config.normalize(
        raw.reshape(28, 16, 2, 16, 2).mean((2, 4))), atol=1e-5)
    trainer.run()
    assert load_config(tmp_path / "model").scale == (1, 2, 2)


def test_cli_train_ffn_and_config_errors(tmp_path, capsys):
    import yaml

    from pipeline.cli import main

    from storage.box import Box
    from storage.volume import create_volume

    h5 = _tiny_volume(tmp_path / "tiny.h5")
    # a second training volume given as a URL (zarr through storage.volume): several volumes at once
    with h5py.File(h5, "r") as f:
        raw, gt = f["raw"][()], f["gt"][()]
    for name, arr, kind in (("raw", raw, "image"), ("gt", gt, "segmentation")):
        vol = create_volume(f"zarr://{tmp_path}/v2/{name}", shape_zyx=arr.shape, dtype=arr.dtype, kind=kind,
                            voxel_size_xyz_nm=(8, 8, 8), chunk_shape_zyx=(16, 16, 16))
        vol.write(Box.from_shape(arr.shape), arr)
    cfg = {
        "model": {"depth": 1, "features": 4, "fov_size_xyz": [9, 9, 9], "deltas_xyz": [2, 2, 2]},
        "volumes": [{"image": f"{h5}:raw", "labels": f"{h5}:gt"},
                    {"image": f"zarr://{tmp_path}/v2/raw", "labels": f"zarr://{tmp_path}/v2/gt"}],
        "output_dir": str(tmp_path / "cli_run"), "batch_size": 1, "max_steps": 100, "threads": 1,
        "partitions": {"min_size": 10}, "fov_policy": "max_pred",
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "ffn", str(path), "--max-steps", "3"]) == 0
    assert (tmp_path / "cli_run" / "checkpoints" / "ckpt-000000003" / "state.json").is_file()
    assert "2 volume(s)" in capsys.readouterr().out
    assert len(list((tmp_path / "cli_run").glob("partitions-*.npy"))) == 2
    bad = dict(cfg, ema_momentum=1.0)
    path.write_text(yaml.safe_dump(bad))
    assert main(["train", "ffn", str(path)]) == 2
    assert "ema_momentum has an invalid value 1.0" in capsys.readouterr().err
    bad = dict(cfg, optimizer={"name": "adamw"})
    path.write_text(yaml.safe_dump(bad))
    assert main(["train", "ffn", str(path)]) == 2
    assert "optimizer.name" in capsys.readouterr().err
    bad = dict(cfg, volumes=[{"image": str(tmp_path / "missing.h5:raw"), "labels": f"{h5}:gt"}],
               output_dir=str(tmp_path / "never"))
    path.write_text(yaml.safe_dump(bad))
    assert main(["train", "ffn", str(path)]) == 2
    assert "missing.h5" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


JAX_TRAINING = """
import csv, json, sys
import numpy as np
from pathlib import Path
from test_ffn_training import _config, _tiny_volume
import keras
from ffn.train import Trainer
tmp = Path(sys.argv[1])
h5 = _tiny_volume(tmp / "tiny.h5")
adam = {"name": "adam", "learning_rate": 0.003, "decay_steps": 50, "decay_rate": 0.5}
trainer = Trainer(_config(tmp, h5, max_steps=120, checkpoint_every=60, log_every=20, optimizer=adam),
                  log=lambda s: None)
trainer.run()
resumed = Trainer(_config(tmp, h5, max_steps=130, checkpoint_every=60, log_every=5, optimizer=adam),
                  log=lambda s: None)
assert resumed.restore() and resumed.step == 120
iterations = int(np.asarray(resumed.optimizer.iterations.value))
resumed.run()
x = np.random.default_rng(1).normal(size=(1, 9, 9, 9, 2)).astype(np.float32)
np.save(tmp / "logits.npy", np.asarray(resumed.model.predict_on_batch(x)))
rows = list(csv.DictReader(open(tmp / "run" / "scalars.csv")))
losses = [float(r["loss"]) for r in rows]
from test_ffn_training import check_exported_weights_are_the_moving_average
check_exported_weights_are_the_moving_average(tmp)
print(json.dumps({"backend": keras.backend.backend(), "losses": losses, "lr_120": float(rows[5]["learning_rate"]), "iterations_at_resume": iterations, "step": resumed.step}))
"""


def test_training_runs_under_the_jax_backend_without_tensorflow(tmp_path):
    """On a GPU node whose stack is JAX and has no TensorFlow, KERAS_BACKEND=jax trains, checkpoints and resumes
    (Adam's state included); the exported model loads under TensorFlow and computes the same logits; the weights'
    moving average is kept and exported as under TensorFlow."""
    import json

    from backend_fixtures import run_under_jax_without_tensorflow
    from ffn.model import load_model

    run = run_under_jax_without_tensorflow(JAX_TRAINING, str(tmp_path))
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["backend"] == "jax"
    assert out["iterations_at_resume"] == 120 and out["step"] == 130
    losses = out["losses"]
    assert np.isfinite(losses).all() and losses[5] < 0.7 * losses[0], losses
    assert out["lr_120"] == pytest.approx(0.003 * 0.5 ** (120 / 50), rel=1e-4)  # the schedule saw every step
    model, _ = load_model(tmp_path / "model")
    x = np.random.default_rng(1).normal(size=(1, 9, 9, 9, 2)).astype(np.float32)
    np.testing.assert_allclose(model(x).numpy(), np.load(tmp_path / "logits.npy"), atol=1e-4)


def test_every_example_training_config_parses(monkeypatch, request):
    """The training recipes under examples/ are documentation users copy: each must load as a valid config
    (FFN: the whole TrainConfig; synapses: every field and the warm-start model, without making volumes). Recipes
    that train on ../shared/data's ISBI stack are checked last, and need that folder."""
    from pathlib import Path

    from ffn.train import load_train_config
    from pipeline.synapse_training import parse_training_config

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the recipes name paths from the repository root
    ffn_recipes = sorted((repo / "examples").glob("train_ffn*.yaml"))
    synapse_recipes = sorted((repo / "examples").glob("train_synapses*.json"))
    assert len(ffn_recipes) >= 5 and len(synapse_recipes) >= 4
    for path in ffn_recipes:
        assert load_train_config(path).max_steps > 0, path
    for path in sorted(synapse_recipes, key=lambda p: "isbi" in p.read_text()):
        if "isbi" in path.read_text():
            request.getfixturevalue("shared_data")
        model_config, settings, sources, _ = parse_training_config(path)
        assert settings["steps"] > 0 and sources, path
