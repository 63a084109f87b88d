"""Synthetic ViGGO-shaped samples and the micro-batches the recipes feed the model."""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np
import torch

from payloads import shared_prefix


GIB = 2**30
IGNORE = -100
PAD_ID = 151643  # <|endoftext|>
IM_START, IM_END, NEWLINE = 151644, 151645, 198
ROLE = {"system": 8948, "user": 872, "assistant": 77091}


# --------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


class ViggoLikeTask:
    """ViGGO-shaped samples whose answers a LoRA adapter can learn from random base weights."""

    SYSTEM_LEN = 127
    PREFIX_LEN = 3 + SYSTEM_LEN + 2 + 3  # what every sample starts with: the system turn and the user turn's header
    N_ATTRIBUTES = 256

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.system = rng.integers(1000, 100_000, size=self.SYSTEM_LEN).tolist()
        self.words = rng.choice(np.arange(1000, 100_000), size=4000, replace=False)
        self.functions = rng.choice(np.arange(100_000, 101_000), size=9, replace=False).tolist()
        self.attributes = rng.choice(np.arange(101_000, 140_000), size=self.N_ATTRIBUTES, replace=False).tolist()
        self.successor = rng.permutation(self.N_ATTRIBUTES).tolist()

    def sample(self, rng: np.random.Generator) -> Sample:
        n_input = int(np.clip(round(rng.normal(28, 9)), 6, 70))
        n_answer = int(np.clip(round(rng.normal(26, 8)), 6, 64))
        prompt = (
            [IM_START, ROLE["system"], NEWLINE] + self.system + [IM_END, NEWLINE]
            + [IM_START, ROLE["user"], NEWLINE] + rng.choice(self.words, size=n_input).tolist() + [IM_END, NEWLINE]
            + [IM_START, ROLE["assistant"], NEWLINE]
        )
        answer = [self.functions[int(rng.integers(len(self.functions)))]]
        index = int(rng.integers(self.N_ATTRIBUTES))
        for _ in range(n_answer - 2):
            answer.append(self.attributes[index])
            index = self.successor[index]
        answer.append(IM_END)
        return Sample(prompt + answer, [IGNORE] * len(prompt) + answer)

    def stream(self, seed: int, n: int) -> list[Sample]:
        rng = np.random.default_rng(seed)
        return [self.sample(rng) for _ in range(n)]


