"""FFN inference: canvas, seeds, movement, batching executor, consensus.

The model is a hand-set convstack_3d ("grow model") that floods from positive seed voxels through bright image
voxels and never into dark ones, with saturated logits (+7 object, -3 elsewhere): a transparent stand-in for a
trained FFN, so each test knows exactly what the right segmentation is.
"""

from __future__ import annotations


import numpy as np
import pytest

from ffn.canvas import Canvas, InferenceOptions, Restrictor
from ffn.executor import Forward, run_canvases
from ffn.inference import consensus_segment, segment_volume, segment_volumes, split_by_intersection
from ffn.model import FFNConfig, build_model, conv_layer_names, set_conv_weights
from ffn.movement import FaceMaxQueue, face_max_moves
from ffn.seeds import PolicyPeaks, grid_coords, peak_coords
from storage.errors import ConfigError

BRIGHT, DARK = 200, 30


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    from ffn.executor import configure_threads

    configure_threads(1, 1)


def grow_model(fov: int = 9, delta: int = 2, min_segment_size: int = 50):
    """logits = 10*clip(G, 0, 1) - 3, G = (positive-seed mass within 2 voxels, through bright voxels) - darkness."""
    cfg = FFNConfig(depth=2, features=5, fov_size=(fov,) * 3, deltas=(delta,) * 3, min_segment_size=min_segment_size)
    model = build_model(cfg)
    f, c = 5, 1
    w = {n: [np.zeros((3, 3, 3, 2 if n == "conv0_a" else f, f), np.float32), np.zeros(f, np.float32)]
         for n in conv_layer_names(2)[:-1]}
    w["conv_lom"] = [np.zeros((1, 1, 1, f, 1), np.float32), np.zeros(1, np.float32)]
    k, b = w["conv0_a"]  # relu(seed), relu(seed-1), relu(-image), relu(-seed)
    k[c, c, c, 1, 0] = 1; k[c, c, c, 1, 1] = 1; b[1] = -1; k[c, c, c, 0, 2] = -1; k[c, c, c, 1, 3] = -1  # noqa: E702
    k, b = w["conv0_b"]  # x0 = neighbour clip(seed) mass, x1 = darkness, x2/x3 = seed +/- parts, x4 = x0 - 1
    k[:, :, :, 0, 0] = 1; k[:, :, :, 1, 0] = -1; k[c, c, c, 2, 1] = 1; k[c, c, c, 0, 2] = 1; k[c, c, c, 3, 3] = 1  # noqa: E702
    k[:, :, :, 0, 4] = 1; k[:, :, :, 1, 4] = -1; b[4] = -1  # noqa: E702
    k, b = w["conv1_a"]  # gated (bright) neighbour mass, clipped, and darkness again
    k[c, c, c, 0, 0] = 1; k[c, c, c, 1, 0] = -30; k[c, c, c, 0, 1] = 1; k[c, c, c, 1, 1] = -30; b[1] = -1  # noqa: E702
    k[c, c, c, 1, 2] = 1
    k, b = w["conv1_b"]
    for o in (0, 4):
        k[:, :, :, 0, o] = 1; k[:, :, :, 1, o] = -1; k[c, c, c, 2, o] = -30  # noqa: E702
    k, b = w["conv_lom"]  # update = -seed + 10*clip(G) - 3
    k[0, 0, 0, 2, 0] = -1; k[0, 0, 0, 3, 0] = 1; k[0, 0, 0, 0, 0] = 10; k[0, 0, 0, 4, 0] = -10; b[0] = -3  # noqa: E702
    set_conv_weights(model, {n: tuple(v) for n, v in w.items()})
    return model, cfg


@pytest.fixture(scope="module")
def grow():
    model, cfg = grow_model()
    return Forward(model, cfg), cfg, model


def tubes(cut: bool = True, length: int = 48) -> np.ndarray:
    """Two bright 8x8 tubes along x in a dark volume; ``cut`` puts a 2-voxel dark membrane across both."""
    img = np.full((24, 24, length), DARK, np.uint8)
    img[4:12, 4:12, :] = BRIGHT
    img[14:22, 14:22, :] = BRIGHT
    if cut:
        img[:, :, 23:25] = DARK
    return img


