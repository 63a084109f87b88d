"""The parts of bench/training_recipe.py: data, model, training steps and measurements, runs and reports.

The repository's operator/ is put on the path here: the bench derives its recipes from the operator's own
`llmops.builders.recipe` and builds shared-prefix rows with the payload's `payloads.shared_prefix`.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "operator"))
