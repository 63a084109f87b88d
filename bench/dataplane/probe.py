"""How much LoRA training the data-plane task needs on its random-weight model: a sweep with transformers + peft.

`python -m dataplane.probe <out.json>` on the GPU: for each (rank, learning rate, steps), LoRA on every linear
layer of bench/dataplane/task.py's model, trained on the chat-formatted rows (system = instruction, user = input,
loss on the answer), then greedy exact match on held-out rows. The FineTune settings of bench/dataplane_gpu.py
come from this sweep; its result is kept beside the run's.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

from . import task

SWEEP = [(16, 2e-3, 600), (16, 5e-3, 600), (64, 2e-3, 600), (16, 2e-3, 1500)]
if os.environ.get("PROBE_SMOKE"):  # a CPU check of the code path only
    SWEEP = [(4, 1e-3, 2)]
BATCH, EVAL_ROWS = 32, 200
DEVICE = "cpu" if os.environ.get("PROBE_SMOKE") else "cuda"


def encode(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    messages = [{"role": "system", "content": row["instruction"]}, {"role": "user", "content": row["input"]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (tokenizer(prompt, add_special_tokens=False)["input_ids"],
            tokenizer(row["output"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"])


def trial(model_dir: Path, tokenizer, train: list, test: list, rank: int, lr: float, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    rng = random.Random(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(DEVICE)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + __import__("math").cos(3.14159 * s / steps)))
    data = [encode(tokenizer, r) for r in train]
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        batch = rng.sample(data, BATCH)
        length = max(len(a) + len(b) for a, b in batch)
        ids = torch.full((BATCH, length), tokenizer.pad_token_id)
        labels = torch.full((BATCH, length), -100)
        mask = torch.zeros((BATCH, length), dtype=torch.long)
        for i, (a, b) in enumerate(batch):
            ids[i, :len(a) + len(b)] = torch.tensor(a + b)
            labels[i, len(a):len(a) + len(b)] = torch.tensor(b)
            mask[i, :len(a) + len(b)] = 1
        loss = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), labels=labels.to(DEVICE)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    train_s = time.perf_counter() - t0
    model.eval()
    tokenizer.padding_side = "left"
    correct = 0
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for start in range(0, EVAL_ROWS, 100):
        rows = test[start:start + 100]
        prompts = [encode(tokenizer, r)[0] for r in rows]
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts]).to(DEVICE)
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask.to(DEVICE), max_new_tokens=48, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        for row, generated in zip(rows, out[:, width:].tolist()):
            correct += tokenizer.decode(generated, skip_special_tokens=True).strip() == row["output"]
    return {"rank": rank, "lr": lr, "steps": steps, "train_s": round(train_s, 1),
            "loss_first_last": [round(losses[0], 3), round(sum(losses[-20:]) / 20, 4)],
            "exact_match": correct / EVAL_ROWS}


def main(out: Path) -> None:
    work = Path(os.environ.get("PROBE_WORK", "/tmp/dp/probe"))
    train, test = task.rows(2000, seed=1), task.rows(EVAL_ROWS, seed=3)
    tokenizer = task.train_tokenizer(train + test)
    task.build_model(work / "model", tokenizer)
    results = []
    for rank, lr, steps in SWEEP:
        results.append(trial(work / "model", tokenizer, train, test, rank, lr, steps))
        print(json.dumps(results[-1]), flush=True)
        out.write_text(json.dumps({"model": task.MODEL_CONFIG, "batch": BATCH, "trials": results}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
