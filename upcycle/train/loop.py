"""The training loop: recipe in, checkpoints, metrics and an HF-native export out.

It is the project's own loop (not a generic trainer) so that the MoE terms are really applied, resume is exact
(the data position, the schedule and the RNG are functions of the step), and the same code runs on one CPU, one
GPU, or many ranks under `torchrun` with FSDP2.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from upcycle.errors import OptionError, UpcycleError
from upcycle.loading import load_causal_lm_strict
from upcycle.output_safety import refuse_overlap
from upcycle.train import moe_losses
from upcycle.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from upcycle.train.data import BatchOrder, PackedDataset, eval_batches, make_batch, packed_dataset
from upcycle.train.distributed import Dist, all_reduce_sum, barrier, init_distributed, shard_model, shutdown
from upcycle.train.export import check_replaceable_export, export_model
from upcycle.train.metrics import MetricsLog
from upcycle.train.recipe import TrainRecipe, resolve_batch
from upcycle.train.schedule import lr_at


class TrainingDiverged(UpcycleError):
    """The loss or gradients stayed non-finite for too many consecutive steps."""

    exit_code = 4


class Reporter(Protocol):
    """What the loop tells the outside world (the CLI draws it); every method is called on rank 0 only."""

    def start(self, info: dict[str, Any]) -> None: ...
    def step(self, record: dict[str, Any]) -> None: ...
    def evaluated(self, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


class SilentReporter:
    def start(self, info: dict[str, Any]) -> None:
        pass

    def step(self, record: dict[str, Any]) -> None:
        pass

    def evaluated(self, record: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass


@dataclass
class TrainSummary:
    steps: int
    tokens: int
    final_loss: float | None
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    export_dir: str | None = None
    resumed_from: int | None = None
    seconds: float = 0.0


def choose_experts_implementation(requested: str, device: torch.device) -> str:
    """'auto' takes the project's kernels where they run compiled (a CUDA GPU with Triton), else grouped_mm."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        from upcycle.kernels import select_backend

        if select_backend(device) == "triton":
            return "upcycle"
    return "grouped_mm"


def load_model(recipe: TrainRecipe, info: Dist, compute_dtype: torch.dtype) -> nn.Module:
    implementation = choose_experts_implementation(recipe.model.experts_implementation, info.device)
    if implementation == "upcycle":
        import upcycle.kernels  # noqa: F401  (registers the implementation with transformers)
    model = load_causal_lm_strict(recipe.model.path, torch.float32, recipe.model.trust_remote_code)
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
    model.to(info.device)
    if info.enabled:
        shard_model(model, info, compute_dtype if compute_dtype != torch.float32 else None)
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


def tokens_for(files: list[str], recipe: TrainRecipe, info: Dist) -> PackedDataset:
    """Rank 0 tokenises (once, cached); the others wait, then map the same file."""
    cache = Path(recipe.data.cache_dir) if recipe.data.cache_dir else None
    args = ([Path(f) for f in files], Path(recipe.model.path), recipe.data.seq_len, recipe.data.text_field, cache)
    if info.is_main:
        dataset = packed_dataset(*args)
    barrier(info)
    return dataset if info.is_main else packed_dataset(*args)


def run_micro_batch(
    model: nn.Module,
    taps: moe_losses.RouterTaps,
    batch_BS: torch.Tensor,
    recipe: TrainRecipe,
    scale: float,
    autocast: contextlib.AbstractContextManager,
) -> torch.Tensor:
    """Forward and backward of one micro-batch, the loss scaled so accumulated gradients are a mean.

    Returns (lm, aux, z) as a detached device tensor: reading it is left to the end of the step, so the device
    never waits for the host in between.
    """
    taps.clear()
    with autocast:
        out = model(input_ids=batch_BS, labels=batch_BS)
    lm = out.loss.float()
    zero = torch.zeros((), device=lm.device)
    aux = moe_losses.aux_loss(taps.records) if taps.records and recipe.moe.aux_loss_coef else zero
    z = moe_losses.z_loss(taps.records) if taps.records and recipe.moe.z_loss_coef else zero
    loss = lm + recipe.moe.aux_loss_coef * aux + recipe.moe.z_loss_coef * z
    (loss * scale).backward()
    taps.clear()
    return torch.stack([lm, aux, z]).detach()


