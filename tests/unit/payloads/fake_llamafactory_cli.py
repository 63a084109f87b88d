"""A stand-in for `llamafactory-cli train <config>` (LLaMA-Factory 0.9.4 with USE_RAY=1) on a CPU machine.

It reads the config and the staged dataset exactly where the real workers would, prints the trainer's log lines as
Ray forwards them from a training worker, and leaves what 0.9.4 + Ray Train 2.60 leave behind:
`<ray_storage_path>/<ray_run_name>/checkpoint_<timestamp>/checkpoint/` folders (adapter, tokenizer, trainer state)
and, in `output_dir`, the final adapter and `all_results.json`.

Knobs (environment): FAKE_LF_RANK writes a different LoRA rank; FAKE_LF_FAIL=oom dies like a CUDA OOM;
FAKE_LF_NO_CHECKPOINT skips the Ray checkpoints; FAKE_LF_EMPTY_WEIGHTS writes empty adapter weights;
FAKE_LF_STEP_S sleeps between steps; FAKE_LF_ADAPTER_TEMPLATE names an adapter_config.json written by peft, whose
fields the fake keeps (peft's import takes seconds). Each run appends its config path to FAKE_LF_CALLS when set.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time

PREFIX = "(RayTrainWorker pid=4242, ip=10.0.0.7) "
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 4


def say(text: str = "") -> None:
    for line in text.splitlines() or [""]:
        print(PREFIX + line, flush=True)


def write_adapter(folder: str, config: dict, global_step: int) -> None:
    os.makedirs(folder, exist_ok=True)
    rank = int(os.environ.get("FAKE_LF_RANK") or config.get("lora_rank", 8))
    target = config.get("lora_target", "all")
    modules = ALL_LINEAR if target == "all" else target.split(",")
    adapter = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
               "lora_alpha": config.get("lora_alpha") or 2 * int(config.get("lora_rank", 8)),
               "lora_dropout": config.get("lora_dropout", 0.0), "target_modules": sorted(modules),
               "base_model_name_or_path": config["model_name_or_path"], "bias": "none", "inference_mode": True}
    template = os.environ.get("FAKE_LF_ADAPTER_TEMPLATE")  # an adapter_config.json that peft itself wrote
    if template:
        with open(template) as handle:
            adapter = {**json.load(handle), **adapter}
    with open(os.path.join(folder, "adapter_config.json"), "w") as handle:
        json.dump(adapter, handle, indent=2)
    header = json.dumps({"__metadata__": {"format": "pt", "global_step": str(global_step)}}).encode()
    weights = b"" if os.environ.get("FAKE_LF_EMPTY_WEIGHTS") else struct.pack("<Q", len(header)) + header
    with open(os.path.join(folder, "adapter_model.safetensors"), "wb") as handle:
        handle.write(weights)
    for name, content in (("tokenizer_config.json", "{}"), ("special_tokens_map.json", "{}"),
                          ("README.md", "fake adapter\n"), ("optimizer.pt", "x" * 64), ("scheduler.pt", "x"),
                          ("rng_state_0.pth", "x"), ("training_args.bin", "x"),
                          ("trainer_state.json", json.dumps({"global_step": global_step}))):
        with open(os.path.join(folder, name), "w") as handle:
            handle.write(content)


def main(argv: list[str]) -> int:
    if argv[:1] != ["train"] or len(argv) != 2:
        print(f"usage: llamafactory-cli train <config>, got {argv}", file=sys.stderr)
        return 2
    if os.environ.get("USE_RAY") != "1":
        print("Ray was not enabled. Please set `USE_RAY=1` to enable ray.", file=sys.stderr)
        return 2
    if os.environ.get("FAKE_LF_CALLS"):
        with open(os.environ["FAKE_LF_CALLS"], "a") as handle:
            handle.write(argv[1] + "\n")
    with open(argv[1]) as handle:
        config = json.load(handle)

    # Workers read dataset_info.json from dataset_dir and each dataset from its file_name (a file or a folder).
    with open(os.path.join(config["dataset_dir"], "dataset_info.json")) as handle:
        info = json.load(handle)
    for key in ("dataset", "eval_dataset"):
        if config.get(key):
            folder = os.path.join(config["dataset_dir"], info[config[key]]["file_name"])
            rows = sum(1 for f in os.listdir(folder) for line in open(os.path.join(folder, f)) if line.strip())
            say(f"[INFO|loader.py] Loaded {rows} examples of {config[key]} from {folder}")

    say("[INFO|trainer.py:2519] ***** Running training *****")
    say(f"[INFO|trainer.py:2524]   Total optimization steps = {STEPS}")
    step_s = float(os.environ.get("FAKE_LF_STEP_S") or 0.05)
    storage = os.path.join(config["ray_storage_path"], config["ray_run_name"])
    for step in range(1, STEPS + 1):
        time.sleep(step_s)
        print(f"{PREFIX}\r{step * 100 // STEPS:3d}%|####      | {step}/{STEPS} [00:0{step}<00:03,  1.00s/it]",
              flush=True)
        say(str({"loss": round(1.5 / step, 4), "grad_norm": 0.5, "learning_rate": round(1e-4 * (STEPS - step) / STEPS, 8),
                 "epoch": round(step / 2, 2)}))
        if step == 2 and os.environ.get("FAKE_LF_FAIL") == "oom":
            say("Traceback (most recent call last):\n  File \"trainer.py\", line 1, in train\n"
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
            print("ray.exceptions.RayTaskError(OutOfMemoryError): worker died", flush=True)
            return 1
        if step % 2 == 0 and not os.environ.get("FAKE_LF_NO_CHECKPOINT"):
            # Ray Train V2 names checkpoints by time; these sort in step order.
            write_adapter(os.path.join(storage, f"checkpoint_2026-11-25_21-3{step}-00.000000", "checkpoint"),
                          config, step)
    if config.get("eval_dataset"):
        say(str({"eval_loss": 0.1362, "eval_runtime": 2.0, "eval_samples_per_second": 35.2, "epoch": 2.0}))
    summary = {"train_runtime": 437.2951, "train_samples_per_second": 11.434, "train_steps_per_second": 0.354,
               "train_loss": 0.2079, "epoch": 2.0}
    say(str(summary))
    write_adapter(config["output_dir"], config, STEPS)
    results = {**summary, "total_flos": 4.8e16}
    if config.get("eval_dataset"):
        results.update({"eval_loss": 0.1362, "eval_runtime": 2.0, "eval_samples_per_second": 35.2})
    with open(os.path.join(config["output_dir"], "all_results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
