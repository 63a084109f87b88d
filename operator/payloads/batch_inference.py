"""Batch inference payload: ``python -m payloads.batch_inference --config /etc/llmops/job/job.json``.

Runs inside the RayJob that the operator renders for a BatchInference. It reads the input dataset, builds chat
messages per row, generates with ``ray.data.llm`` (vLLM engine), writes the output dataset, scores it against a
reference column when ``evaluation`` is set, and reports the result to the operator's ConfigMap (``report.py``).

Output is complete only when ``<output>/_SUCCESS`` exists: the marker is deleted first and written last, and
``Succeeded`` (with ``outputURI``) is reported only after it is written.

Test seam: ``main(..., processor_factory=...)``. The default factory is ``ray.data.llm.build_processor``; tests pass
a factory that replaces the GPU-only engine stages and keep everything else (reading, preprocess, postprocess,
writing, scoring, reporting) real.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from payloads import metrics, storage
from payloads.report import ReportError, ResultReporter, interval_from, rfc3339_now
from payloads.row_progress import RowProgress

logger = logging.getLogger("llmops.payloads.batch_inference")

SUCCESS_MARKER = "_SUCCESS"
GENERATED_TEXT = "generated_text"
# Columns the payload adds to every output row (the token counts come from the vLLM engine stage).
ADDED_COLUMNS = (GENERATED_TEXT, "num_input_tokens", "num_generated_tokens")
# Input columns are carried through ray.data.llm under private names, so an input column that happens to be called
# `prompt`, `messages`, `model`, ... cannot collide with the columns ray.data.llm's stages write.
CARRIED_COLUMN_PREFIX = "__llmops_in_"
DEFAULT_MAX_LORA_RANK = 64
RAY_DEFAULT_CONCURRENT_BATCHES = 8   # vLLMEngineProcessorConfig.max_concurrent_batches' default
IN_FLIGHT_PER_SEQUENCE_SLOT = 2
# spec.sampling (camelCase) -> vLLM SamplingParams.
SAMPLING_FIELDS = {
    "temperature": "temperature",
    "maxTokens": "max_tokens",
    "minTokens": "min_tokens",
    "topP": "top_p",
    "topK": "top_k",
    "minP": "min_p",
    "seed": "seed",
    "stop": "stop",
    "presencePenalty": "presence_penalty",
    "frequencyPenalty": "frequency_penalty",
    "repetitionPenalty": "repetition_penalty",
}

ProcessorFactory = Callable[[Any, Callable, Callable], Callable[[Any], Any]]


class PayloadError(Exception):
    """A failure whose message is written for the user (it goes to the ConfigMap as is)."""


# ---------------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Adapter:
    name: str
    uri: str


@dataclass(frozen=True)
class BatchInferenceSpec:
    name: str
    namespace: str
    model_source: str
    adapter: Optional[Adapter]
    input_uri: str
    input_format: str
    system_prompt: Optional[str]
    system_field: Optional[str]
    user_field: str
    sampling: Mapping[str, Any]  # vLLM names
    engine_kwargs: Mapping[str, Any]
    accelerator_type: Optional[str]
    concurrency: Union[int, Tuple[int, int]]
    batch_size: int
    output_uri: str
    output_format: str
    reference_field: Optional[str]
    metrics: Tuple[str, ...]


def _get(doc: Mapping[str, Any], path: str, required: bool = True) -> Any:
    value: Any = doc
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if required and value in (None, ""):
        raise PayloadError(f"job config has no spec.{path}")
    return value


def parse_spec(doc: Mapping[str, Any]) -> BatchInferenceSpec:
    """The operator-rendered job JSON as a typed spec; raises PayloadError naming the offending field."""
    for key in ("input", "output"):
        fmt = _get(doc, f"{key}.format")
        if fmt not in storage.FORMATS:
            raise PayloadError(f"spec.{key}.format is {fmt!r}; expected one of {', '.join(storage.FORMATS)}")
    system_prompt, system_field = _get(doc, "prompt.systemPrompt", False), _get(doc, "prompt.systemField", False)
    if system_prompt and system_field:
        raise PayloadError("spec.prompt.systemPrompt and spec.prompt.systemField are mutually exclusive")
    sampling_doc = doc.get("sampling") or {}
    unknown = sorted(set(sampling_doc) - set(SAMPLING_FIELDS))
    if unknown:
        raise PayloadError(f"spec.sampling has unknown fields {unknown}; known: {', '.join(SAMPLING_FIELDS)}")
    adapter_doc = _get(doc, "model.adapter", False)
    adapter = None
    if adapter_doc:
        adapter = Adapter(name=_get(doc, "model.adapter.name", False) or "", uri=_get(doc, "model.adapter.uri"))
    evaluation = doc.get("evaluation") or None
    reference_field, metric_names = None, ()
    if evaluation:
        reference_field = _get(doc, "evaluation.referenceField")
        metric_names = tuple(evaluation.get("metrics") or metrics.METRIC_NAMES)
        unknown = sorted(set(metric_names) - set(metrics.METRIC_NAMES))
        if unknown:
            raise PayloadError(
                f"spec.evaluation.metrics has unknown metrics {unknown}; known: {', '.join(metrics.METRIC_NAMES)}"
            )
    concurrency = doc.get("concurrency") or 1
    return BatchInferenceSpec(
        name=doc.get("name") or "",
        namespace=doc.get("namespace") or "",
        model_source=_get(doc, "model.source"),
        adapter=adapter,
        input_uri=_get(doc, "input.uri"),
        input_format=_get(doc, "input.format"),
        system_prompt=system_prompt or None,
        system_field=system_field or None,
        user_field=_get(doc, "prompt.userField"),
        sampling={SAMPLING_FIELDS[k]: v for k, v in sampling_doc.items() if v is not None},
        engine_kwargs=dict(doc.get("engineKwargs") or {}),
        accelerator_type=doc.get("acceleratorType") or None,
        concurrency=tuple(concurrency) if isinstance(concurrency, list) else concurrency,
        batch_size=doc.get("batchSize") or 16,
        output_uri=_get(doc, "output.uri"),
        output_format=_get(doc, "output.format"),
        reference_field=reference_field,
        metrics=metric_names,
    )


# ------------------------------------------------------------------------------------- pure config builders


def _local_model_source(source: str) -> str:
    return storage.local_path(source) if source.startswith("pvc://") else source


def lora_routing(spec: BatchInferenceSpec) -> Tuple[Optional[str], Optional[str]]:
    """(per-row ``model`` value, ``dynamic_lora_loading_path``) for the adapter; (None, None) without one.

    Ray 2.60's vLLM stage treats a row whose ``model`` differs from ``model_source`` as a LoRA request named
    ``model``, loaded from ``<dynamic_lora_loading_path>/<model>`` when that path is set, else from ``model``
    itself (a local directory); it refuses remote names. So an object-storage adapter becomes (last segment,
    parent prefix) and a pvc adapter becomes (local path, None).
    """
    if spec.adapter is None:
        return None, None
    try:
        location = storage.parse(spec.adapter.uri)
        if location.is_object_store:
            return location.name, location.parent.uri
        return storage.local_path(location), None
    except storage.StorageURIError as exc:
        raise PayloadError(f"spec.model.adapter.uri: {exc}") from exc


def engine_kwargs(spec: BatchInferenceSpec) -> Dict[str, Any]:
    kwargs = dict(spec.engine_kwargs)
    if spec.adapter is not None:
        kwargs["enable_lora"] = True
        kwargs.setdefault("max_lora_rank", DEFAULT_MAX_LORA_RANK)
        kwargs["max_loras"] = 1
    return kwargs


def max_concurrent_batches(engine: Mapping[str, Any], batch_size: int) -> int:
    """Batches the engine actor works on at once: enough rows in flight to keep the scheduler's every sequence slot
    busy, twice over, since a batch holds its slot until its longest row ends (Ray's own default is the floor)."""
    seqs = int(engine.get("max_num_seqs") or 0)
    return max(RAY_DEFAULT_CONCURRENT_BATCHES, math.ceil(IN_FLIGHT_PER_SEQUENCE_SLOT * seqs / batch_size))


def processor_config_kwargs(spec: BatchInferenceSpec) -> Dict[str, Any]:
    """Keyword arguments of ``ray.data.llm.vLLMEngineProcessorConfig`` (Ray 2.60 field names)."""
    _, lora_path = lora_routing(spec)
    engine = engine_kwargs(spec)
    kwargs: Dict[str, Any] = dict(
        model_source=_local_model_source(spec.model_source),
        engine_kwargs=engine,
        batch_size=spec.batch_size,
        max_concurrent_batches=max_concurrent_batches(engine, spec.batch_size),
        concurrency=spec.concurrency,
        accelerator_type=spec.accelerator_type,
        # Chat template and tokenization run in CPU stages, off the GPU actor. The engine already detokenizes
        # (SamplingParams.detokenize defaults to True), so a separate detokenize stage would only repeat that work.
        chat_template_stage=True,
        tokenize_stage=True,
        detokenize_stage=False,
    )
    if lora_path:
        kwargs["dynamic_lora_loading_path"] = lora_path
    return kwargs


def build_processor_config(spec: BatchInferenceSpec) -> Any:
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(**processor_config_kwargs(spec))


def default_processor_factory(config: Any, preprocess: Callable, postprocess: Callable) -> Callable[[Any], Any]:
    from ray.data.llm import build_processor

    return build_processor(config, preprocess=preprocess, postprocess=postprocess)


# ------------------------------------------------------------------------------------- row functions (in Ray)


def carried(column: str, columns: Sequence[str]) -> str:
    return f"{CARRIED_COLUMN_PREFIX}{list(columns).index(column)}"


class BuildRequest:
    """Preprocess: one input row -> chat messages, sampling params and the model (or LoRA) for that row."""

    def __init__(self, spec: BatchInferenceSpec, columns: Sequence[str]):
        self.user_column = carried(spec.user_field, columns)
        self.system_column = carried(spec.system_field, columns) if spec.system_field else None
        self.system_prompt = spec.system_prompt
        self.user_field, self.system_field = spec.user_field, spec.system_field
        self.sampling = dict(spec.sampling)
        row_model, _ = lora_routing(spec)
        # Always set `model`: equal to model_source it means "no LoRA" to the engine stage.
        self.model = row_model or _local_model_source(spec.model_source)

    def _value(self, row: Mapping[str, Any], column: str, field: str, spec_path: str) -> str:
        value = row.get(column)
        if value is None:
            raise PayloadError(f"an input row has no value for field {field!r} named by {spec_path}")
        return value if isinstance(value, str) else str(value)

    def __call__(self, row: Dict[str, Any]) -> Dict[str, Any]:
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        elif self.system_column:
            content = self._value(row, self.system_column, self.system_field, "spec.prompt.systemField")
            messages.append({"role": "system", "content": content})
        content = self._value(row, self.user_column, self.user_field, "spec.prompt.userField")
        messages.append({"role": "user", "content": content})
        return {"messages": messages, "sampling_params": dict(self.sampling), "model": self.model}


class CollectOutput:
    """Postprocess: the input row under its original column names plus the generated text and token counts."""

    def __init__(self, columns: Sequence[str]):
        self.columns = list(columns)

    def __call__(self, row: Dict[str, Any]) -> Dict[str, Any]:
        out = {name: row.get(f"{CARRIED_COLUMN_PREFIX}{i}") for i, name in enumerate(self.columns)}
        out[GENERATED_TEXT] = row.get(GENERATED_TEXT) or ""
        out["num_input_tokens"] = row.get("num_input_tokens")
        out["num_generated_tokens"] = row.get("num_generated_tokens")
        return out


# -------------------------------------------------------------------------------------------------- the run


def check_columns(spec: BatchInferenceSpec, columns: Sequence[str]) -> None:
    present = ", ".join(columns) or "(none)"
    named = [(spec.user_field, "spec.prompt.userField"), (spec.system_field, "spec.prompt.systemField")]
    named.append((spec.reference_field, "spec.evaluation.referenceField"))
    for field, spec_path in named:
        if field and field not in columns:
            raise PayloadError(f"input row has no field {field!r} named by {spec_path}; fields present: {present}")
    clashing = [c for c in columns if c in ADDED_COLUMNS]
    if clashing:
        raise PayloadError(
            f"input has column(s) {clashing} that the output adds ({', '.join(ADDED_COLUMNS)}); rename them"
        )


def check_locations(spec: BatchInferenceSpec) -> Tuple[storage.StorageURI, storage.StorageURI]:
    try:
        source = storage.parse(spec.input_uri)
    except storage.StorageURIError as exc:
        raise PayloadError(f"spec.input.uri: {exc}") from exc
    try:
        target = storage.parse(spec.output_uri)
    except storage.StorageURIError as exc:
        raise PayloadError(f"spec.output.uri: {exc}") from exc
    if not target.key:
        raise PayloadError(f"spec.output.uri {target} must name a directory below the bucket or claim root")
    if target.contains(source) or source.contains(target):
        raise PayloadError(
            f"spec.output.uri {target} and spec.input.uri {source} overlap; the output directory is replaced "
            "on every run, so it must be separate from the input"
        )
    return source, target


def _count_rows_and_missing(ds: Any, fields: Sequence[str]) -> Tuple[int, List[int]]:
    """One distributed pass: the number of rows and, per field, of rows where it is null."""

    def count(batch):
        out = {"rows": [batch.num_rows]}
        out.update({f"missing_{i}": [batch.column(field).null_count] for i, field in enumerate(fields)})
        return out

    names = ["rows"] + [f"missing_{i}" for i in range(len(fields))]
    sums = ds.select_columns(list(fields)).map_batches(count, batch_format="pyarrow").sum(names)
    if sums is None:  # no rows at all
        return 0, [0] * len(fields)
    return int(sums["sum(rows)"]), [int(sums[f"sum({n})"]) for n in names[1:]]


def read_input(spec: BatchInferenceSpec, source: storage.StorageURI) -> Tuple[Any, List[str], int]:
    """The input dataset, its columns and row count, after checking every field the prompt needs is there."""
    try:
        ds = storage.read_dataset(source, spec.input_format)
        columns = list(ds.schema().names)
    except Exception as exc:  # Ray and pyarrow raise many types for missing/unreadable/denied inputs.
        raise _unreadable(spec, source, exc) from exc
    check_columns(spec, columns)
    prompt_fields = [(f, p) for f, p in ((spec.user_field, "spec.prompt.userField"),
                                         (spec.system_field, "spec.prompt.systemField")) if f]
    try:
        total, missing = _count_rows_and_missing(ds, [f for f, _ in prompt_fields])
    except Exception as exc:
        raise _unreadable(spec, source, exc) from exc
    if total == 0:
        raise PayloadError(f"spec.input.uri {source} has no rows")
    for (field, spec_path), count in zip(prompt_fields, missing, strict=True):
        if count:
            raise PayloadError(f"{count} of {total} input rows have no value for field {field!r} named by {spec_path}")
    return ds, columns, total


def _unreadable(spec: BatchInferenceSpec, source: storage.StorageURI, exc: BaseException) -> PayloadError:
    return PayloadError(
        f"cannot read spec.input.uri {source} as {spec.input_format}: {type(exc).__name__}: {_first_line(exc)}"
    )


def score_output(spec: BatchInferenceSpec, target: storage.StorageURI) -> Dict[str, Any]:
    """Metrics over the output as written (read back, streamed through the driver)."""
    wanted = [GENERATED_TEXT] + ([spec.reference_field] if spec.reference_field else [])
    ds = storage.read_dataset(target, spec.output_format, columns=wanted)
    accumulator = metrics.MetricAccumulator()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=4096):
        predictions = batch.column(GENERATED_TEXT).to_pylist()
        if spec.reference_field:
            accumulator.add_all(zip(predictions, batch.column(spec.reference_field).to_pylist(), strict=True))
        else:
            accumulator.rows += len(predictions)
    if not spec.reference_field:
        return {"rows": accumulator.rows}
    return dict(accumulator.result(spec.metrics))