def greedy_pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices per row: each row repeatedly takes the longest remaining sample that still fits."""
    pool = sorted(range(len(lengths)), key=lambda i: lengths[i])
    pool_lengths = [lengths[i] for i in pool]
    rows = []
    while pool:
        row, room = [], capacity
        while pool:
            pos = bisect.bisect_right(pool_lengths, room) - 1
            if pos < 0:
                break
            room -= pool_lengths.pop(pos)
            row.append(pool.pop(pos))
        if not row:
            raise ValueError(f"a sample is longer than the row capacity {capacity}")
        rows.append(row)
    return rows


@dataclasses.dataclass
class MicroBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    max_seqlen: int
    n_samples: int
    n_tokens: int  # real (non-pad) tokens
    n_labels: int  # label tokens after the one-token shift

    @property
    def n_slots(self) -> int:
        return self.input_ids.numel()


def _segments_from_positions(position_ids: np.ndarray) -> tuple[torch.Tensor, int]:
    flat = position_ids.reshape(-1)
    starts = np.flatnonzero(flat == 0).tolist() + [flat.size]
    lengths = np.diff(starts)
    return torch.tensor(starts, dtype=torch.int32, device="cuda"), int(lengths.max())


def packed_microbatch(rows: list[list[Sample]], row_len: int) -> MicroBatch:
    ids = np.full((len(rows), row_len), PAD_ID, dtype=np.int64)
    labels = np.full((len(rows), row_len), IGNORE, dtype=np.int64)
    positions = np.zeros((len(rows), row_len), dtype=np.int64)  # padding keeps position 0, as LLaMA-Factory's
    n_tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s.input_ids)
            ids[r, at:at + n] = s.input_ids
            labels[r, at:at + n] = s.labels
            positions[r, at:at + n] = np.arange(n)
            at += n
        if at > row_len:
            raise ValueError("row overflow")
        n_tokens += at
    cu, max_len = _segments_from_positions(positions)
    return MicroBatch(
        input_ids=torch.from_numpy(ids).cuda(), labels=torch.from_numpy(labels).cuda(),
        position_ids=torch.from_numpy(positions).cuda(), attention_mask=None, cu_seqlens=cu, max_seqlen=max_len,
        n_samples=sum(len(r) for r in rows), n_tokens=n_tokens, n_labels=int((labels[:, 1:] != IGNORE).sum()),
    )


def shared_microbatch(rows: list[list[Sample]], multiple: int = shared_prefix.ROW_MULTIPLE) -> MicroBatch:
    """Rows as the shared-prefix hook hands them to the model: the prefix every sample of the task starts with
    (ViggoLikeTask.PREFIX_LEN tokens) once, then each sample's rest at its own positions, the micro-batch padded to
    its longest row (a multiple of the hook's ROW_MULTIPLE), the 4-D mask in bf16 (what LLaMA-Factory's collator
    builds in bf16)."""
    features = []
    for row in rows:
        packed = shared_prefix.pack([(s.input_ids, s.labels) for s in row], ViggoLikeTask.PREFIX_LEN, 10**9,
                                    lambda lengths, capacity: [lengths])  # the row as it is: one knapsack
        features.append({k: v[0] for k, v in packed.items()})
    features = shared_prefix.pad_rows(features, PAD_ID, multiple)
    ids = torch.tensor([f["input_ids"] for f in features], device="cuda")
    labels = torch.tensor([f["labels"] for f in features], device="cuda")
    indices = torch.tensor([f["attention_mask"] for f in features], device="cuda")
    return MicroBatch(
        input_ids=ids, labels=labels, position_ids=torch.tensor([f["position_ids"] for f in features], device="cuda"),
        attention_mask=shared_prefix.attention_mask_4d(indices, torch.bfloat16), cu_seqlens=None, max_seqlen=0,
        n_samples=sum(len(r) for r in rows), n_tokens=int((indices != 0).sum()),
        n_labels=int((labels[:, 1:] != IGNORE).sum()))


def microbatch_for(recipe, rows: list[list[Sample]], row_len: int) -> MicroBatch:
    return shared_microbatch(rows, recipe.pad_multiple) if recipe.attention == "shared-prefix" else \
        packed_microbatch(rows, row_len)


def padded_microbatch(sample: Sample, multiple: int = 8) -> MicroBatch:
    """One sample, right-padded to a multiple of 8 with a 0/1 attention mask (LLaMA-Factory's SFT collator)."""
    n = len(sample.input_ids)
    length = -(-n // multiple) * multiple
    ids = sample.input_ids + [PAD_ID] * (length - n)
    labels = sample.labels + [IGNORE] * (length - n)
    mask = [1] * n + [0] * (length - n)
    return MicroBatch(
        input_ids=torch.tensor([ids], device="cuda"), labels=torch.tensor([labels], device="cuda"),
        position_ids=None, attention_mask=torch.tensor([mask], device="cuda"), cu_seqlens=None, max_seqlen=n,
        n_samples=1, n_tokens=n, n_labels=sum(1 for x in labels[1:] if x != IGNORE),
    )


def pack_rows(samples: list[Sample], row_len: int, seed: int) -> list[list[Sample]]:
    """LLaMA-Factory's packing: capacity cutoff_len - 1, then the trainer's sampler shuffles the rows."""
    rows = greedy_pack([len(s.input_ids) for s in samples], row_len - 1)
    order = np.random.default_rng(seed).permutation(len(rows))
    return [[samples[i] for i in rows[j]] for j in order]
