"""An OpenAI-compatible endpoint under a fixed number of concurrent streams, with the `openai` client."""

from __future__ import annotations

import asyncio
import time
from typing import Any


async def _run(base_url: str, model: str, prompts: list[list[dict]], concurrency: int, max_tokens: int
               ) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="none", timeout=120, max_retries=0)
    queue: asyncio.Queue = asyncio.Queue()
    for messages in prompts:
        queue.put_nowait(messages)
    tokens, errors = [], []

    async def stream() -> None:
        while not queue.empty():
            messages = queue.get_nowait()
            try:
                reply = await client.chat.completions.create(model=model, messages=messages, temperature=0.0,
                                                             max_tokens=max_tokens, extra_body={"ignore_eos": True})
                tokens.append(reply.usage.completion_tokens)
            except Exception as exc:  # counted, not fatal: the figure says how many failed
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

    start = time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    await client.close()
    return {"requests": len(prompts), "concurrency": concurrency, "failed": len(errors), "errors": errors[:3],
            "output_tokens": sum(tokens), "seconds": round(seconds, 2),
            "output_tokens_per_s": round(sum(tokens) / seconds, 1)}


def measure(base_url: str, model: str, prompts: list[list[dict]], concurrency: int, max_tokens: int
            ) -> dict[str, Any]:
    return asyncio.run(_run(base_url, model, prompts, concurrency, max_tokens))


def chat(base_url: str, model: str, messages: list[dict], max_tokens: int) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="none", timeout=120, max_retries=0)
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0.0, max_tokens=max_tokens)
    return reply.choices[0].message.content or ""


def models(base_url: str) -> list[str]:
    from openai import OpenAI

    return sorted(m.id for m in OpenAI(base_url=base_url, api_key="none", timeout=30).models.list().data)