def run(spec: BatchInferenceSpec, reporter: ResultReporter, processor_factory: ProcessorFactory
        ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Generate, write and score; returns the metrics and the final progress."""
    import ray

    source, target = check_locations(spec)
    config = build_processor_config(spec)
    if not ray.is_initialized():
        ray.init()

    ds, columns, total = read_input(spec, source)
    generating = f"Generating for {total} input rows with {spec.model_source}."
    _report_progress(reporter, generating, 0, total)

    out_fs, out_path = storage.resolve(target)
    marker = f"{out_path}/{SUCCESS_MARKER}"
    storage.delete_file_if_exists(out_fs, marker)  # an older run's marker must not vouch for this run's files

    ds = ds.rename_columns({name: carried(name, columns) for name in columns})
    processor = processor_factory(config, BuildRequest(spec, columns), CollectOutput(columns))
    with RowProgress(total, lambda progress: reporter.running(generating, progress),
                     interval_from()) as progress:
        storage.write_dataset(progress.counted(processor(ds)), target, spec.output_format)
    done = progress.final()

    result = score_output(spec, target)
    marker_doc = {"rows": result["rows"], "metrics": result, "inputURI": source.uri, "completedAt": rfc3339_now()}
    storage.write_bytes(out_fs, marker, json.dumps(marker_doc, sort_keys=True).encode("utf-8"))
    # The scorer counts the rows written; the rate is the generation's, without the engine's start.
    return result, {**done, "rowsDone": result["rows"], "rowsTotal": result["rows"]}


def _report_progress(reporter: ResultReporter, message: str, done: int, total: int) -> None:
    try:
        # Clear what an earlier attempt may have left: a new run has no metrics and no complete output yet.
        reporter.running(message, {"rowsDone": done, "rowsTotal": total}, metrics=None, outputURI=None)
    except ReportError as exc:  # progress is best effort; the final report is not
        logger.warning("progress report failed: %s", exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


_PAYLOAD_ERROR_LINE = re.compile(r"^(?:\S+\.)?PayloadError: (.+)$", re.MULTILINE)
_EXCEPTION_LINE = re.compile(r"^((?:[A-Za-z_][\w.]*\.)?\w*(?:Error|Exception)\b.*: .+)$", re.MULTILINE)
_RAY_WRAPPERS = ("ray.exceptions.", "RayTaskError")


def failure_message(exc: BaseException) -> str:
    """The user-facing message for ``exc``: its PayloadError's message when there is one.

    A PayloadError raised in a Ray worker reaches the driver only as text inside Ray's error (the exception chain
    does not cross the process boundary), so the text is searched as well.
    """
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # Skip Ray's dual RayTaskError/PayloadError classes: their str() is a whole traceback.
        if isinstance(current, PayloadError) and not any(c.__name__ == "RayTaskError" for c in type(current).__mro__):
            return str(current)
        current = current.__cause__ or current.__context__
    text = str(exc)
    found = _PAYLOAD_ERROR_LINE.findall(text)
    if found:
        return found[-1].strip()
    # For a worker failure, name the worker's own exception rather than Ray's wrapper around it.
    causes = [c for c in _EXCEPTION_LINE.findall(text) if not c.startswith(_RAY_WRAPPERS)]
    return f"batch inference failed: {causes[-1] if causes else f'{type(exc).__name__}: {_first_line(exc)}'}"


def main(
    argv: Optional[Sequence[str]] = None,
    *,
    processor_factory: ProcessorFactory = default_processor_factory,
    reporter: Optional[ResultReporter] = None,
) -> int:
    """Exit status: 0 succeeded, 1 failed (a Failed report was attempted), 3 succeeded but unreported."""
    parser = argparse.ArgumentParser(prog="python -m payloads.batch_inference", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="path of the job JSON rendered by the operator")
    args = parser.parse_args(argv)
    reporter = reporter or ResultReporter.from_env()

    try:
        with open(args.config, encoding="utf-8") as handle:
            spec = parse_spec(json.load(handle))
        result, progress = run(spec, reporter, processor_factory)
    except Exception as exc:  # every failure must reach the operator as a Failed report
        message = failure_message(exc)
        logger.exception("%s", message)
        try:
            reporter.failed(message)
        except ReportError as report_exc:
            logger.error("could not report the failure: %s", report_exc)
        return 1

    rows = result["rows"]
    scored = ", ".join(f"{k}={v}" for k, v in result.items() if k != "rows")
    try:
        reporter.succeeded(
            f"Generated {rows} rows into {spec.output_uri}" + (f"; {scored}." if scored else "."),
            progress=progress,
            metrics=result,
            outputURI=spec.output_uri,
        )
    except ReportError as exc:
        logger.error("output is complete but the result could not be reported: %s", exc)
        return 3
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
