"""The sizes of a comparison: everything that sets what a run costs, the same for every arm so tokens are equal.

A size is numbers only (sequence length, batch, steps, evaluation, learning-rate schedule, precision and which
decoder layers become MoE); :mod:`upcycle.experiments.paper_recipe` turns them into recipe sections.
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.errors import OptionError


@dataclass(frozen=True)
class Size:
    """What every run of one comparison shares: its tokens, evaluation, schedule and precision."""

    name: str
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    steps: int
    eval_interval: int
    eval_sequences: int  # held-out sequences per evaluation (0 = all)
    warmup_steps: int
    lr: float = 3e-4  # peak; every size shares the comparison recipe's schedule unless it says otherwise
    min_lr: float = 3e-5
    precision: str = "auto"
    moe_layers: str = "all"  # which decoder layers become MoE (convert's --layers); the others stay dense
    budget: str = ""  # what it is sized for, printed with the plan
    experts_implementation: str = "auto"

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch_size * self.grad_accum

    @property
    def tokens(self) -> int:
        """Training tokens per run."""
        return self.steps * self.tokens_per_step

    def describe(self) -> str:
        moe = "MoE in every layer" if self.moe_layers == "all" else f"MoE in layers {self.moe_layers} only"
        return (
            f"{self.name} size: {self.steps} steps x {self.micro_batch_size * self.grad_accum} sequences x "
            f"{self.seq_len} tokens = {self.tokens:,} training tokens per run, "
            f"held-out loss every {self.eval_interval} steps on "
            f"{'all' if not self.eval_sequences else self.eval_sequences} held-out sequences, "
            f"peak LR {self.lr:g}, {self.precision} ({moe})"
        )


# fmt: off
SIZES: dict[str, Size] = {
    # 2 CPU cores, fp32. The full E8 top-2 upcycle of all 30 layers of SmolLM2 (0.69 B parameters, ~15 GB with
    # AdamW) took 82 s for one step of 4 x 128 tokens on this shared 2-core machine (~20 s at best), so four MoE
    # runs of it overrun 30 minutes. Cutting the model to its first layers is no way out: it breaks a trained
    # model (held-out loss 3.95 for all 30 layers, 19.3 for the first 6, 11.6 for the first 3 + last 3).
    # So the CPU size keeps the whole real model and upcycles only its last 6 decoder layers (24-29; the other
    # 24 keep their dense MLP): every arm starts from SmolLM2 itself, the exact upcycles at its loss. Each run
    # is 12 steps of 2 x 128 tokens: enough to see the direction of the first steps, not converged gains.
    "cpu": Size(
        "cpu", seq_len=128, micro_batch_size=2, grad_accum=1, steps=12, warmup_steps=2, precision="fp32",
        eval_interval=3, eval_sequences=8, moe_layers="24-29",
        budget="under 30 minutes on 2 CPU cores, all runs and seeds included",
    ),
    # One GPU (bf16): ~1.3 M tokens per run (just under one pass over the Shakespeare training text), for the
    # default variants with two seeds of the dense control and the best MoE. Its time has not been measured.
    "gpu": Size(
        "gpu", seq_len=1024, micro_batch_size=8, grad_accum=4, steps=40, warmup_steps=4, precision="bf16",
        eval_interval=5, eval_sequences=0, budget="one GPU; its time has not been measured yet",
    ),
}
# fmt: on


def get_size(size: str | Size) -> Size:
    """A size by name (``cpu``, ``gpu``), or the one given."""
    if isinstance(size, Size):
        return size
    if size not in SIZES:
        raise OptionError(f"unknown size {size!r}.", f"use one of {', '.join(SIZES)}.")
    return SIZES[size]
