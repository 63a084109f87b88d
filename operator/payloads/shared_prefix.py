"""Shared-prefix packing: the tokens every SFT sample starts with are carried once per packed row.

ViGGO's samples all begin with the chat template, the system prompt and the same ~130-token instruction: about
150 of their ~194 tokens. Packed the usual way, every sample carries that prefix and the GPU computes it again
for each one. Here a packed row is

    [ prefix | rest of sample 1 | rest of sample 2 | ... | padding ]

and each sample's tokens attend to the prefix and to their own earlier tokens, at the positions they would have
alone (the prefix at 0..P-1, each sample's rest from P on). Every logit is the one the sample gets on its own, so
the loss is the same and so are the gradients: the prefix's activations receive the sum of what each sample
sends back, which is what separate copies would have added up to. Exact up to rounding; the payload tests check
it on a model through LLaMA-Factory's own data path.

For LLaMA-Factory 0.9.4 with ``neat_packing`` (its 4-D attention mask, used with SDPA or eager attention). FA2
varlen attention cannot express a prefix shared by several sequences, so the operator turns this on only with
neat packing. ``install`` is a Ray worker setup hook: the FineTune's runtime environment names it
(``worker_process_setup_hook``), so it runs in every Ray Train worker before LLaMA-Factory builds its dataset and
swaps two functions of 0.9.4 (the driver checks that version before training):

* ``PackedSupervisedDatasetProcessor.preprocess_dataset`` packs as above when the samples of a preprocessing
  batch share at least ``MIN_SHARED_TOKENS`` prompt tokens (otherwise, or with images, videos or audio, it is
  LLaMA-Factory's own);
* ``prepare_4d_attention_mask`` also lets every token see the keys marked ``SHARED``; without such keys its mask
  is LLaMA-Factory's block-diagonal one.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger("llmops.payloads.shared_prefix")

IGNORE_INDEX = -100
SHARED = -1  # the attention-mask index of the shared prefix (samples are 1, 2, ...; padding is 0)
MIN_SHARED_TOKENS = 16
# Shared rows come in many lengths (ViGGO: 200 to 780 tokens); each new one costs the attention kernel's set-up
# (~0.1 s a step on an H100) and a compiled model's shape check. Padded to 64 there are ~10 instead of ~70, for ~4%
# more padded tokens in a step that waits on the host, not the GPU.
ROW_MULTIPLE = 64

Sample = Tuple[Sequence[int], Sequence[int]]  # input ids, labels


def shared_prefix_length(samples: Sequence[Sample]) -> int:
    """How many leading tokens all samples have in common, stopping at the first label token of any of them
    (the prefix is prompt only) and leaving every sample at least one token of its own."""
    if len(samples) < 2:
        return 0
    first = samples[0][0]
    limit = min(len(ids) for ids, _ in samples) - 1
    for ids, labels in samples:
        limit = min(limit, next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels)))
        n = 0
        while n < limit and ids[n] == first[n]:
            n += 1
        limit = n
    return max(limit, 0)


def pack(samples: Sequence[Sample], prefix_len: int, cutoff_len: int,
         knapsack: Callable[[List[int], int], List[List[int]]]) -> Dict[str, List[List[int]]]:
    """The rows LLaMA-Factory 0.9.4 packs (``knapsack`` is its ``greedy_knapsack`` over whole sample lengths, so
    each row holds the same samples and an optimizer step sees as many samples as without sharing), each carrying
    the prefix once. Rows are not padded here: ``pad_rows`` pads a micro-batch to its longest row."""
    prefix = list(samples[0][0][:prefix_len])
    by_length: Dict[int, List[int]] = defaultdict(list)
    for index, (ids, _) in enumerate(samples):
        by_length[len(ids)].append(index)
    rows: Dict[str, List[List[int]]] = defaultdict(list)
    for group in knapsack([len(ids) for ids, _ in samples], cutoff_len):
        input_ids, labels = list(prefix), [IGNORE_INDEX] * prefix_len
        attention, positions = [SHARED] * prefix_len, list(range(prefix_len))
        for segment, length in enumerate(group, start=1):
            ids, sample_labels = samples[by_length[length].pop()]
            input_ids += ids[prefix_len:]
            labels += sample_labels[prefix_len:]
            attention += [segment] * (length - prefix_len)
            positions += range(prefix_len, length)
        rows["input_ids"].append(input_ids)
        rows["labels"].append(labels)
        rows["attention_mask"].append(attention)
        rows["position_ids"].append(positions)
    return rows


def pad_rows(features: Sequence[Dict[str, Any]], pad_id: int, multiple: int) -> List[Dict[str, Any]]:
    """A micro-batch's rows padded on the right to its longest row (rounded up to ``multiple``): the collator
    pads input ids, the mask and labels itself, but not position ids."""
    longest = max(len(f["input_ids"]) for f in features)
    length = -(-longest // multiple) * multiple
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}
    return [{**f, **{key: list(f[key]) + [value] * (length - len(f[key])) for key, value in fill.items() if key in f}}
            for f in features]


def attention_mask_4d(indices: Any, dtype: Any) -> Any:
    """(batch, 1, n, n) additive mask from per-token indices: causal, within a sample, and onto the shared prefix;
    padding (index 0) is seen by no one. Without ``SHARED`` indices it equals LLaMA-Factory 0.9.4's mask."""
    import torch

    n = indices.size(1)
    keys, queries = indices.unsqueeze(1).unsqueeze(2), indices.unsqueeze(1).unsqueeze(3)
    causal = torch.tril(torch.ones((n, n), dtype=torch.bool, device=indices.device))
    allowed = ((keys == queries) | (keys == SHARED)) & (keys != 0) & causal
    return torch.where(allowed, torch.tensor(0, dtype=dtype, device=indices.device), torch.finfo(dtype).min)


