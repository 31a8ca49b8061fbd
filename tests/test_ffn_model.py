"""FFN model: architecture, config round trip, model folders, registry, google/ffn checkpoint import."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ffn.model import (
    FFNConfig,
    available_models,
    build_model,
    conv_layer_names,
    load_config,
    load_model,
    resolve_model,
    save_model,
)
from storage.errors import ConfigError, ConnectomeError

CKPT = "ffn_fib25_checkpoint/model.ckpt-27465036"
TINY = FFNConfig(depth=2, features=8, fov_size=(9, 9, 9), deltas=(2, 2, 2))


def test_param_count_and_flops_match_the_reference_fib25_model():
    config = FFNConfig(depth=12, features=32, fov_size=(33, 33, 33), deltas=(8, 8, 8))
    model = build_model(config)
    assert model.count_params() == config.num_params() == 638_433
    assert round(config.flops_per_step() / 1e9, 1) == 45.8
    names = [layer.name for layer in model.layers if layer.name.startswith("conv")]
    assert names == conv_layer_names(12)
    assert len(names) == 25


def test_logits_are_seed_plus_update():
    """With conv_lom zeroed the network's update is 0, so logits must equal the seed channel exactly."""
    model = build_model(TINY)
    lom = model.get_layer("conv_lom")
    lom.set_weights([np.zeros_like(w) for w in lom.get_weights()])
    x = np.random.default_rng(0).normal(size=(2, 9, 9, 9, 2)).astype(np.float32)
    np.testing.assert_array_equal(model(x).numpy()[..., 0], x[..., 1])


def test_save_load_gives_identical_outputs(tmp_path):
    model = build_model(TINY)
    x = np.random.default_rng(1).normal(size=(3, 9, 9, 9, 2)).astype(np.float32)
    save_model(model, TINY, tmp_path / "m")
    loaded, config = load_model(tmp_path / "m")
    assert config == TINY
    np.testing.assert_array_equal(model(x).numpy(), loaded(x).numpy())


def test_config_json_is_xyz_for_people(tmp_path):
    config = FFNConfig(depth=3, features=4, fov_size=(9, 17, 15), deltas=(2, 4, 3), min_boundary_dist=(1, 2, 2))
    save_model(build_model(config), config, tmp_path / "m")
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    assert data["fov_size_xyz"] == [15, 17, 9]
    assert data["deltas_xyz"] == [3, 4, 2]
    assert load_config(tmp_path / "m") == config


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="fov_size"):
        FFNConfig(fov_size=(8, 9, 9))
    with pytest.raises(ConfigError, match="deltas"):
        FFNConfig(fov_size=(9, 9, 9), deltas=(5, 2, 2))
    with pytest.raises(ConfigError, match="move_threshold"):
        FFNConfig(move_threshold=1.5)
    with pytest.raises(ConfigError, match="unknown"):
        FFNConfig.from_json_dict({"depth": 2, "bogus": 1})


def test_resolve_model_path_name_and_error(tmp_path):
    save_model(build_model(TINY), TINY, tmp_path / "m")
    assert resolve_model(tmp_path / "m") == tmp_path / "m"
    for name in available_models():
        assert (resolve_model(name) / "config.json").is_file()
    with pytest.raises(ConnectomeError, match="no-such-model"):
        resolve_model("no-such-model")


def test_import_fib25_checkpoint_reproduces_reference_logits(shared_data, tmp_path):
    from ffn.checkpoint_import import import_checkpoint

    out = import_checkpoint(shared_data / CKPT, tmp_path / "fib25")
    model, config = load_model(out)
    assert (config.depth, config.features, config.fov_size, config.deltas) == (12, 32, (33, 33, 33), (8, 8, 8))
    assert config.metadata["global_step"] == 27_465_036
    ref = np.load(shared_data / "ffn_fib25_checkpoint" / "reference_io.npz")
    # build the input the way inference does: from the raw uint8 patch through the config's normalisation
    image = config.normalize(ref["raw_uint8"])[..., None]
    np.testing.assert_allclose(image, ref["image"], atol=1e-6)
    x = np.concatenate([image, ref["seed"]], axis=-1)
    logits = model.predict(x, batch_size=1, verbose=0)
    assert logits.shape == ref["logits"].shape
    assert np.abs(logits - ref["logits"]).max() <= 1e-3
    # the half-grown second seed must matter: the two patches' outputs differ from a fresh-seed run
    assert np.abs(ref["logits"][1] - ref["seed"][1]).max() > 0.5


JAX_REFERENCE = """
import sys
import numpy as np
from ffn.executor import Forward
from ffn.model import load_model
model, config = load_model(sys.argv[1])
ref = np.load(sys.argv[2])
x = np.concatenate([config.normalize(ref["raw_uint8"])[..., None], ref["seed"]], axis=-1).astype(np.float32)
print(float(np.abs(Forward(model, config)(x) - ref["logits"][..., 0]).max()))
"""


def test_jax_forward_reproduces_reference_logits(shared_data, tmp_path):
    """The JAX forward pass (GPU nodes without TensorFlow) on the imported FIB-25 model: google/ffn's logits."""
    from backend_fixtures import run_under_jax_without_tensorflow
    from ffn.checkpoint_import import import_checkpoint

    out = import_checkpoint(shared_data / CKPT, tmp_path / "fib25")
    ref = shared_data / "ffn_fib25_checkpoint" / "reference_io.npz"
    run = run_under_jax_without_tensorflow(JAX_REFERENCE, str(out), str(ref))
    assert float(run.stdout.split()[-1]) <= 1e-3


def test_import_ffn_cli(shared_data, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["import-ffn", str(shared_data / CKPT), str(tmp_path / "m")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["params"] == 638_433
    assert main(["import-ffn", str(tmp_path / "missing.ckpt"), str(tmp_path / "n")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
