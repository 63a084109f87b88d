"""A ViGGO-shaped task a LoRA adapter on a small random-weight model can learn, its tokenizer, its model.

The rows look like ViGGO's: an `instruction` (the system prompt), an `input` sentence about a video game and the
`output` meaning representation, `function(attribute[value], ...)`, built from ViGGO's own function names,
attributes and values (tests/payload_data/viggo_test.jsonl). Unlike the real sentences, each one says its function
with a fixed phrase and names each attribute with a fixed word before its value, in the order of the answer: the
mapping is fully determined by the sentence, so a few hundred LoRA steps on a random-weight base can learn it, and
exact match separates the adapter (it learned the mapping) from the base (it cannot know it).

The tokenizer is trained on the rows (every word one token) with Qwen's chat tokens and chat template; the model
is Qwen2's architecture, small, with random weights.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from llamafactory_bench.data import DEFAULT_SYSTEM, VIGGO, chat_tokenizer

FUNCTION_PHRASES = {
    "inform": "let me tell you that",
    "request": "could you find me",
    "give_opinion": "in my opinion",
    "confirm": "am I right that",
    "verify_attribute": "is it true that",
    "suggest": "you might like",
    "request_explanation": "why do you think",
    "recommend": "I recommend",
    "request_attribute": "what do you know about",
}
ATTRIBUTE_WORDS = {
    "name": "title", "exp_release_date": "expected", "release_year": "year", "developer": "studio",
    "esrb": "esrb", "rating": "rated", "genres": "genre", "player_perspective": "perspective",
    "has_multiplayer": "multiplayer", "platforms": "on", "available_on_steam": "steam",
    "has_linux_release": "linux", "has_mac_release": "mac", "specifier": "kind",
}
INSTRUCTION = ("Given a target sentence, construct the underlying meaning representation of the input sentence as a "
               "single function with attributes and attribute values.")
VALUES_PER_ATTRIBUTE = 12

# Small Qwen2 (tied embeddings as Qwen2.5's small models); the vocabulary is the tokenizer's.
MODEL_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256, "intermediate_size": 768,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "tie_word_embeddings": True, "hidden_act": "silu",
    "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True, "use_sliding_window": False,
    "torch_dtype": "bfloat16",
}


def _value_pools(seed: int) -> dict[str, list[str]]:
    rows = [json.loads(line) for line in VIGGO.read_text().splitlines() if line.strip()]
    pools: dict[str, set] = {attr: set() for attr in ATTRIBUTE_WORDS}
    for row in rows:
        for attr, values in re.findall(r"(\w+)\[([^\]]*)\]", row["output"]):
            if attr in pools:
                pools[attr].update(v for v in values.split(", ") if v)
    rng = random.Random(seed)
    return {attr: sorted(rng.sample(sorted(pool), min(len(pool), VALUES_PER_ATTRIBUTE))) or ["yes", "no"]
            for attr, pool in pools.items()}


def rows(n: int, seed: int) -> list[dict]:
    """n rows {instruction, input, output}; the same seed gives the same rows."""
    pools, rng, out = _value_pools(0), random.Random(seed), []
    for _ in range(n):
        function = rng.choice(sorted(FUNCTION_PHRASES))
        attributes = rng.sample(sorted(ATTRIBUTE_WORDS), rng.randint(1, 4))
        parts, words = [], [FUNCTION_PHRASES[function]]
        for attr in attributes:
            value = rng.choice(pools[attr])
            parts.append(f"{attr}[{value}]")
            words.append(f"{ATTRIBUTE_WORDS[attr]} {value}")
        out.append({"instruction": INSTRUCTION, "input": " ".join(words) + rng.choice(".?!"),
                    "output": f"{function}({', '.join(parts)})"})
    return out


def train_tokenizer(samples: list[dict]):
    """Byte-level BPE trained until every word of the rows is one token, with Qwen's chat tokens and template."""
    texts = ["system\n" + DEFAULT_SYSTEM, "\n", "assistant\n", "user\n"]
    texts += [t for s in samples for t in (f"system\n{s['instruction']}", f"user\n{s['input']}", s["output"])]
    return chat_tokenizer(texts, vocab_size=4096)


def build_model(folder: Path, tokenizer, seed: int = 0, shape: dict | None = None) -> dict:
    """Random weights (transformers' own init, seeded), saved with the tokenizer and a generation config."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{k: v for k, v in {**MODEL_CONFIG, **(shape or {})}.items()
                            if k not in ("architectures", "model_type")},
                         vocab_size=len(tokenizer), bos_token_id=None,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id).save_pretrained(folder)
    return {"params": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer)}


if __name__ == "__main__":
    # python -m dataplane.task <data dir> <model dir>: the tokenizer (trained on every split's text, as a real
    # model's tokenizer covers its users' words) and the random model, saved together; prints their sizes.
    import sys

    data_dir, model_dir = Path(sys.argv[1]), Path(sys.argv[2])
    every_row = [json.loads(line) for path in sorted(data_dir.glob("*.jsonl"))
                 for line in path.read_text().splitlines() if line.strip()]
    print(json.dumps(build_model(model_dir, train_tokenizer(every_row))))
