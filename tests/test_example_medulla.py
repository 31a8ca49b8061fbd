"""examples/medulla: its config loads and names models that exist; `connectome import --box` (the crop it uses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from storage.volume import open_volume

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "medulla"


def test_medulla_run_config_loads_and_its_models_resolve():
    from ffn.model import resolve_model
    from pipeline.config import load_config
    from pipeline.run import RunConfig
    from pipeline.synapse_model import resolve_model as resolve_synapse_model

    config = load_config(EXAMPLE / "run.yaml", RunConfig)
    config.validate()
    assert config.stages == ["segment", "synapses", "publish"]
    assert config.cluster.workers == 2
    assert tuple(config.segment.block_shape) == (64, 128, 128)
    assert (resolve_model(config.segment.model) / "model.weights.h5").is_file()
    assert resolve_synapse_model(config.synapses.model).is_dir()
    readme = (EXAMPLE / "README.md").read_text()
    assert "connectome run examples/medulla/run.yaml" in readme and "--box 0 0 120 250 250 170" in readme


def test_import_box_keeps_source_coordinates(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    raw = np.random.default_rng(3).integers(0, 255, (10, 12, 14), dtype=np.uint8)
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f["raw"] = raw
    dst = tmp_path / "crop.zarr"
    rc = main(["import", f"{tmp_path}/in.h5:raw", str(dst), "--voxel-size", "10", "10", "10",
               "--box", "2", "1", "6", "14", "12", "10", "--offset", "2", "1", "6"])
    assert rc == 0
    vol = open_volume(str(dst))
    assert vol.shape == (4, 11, 12) and vol.voxel_offset == (2, 1, 6)
    np.testing.assert_array_equal(vol.read(vol.bounds), raw[6:10, 1:12, 2:14])
    capsys.readouterr()
    assert main(["import", f"{tmp_path}/in.h5:raw", str(tmp_path / "bad.zarr"), "--voxel-size", "10", "10", "10",
                 "--box", "0", "0", "0", "14", "12", "11"]) == 2
    assert "outside import source" in capsys.readouterr().err
