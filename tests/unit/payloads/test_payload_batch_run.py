"""End to end in a real local Ray (CPU): read -> preprocess -> [fake engine] -> postprocess -> write -> score -> report.

Only the GPU stage is replaced (see payload_fake_engine.py). Expected metrics are counted by hand in
tests/payload_data/README.md, not computed with payloads.metrics.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

pytest.importorskip("ray.data.llm", reason="the payload tests run in the Ray venv (.venv-ray)")

import pyarrow.csv  # noqa: E402
import pyarrow.json  # noqa: E402
import pyarrow.parquet  # noqa: E402
from payload_fake_engine import FakeEngineFactory, load_answers  # noqa: E402
from payload_testkit import PAYLOAD_DATA  # noqa: E402

from payloads import batch_inference as bi  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_session")

EXAMPLE = json.loads((PAYLOAD_DATA / "viggo_job.json").read_text())
ANSWERS = load_answers(PAYLOAD_DATA / "viggo_fake_predictions.jsonl")
SAMPLING = {"temperature": 0.0, "max_tokens": 256, "top_p": 1.0}
INSTRUCTION = json.loads((PAYLOAD_DATA / "viggo_test.jsonl").read_text().splitlines()[0])["instruction"]
EXPECTED_METRICS = {"exactMatch": 0.7, "functionNameAccuracy": 0.9, "attributeF1": 156 / 163, "rows": 20}


@pytest.fixture
def pvc(tmp_path, monkeypatch) -> Path:
    """The PVC mount root: pvc://data/... is tmp_path/pvc/data/..."""
    root = tmp_path / "pvc"
    (root / "data" / "viggo").mkdir(parents=True)
    monkeypatch.setenv("LLMOPS_PVC_ROOT", str(root))
    return root


def write_input(pvc: Path, fmt: str, rows=None) -> str:
    table = pyarrow.json.read_json(PAYLOAD_DATA / "viggo_test.jsonl")
    if rows is not None:
        table = pyarrow.Table.from_pylist(rows)
    path = pvc / "data" / "viggo" / f"test.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    elif fmt == "parquet":
        pyarrow.parquet.write_table(table, path)
    else:
        pyarrow.csv.write_csv(table, path)
    return f"pvc://data/viggo/test.{fmt}"


def make_job(tmp_path: Path, **changes) -> str:
    doc = copy.deepcopy(EXAMPLE)
    doc["output"]["uri"] = "pvc://data/eval-out"
    doc.update(changes)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(doc))
    return str(path)


def fake_engine(expect_model="viggo-lora", expect_system=EXAMPLE["prompt"]["systemPrompt"],
                delay_s=0.0) -> FakeEngineFactory:
    return FakeEngineFactory(ANSWERS, expect_model, SAMPLING, expect_system, delay_s)


def read_output(pvc: Path, fmt: str) -> list:
    out = pvc / "data" / "eval-out"
    files = sorted(p for p in out.iterdir() if p.name != bi.SUCCESS_MARKER)
    assert files, "no output files"
    if fmt == "jsonl":
        return [json.loads(line) for f in files for line in f.read_text().splitlines()]
    reader = pyarrow.parquet.read_table if fmt == "parquet" else pyarrow.csv.read_csv
    return pyarrow.concat_tables([reader(f) for f in files]).to_pylist()


