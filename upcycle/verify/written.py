"""The checks `convert` runs on the folder it has written, before publishing it.

Two facts about a conversion are only known once its files exist: whether the tokenizer and generation settings
load in transformers as the dense model's do (a tokenizer class can follow config.json's model type), and, when the
plan rounds source values to a narrower dtype, how far the rounding moves the model. The first refuses a
conversion a user would get different results from; the second is measured and recorded (fp32 compute, real text,
the same function check `verify` runs: whole models when both fit in memory, else layer by layer).
"""

from __future__ import annotations

from pathlib import Path

from upcycle.convert.source import DenseSource
from upcycle.convert.written_plan import WrittenPlan
from upcycle.errors import UnsupportedModelError
from upcycle.verify.files import check_files
from upcycle.verify.function import check_function, probe_for
from upcycle.verify.modes import choose_mode
from upcycle.verify.streaming import check_streaming

MEASURE_TOKENS = 128  # enough text to see the rounding's effect; verify measures again on as much as asked


def inspect_written(plan: WrittenPlan, dense: DenseSource, folder: Path) -> None:
    """Refuse a written folder whose tokenizer or generation settings load differently; measure a rounding."""
    refuse_other_files(plan, dense, folder)
    if plan.exactness.rounded_to:
        plan.exactness.rounding_deviation = measure_rounding(plan, dense, folder)


def refuse_other_files(plan: WrittenPlan, dense: DenseSource, folder: Path) -> None:
    """Refuse a written folder whose tokenizer or generation settings load differently from the source's."""
    files = check_files(dense.folder, folder, None, byte_equal=False)
    if not files.ok:
        first = files.differences[0]
        fix = (
            "state the tokenizer class in the source's tokenizer_config.json (tokenizer_class), or choose another "
            "--target."
            if first.startswith("the tokenizer")
            else "choose another --target."
        )
        raise UnsupportedModelError(
            f"the {plan.architecture} folder would not give a user the dense model's tokenizer or generation "
            f"settings: {first}; nothing was written.",
            fix,
        )


def measure_rounding(plan: WrittenPlan, dense: DenseSource, moe_folder: Path) -> dict:
    """The relative deviation of the written MoE from the dense model as stored, and how it was measured."""
    moe = DenseSource.open(moe_folder)
    probe = probe_for(plan.config_check.get("smallest_window"), MEASURE_TOKENS)
    mode, _ = choose_mode("auto", dense, moe, "float32")
    if mode == "full":
        full = check_function(dense.folder, moe_folder, probe)
        relative, what, origin = full.logits_rel_diff, "logits", full.text_source
    else:
        streamed = check_streaming(dense, moe, plan, probe)
        relative, what, origin = streamed.rel_diff, "worst layer output", streamed.text_source
    return {"relative": relative, "what": what, "compute": "float32", "tokens": probe.tokens, "text": origin}
