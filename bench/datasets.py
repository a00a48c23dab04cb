"""Where the benchmarks find the public data set they judge quality on.

Magnetic Tile Defect (Huang, Qiu and Yuan, "Surface defect saliency of magnetic tile", The Visual Computer,
2020; published at github.com/abin24/Magnetic-tile-defect-datasets.): photographs of magnetic tiles, good
and with blowholes, breaks, cracks, frays and uneven surfaces, with pixel masks. The benchmarks read it
arranged in MVTec AD's layout (`train/good`, `test/good`, `test/<kind>`, `ground_truth/<kind>`), from
the folder given with their data argument or, by default, from $MAGNETIC_TILE.
"""

from __future__ import annotations

import os
from pathlib import Path

ENVIRONMENT = "MAGNETIC_TILE"
HELP = (f"the Magnetic Tile Defect data set in MVTec AD's layout (default: ${ENVIRONMENT}); see bench/datasets.py")


def magnetic_tile() -> Path:
    """The data set's folder as configured ($MAGNETIC_TILE), or a relative `magnetic-tile` that says, when
    it is missing, which argument to give."""
    return Path(os.environ.get(ENVIRONMENT) or "magnetic-tile")
