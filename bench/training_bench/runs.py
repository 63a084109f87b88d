"""Runs of recipes: timed rows, learning runs, and the faster variants against their bases."""

from __future__ import annotations

import dataclasses
import json
import time
import traceback

import numpy as np
import torch

from .data import MicroBatch, Sample, microbatch_for, packed_microbatch
from .model import FAST_VARIANTS, Fp8, Liger, NO_LIGER, Varlen, fp8_selftest, set_attention, set_checkpointing
from .steps import Recipe, eval_loss, loss_and_gradients, make_steps, measure, profile_timed, train
from .report import targets, timed_by_name, write


WARM_ON_TIMED = -1  # a plan's warm-up: the timed steps themselves, once (every row shape seen before timing)


def run_variants(model, adapter, plan, pool, rows, row_len, n_params, results, out_dir, t_start) -> None:
    cursor = 0
    for recipe, warmup, timed in plan:
        try:
            n_steps = timed if warmup == WARM_ON_TIMED else warmup + timed
            need = n_steps * recipe.micro_batch * recipe.accumulation
            if recipe.packed and cursor + need > len(rows):
                cursor = 0
            steps = make_steps(recipe, pool, rows[cursor:], n_steps, row_len)
            if recipe.packed:
                cursor += need
            if warmup == WARM_ON_TIMED:
                steps, warmup = steps + steps, len(steps)
            row = measure(model, adapter, recipe, steps, warmup, n_params)
        except Exception as exc:  # noqa: BLE001
            row = {**dataclasses.asdict(recipe), "error": f"{exc!r}"[:500]}
            traceback.print_exc()
        results["variants"].append(row)
        print(f"[{time.perf_counter() - t_start:6.1f}s] {json.dumps(row)}", flush=True)
        write(out_dir, results)  # first: after a CUDA error the next call fails too
        torch.cuda.empty_cache()


