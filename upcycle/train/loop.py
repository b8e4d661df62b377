"""The training loop: recipe in, checkpoints, metrics and an HF-native export out.

It is the project's own loop (not a generic trainer) so that the MoE terms are really applied, resume is exact
(the data position, the schedule and the RNG are functions of the step), and the same code runs on one CPU, one
GPU, or many ranks under `torchrun` with FSDP2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.hf.loading import load_causal_lm_strict
from upcycle.hf.moe_modules import moe_blocks
from upcycle.output_safety import refuse_overlap
from upcycle.train import moe_losses, step0
from upcycle.train.batch_order import BatchOrder, repetition_note
from upcycle.train.batch_size import resolve_batch
from upcycle.train.checkpoint import (
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from upcycle.train.conversion import Conversion, prepare_model
from upcycle.train.distributed import (
    Dist,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    clip_grad_norm,
    init_distributed,
    shard_model,
    shutdown,
)
from upcycle.train.eval_plan import eval_batches
from upcycle.train.export import check_replaceable_export, export_model, export_settings
from upcycle.train.metrics import MetricsLog
from upcycle.train.model_shape import meta_model, model_shape
from upcycle.train.packing import PackedDataset, make_batch, packed_dataset
from upcycle.train.parallel import Layout, engine_available, resolve_layout
from upcycle.train.recipe import TrainRecipe
from upcycle.train.resume import check_same_data, resume_point
from upcycle.train.router_precision import routers_in_fp32, run_routers_in_fp32
from upcycle.train.run_folder import check_run_folder, clear_earlier_run, run_lock
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
    conversion: Conversion | None = None  # the recipe's upcycle (model.source), converted or reused


def choose_experts_implementation(requested: str, device: torch.device) -> str:
    """'auto' takes the project's kernels where they run compiled (a CUDA GPU with Triton), else grouped_mm."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        from upcycle.kernels import select_backend

        if select_backend(device) == "triton":
            return "upcycle"
    return "grouped_mm"


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
    by_engine = layout.sharded and engine_available()
    if by_engine:
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


def expert_placement(model: nn.Module) -> dict[str, Any]:
    """Which experts this rank really holds: read off the first experts module's weights, not the plan."""
    for _, block in moe_blocks(model):
        weight = next((p for p in block.experts.parameters(recurse=False) if p.dim() == 3), None)
        if weight is None:
            continue
        total = int(weight.shape[0])
        mesh = getattr(weight, "device_mesh", None)
        names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
        local_rows = int(weight.to_local().shape[0]) if hasattr(weight, "to_local") else total
        if "ep" in names:
            ep = mesh.size(names.index("ep"))
            coordinate = mesh.get_local_rank("ep")
            first, count = coordinate * total // ep, total // ep
        else:
            first, count = 0, total
        return {"experts": [first, first + count - 1], "of": total, "local_rows": local_rows}
    return {}


def parallel_record(model: nn.Module, layout: Layout, placement: list[dict], info: Dist) -> dict[str, Any]:
    """What really ran, from every rank: the layout, the experts each rank holds, and the experts
    implementation's calls (backend, experts per call) up to the end of the first step, step-0 evaluation included."""
    registry = sys.modules.get("upcycle.kernels.registry")
    calls = {f"{backend}:{experts}": n for (backend, experts), n in registry.calls.items()} if registry else {}
    return {
        "kind": "layout",
        "layout": layout.as_dict(),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "placement": placement,
        "experts_calls": all_gather_objects(calls, info),
        # the decoder layer of each per-layer entry in the train records (aux loss, dropped tokens)
        "moe_layers": moe_losses.router_layers(moe_losses.find_routers(model)),
    }


def describe_experts_calls(record: dict[str, Any]) -> str:
    implementation = record["experts_implementation"]
    seen = sorted({key for calls in record["experts_calls"] for key in calls})
    if not seen:
        return f"experts implementation: {implementation}"
    ran = ", ".join(f"{key.split(':')[0]} kernels on {key.split(':')[1]} local experts" for key in seen)
    return f"experts implementation: {implementation} ({ran})"


def make_optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm scales and biases are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    o = recipe.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"  # one kernel for all parameters on a GPU
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)


