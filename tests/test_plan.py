"""`connectome plan`: block counts, device-hours and bytes follow from the rates; bad input is one clear error."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.plan import OutputSize, Rates, StageRate, load_rates, plan
from storage.errors import ConfigError


def test_plan_arithmetic():
    rates = Rates([StageRate("segment", "gpu", 1000.0, scale=1, block_shape_zyx=(10, 100, 100)),
                   StageRate("mesh", "cpu", 500.0, scale=0, block_shape_zyx=(10, 100, 100))],
                  [OutputSize("segmentation", 0.5, scale=1)])
    p = plan((400, 400, 20), (8, 8, 40), rates, gpu_hour_price=2.0, cpu_hour_price=0.1)
    seg, mesh = p["stages"]
    assert seg["blocks"] == 2 * 2 * 2 and mesh["blocks"] == 2 * 4 * 4
    assert seg["device_hours"] == pytest.approx(400 * 400 * 20 / 4 / 1000 / 3600)
    assert mesh["device_hours"] == pytest.approx(400 * 400 * 20 / 500 / 3600)
    assert p["compute_cost"] == pytest.approx(seg["device_hours"] * 2.0 + mesh["device_hours"] * 0.1)
    assert p["outputs"][0]["bytes"] == pytest.approx(400 * 400 * 20 / 4 * 0.5)
    assert p["volume_mm3"] == pytest.approx(400 * 400 * 20 * 8 * 8 * 40 / 1e18)


def test_packaged_rates_and_cli_last_line_json(capsys):
    assert load_rates().stages
    assert main(["plan", "--shape", "625000", "625000", "60606", "--voxel-size", "4", "4", "33"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 12 < out["volume_mm3"] < 13 and out["gpu_hours"] > 1e6 and out["storage_bytes"] > 1e15


def test_bad_input(tmp_path, capsys):
    with pytest.raises(ConfigError, match="shape"):
        plan((0, 1, 1), (1, 1, 1), Rates())
    bad = tmp_path / "rates.json"
    bad.write_text('{"stages": [{"stage": "x", "device": "gpu", "voxels_per_s": 0}], "outputs": []}')
    assert main(["plan", "--shape", "1", "1", "1", "--voxel-size", "1", "1", "1", "--rates", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "voxels_per_s" in err[0] and str(bad) in err[0]
