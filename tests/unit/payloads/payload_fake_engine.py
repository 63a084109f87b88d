"""The one stand-in of the payload tests: a CPU stage in place of ray.data.llm's chat-template/tokenize/vLLM stages.

`FakeEngineFactory` is passed as `processor_factory` to `payloads.batch_inference.main`. It receives the real
`vLLMEngineProcessorConfig` and the payload's real preprocess/postprocess, and returns a real
`ray.data.llm.Processor` (so Ray's own preprocess/postprocess wrapping and stage plumbing run) whose only stage
answers from a table of canned generations keyed by the user message. It checks what the engine would be given:
the messages, the sampling params and the per-row `model` that selects the LoRA adapter.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional, Type

from ray.data.llm import Processor
from ray.llm._internal.batch.stages.base import StatefulStage, StatefulStageUDF


class FakeEngineUDF(StatefulStageUDF):
    def __init__(
        self,
        data_column: str,
        expected_input_keys: List[str],
        answers: Dict[str, str],
        expect_model: str,
        expect_sampling: Dict[str, Any],
        expect_system: Optional[str],
        delay_s: float = 0.0,
    ):
        super().__init__(data_column, expected_input_keys)
        self.delay_s = delay_s
        self.answers = answers
        self.expect_model = expect_model
        self.expect_sampling = expect_sampling
        self.expect_system = expect_system

    def _check(self, row: Dict[str, Any]) -> str:
        messages = list(row["messages"])
        roles = [m["role"] for m in messages]
        expected_roles = (["system"] if self.expect_system is not None else []) + ["user"]
        if roles != expected_roles:
            raise AssertionError(f"fake engine: roles {roles}, expected {expected_roles}")
        if self.expect_system is not None and messages[0]["content"] != self.expect_system:
            raise AssertionError(f"fake engine: system message {messages[0]['content'][:60]!r}...")
        if row["model"] != self.expect_model:
            raise AssertionError(f"fake engine: row model {row['model']!r}, expected {self.expect_model!r}")
        sampling = {k: v for k, v in dict(row["sampling_params"]).items() if v is not None}
        if sampling != self.expect_sampling:
            raise AssertionError(f"fake engine: sampling {sampling}, expected {self.expect_sampling}")
        user = messages[-1]["content"]
        if user not in self.answers:
            raise AssertionError(f"fake engine: no canned answer for {user[:60]!r}")
        return user

    async def udf(self, batch: List[Dict[str, Any]]) -> AsyncIterator[Dict[str, Any]]:
        await asyncio.sleep(self.delay_s)   # an engine's time per batch, for the progress reports
        for row in batch:
            user = self._check(row)
            answer = self.answers[user]
            yield {
                self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN],
                "prompt": f"<|user|>{user}<|assistant|>",
                "generated_text": answer,
                "num_input_tokens": len(user.split()),
                "num_generated_tokens": len(answer.split()),
            }


class FakeEngineStage(StatefulStage):
    fn: Type[StatefulStageUDF] = FakeEngineUDF

    def get_required_input_keys(self) -> Dict[str, str]:
        return {"messages": "chat messages", "sampling_params": "sampling params", "model": "model or LoRA"}


def load_answers(path: Path) -> Dict[str, str]:
    with open(path, encoding="utf-8") as handle:
        return {row["input"]: row["generated_text"] for row in map(json.loads, handle)}


class FakeEngineFactory:
    def __init__(self, answers: Dict[str, str], expect_model: str, expect_sampling: Dict[str, Any],
                 expect_system: Optional[str], delay_s: float = 0.0):
        self.kwargs = dict(answers=answers, expect_model=expect_model, expect_sampling=expect_sampling,
                           expect_system=expect_system, delay_s=delay_s)
        self.configs: List[Any] = []

    def __call__(self, config, preprocess, postprocess) -> Processor:
        self.configs.append(config)
        stage = FakeEngineStage(fn_constructor_kwargs=self.kwargs, map_batches_kwargs={"concurrency": 1})
        return Processor(config, [stage], preprocess=preprocess, postprocess=postprocess)