def evaluate(
    model: nn.Module,
    dataset: PackedDataset,
    recipe: TrainRecipe,
    info: Dist,
    taps: moe_losses.RouterTaps | None,
    autocast: contextlib.AbstractContextManager,
) -> dict[str, Any]:
    """Mean held-out loss per token over the same sequences every time, exact across any number of ranks.

    Every rank runs the same number of equal micro-batches (FSDP needs it); padding rows repeat real ones and
    are left out of the sums via the plan's counts.
    """
    plan = eval_batches(dataset, recipe.data.eval_sequences, recipe.batch.micro_batch_size, info.rank, info.world_size)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    loads: list[torch.Tensor] = []
    with torch.no_grad():
        for ids, count in zip(plan.batches, plan.counts, strict=True):
            batch_BS = make_batch(dataset, ids).to(info.device)
            if taps is not None:
                taps.clear()
            with autocast:
                logits_BSV = model(input_ids=batch_BS).logits
            loss_BS = torch.nn.functional.cross_entropy(
                logits_BSV[:, :-1].float().flatten(0, 1), batch_BS[:, 1:].flatten(), reduction="none"
            ).view(batch_BS.shape[0], -1)
            real = loss_BS[:count].double()
            total += torch.stack([real.sum().cpu(), torch.tensor(real.numel(), dtype=torch.float64)])
            if taps is not None and taps.records and count:
                loads.append(torch.tensor(moe_losses.expert_load(taps.records), dtype=torch.float64) * count)
    if taps is not None:
        taps.clear()
    model.train(was_training)
    total = all_reduce_sum(total, info)
    record: dict[str, Any] = {"eval_loss": (total[0] / total[1]).item(), "eval_tokens": int(total[1].item())}
    record["eval_ppl"] = math.exp(min(record["eval_loss"], 50.0))
    if taps is not None and taps.routers:
        local = torch.stack(loads).sum(0) if loads else torch.zeros(len(taps.routers), 1, dtype=torch.float64)
        load_LE = all_reduce_sum(local, info)
        load_LE = load_LE / load_LE.sum(-1, keepdim=True)
        imbalance = (load_LE.max(-1).values / load_LE.mean(-1)).tolist()
        record["expert_load"] = [[round(v, 5) for v in row] for row in load_LE.tolist()]
        record["load_imbalance_max_over_mean"] = [round(v, 4) for v in imbalance]
    return record


def dense_reference_loss(
    recipe: TrainRecipe, dataset: PackedDataset, info: Dist, autocast: contextlib.AbstractContextManager
) -> tuple[float, bool] | None:
    """The dense source's held-out loss, when the model is an upcycle and its source is at hand."""
    plan_path = Path(recipe.model.path) / "upcycle.json"
    if not plan_path.is_file():
        return None
    plan = json.loads(plan_path.read_text())
    source = Path(plan.get("source", {}).get("path", ""))
    if plan.get("source", {}).get("kind") != "folder" or not (source / "config.json").is_file():
        return None
    dense = load_causal_lm_strict(source, torch.float32).to(info.device)
    record = evaluate(dense, dataset, recipe, info, None, autocast)  # unsharded: each rank evaluates its share
    del dense
    return record["eval_loss"], bool(plan.get("exactness", {}).get("exact"))


def train(recipe: TrainRecipe, reporter: Reporter | None = None, resume: bool = False) -> TrainSummary:
    """Run the recipe to its last step (or resume it); returns what happened."""
    started = time.perf_counter()
    info = init_distributed()
    report = reporter if (reporter is not None and info.is_main) else SilentReporter()
    try:
        return _train(recipe, info, report, resume, started)
    finally:
        shutdown(info)


