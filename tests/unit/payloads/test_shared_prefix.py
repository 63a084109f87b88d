"""Shared-prefix packing (payloads/shared_prefix.py): the rows it builds, the mask it gives them, and (with the real
LLaMA-Factory 0.9.4) that a model trained on its rows gets the loss and the gradients of the samples alone."""

from __future__ import annotations

import json

import pytest
import torch

from payload_testkit import PAYLOAD_DATA, make_tiny_qwen
from payloads import shared_prefix
from payloads.shared_prefix import IGNORE_INDEX, SHARED, attention_mask_4d, pack, pad_rows, shared_prefix_length

PREFIX = [5, 6, 7, 8]


def sample(own: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
    ids = PREFIX + own + answer
    return ids, [IGNORE_INDEX] * (len(PREFIX) + len(own)) + answer


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    for length in sorted(lengths, reverse=True):
        row = next((r for r in rows if sum(r) + length <= capacity), None)
        row.append(length) if row is not None else rows.append([length])
    return rows


def test_the_prefix_is_what_every_sample_starts_with_and_stops_before_any_label():
    samples = [sample([1, 2], [30, 31]), sample([1, 3], [32]), sample([4], [33, 34])]
    assert shared_prefix_length(samples) == len(PREFIX)
    # Two samples alike up to their answers: the prefix still ends where the first label starts.
    assert shared_prefix_length([sample([1, 2], [30]), sample([1, 2], [30])]) == len(PREFIX) + 2
    # Every sample keeps at least one token of its own.
    assert shared_prefix_length([(PREFIX, [IGNORE_INDEX] * 4), (PREFIX + [9], [IGNORE_INDEX] * 5)]) == 3
    assert shared_prefix_length([sample([1], [30]), ([9] + PREFIX, [IGNORE_INDEX] * 5)]) == 0
    assert shared_prefix_length([sample([1], [30])]) == 0  # nothing to share with


def test_rows_hold_the_samples_the_unshared_packing_would_with_the_prefix_once():
    samples = [sample([1, 2], [30, 31]), sample([1, 3], [32]), sample([4], [33, 34]), sample([9] * 8, [35])]
    rows = pack(samples, len(PREFIX), 16, first_fit)
    # Grouped by whole lengths (8 + 7 fit 16, then 14): as many samples per row as without sharing.
    assert [sum(1 for i in set(m) if i > 0) for m in rows["attention_mask"]] == [1, 2, 1]
    rebuilt = []
    for ids, labels, mask, positions in zip(rows["input_ids"], rows["labels"], rows["attention_mask"],
                                            rows["position_ids"]):
        assert ids[:4] == PREFIX and mask[:4] == [SHARED] * 4 and positions[:4] == [0, 1, 2, 3]
        assert labels[:4] == [IGNORE_INDEX] * 4
        for segment in sorted(set(mask) - {SHARED}):
            at = [i for i, m in enumerate(mask) if m == segment]
            assert [positions[i] for i in at] == list(range(4, 4 + len(at)))  # as if the sample were alone
            rebuilt.append((PREFIX + [ids[i] for i in at], [IGNORE_INDEX] * 4 + [labels[i] for i in at]))
    assert sorted(rebuilt) == sorted(samples)


def test_the_mask_lets_each_sample_see_the_prefix_and_itself_only():
    indices = torch.tensor([[SHARED, SHARED, 1, 1, 2, 2, 0]])
    mask = attention_mask_4d(indices, torch.float32)[0, 0] == 0
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 0, 0],  # padding attends to the prefix: harmless, it has no label
    ]


def test_without_a_shared_prefix_the_mask_is_block_diagonal_and_causal():
    indices = torch.tensor([[1, 1, 2, 2, 2, 0]])
    mask = (attention_mask_4d(indices, torch.bfloat16)[0, 0] == 0).int()
    expected = torch.zeros(6, 6, dtype=torch.int)
    for lo, hi in ((0, 2), (2, 5)):
        expected[lo:hi, lo:hi] = torch.tril(torch.ones(hi - lo, hi - lo, dtype=torch.int))
    assert torch.equal(mask, expected)
    assert attention_mask_4d(indices, torch.bfloat16).dtype == torch.bfloat16


def test_a_micro_batch_is_padded_to_its_longest_row_position_ids_too():
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "attention_mask": [SHARED, 1, 1],
             "position_ids": [0, 1, 2], "images": None},
            {"input_ids": [1], "labels": [-100], "attention_mask": [SHARED], "position_ids": [0], "images": None}]
    padded = pad_rows(rows, pad_id=0, multiple=4)
    assert padded[1] == {"input_ids": [1, 0, 0, 0], "labels": [-100] * 4, "attention_mask": [SHARED, 0, 0, 0],
                         "position_ids": [0, 0, 0, 0], "images": None}
    assert {len(f[k]) for f in padded for k in ("input_ids", "labels", "attention_mask", "position_ids")} == {4}
    assert rows[1]["input_ids"] == [1]  # the dataset's rows are left as they are