def pieces(img: np.ndarray) -> list[np.ndarray]:
    """Ground-truth masks of the tube pieces (connected bright regions)."""
    import cc3d

    gt = cc3d.connected_components(img == BRIGHT, connectivity=6)
    return [gt == i for i in range(1, int(gt.max()) + 1)]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming ids (0 must stay 0)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]], 1), axis=0)
    return len(pairs) == len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


# ---- forward pass -------------------------------------------------------------------------------------------

def test_forward_equals_keras_model_and_bf16_is_close():
    cfg = FFNConfig(depth=3, features=8, fov_size=(9, 9, 9), deltas=(2, 2, 2))
    model = build_model(cfg)
    x = np.random.default_rng(0).normal(size=(3, 9, 9, 9, 2)).astype(np.float32)
    want = model(x).numpy()[..., 0]
    np.testing.assert_allclose(Forward(model, cfg)(x), want, atol=1e-5)
    np.testing.assert_allclose(Forward(model, cfg, "bfloat16")(x), want, atol=0.1)
    with pytest.raises(ConfigError, match="precision"):
        Forward(model, cfg, "int4")


def test_forward_graph_optimises_without_a_remapper_error(capfd):
    # tf.nn.relu on the residual sum made Grappler's oneDNN remapper fail (and log an error line) on every FFN graph
    cfg = FFNConfig(depth=3, features=8, fov_size=(9, 9, 9), deltas=(2, 2, 2))
    Forward(build_model(cfg), cfg)(np.zeros((2, 9, 9, 9, 2), np.float32))
    assert "remapper failed" not in capfd.readouterr().err


JAX_INFERENCE = """
import sys
import numpy as np
import keras
from ffn.executor import Forward
from ffn.inference import segment_volume
from ffn.model import FFNConfig, build_model
out = sys.argv[1]
cfg = FFNConfig(depth=3, features=8, fov_size=(9, 9, 9), deltas=(2, 2, 2))
model = build_model(cfg)
x = np.random.default_rng(0).normal(size=(3, 9, 9, 9, 2)).astype(np.float32)
want = np.asarray(model(x))[..., 0]
f32, bf16 = Forward(model, cfg)(x), Forward(model, cfg, "bfloat16")(x)
labels, stats = segment_volume(np.load(out + "/raw.npy"), "synthetic_small")
np.save(out + "/labels.npy", labels)
assert "tensorflow" not in sys.modules
print(keras.backend.backend(), float(np.abs(f32 - want).max()), float(np.abs(bf16 - want).max()), stats["steps"])
"""


def test_inference_runs_under_jax_without_tensorflow_and_segments_identically(tmp_path):
    """GPU nodes whose stack is JAX (no TensorFlow): the forward pass is built from lax convolutions, agrees with
    the Keras model, and whole-volume inference gives the same labels as under TensorFlow, voxel for voxel (the
    convolutions run at full float32 precision, so no flood decision flips)."""
    from backend_fixtures import run_under_jax_without_tensorflow
    from pipeline.synthetic import SynthParams, generate_box

    shape = (16, 48, 48)
    raw = generate_box(SynthParams(seed=77, shape_zyx=shape), ((0, 0, 0), shape))["raw"]
    np.save(tmp_path / "raw.npy", raw)
    want, stats = segment_volume(raw, "synthetic_small")
    assert stats["segments"] >= 2
    run = run_under_jax_without_tensorflow(JAX_INFERENCE, str(tmp_path))
    backend, f32_err, bf16_err, steps = run.stdout.split()
    assert backend == "jax" and float(f32_err) <= 1e-5 and float(bf16_err) <= 0.1
    assert int(steps) == stats["steps"]
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), want)


# ---- seeds and movement -------------------------------------------------------------------------------------

def test_peaks_lie_inside_objects_not_on_membranes():
    img = tubes()
    coords = peak_coords(img)
    assert len(coords) > 0
    assert list(map(tuple, coords)) == sorted(map(tuple, coords))  # ascending z, y, x like the reference
    inside_tubes = [img[tuple(c)] == BRIGHT for c in coords if 4 <= c[0] < 22 and 4 <= c[1] < 22]
    assert inside_tubes and all(inside_tubes)
    assert np.array_equal(coords, peak_coords(img))  # deterministic


