"""One training run as an object: its phases are the methods, what it knows and where it stands the attributes.

`Trainer.run` sets the run up (precision, layout, batch, the resume point, data, model, optimizer), evaluates at
step 0 (with the step-0 check), takes the steps, evaluating and checkpointing at their intervals, and exports.
The phases keep one order on every rank: the RNG is seeded once before anything draws from it, and every
collective (data barriers, placement, the per-step all-reduce, evaluation, checkpoints, export) is reached by all
ranks in the same sequence.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from upcycle.errors import UpcycleError
from upcycle.train import moe_losses, step0
from upcycle.train.batch_order import BatchOrder, repetition_note
from upcycle.train.batch_size import resolve_batch
from upcycle.train.checkpoint import load_checkpoint, read_trainer_state, save_checkpoint
from upcycle.train.distributed import Dist, all_reduce_sum, barrier, clip_grad_norm
from upcycle.train.evaluation import evaluate
from upcycle.train.export import check_replaceable_export, export_model, export_settings
from upcycle.train.metrics import MetricsLog
from upcycle.train.micro_batch import run_micro_batch
from upcycle.train.model_setup import check_kernels_first, check_random_init_layout, load_model, make_optimizer
from upcycle.train.model_shape import meta_model, model_shape
from upcycle.train.packing import PackedDataset, make_batch, packed_dataset
from upcycle.train.parallel import resolve_layout
from upcycle.train.placement import checked_placement, describe_experts_calls, parallel_record
from upcycle.train.recipe import TrainRecipe
from upcycle.train.reporting import Reporter, announce
from upcycle.train.resume import ResumePoint, check_same_data, resume_point
from upcycle.train.router_precision import routers_in_fp32, run_routers_in_fp32
from upcycle.train.run_state import Progress, TrainSummary
from upcycle.train.schedule import lr_at
from upcycle.train.step_metrics import StepMetrics, mean_over_ranks
from upcycle.train.task_scoring import TaskScoring


class TrainingDiverged(UpcycleError):
    """The loss or gradients stayed non-finite for too many consecutive steps."""

    exit_code = 4


class Trainer:
    """Runs one recipe on this rank, from its first (or resumed) step to its export.

    Built cheaply; `run` does the work. `resume_checkpoint` is the checkpoint the run folder check chose (None for
    a new run); `allow_changes` names the recipe changes a resumed run accepts (see `upcycle.train.resume`).
    """

    def __init__(
        self,
        recipe: TrainRecipe,
        info: Dist,
        report: Reporter,
        resume_checkpoint: Path | None,
        allow_changes: set[str],
    ) -> None:
        self.recipe, self.info, self.report = recipe, info, report
        self.resume_checkpoint, self.allow_changes = resume_checkpoint, allow_changes
        self.run_dir = Path(recipe.run.output_dir)
        self.progress = Progress()
        self.start_step = 0
        self.resumed_from: int | None = None
        self.saved: dict[str, Any] = {}  # the resumed checkpoint's trainer state
        self.point: ResumePoint | None = None
        self.tasks: TaskScoring | None = None  # downstream tasks, when the recipe names some

    # ---- the run ---------------------------------------------------------------------------------------------

    def run(self, started: float) -> TrainSummary:
        """Set up, evaluate at step 0, train every step left, export; `started` is when the run began."""
        self.setup()
        if self.start_step == 0:
            self.evaluate(0, held_out=True)
        for step in range(self.start_step, self.batch.steps):
            record = self.step(step)
            self._report_step(step, record)
            done = step + 1 == self.batch.steps
            held_out = _due(self.recipe.run.eval_interval, step) or done
            if held_out or (self.tasks is not None and self.tasks.due(step + 1, held_out)):
                self.evaluate(step + 1, held_out)
            if self.recipe.run.checkpoints and (_due(self.recipe.run.checkpoint_interval, step) or done):
                self.checkpoint(step + 1)
        p = self.progress
        summary = TrainSummary(
            self.batch.steps,
            p.tokens,
            p.last_loss,
            p.history,
            resumed_from=self.resumed_from,
            seconds=time.perf_counter() - started,
        )
        if self.recipe.run.export:
            summary.export_dir = self.export(summary)
        self.taps.remove()
        self.log.close()
        return summary

    # ---- setup: before step 0 --------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before the first step, cheapest checks first: a refused resume costs no tokenising or load."""
        torch.manual_seed(self.recipe.run.seed)
        self._choose_precision()
        self._plan()
        self._load_data()
        recipe = self.recipe
        self.tasks = TaskScoring.prepare(recipe.eval, recipe.model.path, self.info, self.batch.steps, self.precision)
        self._build_model()
        self.order = BatchOrder(len(self.train_set), recipe.run.seed)
        if self.point is not None:
            self.resume()
        self._open_records()
        if self.tasks is not None and self.start_step:
            self.tasks.restore(self.run_dir, self.start_step)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.report.start(
            {
                "steps": self.batch.steps,
                "start_step": self.start_step,
                "tokens_per_step": self.batch.tokens_per_step,
                "world_size": self.info.world_size,
                "device": str(self.info.device),
                "precision": self.precision,
                "routers": len(self.taps.routers),
                "train_sequences": len(self.train_set),
                "experts_implementation": getattr(self.model.config, "_experts_implementation", None),
            }
        )

    def _choose_precision(self) -> None:
        """bf16 on a GPU unless the recipe says otherwise; autocast in one process, FSDP2's policy when sharded."""
        precision = self.recipe.run.precision
        if precision == "auto":
            precision = "bf16" if self.info.device.type == "cuda" else "fp32"
        self.precision = precision
        self.compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        use_autocast = self.compute_dtype != torch.float32 and not self.info.enabled
        self.autocast: contextlib.AbstractContextManager = (
            torch.autocast(self.info.device.type, dtype=self.compute_dtype)
            if use_autocast
            else contextlib.nullcontext()
        )

    def _plan(self) -> None:
        """The layout and batch from the model's shape alone, and a resumed run's point, checked before any data is
        tokenised or weights loaded."""
        recipe = self.recipe
        self.shape = model_shape(meta_model(recipe.model.path, recipe.model.trust_remote_code))
        self.layout = resolve_layout(recipe.parallel, self.info.world_size, self.shape.num_experts)
        self.batch = resolve_batch(recipe.batch, recipe.data.seq_len, self.layout.data_parallel)
        check_random_init_layout(recipe.model.init, self.layout)
        if self.resume_checkpoint is not None:
            self.saved = read_trainer_state(self.resume_checkpoint)
            self.point = resume_point(
                self.saved,
                recipe.to_dict(),
                self.batch.global_batch_sequences,
                self.info.world_size,
                self.allow_changes,
                self.batch.steps,
            )
            for note in self.point.notes:
                self.report.message(note)
        if recipe.optim.warmup_steps >= self.batch.steps:
            self.report.message(
                f"warning: optim.warmup_steps ({recipe.optim.warmup_steps}) >= the run's {self.batch.steps} steps: the "
                "learning rate rises for the whole run and never decays. Lower optim.warmup_steps or raise batch.steps."
            )

    def _load_data(self) -> None:
        """The training and held-out token streams; a resumed run's training tokens must be the checkpoint's."""
        data = self.recipe.data
        self.train_set = self._tokens(data.train)
        repeats = repetition_note(len(self.train_set), self.batch.global_batch_sequences, self.batch.steps)
        if repeats:
            self.report.message(repeats)
        if self.point is not None:
            note = check_same_data(self.saved, self.train_set.tokens_sha256, self.allow_changes)
            if note:
                self.report.message(note)
        self.eval_set = self._tokens(data.eval) if data.eval else None

    def _tokens(self, files: list[str]) -> PackedDataset:
        """Rank 0 tokenises (once, cached); the others wait, then map the same file."""
        recipe = self.recipe
        cache = Path(recipe.data.cache_dir) if recipe.data.cache_dir else None
        args = ([Path(f) for f in files], Path(recipe.model.path), recipe.data.seq_len, recipe.data.text_field, cache)
        if self.info.is_main:
            announce(self.report, "tokenising (once, then cached)")
            progress = lambda done, total: announce(self.report, "tokenising (once, then cached)", done, total)  # noqa: E731
            dataset = packed_dataset(*args, warn=self.report.message, progress=progress)
        barrier(self.info)
        return dataset if self.info.is_main else packed_dataset(*args)

    def _build_model(self) -> None:
        """The model as laid out, its experts where planned, the router taps, the optimizer, compiled if asked."""
        recipe, info = self.recipe, self.info
        self.export_dtype, self.export_use_cache = export_settings(Path(recipe.model.path), recipe.run.export_dtype)
        for line in self.layout.describe(self.shape.num_experts):
            self.report.message(line)
        announce(self.report, "loading the model")
        self.model = load_model(recipe, info, self.layout, self.compute_dtype)
        self.placement = checked_placement(self.model, self.layout, self.shape.num_experts, info)
        self.taps = moe_losses.RouterTaps(
            self.model, recipe.moe.capacity_factor, count=recipe.moe.bias_update_rate > 0, say=self.report.message
        )
        if self.compute_dtype != torch.float32 and self.taps.routers:
            fp32 = routers_in_fp32(recipe.moe.router_dtype, self.taps.routers)
            if fp32:
                run_routers_in_fp32(self.taps.routers, info.device.type)
            dtype = "float32" if fp32 else self.precision
            self.report.message(f"routers compute in {dtype} (moe.router_dtype {recipe.moe.router_dtype})")
        self.optimizer = make_optimizer(self.model, recipe)
        check_kernels_first(self.model, recipe.model.experts_implementation, self.compute_dtype, self.report.message)
        if recipe.run.compile:
            self.model.compile()  # compiles forward in place; parameters, hooks and state-dict names are unchanged

    def resume(self) -> None:
        """Load the checkpoint's model (and optimizer, once it has stepped) and continue where it stood."""
        assert self.resume_checkpoint is not None and self.point is not None
        self.progress = Progress.resumed(self.point, self.saved)
        optimizer = self.optimizer if self.progress.stepped else None
        load_checkpoint(self.resume_checkpoint, self.model, optimizer)
        self.start_step = self.resumed_from = self.point.step

    def _open_records(self) -> None:
        """metrics.jsonl (and TensorBoard) from the start step on, and the resolved recipe; rank 0 writes."""
        self.log = MetricsLog(self.run_dir, self.info.is_main, self.recipe.run.tensorboard, resume_step=self.start_step)
        if self.log.tensorboard_note:
            self.report.message(self.log.tensorboard_note)
        if self.info.is_main:
            (self.run_dir / "recipe.resolved.json").write_text(json.dumps(self.recipe.to_dict(), indent=2) + "\n")

    # ---- a step ----------------------------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, Any]:
        """One optimizer step (0-based `step`) over this rank's share of the global batch; its train record."""
        started = time.perf_counter()
        recipe, batch, info, p = self.recipe, self.batch, self.info, self.progress
        o = recipe.optim
        lr = lr_at(
            step, peak=o.lr, minimum=o.min_lr, warmup_steps=o.warmup_steps, total_steps=batch.steps, kind=o.schedule
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = self.order.local_micro_batches(
            step, batch.global_batch_sequences, batch.micro_batch_size, info.rank, info.world_size, position=p.position
        )
        sums: StepMetrics | None = None
        for ids in micro_batches:
            batch_BS = make_batch(self.train_set, ids).to(info.device)
            metrics = run_micro_batch(self.model, self.taps, batch_BS, recipe, 1.0 / len(micro_batches), self.autocast)
            sums = metrics if sums is None else sums + metrics
        assert sums is not None
        grad_norm = clip_grad_norm(self.params, o.grad_clip if o.grad_clip is not None else math.inf)
        means, grad_norm_value = mean_over_ranks(sums, len(micro_batches), grad_norm, info)
        finite = math.isfinite(grad_norm_value) and math.isfinite(means.lm.item())
        self._apply(step, finite)
        seconds = time.perf_counter() - started
        p.last_loss = means.lm.item()
        p.position += batch.global_batch_sequences
        p.tokens += batch.tokens_per_step
        record = {
            "kind": "train",
            "step": step + 1,
            "loss": p.last_loss,
            "aux_loss": means.aux.item(),
            "z_loss": means.z.item(),
            "lr": lr,
            "grad_norm": grad_norm_value,
            "tokens": p.tokens,
            "data_position": p.position,  # sequences of the training stream consumed
            "epoch": round(p.position / len(self.train_set), 6),  # passes over the training data completed
            "tokens_per_s": batch.tokens_per_step / seconds,
            "step_seconds": seconds,
            "skipped": not finite,
        }
        return record | means.per_layer_record()

    def _apply(self, step: int, finite: bool) -> None:
        """Take the optimizer step (and move the score biases) when the step is finite, else skip and count it."""
        p, rate = self.progress, self.recipe.moe.bias_update_rate
        if finite:
            self.optimizer.step()
            p.stepped = True
            p.bad_steps = 0
            if rate > 0:
                moe_losses.update_score_biases(self.taps, rate, lambda t: all_reduce_sum(t, self.info))
        else:
            p.bad_steps += 1
            self.report.message(f"step {step + 1}: non-finite loss or gradient, step skipped ({p.bad_steps} in a row)")
        self.taps.reset_counts()
        self.optimizer.zero_grad(set_to_none=True)

    def _report_step(self, step: int, record: dict[str, Any]) -> None:
        """Log the record (at the log interval, the last step and any skipped one), report it, and after the first
        step the layout that really ran; stop a run that keeps diverging."""
        run = self.recipe.run
        if (step + 1) % max(1, run.log_interval) == 0 or step + 1 == self.batch.steps or record["skipped"]:
            self.log.write(record)
        self.report.step(record)
        if step == self.start_step:
            layout_record = parallel_record(self.model, self.layout, self.placement, self.info)
            self.log.write(layout_record | {"step": step + 1})
            self.report.message(describe_experts_calls(layout_record))
        if self.progress.bad_steps >= run.max_bad_steps:
            raise TrainingDiverged(
                f"training stopped at step {step + 1}: {self.progress.bad_steps} consecutive non-finite steps.",
                "lower optim.lr, check the data, or resume from an earlier checkpoint.",
            )

    # ---- evaluation, checkpoints, export ---------------------------------------------------------------------

    def evaluate(self, step: int, held_out: bool) -> None:
        """The evaluations after `step` steps: held-out loss (with the step-0 check at 0), downstream tasks when due."""
        if held_out and self.eval_set is not None:
            self._held_out(step)
        if self.tasks is not None and self.tasks.due(step, held_out):
            record = self.tasks.run(step, self.model, self.autocast, self.taps)
            self.log.write(record)
            self.report.message(self.tasks.summary(record))

    def _held_out(self, step: int) -> None:
        evaluated = evaluate(self.model, self.eval_set, self.recipe, self.info, self.taps, self.autocast)
        record = {"kind": "eval", "step": step, **evaluated}
        if step == 0:
            fields, message = step0.check(
                self.model, self.recipe, self.eval_set, self.info, self.compute_dtype, self.autocast
            )
            record |= fields
            if message:
                self.report.message(message)
        self.progress.history.append({k: v for k, v in record.items() if k != "expert_load"})
        self.log.write(record)
        self.report.evaluated(record)

    def checkpoint(self, step: int) -> None:
        """Save the model, the optimizer once it has stepped, and where the run stands after `step` steps."""
        p, recipe = self.progress, self.recipe
        state = p.trainer_state(
            step,
            self.batch.global_batch_sequences,
            self.info.world_size,
            recipe.to_dict(),
            self.train_set.tokens_sha256,
        )
        optimizer = self.optimizer if p.stepped else None
        save_checkpoint(self.run_dir, step, self.model, optimizer, state, keep=recipe.run.keep_checkpoints)

    def export(self, summary: TrainSummary) -> str | None:
        """The HF-native export in RUN_DIR/export, replacing an earlier upcycle export atomically."""
        out_dir = self.run_dir / "export"
        check_replaceable_export(out_dir)  # again: files may have been put there while it trained
        training = {
            "steps": summary.steps,
            "tokens": summary.tokens,
            "final_loss": summary.final_loss,
            "eval_history": self.progress.history,
            "downstream": self.tasks.latest if self.tasks is not None else None,
            "recipe": self.recipe.to_dict(),
        }
        model_dir = Path(self.recipe.model.path)
        out = export_model(
            self.model,
            self.info,
            model_dir,
            out_dir,
            training,
            force=True,
            dtype=self.export_dtype,
            use_cache=self.export_use_cache,
        )
        return str(out) if out else None


def _due(interval: int | None, step: int) -> bool:
    """Whether an every-`interval`-steps action (0 or None: never) falls after 0-based `step`."""
    return bool(interval) and (step + 1) % interval == 0