# ---------------------------------------------------------------- the real LLaMA-Factory 0.9.4

def viggo_examples(n: int) -> dict:
    rows = [json.loads(line) for line in (PAYLOAD_DATA / "viggo_test.jsonl").read_text().splitlines()][:n]
    return {"_prompt": [[{"role": "user", "content": r["instruction"] + "\n" + r["input"]}] for r in rows],
            "_response": [[{"role": "assistant", "content": r["output"]}] for r in rows],
            "_system": [""] * n, "_tools": [""] * n, "_images": [None] * n, "_videos": [None] * n,
            "_audios": [None] * n}


def summed_loss(model, input_ids, labels, **inputs):
    logits = model(input_ids=input_ids, **inputs).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.llamafactory
def test_llamafactory_094_trains_on_shared_rows_as_on_the_samples_alone(tmp_path):
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask
    from llamafactory.data.processor.supervised import PackedSupervisedDatasetProcessor, SupervisedDatasetProcessor
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tiny_qwen(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    data_args = DataArguments(template="qwen", cutoff_len=1024, packing=True, neat_packing=True)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    parts = {"template": template, "tokenizer": tokenizer, "processor": None, "data_args": data_args}
    examples = viggo_examples(20)
    alone = SupervisedDatasetProcessor(**parts).preprocess_dataset(examples)
    stock = PackedSupervisedDatasetProcessor(**parts).preprocess_dataset(examples)
    assert SHARED not in {i for m in stock["attention_mask"] for i in m}

    shared_prefix.install()
    shared_prefix.install()  # a second call changes nothing
    rows = PackedSupervisedDatasetProcessor(**parts).preprocess_dataset(examples)
    prefix_len = rows["attention_mask"][0].count(SHARED)
    assert prefix_len >= shared_prefix.MIN_SHARED_TOKENS
    assert len(rows["input_ids"]) == len(stock["input_ids"]) > 1  # the same rows...
    tokens = sum(map(len, rows["input_ids"]))
    assert tokens < sum(map(len, alone["input_ids"])) - (len(alone["input_ids"]) - len(rows["input_ids"])) * (
        prefix_len - 1)  # ...with the prefix once per row
    # Each row holds the very samples LLaMA-Factory's own packing puts in it.
    def samples_in(row_ids, mask, skip):
        return sorted(tuple(row_ids[:skip] + [t for t, m in zip(row_ids, mask) if m == s])
                      for s in set(mask) - {0, SHARED})
    for i in range(len(rows["input_ids"])):
        assert samples_in(rows["input_ids"][i], rows["attention_mask"][i], prefix_len) == \
            samples_in(stock["input_ids"][i], stock["attention_mask"][i], 0)

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="sdpa",
                                                 torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             init_lora_weights=False))
    collator = SFTDataCollatorWith4DAttentionMask(
        template=template, tokenizer=tokenizer, model=model, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX,
        block_diag_attn=True, attn_implementation="sdpa", compute_dtype=torch.float32)
    keys = ("input_ids", "attention_mask", "position_ids", "labels", "images", "videos", "audios")
    flash = SFTDataCollatorWith4DAttentionMask(
        template=template, tokenizer=tokenizer, model=model, pad_to_multiple_of=8, label_pad_token_id=IGNORE_INDEX,
        block_diag_attn=True, attn_implementation="flash_attention_2", compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="set training.attention to sdpa or eager"):
        flash([{k: rows[k][0] for k in keys}])  # FA2 would take the prefix for a sample of its own: refused
    batch = collator([{k: rows[k][i] for k in keys} for i in (0, 1)])  # rows of unequal length, one micro-batch
    assert batch["attention_mask"].dim() == 4 and batch["position_ids"][0, :prefix_len].tolist() == \
        list(range(prefix_len))

    def lora_grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    packed_loss = summed_loss(model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"])
    packed_grads = lora_grads(packed_loss)
    in_rows = {tuple(t) for i in (0, 1) for t in samples_in(rows["input_ids"][i], rows["attention_mask"][i],
                                                           prefix_len)}
    singles = [(ids, labels) for ids, labels in zip(alone["input_ids"], alone["labels"]) if tuple(ids) in in_rows]
    assert len(singles) == sum(len(set(rows["attention_mask"][i]) - {0, SHARED}) for i in (0, 1)) > 2
    alone_loss = sum(summed_loss(model, torch.tensor([ids]), torch.tensor([labels])) for ids, labels in singles)
    alone_grads = lora_grads(alone_loss)
    assert packed_loss.item() == pytest.approx(alone_loss.item(), rel=1e-5)
    assert packed_grads.keys() == alone_grads.keys() and len(packed_grads) > 0
    for name, grad in packed_grads.items():  # float32 sums taken in another order: equal to ~1e-7 of the norm
        assert (grad - alone_grads[name]).norm() <= 1e-5 * alone_grads[name].norm(), name