def test_grid_coords_cover_offsets_in_order():
    g = grid_coords((20, 20, 20), step=16, offsets=(0, 8))
    assert tuple(g[0]) == (0, 0, 0) and tuple(g[8]) == (8, 8, 8) and len(g) == 9


def test_face_max_moves_and_lattice_dedupe():
    logits = np.full((9, 9, 9), -3.0, np.float32)
    logits[4, 4, 6] = 5.0  # +x face (delta 2), the rest below threshold
    logits[4, 5, 2] = 1.0  # -x face but below threshold 2.2
    moves = face_max_moves(logits, (2, 2, 2), threshold=2.2)
    assert moves == [(5.0, (0, 0, 2))]
    q = FaceMaxQueue((10, 10, 10), (2, 2, 2), 2.2)
    assert q.pop(lambda p: True) == (10, 10, 10)
    q.update(logits, (10, 10, 10))
    q.queue.append((10, 10, 9))  # same lattice cell as the start -> skipped
    assert q.pop(lambda p: True) == (10, 10, 12)
    assert q.pop(lambda p: True) is None


def test_face_components_follow_both_branches_of_a_fork():
    logits = np.full((9, 9, 9), -3.0, np.float32)
    logits[4, 3, 6] = 4.0  # two branches crossing the +x face, apart in y
    logits[4, 5, 6] = 5.0
    logits[4, 4, 2] = 1.0  # below threshold
    assert face_max_moves(logits, (2, 2, 2), threshold=2.2) == [(5.0, (0, 1, 2))]
    assert face_max_moves(logits, (2, 2, 2), threshold=2.2, branches=True) == [(5.0, (0, 1, 2)), (4.0, (0, -1, 2))]
    q = FaceMaxQueue((10, 10, 10), (2, 2, 2), 2.2, branches=True)
    q.pop(lambda p: True)
    q.update(logits, (10, 10, 10))
    assert [q.pop(lambda p: True), q.pop(lambda p: True)] == [(10, 11, 12), (10, 9, 12)]
    with pytest.raises(ConfigError, match="movement"):
        FFNConfig(movement="random_walk")


# ---- canvas -----------------------------------------------------------------------------------------------------

def test_tubes_cut_by_membrane_give_four_segments(grow):
    forward, cfg, _ = grow
    img = tubes(cut=True)
    labels, stats = segment_volume(img, forward, cfg, seed_policy="peaks")
    assert labels.dtype == np.uint64
    assert stats["segments"] == 4 and labels.max() == 4
    assert not labels[img == DARK].any()  # never into membrane/background
    for piece in pieces(img):
        ids, counts = np.unique(labels[piece], return_counts=True)
        assert counts[ids > 0].max() >= 0.9 * piece.sum()  # each piece is (almost) one segment
        assert (ids > 0).sum() == 1
    assert stats["steps"] > 10 * stats["segments"]
    assert set(stats["origins"]) == {1, 2, 3, 4}


def test_downsampling_helpers_round_trip_odd_shapes():
    from ffn.scale import downsample_image, downsample_labels, upsample_labels

    img = np.arange(3 * 5 * 7, dtype=np.uint8).reshape(3, 5, 7)
    small = downsample_image(img, (1, 2, 2))
    assert small.shape == (3, 3, 4) and small.dtype == np.float32
    assert small[0, 0, 0] == img[0, :2, :2].mean()
    assert small[0, 2, 3] == img[0, 4, 6]  # edge-padded cell: the border voxel itself
    lab = downsample_labels(img, (1, 2, 2))
    assert lab.shape == (3, 3, 4) and lab[1, 1, 1] == img[1, 2, 2]
    back = upsample_labels(lab, (1, 2, 2), img.shape)
    assert back.shape == img.shape and back[1, 3, 3] == img[1, 2, 2]
    assert downsample_image(img, (1, 1, 1)) is img


