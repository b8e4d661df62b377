"""The checks `convert` runs on the folder it has written, before publishing it.

Two facts about a conversion are only known once its files exist: whether the tokenizer and generation settings
load in transformers as the dense model's do (a tokenizer class can follow config.json's model type), and, when the
plan rounds source values to a narrower dtype, how far the rounding moves the model. The first refuses a
conversion a user would get different results from; the second is measured and recorded (fp32 compute, real text,
the same function check `verify` runs: whole models when both fit in memory, else layer by layer).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from upcycle.convert.exactness import CODE_NAMES, leaf_recipes, rounded_sources
from upcycle.convert.source import DenseSource
from upcycle.convert.written_plan import WrittenPlan
from upcycle.errors import UnsupportedModelError
from upcycle.verify.files import check_files
from upcycle.verify.function import Probe, check_function, load_text_tokens, probe_for
from upcycle.verify.modes import choose_mode
from upcycle.verify.streaming import check_streaming

MEASURE_TOKENS = 128  # enough text to see the rounding's effect; verify measures again on as much as asked


def inspect_written(
    plan: WrittenPlan, dense: DenseSource, folder: Path, tensors_written: Callable[[], object] = lambda: None
) -> None:
    """Refuse a written folder whose tokenizer or generation settings load differently; measure a rounding.

    Runs while the tensors are written; `tensors_written` waits for them, which only a rounding measured on the
    written MoE needs."""
    refuse_other_files(plan, dense, folder)
    if plan.exactness.rounded_to:
        plan.exactness.rounding_deviation = measure_rounding(plan, dense, folder, tensors_written)


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


def measure_rounding(
    plan: WrittenPlan, dense: DenseSource, moe_folder: Path, tensors_written: Callable[[], object] = lambda: None
) -> dict:
    """The relative deviation of the written MoE from the dense model as stored, and how it was measured.

    When the method is exact and every written tensor holds its source's values cast to one dtype (nothing
    scaled), the MoE computes the dense function on those cast weights (the exactness the config check and the
    weight recipes establish, which `verify` proves on the written folder). The rounding is then measured on the
    dense model itself, its weights cast as written: one model of the dense size in memory instead of both, the MoE
    holding E copies. An approximate method (re-drawn neurons, noise) is measured on the written MoE: its figure
    must hold the method's own deviation too (`verify --weights-only --tol` judges by it)."""
    probe = probe_for(plan.config_check.get("smallest_window"), MEASURE_TOKENS)
    into = single_cast(plan, dense) if plan.exactness.exact_up_to_rounding else None
    measured = None
    if into is not None and choose_mode("auto", dense, dense, "float32")[0] == "full":
        measured = rounded_dense_deviation(dense.folder, moe_folder, into, probe)
    if measured is not None:
        relative, origin = measured
        return {
            "relative": relative, "what": "logits", "compute": "float32", "tokens": probe.tokens, "text": origin,
            "measured_on": f"the dense model, its weights cast to {into} as written",
        }  # fmt: skip
    tensors_written()
    moe = DenseSource.open(moe_folder)
    mode, _ = choose_mode("auto", dense, moe, "float32")
    if mode == "full":
        full = check_function(dense.folder, moe_folder, probe)
        relative, what, origin = full.logits_rel_diff, "logits", full.text_source
    else:
        streamed = check_streaming(dense, moe, plan, probe)
        relative, what, origin = streamed.rel_diff, "worst layer output", streamed.text_source
    return {
        "relative": relative, "what": what, "compute": "float32", "tokens": probe.tokens, "text": origin,
        "measured_on": "the written MoE",
    }  # fmt: skip


def single_cast(plan: WrittenPlan, dense: DenseSource) -> str | None:
    """The one output dtype (a name) every written source value is cast to, when no copy is scaled; else None."""
    rounding = rounded_sources(dense, plan.recipes)
    codes = {leaf.dtype for recipe in plan.recipes for leaf in leaf_recipes(recipe)}
    if rounding.scaled or len(codes) != 1 or len(rounding.into) != 1:
        return None
    (code,) = codes
    return rounding.into[0] if CODE_NAMES.get(code) == rounding.into[0] else None


def rounded_dense_deviation(dense_folder: Path, moe_folder: Path, into: str, probe: Probe) -> tuple[float, str] | None:
    """Relative logits deviation of the dense model (fp32 compute) once every weight is cast to `into` and back;
    None when the model keeps stored values outside its parameters (a persistent buffer: cast in the MoE's files,
    it would be missed here)."""
    import torch

    from upcycle.hf.loading import TORCH_DTYPES, load_causal_lm_strict
    from upcycle.verify.layer_pairs import relative

    model = load_causal_lm_strict(dense_folder, torch.float32).eval()
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    if any(t.is_floating_point() for name, t in model.state_dict().items() if name not in parameters):
        return None
    ids, origin = load_text_tokens(moe_folder, probe.text, probe.tokens, model.config.get_text_config().vocab_size)
    with torch.no_grad():
        stored = model(ids[None]).logits[0]
        for parameter in model.parameters():  # the weights only (a rotary table is not stored), as fresh tensors
            parameter.data = parameter.data.to(TORCH_DTYPES[into]).float()  # (writing in place faults mapped pages)
        cast = model(ids[None]).logits[0]
    return relative(stored, cast)[1], origin
