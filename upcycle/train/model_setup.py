"""The trained model and its optimizer: fp32 master weights laid out as the run's layout says, AdamW."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from upcycle.errors import OptionError, UpcycleError
from upcycle.hf.loading import load_causal_lm_strict, random_causal_lm
from upcycle.train import moe_losses
from upcycle.train.distributed import Dist, shard_model
from upcycle.train.parallel import Layout, engine_available
from upcycle.train.recipe import TrainRecipe


def choose_experts_implementation(requested: str, device: torch.device) -> str:
    """'auto' takes the project's kernels where they run compiled (a CUDA GPU with Triton), else grouped_mm."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        from upcycle.kernels import select_backend

        if select_backend(device) == "triton":
            return "upcycle"
    return "grouped_mm"


def check_kernels_first(model: nn.Module, requested: str, dtype: torch.dtype, say: Callable[[str], None]) -> None:
    """Before step 0 (and before compiling), upcycle's Triton experts are checked against the reference on this
    model's first experts layer (upcycle.kernels.self_check); the result is said, and recorded in the run's layout
    record and the export's card. Asked for by name (`upcycle`), kernels that fail stop the run; chosen by `auto`,
    the run goes on with transformers' grouped_mm."""
    if getattr(model.config, "_experts_implementation", None) != "upcycle":
        return
    from upcycle.hf.moe_modules import moe_blocks
    from upcycle.kernels import select_backend, self_check

    blocks = moe_blocks(model)
    device = next(model.parameters()).device
    if not blocks or select_backend(device) != "triton":
        return
    self_check.policy["on_failure"] = "raise" if requested == "upcycle" else "fall_back"
    top_k = int(getattr(model.config, "num_experts_per_tok", 2))
    try:
        verdict = self_check.check_experts(blocks[0][1].experts, dtype, top_k)
    except self_check.KernelCheckFailed as error:
        raise UpcycleError(
            f"{error}.", "use model.experts_implementation: auto (falls back to grouped_mm) or grouped_mm."
        ) from None
    if verdict is None:  # this rank holds none of the layer's experts: its first forward checks them
        return
    say(verdict.describe() + ("" if verdict.ok else "; the run uses transformers' grouped_mm experts instead"))


def check_random_init_layout(init: str, layout: Layout) -> None:
    """A random model is drawn whole on every rank and sharded by FSDP2 alone: no other layout can hold it."""
    if init == "random" and (layout.ep > 1 or layout.replicate > 1 or layout.tp > 1):
        raise OptionError(
            f"model.init: random runs in one process or under plain FSDP, not with parallel.ep={layout.ep}, "
            f"replicate={layout.replicate}, tp={layout.tp}.",
            "set parallel.ep, parallel.replicate and parallel.tp to 1 for the random-initialisation control.",
        )


def load_model(recipe: TrainRecipe, info: Dist, layout: Layout, compute_dtype: torch.dtype) -> nn.Module:
    """The model in fp32 master weights, laid out as `layout` says.

    Sharded layouts are loaded by transformers' distributed engine: each rank builds the model on the meta
    device, applies expert parallelism and FSDP2, then reads only its own shard of every tensor, so no rank holds
    the whole model. Without that engine (older transformers), each rank loads the whole model and FSDP2 shards it
    afterwards.
    """
    implementation = choose_experts_implementation(recipe.model.experts_implementation, info.device)
    if implementation == "upcycle":
        import upcycle.kernels  # noqa: F401  (registers the implementation with transformers)
    path, remote = recipe.model.path, recipe.model.trust_remote_code
    mixed = compute_dtype != torch.float32
    fresh = recipe.model.init == "random"
    by_engine = layout.sharded and engine_available() and not fresh  # a random model is drawn whole, then sharded
    if fresh:
        model = random_causal_lm(path, recipe.run.seed, torch.float32, remote)
    elif by_engine:
        model = load_causal_lm_strict(path, torch.float32, remote, distributed_config=layout.distributed_config(mixed))
    else:
        model = load_causal_lm_strict(path, torch.float32, remote)
    if moe_losses.find_routers(model) and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(implementation)
    model.config.use_cache = False
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = False  # upcycle adds the aux loss itself, for every class alike
    if recipe.model.activation_checkpointing:
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if not by_engine:
        model.to(info.device)
        if info.enabled:
            shard_model(model, info, compute_dtype if mixed else None)
    model.train()
    return model


def make_optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm scales and biases are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    o = recipe.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"  # one kernel for all parameters on a GPU
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)
