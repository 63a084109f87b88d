"""The parts of bench/llamafactory_run.py: data, model, configs, the training process and its measurements, report.

The repository's operator/ is put on the path here: the recipes are rendered by the operator's own
`llmops.builders.finetune`, and the samples are measured with the payload's `payloads.shared_prefix`.
"""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "operator"
# The child processes (`_build`, `_train`) run the entry script again, as `llamafactory-cli train` would be run.
SCRIPT = REPO / "bench" / "llamafactory_run.py"

sys.path.insert(0, os.fspath(OPERATOR))
