"""A second phantom renderer, independent of ``data.phantom``, that draws 112 um tiles with and without each
finding: its own tissue, vessel, calcium, thrombus and inflammation shapes and its own colour model. Trained on one
generator and tested on the other (leave-one-generator-out), a model shows whether it learned the findings or one
way of drawing them (issue 22; ``benchmarks/bench_transfer.py``).

    write_tile_set("alt_tiles", 800, seed=1)   # alt_tiles/tiles.csv: path, patient_id, one 0/1 column per finding

Modules: ``canvas`` (value noise, dye layers, cell stamps), ``tissue`` (background, vessel fields, findings),
``tiles`` (scenarios, one tile, the tile folder).
"""

from calciscope.data.tile_phantom.tiles import FINDINGS, SCENARIOS, render_tile, write_tile_set

__all__ = ["FINDINGS", "SCENARIOS", "render_tile", "write_tile_set"]