def learning_runs(model, adapter, recipe: Recipe, label: str, steps, lrs, eval_rows, row_len, n_samples,
                  results, out_dir) -> None:
    """Train from the same initial adapter over the same samples; record train and held-out loss."""
    attention = recipe.attention
    for lr in lrs:
        try:
            set_checkpointing(model, recipe.checkpointing)
            set_attention(model, "llmops_varlen" if attention == "varlen" else "sdpa")
            t0 = time.perf_counter()
            losses = [float(x) for x in train(model, adapter, recipe, steps, schedule=True, lr=lr)]
            seconds = time.perf_counter() - t0
            tail = losses[-max(1, len(losses) // 10):]
            run = {
                "run": label,
                "recipe": recipe.name,
                "learning_rate": lr,
                "optimizer_steps": len(steps),
                "samples_per_step": round(n_samples / len(steps), 2),
                "first_step_loss": round(losses[0], 4),
                "last_10pct_mean_loss": round(sum(tail) / len(tail), 4),
                "eval_loss": round(eval_loss(model, eval_rows, row_len, "varlen" if Varlen.available
                                             else "sdpa-mask"), 4),
                "curve_every_10pct": [round(losses[min(len(losses) - 1, int(f * len(losses)))], 3)
                                      for f in np.linspace(0, 1, 11)],
                "seconds": round(seconds, 1),
            }
        except Exception as exc:  # noqa: BLE001
            run = {"run": label, "learning_rate": lr, "error": f"{exc!r}"[:500]}
            traceback.print_exc()
        results["loss"]["runs"].append(run)
        print("loss:", json.dumps(run), flush=True)
        write(out_dir, results)


@dataclasses.dataclass
class LearningCheck:
    """What learning_runs needs: the learning samples' packed rows (one per optimizer step), the held-out rows."""

    rows: list[list[Sample]]
    row_len: int
    eval_rows: list[list[Sample]]
    lrs: list[float]
    n_samples: int

    def steps(self, recipe: Recipe) -> list[list[MicroBatch]]:
        return [[microbatch_for(recipe, [row], self.row_len)] for row in self.rows]


def run_fast_variants(model, adapter, reference: Recipe, default: Recipe, no_liger: Recipe, names: list[str],
                      learning: LearningCheck | None, pool, rows, row_len: int, n_params: int, results: dict,
                      out_dir: str, t_start: float) -> None:
    """--variants: the reference; the variants of the default without Liger (if any are named) after their base;
    the default and its variants; last the default again (the run's noise). Each variant gets its numerics against
    its base on one packed row, its throughput on the same rows as its base, a profile and, with `learning`, the
    held-out loss after training on the learning samples next to its base's."""
    run_variants(model, adapter, [(reference, 3, 8)], pool, rows, row_len, n_params, results, out_dir, t_start)
    results["fp8_selftest"] = fp8_selftest()
    print("fp8 self-test:", json.dumps(results["fp8_selftest"]), flush=True)
    if learning:
        adapter.reset()
        results["loss"]["initial_eval_loss"] = round(eval_loss(model, learning.eval_rows, row_len,
                                                               "varlen" if Varlen.available else "sdpa-mask"), 4)
    results["profiles"], results["numerics"] = [], []
    plain = [name for name in names if name.endswith(NO_LIGER)]
    if plain:  # Liger cannot be taken off again: these go first
        variants_of(model, adapter, no_liger, plain, learning, pool, rows, row_len, n_params, results,
                    out_dir, t_start)
    results["liger"] = Liger.apply(model, packed_microbatch([pool[:8]], row_len))
    variants_of(model, adapter, default, [name for name in names if name not in plain], learning, pool,
                rows, row_len, n_params, results, out_dir, t_start)
    again = dataclasses.replace(default, name=f"{default.name}-again")
    run_variants(model, adapter, [(again, 1, 20)], pool, rows, row_len, n_params, results, out_dir, t_start)
    results["targets"] = targets(timed_by_name(results), [default.name, *names, again.name])


def variants_of(model, adapter, base: Recipe, names: list[str], learning: LearningCheck | None, pool, rows,
                row_len: int, n_params: int, results: dict, out_dir: str, t_start: float) -> None:
    """The base recipe, then each named variant of it: numerics against the base, throughput, profile; then the
    learning runs of the base and of each variant that trained."""
    run_variants(model, adapter, [(base, WARM_ON_TIMED, 20)], pool, rows, row_len, n_params, results, out_dir,
                 t_start)
    trained = [base]
    results["profiles"].append(profile_timed(model, adapter, base, pool, rows, row_len, timed_by_name(results)))
    check_row = microbatch_for(base, [rows[-1]], row_len)
    loss0, grads0, seconds0 = loss_and_gradients(model, adapter, base, check_row)
    dynamo = torch._dynamo.utils.counters
    for name in names:
        overrides, description = FAST_VARIANTS[name.removesuffix(NO_LIGER)]
        variant = dataclasses.replace(base, name=name, description=f"as {base.name}: {description}", rendered=None,
                                      **overrides)
        try:
            breaks, graphs = sum(dynamo["graph_break"].values()), dynamo["stats"]["unique_graphs"]
            loss, grads, seconds = loss_and_gradients(model, adapter, variant, check_row)
            check = {
                "variant": name,
                "against": base.name,
                "row_samples": check_row.n_samples,
                "loss": round(loss, 5),
                "base_loss": round(loss0, 5),
                "loss_rel_diff": abs(loss - loss0) / abs(loss0),
                "grad_rel_err": float((grads - grads0).norm() / grads0.norm()),
                "first_call_s": round(seconds, 2),  # compiled: dynamo + inductor for forward and backward
                "base_first_call_s": round(seconds0, 2),
                "new_graph_breaks": sum(dynamo["graph_break"].values()) - breaks,
                "new_compiled_graphs": dynamo["stats"]["unique_graphs"] - graphs,
                "graph_break_reasons_so_far": [reason.split("\n")[0] for reason in sorted(dynamo["graph_break"])],
            }
            if variant.fp8:
                check["fp8_quantize_s"] = round(Fp8.quantize_s, 2)
        except Exception as exc:  # noqa: BLE001
            check = {"variant": name, "error": f"{exc!r}"[:500]}
            traceback.print_exc()
        results["numerics"].append(check)
        print("numerics:", json.dumps(check), flush=True)
        run_variants(model, adapter, [(variant, WARM_ON_TIMED, 20)], pool, rows, row_len, n_params, results,
                     out_dir, t_start)
        if name in timed_by_name(results):
            trained.append(variant)
        results["profiles"].append(profile_timed(model, adapter, variant, pool, rows, row_len,
                                                 timed_by_name(results)))
        write(out_dir, results)
    if learning:
        for recipe in trained:
            learning_runs(model, adapter, recipe, f"{recipe.name} (1 row/step)", learning.steps(recipe), learning.lrs,
                          learning.eval_rows, row_len, learning.n_samples, results, out_dir)