def test_a_model_with_a_scale_segments_downsampled_and_answers_at_full_size(grow):
    """The same hand-set model declared at XY scale 2 floods the 2x-downsampled tubes: each piece is still one
    segment, labels come back at the volume's shape, and fixed block seeds map to the model's voxels."""
    import dataclasses

    from pipeline.stages.segment import BlockSeeds

    forward, cfg, _ = grow
    cfg2 = dataclasses.replace(cfg, scale=(1, 2, 2))
    img = np.repeat(np.repeat(tubes(cut=True), 2, 1), 2, 2)  # the tubes at twice the XY resolution
    labels, stats = segment_volume(img, forward, cfg2, seed_policy="peaks")
    assert labels.shape == img.shape and stats["segments"] == 4
    assert not labels[img == DARK].any()
    for piece in pieces(img):
        ids, counts = np.unique(labels[piece], return_counts=True)
        assert (ids > 0).sum() == 1 and counts[ids > 0].max() >= 0.9 * piece.sum()
    coarse, _ = segment_volume(tubes(cut=True), forward, cfg, seed_policy="peaks")
    assert same_partition(labels[:, ::2, ::2], coarse)  # exactly the run on the coarse volume
    assert all(o[1] % 2 == 0 and o[2] % 2 == 0 for o, _n in stats["origins"].values())  # volume voxels

    class Canvas2:
        offset, config = (1, 4, 4), cfg2
    assert list(BlockSeeds(((2, 10, 11), (2, 11, 10), (3, 0, 1)))(Canvas2())) == [(3, 9, 9), (4, 4, 4)]
    with pytest.raises(ConfigError, match="scale"):
        dataclasses.replace(cfg, scale=(1, 0, 2))


def test_restrictor_mask_bounds_the_fill(grow):
    forward, cfg, _ = grow
    img = tubes(cut=False)
    mask = np.zeros(img.shape, bool)
    mask[:, :, 20:30] = True  # wider than the FOV: no move can cross it
    labels, stats = segment_volume(img, forward, cfg, restrictor=Restrictor(mask=mask), seed_policy="peaks")
    assert not labels[mask].any()
    assert stats["segments"] == 4  # each tube split in two by the mask
    free, _ = segment_volume(img, forward, cfg, seed_policy="peaks")
    assert free.max() == 2  # without the mask: one segment per tube


def test_padding_reaches_border_objects(grow):
    """An object thinner than the FOV radius along the border is out of reach of every FOV centre in the bare
    volume (the reference leaves it empty); mirror padding lets seeds and moves reach it, and is cropped away."""
    forward, cfg, _ = grow
    img = np.full((24, 24, 48), DARK, np.uint8)
    img[1:4, 4:20, :] = BRIGHT  # a 3-voxel slab against z = 0: FOV radius is 4
    img[12:20, 4:20, :] = BRIGHT  # and one in the middle
    bare, _ = segment_volume(img, forward, cfg, seed_policy="peaks", pad_faces=False)
    padded, stats = segment_volume(img, forward, cfg, seed_policy="peaks")
    assert padded.shape == img.shape
    assert not bare[1:4].any() and bare[12:20].any()
    slab = padded[1:4, 4:20, :]
    assert (slab > 0).mean() > 0.9 and len(np.unique(slab[slab > 0])) == 1
    assert not padded[img == DARK].any()
    assert all(all(0 <= v < n for v, n in zip(pos, img.shape)) for pos, _ in stats["origins"].values())


def test_min_segment_size_rejects_and_marks_seeds(grow):
    forward, cfg, _ = grow
    labels, stats = segment_volume(tubes(), forward, cfg, seed_policy="peaks", min_segment_size=5000)
    assert labels.max() == 0 and stats["segments"] == 0
    assert stats["rejected_small"] >= 4


def test_seed_in_dark_voxel_is_rejected_as_weak(grow):
    forward, cfg, _ = grow
    img = tubes()
    canvas = Canvas(img, cfg, seed_policy=lambda c: iter([(16, 6, 30)]))  # a dark voxel
    run_canvases([canvas], forward)
    assert canvas.counters["rejected_weak"] == 1 and canvas.segmentation[16, 6, 30] == -1


def test_first_come_wins_and_overlaps_are_recorded():
    """A 'box' oracle predicts a 5^3 object around each FOV centre; the second object overlaps the first."""
    cfg = FFNConfig(depth=1, features=1, fov_size=(9, 9, 9), deltas=(3, 3, 3), min_segment_size=10,
                    min_boundary_dist=(0, 0, 0))

    def box(x):
        out = np.full(x.shape[:4], -3.0, np.float32)
        out[:, 2:7, 2:7, 2:7] = 7.0
        return out

    img = np.full((20, 20, 24), BRIGHT, np.uint8)
    canvas = Canvas(img, cfg, seed_policy=lambda c: iter([(10, 10, 10), (10, 10, 13)]))
    run_canvases([canvas], box)
    seg = canvas.segmentation
    assert (seg == 1).sum() == 125 and (seg == 2).sum() == 75
    assert seg[10, 10, 12] == 1  # the overlap stays with the first object
    ids, counts = canvas.overlaps[2]
    assert list(ids) == [1] and list(counts) == [50]
    assert canvas.origins[2].start_zyx == (10, 10, 13) and canvas.origins[2].steps == 1


