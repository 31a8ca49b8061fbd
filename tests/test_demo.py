"""The demo end to end on a small volume: every stage runs, the store is filled, the summary is scored and JSON;
and the split of labelled segments into classifier-training and scored halves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def _packaged(path: str) -> bool:
    return (REPO / path / "config.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _packaged("ffn/models/synthetic_small"), reason="packaged FFN model missing")
def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--size", "32", "128", "128",
                           "--no-view", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("voi", "arand", "segments", "synapse_f1", "cell_type_accuracy", "seconds", "total_seconds"):
        assert key in summary, key
    # the demo must fit the stages together and score them; the figures' quality is the models' business
    # (benchmarks/ffn_quality.py, synapse_quality.py, segclr_quality.py)
    assert summary["segments"] > 5
    assert 0.0 < summary["voi"] < 20.0 and 0.0 <= summary["arand"] <= 1.0
    assert summary["synapses"] > 0 and summary["cell_type_accuracy"] is not None
    state = json.loads((out / "run" / "run_state.json").read_text())
    assert set(state["stages"]) == {"segment", "synapses", "skeletonize", "embed", "classify", "publish"}

    from storage import Connectome

    c = Connectome.open(str(out / "run" / "connectome.duckdb"))
    cells = c.cells()
    assert len(cells) == summary["segments"]
    assert cells["cell_type"].notna().any(), "classify should have written cell types"
    # every skeleton node knows its fragment, so a proofreading split can hand it to the right part
    missing = c.backend.query("SELECT count(*) AS n FROM skeleton_nodes WHERE fragment_id IS NULL")["n"].iloc[0]
    assert (out / "run" / "fragments" / "info").exists() and missing == 0
    assert (out / "run" / "segmentation" / "info").exists()
    assert (out / "run" / "synapses" / "info").exists()
    # a rerun finds every stage finished and changes nothing
    again = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--size", "32", "128", "128",
                            "--no-view", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stdout + again.stderr
    assert len(Connectome.open(str(out / "run" / "connectome.duckdb")).cells()) == len(cells)


def test_classifier_training_half_holds_every_cell_type_with_two_segments():
    from pipeline.demo import training_segments

    # mostly axons, as in a small demo run: a plain hash split can leave one half with axons only
    truth = pd.DataFrame({"segment_id": range(1, 24),
                          "cell_type": ["axon"] * 18 + ["glia"] * 2 + ["spiny_dendrite"] * 2 + ["smooth_dendrite"]})
    train = training_segments(truth)
    held_out = set(truth["segment_id"]) - train
    type_of = dict(zip(truth["segment_id"], truth["cell_type"]))
    assert {type_of[s] for s in train} == set(truth["cell_type"])  # a type with one segment goes to training
    assert {type_of[s] for s in held_out} == {"axon", "glia", "spiny_dendrite"}
    assert len(train) == 12 and training_segments(truth.iloc[::-1]) == train  # half of each type, order-free
