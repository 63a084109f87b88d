"""ViGGO-shaped samples, the tokenizer trained on them, their token counts under LLaMA-Factory, the dataset files."""

from __future__ import annotations

import json
import random
import re
import shutil
import statistics
from pathlib import Path

from payloads.shared_prefix import IGNORE_INDEX

from . import REPO

VIGGO = REPO / "tests" / "payload_data" / "viggo_test.jsonl"

FUNCTIONS = ["inform", "request", "give_opinion", "confirm", "verify_attribute", "suggest", "request_explanation",
             "recommend", "request_attribute"]
ATTRIBUTES = ["name", "exp_release_date", "release_year", "developer", "esrb", "rating", "genres",
              "player_perspective", "has_multiplayer", "platforms", "available_on_steam", "has_linux_release",
              "has_mac_release", "specifier"]
# 127 tokens: with the qwen template's system turn and the user turn's header, a ~151-token shared prefix.
INSTRUCTION = ("Write the meaning of the sentence about a video game as one function call with attributes and "
               f"values. The function is one of {FUNCTIONS}; the attributes are from {ATTRIBUTES}.")
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # the qwen template's
INPUT_TOKENS, ANSWER_TOKENS = (10.0, 8.0), (20.5, 8.5)  # (mean, sd) targets, tuned to the counts above
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_CHAT_TEMPLATE = (  # Qwen2.5's template without tools
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def viggo_like_samples(n: int, seed: int) -> list[dict]:
    """Alpaca rows: the instruction, a sentence that names the answer's values among ViGGO words, the answer."""
    from tokenizers import pre_tokenizers

    def count(text: str) -> int:  # tokens of the tokenizer trained below: one per pre-token
        return len(pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text))

    rows = [json.loads(line) for line in VIGGO.read_text().splitlines() if line.strip()]
    pools: dict[str, set] = {attr: set() for attr in ATTRIBUTES}
    for row in rows:
        for attr, values in re.findall(r"(\w+)\[([^\]]*)\]", row["output"]):
            pools.setdefault(attr, set()).update(v for v in values.split(", ") if v)
    values_of = {attr: sorted(pools[attr]) or ["yes", "no"] for attr in ATTRIBUTES}
    fillers = sorted({w.lower() for row in rows for w in re.findall(r"[A-Za-z]+", row["input"])})
    rng, samples = random.Random(seed), []
    for _ in range(n):
        function, target = rng.choice(FUNCTIONS), max(4, round(rng.gauss(*ANSWER_TOKENS)))
        attributes, parts, named = rng.sample(ATTRIBUTES, len(ATTRIBUTES)), [], []
        while attributes and count(f"{function}({', '.join(parts)})") < target:
            attr = attributes.pop()
            values = rng.sample(values_of[attr], min(len(values_of[attr]), 1 + (rng.random() < 0.2)))
            parts.append(f"{attr}[{', '.join(values)}]")
            named += values
        words, length = list(named), max(3, round(rng.gauss(*INPUT_TOKENS)))
        while count(" ".join(words)) < length:
            words.insert(rng.randrange(len(words) + 1), rng.choice(fillers))
        sentence = " ".join(words)
        samples.append({"instruction": INSTRUCTION, "input": sentence[:1].upper() + sentence[1:] + rng.choice(".?!"),
                        "output": f"{function}({', '.join(parts)})"})
    return samples


def train_tokenizer(samples: list[dict]):
    """Byte-level BPE trained until every word of the samples is one token, with Qwen's chat tokens."""
    # What LLaMA-Factory encodes between the chat tokens: role headers, the system prompt, the turns.
    texts = ["system\n" + DEFAULT_SYSTEM, "\n", "assistant\n"]
    texts += [t for s in samples for t in (f"user\n{s['instruction']}\n{s['input']}", s["output"])]
    return chat_tokenizer(texts, vocab_size=8192)


def chat_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on texts, with Qwen's chat tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                        model_max_length=32768, padding_side="right")
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def measure_samples(tokenizer_dir: str, samples: list[dict], cutoff_len: int) -> dict:
    """Token counts as LLaMA-Factory's qwen template and SFT processor make them."""
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from payloads.shared_prefix import shared_prefix_length
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data_args = DataArguments(template="qwen", cutoff_len=cutoff_len)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    processor = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=None,
                                           data_args=data_args)
    n = len(samples)
    encoded = processor.preprocess_dataset({
        "_prompt": [[{"role": "user", "content": s["instruction"] + "\n" + s["input"]}] for s in samples],
        "_response": [[{"role": "assistant", "content": s["output"]}] for s in samples],
        "_system": [""] * n, "_tools": [""] * n, "_images": [None] * n, "_videos": [None] * n,
        "_audios": [None] * n})
    lengths = sorted(len(ids) for ids in encoded["input_ids"])
    labels = [sum(1 for x in ls if x != IGNORE_INDEX) for ls in encoded["labels"]]
    return {
        "samples": n,
        "mean_tokens": round(statistics.fmean(lengths), 1),
        "p5_p50_p95_tokens": [lengths[int(q * (n - 1))] for q in (0.05, 0.5, 0.95)],
        "mean_label_tokens": round(statistics.fmean(labels), 1),
        "shared_prefix_tokens": shared_prefix_length(list(zip(encoded["input_ids"], encoded["labels"]))),
        "tokenizer_size": len(tokenizer),
        "lengths": [len(ids) for ids in encoded["input_ids"]],  # in file order (max_samples takes the first)
    }


def write_dataset(samples: list[dict], dataset_info: dict, data_dir: Path) -> None:
    """The operator's dataset_info.json entry for `train`, pointed at a local folder holding the samples."""
    shutil.rmtree(data_dir, ignore_errors=True)
    (data_dir / "train").mkdir(parents=True)
    with open(data_dir / "train" / "train.jsonl", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    info = {"train": {**dataset_info["train"], "file_name": str(data_dir / "train")}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=2))