# ---------------------------------------------------------------- LLaMA-Factory 0.9.4


def install() -> None:
    """Ray worker setup hook: packs LLaMA-Factory 0.9.4's SFT rows around the shared prefix in this process."""
    try:
        from llamafactory.data import collator
        from llamafactory.data.processor import supervised
    except ImportError as exc:  # a worker without LLaMA-Factory trains nothing: leave it as it is
        logger.warning("shared-prefix packing not installed: %s", exc)
        return
    processor, batcher = supervised.PackedSupervisedDatasetProcessor, collator.SFTDataCollatorWith4DAttentionMask
    if getattr(processor.preprocess_dataset, "shared_prefix", False):
        return
    stock_preprocess, stock_collate = processor.preprocess_dataset, batcher.__call__

    def preprocess_dataset(self: Any, examples: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
        if self.data_args.neat_packing:
            rows = _shared_rows(self, examples, supervised.greedy_knapsack)
            if rows is not None:
                return rows
        return stock_preprocess(self, examples)

    def collate(self: Any, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        if any(SHARED in f["attention_mask"] for f in features):
            if not self.block_diag_attn or self.attn_implementation == "flash_attention_2":
                raise RuntimeError("shared-prefix rows need neat packing's 4-D mask, but the model runs "
                                   f"{self.attn_implementation} attention: set training.attention to sdpa or eager")
            features = pad_rows(features, self.tokenizer.pad_token_id,
                                math.lcm(ROW_MULTIPLE, self.pad_to_multiple_of or 1))
        return stock_collate(self, features)

    preprocess_dataset.shared_prefix = True  # type: ignore[attr-defined]
    processor.preprocess_dataset, batcher.__call__ = preprocess_dataset, collate
    collator.prepare_4d_attention_mask = attention_mask_4d


def _shared_rows(processor: Any, examples: Dict[str, List[Any]], knapsack: Callable) -> Optional[Dict[str, Any]]:
    """Shared-prefix rows for one preprocessing batch, or None where LLaMA-Factory's own packing should run
    (media in the samples, or fewer than MIN_SHARED_TOKENS in common)."""
    media = ("images", "videos", "audios")
    if any(item for key in media for item in examples.get(f"_{key}", ())):
        return None
    cutoff_len, samples = processor.data_args.cutoff_len, []
    for i, (prompt, response) in enumerate(zip(examples["_prompt"], examples["_response"])):
        if len(prompt) % 2 != 1 or len(response) != 1:
            continue  # LLaMA-Factory drops these too (and says so when it packs them itself)
        ids, labels = processor._encode_data_example(
            prompt=prompt, response=response, system=examples["_system"][i], tools=examples["_tools"][i],
            images=[], videos=[], audios=[])
        if len(ids) <= cutoff_len:
            samples.append((ids, labels))
    prefix_len = shared_prefix_length(samples)
    if prefix_len < MIN_SHARED_TOKENS:
        return None
    rows = pack(samples, prefix_len, cutoff_len, knapsack)
    whole = sum(len(ids) for ids, _ in samples)
    packed = sum(len(ids) for ids in rows["input_ids"])
    logger.warning("shared-prefix packing: %d samples in %d rows, their first %d tokens carried once per row: "
                   "%d tokens instead of %d", len(samples), len(rows["input_ids"]), prefix_len, packed, whole)
    for key in media:
        rows[key] = [None] * len(rows["input_ids"])
    return dict(rows)