def check_output_dir(recipe: TrainRecipe, resume: bool) -> None:
    """Refuse, before any data is tokenised or any step runs, a run folder whose writes would damage something.

    The run folder must keep clear of the model it trains (not it, not inside it, not containing it); its
    ``export`` folder may only hold an earlier upcycle export (replaced at the end, atomically); its checkpoints
    are continued only with ``--resume``.
    """
    run_dir = Path(recipe.run.output_dir)
    model_dir = [("model.path", recipe.model.path)]
    refuse_overlap(run_dir, model_dir, option="run.output_dir")
    if recipe.run.export:
        refuse_overlap(run_dir / "export", model_dir, option="run.output_dir/export")
        check_replaceable_export(run_dir / "export")
    if not resume and list_checkpoints(run_dir):
        raise OptionError(
            f"{run_dir} already holds checkpoints of an earlier run.",
            "pass --resume to continue it, or set run.output_dir to a new folder.",
        )


def _train(recipe: TrainRecipe, info: Dist, report: Reporter, resume: bool, started: float) -> TrainSummary:
    run_dir = Path(recipe.run.output_dir)
    check_output_dir(recipe, resume)
    torch.manual_seed(recipe.run.seed)
    precision = recipe.run.precision
    if precision == "auto":
        precision = "bf16" if info.device.type == "cuda" else "fp32"
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    use_autocast = compute_dtype != torch.float32 and not info.enabled  # FSDP2's policy casts when sharded
    autocast = torch.autocast(info.device.type, dtype=compute_dtype) if use_autocast else contextlib.nullcontext()

    batch = resolve_batch(recipe, info.world_size)
    train_set = tokens_for(recipe.data.train, recipe, info)
    eval_set = tokens_for(recipe.data.eval, recipe, info) if recipe.data.eval else None
    model = load_model(recipe, info, compute_dtype)
    taps = moe_losses.RouterTaps(model, recipe.moe.capacity_factor)
    optimizer = make_optimizer(model, recipe)
    if recipe.run.compile:
        model.compile()  # compiles forward in place; parameters, hooks and state-dict names are unchanged
    order = BatchOrder(len(train_set), recipe.run.seed)

    start_step, resumed_from, history = 0, None, []
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        start_step = resumed_from = int(state["step"])
        history = list(state.get("eval_history", []))
    log = MetricsLog(run_dir, info.is_main, recipe.run.tensorboard, resume_step=start_step if resume else 0)
    if log.tensorboard_note:
        report.message(log.tensorboard_note)
    if info.is_main:
        (run_dir / "recipe.resolved.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")

    params = [p for p in model.parameters() if p.requires_grad]
    report.start(
        {
            "steps": batch.steps,
            "start_step": start_step,
            "tokens_per_step": batch.tokens_per_step,
            "world_size": info.world_size,
            "device": str(info.device),
            "precision": precision,
            "routers": len(taps.routers),
            "train_sequences": len(train_set),
            "experts_implementation": getattr(model.config, "_experts_implementation", None),
        }
    )

    def run_eval(step: int) -> None:
        if eval_set is None:
            return
        record = {"kind": "eval", "step": step, **evaluate(model, eval_set, recipe, info, taps, autocast)}
        if step == 0:
            reference = dense_reference_loss(recipe, eval_set, info, autocast)
            if reference is not None:
                dense_loss, exact = reference
                record["dense_eval_loss"] = dense_loss
                record["step0_matches_dense"] = abs(record["eval_loss"] - dense_loss) <= 1e-4 * abs(dense_loss) + 1e-6
                if exact and not record["step0_matches_dense"]:
                    report.message(
                        f"warning: step-0 held-out loss {record['eval_loss']:.6f} differs from the dense "
                        f"model's {dense_loss:.6f}; the upcycle is not exact (run `upcycle verify`)."
                    )
        history.append({k: v for k, v in record.items() if k != "expert_load"})
        log.write(record)
        report.evaluated(record)

    if start_step == 0:
        run_eval(0)
    bad_steps, last_loss = 0, None
    for step in range(start_step, batch.steps):
        step_start = time.perf_counter()
        lr = lr_at(
            step,
            peak=recipe.optim.lr,
            minimum=recipe.optim.min_lr,
            warmup_steps=recipe.optim.warmup_steps,
            total_steps=batch.steps,
            kind=recipe.optim.schedule,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = order.local_micro_batches(
            step, batch.global_batch_sequences, batch.micro_batch_size, info.rank, info.world_size
        )
        totals = torch.zeros(3, device=info.device)
        for ids in micro_batches:
            batch_BS = make_batch(train_set, ids).to(info.device)
            totals += run_micro_batch(model, taps, batch_BS, recipe, 1.0 / len(micro_batches), autocast)
        clip = recipe.optim.grad_clip if recipe.optim.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # one host read per step: the mean losses over ranks and the (already global) gradient norm
        step_values = torch.cat([totals.double() / len(micro_batches), grad_norm.detach().double().reshape(1)])
        step_values = all_reduce_sum(step_values, info).cpu()
        totals, grad_norm_value = step_values[:3] / info.world_size, step_values[3].item() / info.world_size
        finite = math.isfinite(grad_norm_value) and math.isfinite(totals[0].item())
        if finite:
            optimizer.step()
            bad_steps = 0
        else:
            bad_steps += 1
            report.message(f"step {step + 1}: non-finite loss or gradient, step skipped ({bad_steps} in a row)")
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - step_start
        last_loss = totals[0].item()
        record = {
            "kind": "train",
            "step": step + 1,
            "loss": last_loss,
            "aux_loss": totals[1].item(),
            "z_loss": totals[2].item(),
            "lr": lr,
            "grad_norm": grad_norm_value,
            "tokens": (step + 1) * batch.tokens_per_step,
            "tokens_per_s": batch.tokens_per_step / seconds,
            "step_seconds": seconds,
            "skipped": not finite,
        }
        if (step + 1) % max(1, recipe.run.log_interval) == 0 or step + 1 == batch.steps or not finite:
            log.write(record)
        report.step(record)
        if bad_steps >= recipe.run.max_bad_steps:
            raise TrainingDiverged(
                f"training stopped at step {step + 1}: {bad_steps} consecutive non-finite steps.",
                "lower optim.lr, check the data, or resume from an earlier checkpoint.",
            )
        done = step + 1 == batch.steps
        if (recipe.run.eval_interval and (step + 1) % recipe.run.eval_interval == 0) or done:
            run_eval(step + 1)
        interval = recipe.run.checkpoint_interval
        if recipe.run.checkpoints and ((interval and (step + 1) % interval == 0) or done):
            trainer_state = {
                "step": step + 1,
                "tokens": (step + 1) * batch.tokens_per_step,
                "data_position": (step + 1) * batch.global_batch_sequences,
                "eval_history": history,
                "recipe": recipe.to_dict(),
            }
            save_checkpoint(run_dir, step + 1, model, optimizer, trainer_state, keep=recipe.run.keep_checkpoints)
    summary = TrainSummary(
        batch.steps,
        batch.steps * batch.tokens_per_step,
        last_loss,
        history,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - started,
    )
    if recipe.run.export:
        check_replaceable_export(run_dir / "export")  # again: files may have been put there while it trained
        out = export_model(
            model,
            info,
            Path(recipe.model.path),
            run_dir / "export",
            {
                "steps": summary.steps,
                "tokens": summary.tokens,
                "final_loss": summary.final_loss,
                "eval_history": history,
                "recipe": recipe.to_dict(),
            },
            force=True,
        )
        summary.export_dir = str(out) if out else None
    taps.remove()
    log.close()
    return summary
