"""Synthetic serial-section EM neuropil with ground truth, generated blockwise and deterministically.

    from pipeline.synthetic import SynthParams, generate_box
    vols = generate_box(SynthParams(seed=1, shape_zyx=(64, 128, 128)), ((0, 0, 0), (64, 128, 128)))
    vols["raw"], vols["gt"], vols["compartments"], vols["clefts"]

See params.py (what can be changed), morphology.py (cell types), labels.py (why segments stay connected),
synapses.py, render.py (EM look) and generate.py (the box function). `generate_block` also returns table rows.
"""

from pipeline.synthetic.generate import SYNAPSE_COLUMNS, SynthBlock, generate_block, generate_box, merge_tables
from pipeline.synthetic.params import CELL_TYPES, COMPARTMENTS, SynthParams

__all__ = ["CELL_TYPES", "COMPARTMENTS", "SYNAPSE_COLUMNS", "SynthBlock", "SynthParams", "generate_block",
           "generate_box", "merge_tables"]