# ---- batching and determinism ---------------------------------------------------------------------------------

def test_batching_across_canvases_equals_batch_one(grow):
    forward, cfg, _ = grow
    imgs = [tubes(cut=True), tubes(cut=False), np.ascontiguousarray(tubes(cut=True)[:, ::-1])]
    alone = [segment_volume(img, forward, cfg, batch_size=1)[0] for img in imgs]
    calls_before = forward.calls
    batched = segment_volumes(imgs, forward, cfg, batch_size=3)
    for a, (b, stats) in zip(alone, batched):
        np.testing.assert_array_equal(a, b)
    total_steps = sum(s["steps"] for _, s in batched)
    calls = forward.calls - calls_before
    assert max(s["steps"] for _, s in batched) <= calls < total_steps  # FOVs of several canvases per call


def test_parallel_floods_are_deterministic_and_find_the_same_objects(grow):
    forward, cfg, _ = grow
    img = tubes(cut=True)
    seq, _ = segment_volume(img, forward, cfg, floods=1)
    par1, s1 = segment_volume(img, forward, cfg, batch_size=4)
    par2, _ = segment_volume(img, forward, cfg, batch_size=4)
    np.testing.assert_array_equal(par1, par2)
    assert s1["model_calls"] < s1["steps"]
    assert par1.max() == seq.max() == 4
    for piece in pieces(img):  # same objects, up to naming and a few border voxels
        a, b = seq[piece], par1[piece]
        assert (a > 0).sum() > 0.9 * piece.sum() and (b > 0).sum() > 0.9 * piece.sum()
        assert len(np.unique(b[b > 0])) == 1


# ---- consensus ----------------------------------------------------------------------------------------------

def test_split_by_intersection():
    a = np.array([[1, 1, 1, 2, 2, 0]], np.uint64)
    b = np.array([[5, 5, 6, 6, 6, 6]], np.uint64)
    out = split_by_intersection(a, b, min_size=0)
    assert out.tolist() == [[1, 1, 2, 3, 3, 0]]
    assert split_by_intersection(a, b, min_size=2).tolist() == [[1, 1, 0, 2, 2, 0]]


def test_consensus_keeps_agreed_objects(grow):
    forward, cfg, _ = grow
    img = tubes(cut=True)
    labels, stats = consensus_segment(img, forward, cfg, split_min_size=500)
    assert labels.max() == 4
    assert stats["forward"]["segments"] == stats["reverse"]["segments"] == 4
    assert not labels[img == DARK].any()


def test_options_and_errors(grow):
    forward, cfg, _ = grow
    assert InferenceOptions.from_config(cfg, move_threshold=0.8).move_threshold == 0.8
    with pytest.raises(ConfigError, match="bogus"):
        segment_volume(tubes(), forward, cfg, bogus=1)
    with pytest.raises(ConfigError, match="smaller than the FOV"):
        segment_volume(np.zeros((4, 20, 20), np.uint8), forward, cfg, pad_faces=False)
    with pytest.raises(ConfigError, match="seed_policy"):
        segment_volume(tubes(), forward, cfg, seed_policy="nope")
    canvas = Canvas(tubes(), cfg, seed_policy="grid")
    seeds = list(PolicyPeaks()(canvas))
    assert seeds and all(4 <= p[i] < tubes().shape[i] - 4 for p in seeds for i in range(3))  # FOV fits


def test_forward_is_built_once_per_keras_model(grow):
    """Blockwise callers pass the same Keras model for every block; re-tracing per block would cost seconds."""
    from ffn.inference import resolve_forward

    _, cfg, model = grow
    f1, _ = resolve_forward(model, cfg)
    f2, _ = resolve_forward(model, cfg)
    f3, _ = resolve_forward(model, cfg, "bfloat16")
    assert f1 is f2 and f3 is not f1 and f3.precision == "bfloat16"