def test_jsonl_eval_with_s3_adapter_reports_exact_metrics(tmp_path, pvc, reporter_env):
    api = reporter_env
    engine = fake_engine()
    job = make_job(tmp_path, input={"uri": write_input(pvc, "jsonl"), "format": "jsonl"})

    assert bi.main(["--config", job], processor_factory=engine) == 0

    # The engine stage got the LoRA setup of the real config.
    (config,) = engine.configs
    assert config.dynamic_lora_loading_path == "s3://bucket/adapters"
    assert config.engine_kwargs["enable_lora"] is True

    # Output: every input row under its own column names, plus the generation.
    rows = read_output(pvc, "jsonl")
    assert len(rows) == 20
    assert set(rows[0]) == {"instruction", "input", "output", "generated_text", "num_input_tokens",
                            "num_generated_tokens"}
    assert {r["input"]: r["generated_text"] for r in rows} == ANSWERS
    marker = json.loads((pvc / "data" / "eval-out" / bi.SUCCESS_MARKER).read_text())
    assert marker["rows"] == 20 and marker["inputURI"] == "pvc://data/viggo/test.jsonl"

    # Reports: Running (clearing stale results) first, Succeeded with exact metrics last.
    first, last = api.patches[0], api.patches[-1]
    assert first["state"] == "Running"
    assert json.loads(first["progress"]) == {"rowsDone": 0, "rowsTotal": 20}
    assert first["metrics"] is None and first["outputURI"] is None
    assert last["state"] == "Succeeded"
    assert last["outputURI"] == "pvc://data/eval-out"
    assert json.loads(last["metrics"]) == pytest.approx(EXPECTED_METRICS, abs=1e-6)
    assert {k: v for k, v in json.loads(last["progress"]).items() if k != "rowsPerSecond"} == {
        "rowsDone": 20, "rowsTotal": 20}
    assert last["message"].startswith("Generated 20 rows into pvc://data/eval-out; exactMatch=0.7")
    assert api.data["state"] == "Succeeded"
    assert all(v is None or isinstance(v, str) for p in api.patches for v in p.values())


def test_progress_is_reported_while_rows_are_generated(tmp_path, pvc, reporter_env, monkeypatch):
    """A slow engine, small batches and a short interval: reports between the first and the last show rows done
    so far, and the rate of generation once more than one block has come out of the engine."""
    api = reporter_env
    monkeypatch.setenv("LLMOPS_PROGRESS_INTERVAL_S", "0.2")
    job = make_job(tmp_path, input={"uri": write_input(pvc, "jsonl"), "format": "jsonl"}, batchSize=2)

    assert bi.main(["--config", job], processor_factory=fake_engine(delay_s=0.3)) == 0

    progress = [json.loads(p["progress"]) for p in api.patches if p.get("progress")]
    done = [p["rowsDone"] for p in progress]
    assert done == sorted(done) and any(0 < n < 20 for n in done), progress
    assert all(p["rowsTotal"] == 20 for p in progress)
    assert all(p["state"] == "Running" for p in api.patches[:-1])
    assert 0 < progress[-1]["rowsPerSecond"] < 20 / 0.3, progress[-1]   # at most a batch per delay, here
    assert json.loads(api.patches[-1]["metrics"]) == pytest.approx(EXPECTED_METRICS, abs=1e-6)


@pytest.mark.parametrize("input_format, output_format", [("parquet", "csv"), ("csv", "parquet")])
def test_other_formats_give_the_same_metrics(tmp_path, pvc, reporter_env, input_format, output_format):
    job = make_job(
        tmp_path,
        input={"uri": write_input(pvc, input_format), "format": input_format},
        output={"uri": "pvc://data/eval-out", "format": output_format},
    )
    assert bi.main(["--config", job], processor_factory=fake_engine()) == 0
    assert json.loads(reporter_env.data["metrics"]) == pytest.approx(EXPECTED_METRICS, abs=1e-6)
    rows = read_output(pvc, output_format)
    assert {r["input"]: r["generated_text"] for r in rows} == ANSWERS


def test_pvc_adapter_system_field_and_no_evaluation(tmp_path, pvc, reporter_env):
    job = make_job(
        tmp_path,
        model={"source": "Qwen/Qwen2.5-7B-Instruct", "adapter": {"name": "viggo-lora", "uri": "pvc://ckpt/viggo"}},
        input={"uri": write_input(pvc, "jsonl"), "format": "jsonl"},
        prompt={"systemPrompt": None, "systemField": "instruction", "userField": "input"},
        evaluation=None,
    )
    engine = fake_engine(expect_model=str(pvc / "ckpt" / "viggo"), expect_system=INSTRUCTION)
    assert bi.main(["--config", job], processor_factory=engine) == 0
    assert engine.configs[0].dynamic_lora_loading_path is None
    assert json.loads(reporter_env.data["metrics"]) == {"rows": 20}
    assert reporter_env.data["message"] == "Generated 20 rows into pvc://data/eval-out."