def tokens_for(
    files: list[str], recipe: TrainRecipe, info: Dist, warn: Callable[[str], None] | None = None
) -> PackedDataset:
    """Rank 0 tokenises (once, cached); the others wait, then map the same file."""
    cache = Path(recipe.data.cache_dir) if recipe.data.cache_dir else None
    args = ([Path(f) for f in files], Path(recipe.model.path), recipe.data.seq_len, recipe.data.text_field, cache)
    if info.is_main:
        dataset = packed_dataset(*args, warn=warn)
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

    Returns [lm, aux, z, dropped fraction, aux per MoE layer..., dropped per MoE layer (with a capacity factor)...]
    as one detached device tensor: reading it is left
    to the end of the step, so the device never waits for the host in between. The router terms are computed
    (for the log) whatever their coefficients; they reach the loss only with a coefficient.
    """
    taps.clear()
    with autocast:
        out = model(input_ids=batch_BS, labels=batch_BS)
    lm = out.loss.float()
    loss, values = lm, [lm.detach()]
    if taps.records:
        moe = recipe.moe
        with torch.set_grad_enabled(moe.aux_loss_coef > 0):
            aux_L = moe_losses.aux_losses(taps.records)
        with torch.set_grad_enabled(moe.z_loss_coef > 0):
            z = moe_losses.z_loss(taps.records)
        loss = lm + moe.aux_loss_coef * aux_L.sum() + moe.z_loss_coef * z
        dropped_L = moe_losses.dropped_fractions(taps.records)
        taps.count_assignments()
        dropped = dropped_L.mean() if dropped_L is not None else lm.new_zeros(())
        values += [aux_L.sum().detach(), z.detach(), dropped.detach()]
        values += list(aux_L.detach().unbind())
        if dropped_L is not None:
            values += list(dropped_L.detach().unbind())
    else:
        values += [lm.new_zeros(()), lm.new_zeros(()), lm.new_zeros(())]
    (loss * scale).backward()
    taps.clear()
    return torch.stack(values)


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
            if taps is not None and taps.records:  # padding rows (and padding-only batches) count nothing
                loads.append(moe_losses.expert_counts(taps.records, count * batch_BS.shape[1]).double())
    if taps is not None:
        taps.clear()
    model.train(was_training)
    total = all_reduce_sum(total, info)
    record: dict[str, Any] = {"eval_loss": (total[0] / total[1]).item(), "eval_tokens": int(total[1].item())}
    record["eval_ppl"] = math.exp(min(record["eval_loss"], 50.0))
    if taps is not None and taps.routers:
        local = torch.stack(loads).sum(0) if loads else torch.zeros(len(taps.routers), 1, dtype=torch.float64)
        load_LE = all_reduce_sum(local, info)
        load_LE = load_LE / load_LE.sum(-1, keepdim=True).clamp_min(1)
        imbalance = (load_LE.max(-1).values / load_LE.mean(-1)).tolist()
        record["expert_load"] = [[round(v, 5) for v in row] for row in load_LE.tolist()]
        record["load_imbalance_max_over_mean"] = [round(v, 4) for v in imbalance]
    return record


def step0_check(
    model: nn.Module,
    recipe: TrainRecipe,
    dataset: PackedDataset,
    info: Dist,
    precision: torch.dtype,
    autocast: contextlib.AbstractContextManager,
) -> tuple[dict[str, Any], str | None]:
    """The record fields and a message: an upcycle's step-0 logits against its dense source, in the run's precision."""
    folder, plan = step0.dense_source(Path(recipe.model.path))
    if folder is None:
        return {}, (f"step-0 check: not run ({plan})" if "trained" in str(plan) else None)
    dense = load_causal_lm_strict(folder, torch.float32).to(info.device)
    if info.enabled and precision != torch.float32:
        dense = dense.to(precision)  # FSDP computes the MoE in the policy's dtype: the dense model does too
    result = step0.compare_with_dense(
        model,
        dense,
        plan,
        dataset,
        recipe.data.eval_sequences,
        recipe.batch.micro_batch_size,
        info,
        precision,
        autocast,
    )
    del dense
    record = result.record() | {"step0_matches_dense": result.passed}
    if result.passed is None:
        exactness = plan.get("exactness") or {}
        measured = (exactness.get("rounding_deviation") or {}).get("relative")
        kind = (
            f"exact up to rounding to {exactness.get('rounded_to')}"
            + (f" ({measured:.3g} measured at conversion)" if measured is not None else "")
            if exactness.get("exact_up_to_rounding")
            else "approximate by design"
        )
        return record, (
            f"step-0 check: {kind}, the logits deviate {result.rel_diff:.3g} relative from the dense "
            f"model's (top-1 agreement {result.top1_agreement:.2%})"
        )
    if result.passed is False:
        return record, _step0_failure(result, folder, recipe)
    return record, None


def _step0_failure(result: step0.Step0Result, dense: Path, recipe: TrainRecipe) -> str:
    """An exact upcycle beyond its step-0 tolerance: stop (nothing trained), or in half precision, well within
    what its rounding might reach on a larger model than those measured, warn."""
    figures = (
        f"{result.rel_diff:.3g} relative ({result.precision}, tolerance {result.tolerance:g}; top-1 agreement "
        f"{result.top1_agreement:.2%})"
    )
    stop_at = result.tolerance * step0.STOP_FACTOR[result.precision]
    if result.rel_diff <= stop_at:
        return (
            f"warning: at step 0 the model's logits differ from its dense source's by {figures}, more than exact "
            f"upcycles measured in {result.precision} but under the {stop_at:g} at which a run stops; check it in "
            f"float32 with `upcycle verify {dense} {recipe.model.path}`"
        )
    rebuild = (
        f"; if it reports a difference, delete {recipe.model.path} so that the next run converts again"
        if recipe.model.source is not None
        else ", and convert again"
    )
    raise UpcycleError(
        f"at step 0 the model's logits differ from its dense source's by {figures}, although its conversion is "
        "exact by design; nothing was trained.",
        f"run `upcycle verify {dense} {recipe.model.path}` to find what differs{rebuild}.",
    )


def train(
    recipe: TrainRecipe,
    reporter: Reporter | None = None,
    resume: bool = False,
    allow_changes: set[str] | frozenset[str] = frozenset(),
    force: bool = False,
    resume_from: Path | None = None,
) -> TrainSummary:
    """Run the recipe to its last step (or resume it); returns what happened.

    A resumed run continues the checkpoint's data stream (the latest, or `resume_from`); `allow_changes` names the
    recipe changes that alter what is trained (see `upcycle.train.resume`) which the user accepts. A run folder
    holding another run is refused unless resumed or replaced (`force`); see `upcycle.train.run_folder`.
    """
    started = time.perf_counter()
    first_rank = int(os.environ.get("RANK", "0")) == 0
    main_rank = reporter is not None and first_rank
    run_dir = Path(recipe.run.output_dir)
    resuming = resume or resume_from is not None
    if recipe.model.path is not None:  # before anything is written: not over the model, no user file in export/
        check_output_dir(recipe)
    reads_folder = first_rank or resuming or not force  # a new run under --force: rank 0 alone, as it clears it
    if reads_folder:  # before anything is converted or written
        check_run_folder(run_dir, resuming, resume_from, force)
    with run_lock(run_dir, enabled=first_rank):
        # again, now that the folder is ours
        checkpoint = check_run_folder(run_dir, resuming, resume_from, force) if reads_folder else None
        if force and checkpoint is None and first_rank:
            clear_earlier_run(run_dir)
        # before the process group exists: converting may take minutes, longer than a collective waits
        recipe, conversion = prepare_model(recipe, reporter.message if main_rank else lambda _: None)
        info = init_distributed()
        report = reporter if (reporter is not None and info.is_main) else SilentReporter()
        try:
            summary = _train(recipe, info, report, checkpoint, started, set(allow_changes))
        finally:
            shutdown(info)
    return dataclasses.replace(summary, conversion=conversion)


def check_output_dir(recipe: TrainRecipe) -> None:
    """Refuse, before any data is tokenised or any step runs, a run folder whose writes would damage something.

    The run folder must keep clear of the model it trains (not it, not inside it, not containing it); its
    ``export`` folder may only hold an earlier upcycle export (replaced at the end, atomically). Another run's
    records are refused earlier (`check_run_folder`).
    """
    run_dir = Path(recipe.run.output_dir)
    model_dir = [("model.path", recipe.model.path)]
    refuse_overlap(run_dir, model_dir, option="run.output_dir")
    if recipe.run.export:
        refuse_overlap(run_dir / "export", model_dir, option="run.output_dir/export")
        check_replaceable_export(run_dir / "export")


def _train(
    recipe: TrainRecipe,
    info: Dist,
    report: Reporter,
    checkpoint: Path | None,
    started: float,
    allow_changes: set[str],
) -> TrainSummary:
    run_dir = Path(recipe.run.output_dir)
    check_output_dir(recipe)
    torch.manual_seed(recipe.run.seed)
    precision = recipe.run.precision
    if precision == "auto":
        precision = "bf16" if info.device.type == "cuda" else "fp32"
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    use_autocast = compute_dtype != torch.float32 and not info.enabled  # FSDP2's policy casts when sharded
    autocast = torch.autocast(info.device.type, dtype=compute_dtype) if use_autocast else contextlib.nullcontext()

    shape = model_shape(meta_model(recipe.model.path, recipe.model.trust_remote_code))
    layout = resolve_layout(recipe.parallel, info.world_size, shape.num_experts)
    batch = resolve_batch(recipe.batch, recipe.data.seq_len, layout.data_parallel)
    point = None
    if checkpoint is not None:  # checked before any data is tokenised or weights loaded
        saved = read_trainer_state(checkpoint)
        point = resume_point(
            saved, recipe.to_dict(), batch.global_batch_sequences, info.world_size, allow_changes, batch.steps
        )
        for note in point.notes:
            report.message(note)
    if recipe.optim.warmup_steps >= batch.steps:
        report.message(
            f"warning: optim.warmup_steps ({recipe.optim.warmup_steps}) >= the run's {batch.steps} steps: the learning "
            "rate rises for the whole run and never decays. Lower optim.warmup_steps or raise batch.steps."
        )
    train_set = tokens_for(recipe.data.train, recipe, info, report.message)
    repeats = repetition_note(len(train_set), batch.global_batch_sequences, batch.steps)
    if repeats:
        report.message(repeats)
    if point is not None:
        note = check_same_data(saved, train_set.tokens_sha256, allow_changes)
        if note:
            report.message(note)
    eval_set = tokens_for(recipe.data.eval, recipe, info, report.message) if recipe.data.eval else None
    export_dtype, export_use_cache = export_settings(Path(recipe.model.path), recipe.run.export_dtype)
    for line in layout.describe(shape.num_experts):
        report.message(line)
    model = load_model(recipe, info, layout, compute_dtype)
    placement = all_gather_objects(expert_placement(model), info)
    if shape.num_experts:
        planned = [layout.experts_of_rank(r, shape.num_experts) for r in range(info.world_size)]
        held = [range(p["experts"][0], p["experts"][1] + 1) for p in placement]
        if held != planned:
            raise RuntimeError(f"the experts were placed {held}, not as the layout planned {planned}")
    taps = moe_losses.RouterTaps(model, recipe.moe.capacity_factor, count=recipe.moe.bias_update_rate > 0)
    if compute_dtype != torch.float32 and taps.routers:
        fp32 = routers_in_fp32(recipe.moe.router_dtype, taps.routers)
        if fp32:
            run_routers_in_fp32(taps.routers, info.device.type)
        report.message(
            f"routers compute in {'float32' if fp32 else precision} (moe.router_dtype {recipe.moe.router_dtype})"
        )
    optimizer = make_optimizer(model, recipe)
    if recipe.run.compile:
        model.compile()  # compiles forward in place; parameters, hooks and state-dict names are unchanged
    order = BatchOrder(len(train_set), recipe.run.seed)

    start_step, resumed_from, history, last_loss = 0, None, [], None
    position, tokens, bad_steps, stepped = 0, 0, 0, False
    if checkpoint is not None and point is not None:
        stepped = bool(saved.get("optimizer_stepped", True))  # older checkpoints always saved the optimizer
        load_checkpoint(checkpoint, model, optimizer if stepped else None)
        start_step = resumed_from = point.step
        history, position, tokens, bad_steps = list(point.history), point.position, point.tokens, point.bad_steps
        last_loss = saved.get("last_loss")  # a finished run resumed trains nothing: its record still has it
    log = MetricsLog(run_dir, info.is_main, recipe.run.tensorboard, resume_step=start_step)
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
            fields, message = step0_check(model, recipe, eval_set, info, compute_dtype, autocast)
            record |= fields
            if message:
                report.message(message)
        history.append({k: v for k, v in record.items() if k != "expert_load"})
        log.write(record)
        report.evaluated(record)

    if start_step == 0:
        run_eval(0)
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
            step, batch.global_batch_sequences, batch.micro_batch_size, info.rank, info.world_size, position=position
        )
        totals = None
        for ids in micro_batches:
            batch_BS = make_batch(train_set, ids).to(info.device)
            values = run_micro_batch(model, taps, batch_BS, recipe, 1.0 / len(micro_batches), autocast)
            totals = values if totals is None else totals + values
        assert totals is not None
        clip = recipe.optim.grad_clip if recipe.optim.grad_clip is not None else math.inf
        grad_norm = clip_grad_norm(params, clip)
        # one host read per step: the mean losses over ranks and the (already global) gradient norm
        step_values = torch.cat([totals.double() / len(micro_batches), grad_norm.detach().double().reshape(1)])
        step_values = all_reduce_sum(step_values, info).cpu()
        means, grad_norm_value = step_values[:-1] / info.world_size, step_values[-1].item() / info.world_size
        finite = math.isfinite(grad_norm_value) and math.isfinite(means[0].item())
        if finite:
            optimizer.step()
            stepped = True
            bad_steps = 0
            if recipe.moe.bias_update_rate > 0:
                moe_losses.update_score_biases(taps, recipe.moe.bias_update_rate, lambda t: all_reduce_sum(t, info))
        else:
            bad_steps += 1
            report.message(f"step {step + 1}: non-finite loss or gradient, step skipped ({bad_steps} in a row)")
        taps.reset_counts()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - step_start
        last_loss = means[0].item()
        position += batch.global_batch_sequences
        tokens += batch.tokens_per_step
        record = {
            "kind": "train",
            "step": step + 1,
            "loss": last_loss,
            "aux_loss": means[1].item(),
            "z_loss": means[2].item(),
            "lr": lr,
            "grad_norm": grad_norm_value,
            "tokens": tokens,
            "data_position": position,  # sequences of the training stream consumed
            "epoch": round(position / len(train_set), 6),  # passes over the training data completed
            "tokens_per_s": batch.tokens_per_step / seconds,
            "step_seconds": seconds,
            "skipped": not finite,
        }
        capacity = recipe.moe.capacity_factor is not None
        moe_layers = (len(means) - 4) // (2 if capacity else 1)  # see run_micro_batch for the layout
        if moe_layers:
            record["aux_loss_per_layer"] = [round(v, 6) for v in means[4 : 4 + moe_layers].tolist()]
        if capacity and moe_layers:
            record["dropped_fraction"] = means[3].item()
            record["dropped_fraction_per_layer"] = [round(v, 6) for v in means[4 + moe_layers :].tolist()]
        if (step + 1) % max(1, recipe.run.log_interval) == 0 or step + 1 == batch.steps or not finite:
            log.write(record)
        report.step(record)
        if step == start_step:
            layout_record = parallel_record(model, layout, placement, info)
            log.write(layout_record | {"step": step + 1})
            report.message(describe_experts_calls(layout_record))
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
                "tokens": tokens,
                "data_position": position,
                "global_batch_sequences": batch.global_batch_sequences,
                "world_size": info.world_size,
                "bad_steps": bad_steps,
                "optimizer_stepped": stepped,  # before the first real step there is no optimizer state to save
                "eval_history": history,
                "recipe": recipe.to_dict(),
                "last_loss": last_loss,
                "train_tokens_sha256": train_set.tokens_sha256,  # what was trained on, whatever produced it
            }
            save_checkpoint(
                run_dir,
                step + 1,
                model,
                optimizer if stepped else None,
                trainer_state,
                keep=recipe.run.keep_checkpoints,
            )
    summary = TrainSummary(
        batch.steps,
        tokens,
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
            dtype=export_dtype,
            use_cache=export_use_cache,
        )
        summary.export_dir = str(out) if out else None
    taps.remove()
    log.close()
    return summary
