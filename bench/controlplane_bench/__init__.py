"""The parts of bench/controlplane.py: measurements, the plane and its inputs, the phases of a run, the report.

The repository's operator/ and tests/ are put on the path here: the bench drives the operator's own code and the
integration harness's operator process.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "tests")]