def test_missing_user_field_fails_before_inference(tmp_path, pvc, reporter_env):
    engine = fake_engine()
    job = make_job(
        tmp_path,
        input={"uri": write_input(pvc, "jsonl"), "format": "jsonl"},
        prompt={"systemPrompt": "s", "systemField": None, "userField": "text"},
    )
    assert bi.main(["--config", job], processor_factory=engine) == 1
    assert engine.configs == []
    assert reporter_env.data["state"] == "Failed"
    assert reporter_env.data["message"] == (
        "input row has no field 'text' named by spec.prompt.userField; fields present: instruction, input, output"
    )
    assert not (pvc / "data" / "eval-out" / bi.SUCCESS_MARKER).exists()
    assert "outputURI" not in reporter_env.data


def test_missing_reference_field_fails(tmp_path, pvc, reporter_env):
    job = make_job(
        tmp_path,
        input={"uri": write_input(pvc, "jsonl"), "format": "jsonl"},
        evaluation={"referenceField": "meaning_representation", "metrics": ["exactMatch"]},
    )
    assert bi.main(["--config", job], processor_factory=fake_engine()) == 1
    assert reporter_env.data["message"].startswith(
        "input row has no field 'meaning_representation' named by spec.evaluation.referenceField"
    )


def test_unreadable_input_fails_with_the_uri_named(tmp_path, pvc, reporter_env):
    job = make_job(tmp_path, input={"uri": "pvc://data/viggo/missing.jsonl", "format": "jsonl"})
    assert bi.main(["--config", job], processor_factory=fake_engine()) == 1
    assert reporter_env.data["state"] == "Failed"
    assert reporter_env.data["message"].startswith("cannot read spec.input.uri pvc://data/viggo/missing.jsonl as jsonl")
    assert not (pvc / "data" / "eval-out").exists()


def test_rows_without_the_user_field_fail_before_inference(tmp_path, pvc, reporter_env):
    rows = [json.loads(line) for line in (PAYLOAD_DATA / "viggo_test.jsonl").read_text().splitlines()]
    rows[11]["input"] = None
    engine = fake_engine()
    job = make_job(tmp_path, input={"uri": write_input(pvc, "jsonl", rows), "format": "jsonl"})

    assert bi.main(["--config", job], processor_factory=engine) == 1

    assert engine.configs == []
    assert [p["state"] for p in reporter_env.patches] == ["Failed"]
    assert reporter_env.data["message"] == (
        "1 of 20 input rows have no value for field 'input' named by spec.prompt.userField"
    )


def test_engine_failure_mid_run_leaves_no_success_marker(tmp_path, pvc, reporter_env):
    rows = [json.loads(line) for line in (PAYLOAD_DATA / "viggo_test.jsonl").read_text().splitlines()]
    rows[11]["input"] = "A sentence the fake engine has no answer for."
    out = pvc / "data" / "eval-out"
    out.mkdir()
    (out / bi.SUCCESS_MARKER).write_text("{}")  # from an earlier, complete run
    job = make_job(tmp_path, input={"uri": write_input(pvc, "jsonl", rows), "format": "jsonl"})
    engine = fake_engine()
    marker_when_built = []

    def factory(config, preprocess, postprocess):
        marker_when_built.append((out / bi.SUCCESS_MARKER).exists())
        return engine(config, preprocess, postprocess)

    assert bi.main(["--config", job], processor_factory=factory) == 1

    # The old marker is gone before the pipeline runs, not only once Ray starts replacing the directory.
    assert marker_when_built == [False]
    assert not (out / bi.SUCCESS_MARKER).exists()
    assert [p["state"] for p in reporter_env.patches] == ["Running", "Failed"]
    assert reporter_env.data["message"] == (
        "batch inference failed: AssertionError: fake engine: no canned answer for "
        "'A sentence the fake engine has no answer for.'"
    )
    assert "outputURI" not in reporter_env.data


def test_output_complete_but_unreported_exits_3(tmp_path, pvc, reporter_env):
    reporter_env.token = "a-different-token"  # every patch is refused with 401, which is not retried
    job = make_job(tmp_path, input={"uri": write_input(pvc, "jsonl"), "format": "jsonl"})
    assert bi.main(["--config", job], processor_factory=fake_engine()) == 3
    assert (pvc / "data" / "eval-out" / bi.SUCCESS_MARKER).exists()
    assert [r["status"] for r in reporter_env.requests] == [401, 401]
