"""Simulated figures are marked in status, beside the numbers `kubectl get` prints, and come from the reference run."""

import pytest

from llmops.api import BATCHINFERENCE, FINETUNE
from llmops.api.batchinference import BatchMetrics
from llmops.api.finetune import TrainMetrics
from llmops.dev.simulator import SIMULATED_EVAL_METRICS, SIMULATED_TRAIN_METRICS
from llmops.decide import batchinference, finetune


@pytest.mark.parametrize("handler, metrics", [(finetune, SIMULATED_TRAIN_METRICS),
                                              (batchinference, SIMULATED_EVAL_METRICS)])
def test_the_simulated_mark_reaches_status_and_nothing_else_sets_it(handler, metrics):
    marked = handler.result_fields({"metrics": {**metrics, "simulated": True}})["metrics"]
    assert marked.wire() == {**metrics, "simulated": True}
    assert handler.result_fields({"metrics": metrics})["metrics"].simulated is None
    assert handler.result_fields({"metrics": {**metrics, "simulated": "no"}})["metrics"].simulated is None


@pytest.mark.parametrize("model", [TrainMetrics, BatchMetrics])
def test_the_status_model_types_the_mark(model):
    assert model.model_validate({"simulated": True}).simulated is True
    assert model.model_json_schema()["properties"]["simulated"]["anyOf"][0] == {"type": "boolean"}


def test_kubectl_get_shows_the_mark_beside_the_numbers():
    bi = [c["name"] for c in BATCHINFERENCE.printer_columns if not c.get("priority")]
    assert bi[bi.index("Exact Match") + 1] == "Simulated"
    wide = {c["name"]: c.get("priority", 0) for c in FINETUNE.printer_columns}
    assert wide["Simulated"] == wide["Train Loss"]   # shown wherever the loss is shown


def test_default_figures_are_the_reference_runs_only():
    assert SIMULATED_EVAL_METRICS == {"rows": 1083, "exactMatch": round(745 / 1083, 3)}
    assert SIMULATED_TRAIN_METRICS == {"trainLoss": 0.2079, "evalLoss": 0.1362, "trainRuntimeSeconds": 437.3,
                                       "trainSamplesPerSecond": 11.434}
