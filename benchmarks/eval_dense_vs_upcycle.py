"""Downstream tasks on SmolLM2-135M and its default exact upcycle: the same prediction on every item?

Both models are scored by `upcycle eval`'s library on the same items, one after the other in this process; the
table gives each task's accuracy for both, how many items' predictions differ (acc and acc_norm), and the CPU
(or GPU) minutes each model took. Run: ``python benchmarks/eval_dense_vs_upcycle.py [--limit N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from upcycle import assets
from upcycle.convert import UpcycleOptions
from upcycle.downstream.run import TaskResult, evaluate_model
from upcycle.hf.loading import load_causal_lm_strict
from upcycle.upcycling import convert

TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "sciq", "openbookqa", "lambada")


def _row(task: str, d: TaskResult, m: TaskResult) -> dict:
    pairs = list(zip(d.outcomes, m.outcomes, strict=True))
    return {
        "task": task,
        "items": d.items,
        "primary": d.primary,
        "dense": d.score,
        "moe": m.score,
        "items_differing_acc": sum(a.prediction != b.prediction for a, b in pairs),
        "items_differing_acc_norm": sum(a.prediction_norm != b.prediction_norm for a, b in pairs),
        "dense_bpb": d.bits_per_byte,
        "moe_bpb": m.bits_per_byte,
        "dense_minutes": d.seconds / 60,
        "moe_minutes": m.seconds / 60,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task (all when left out)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    dense = assets.smollm2_folder()
    threads = torch.get_num_threads()
    print(f"SmolLM2-135M-Instruct (fp32) vs its exact upcycle (8 experts, top-2); {threads} CPU threads")
    print(
        f"{'task':<14}{'items':>6}{'dense':>8}{'moe':>8}{'diff acc':>9}{'diff norm':>10}{'dense min':>10}{'moe min':>9}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        moe = Path(tmp) / "moe"
        start = time.perf_counter()
        convert(dense, moe, UpcycleOptions())
        convert_s = time.perf_counter() - start
        models = {"dense": load_causal_lm_strict(dense), "moe": load_causal_lm_strict(moe)}
        tokenizer = AutoTokenizer.from_pretrained(dense)
        for task in tasks:  # both models on one task, then its row at once
            d, m = (
                evaluate_model(models[name], tokenizer, [task], limit=args.limit, batch_size=args.batch_size).tasks[0]
                for name in ("dense", "moe")
            )
            rows.append(_row(task, d, m))
            print(
                f"{task:<14}{d.items:>6}{100 * d.score:>8.1f}{100 * m.score:>8.1f}{rows[-1]['items_differing_acc']:>9}"
                f"{rows[-1]['items_differing_acc_norm']:>10}{d.seconds / 60:>10.1f}{m.seconds / 60:>9.1f}",
                flush=True,
            )
            if args.json:  # after every task, so a long run stopped early keeps what it finished
                record = {"threads": threads, "limit": args.limit, "convert_seconds": convert_s, "tasks": rows}
                args.json.write_text(json.dumps(record, indent=2))
    print(f"conversion: {convert_s:.0f} s")


if __name__ == "__main__":
    main()
