"""`upcycle train RECIPE --dry-run`: everything resolved (recipe, batch, layout, memory per rank), no weight loaded.

The model is built on the meta device from its config.json alone, so a plan for 64 ranks over 8 nodes runs on
one laptop with `--world-size 64`; nothing is launched, tokenised or allocated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from upcycle.convert.source import weight_files
from upcycle.errors import SourceError
from upcycle.train.batch_size import resolve_batch
from upcycle.train.conversion import cached_conversion, planned_config
from upcycle.train.memory_plan import MemoryPlan, Workload, plan_memory
from upcycle.train.model_shape import ModelShape, meta_model, model_shape
from upcycle.train.parallel import Layout, resolve_layout
from upcycle.train.recipe import TrainRecipe
from upcycle.units import format_bytes


@dataclass
class DryRun:
    layout: Layout
    shape: ModelShape
    precision: str
    steps: int
    micro_batch_size: int
    grad_accum: int
    tokens_per_step: int
    plan: MemoryPlan
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The plan as text: the layout, the batch, then one rank's memory table and whether it fits."""
        shape, plan = self.shape, self.plan
        lines = [
            f"model: {shape.total_params:,} parameters ({shape.expert_params:,} in experts), {len(shape.layers)} "
            f"layers, {shape.num_experts or 'no'} experts per layer",
            *self.layout.describe(shape.num_experts),
            f"batch: {self.micro_batch_size} sequence(s) per micro-batch x {self.grad_accum} accumulation step(s) x "
            f"{self.layout.data_parallel} data rank(s) = {self.tokens_per_step:,} tokens per step, {self.steps} steps",
            f"precision: {self.precision}",
            *self.notes,
            f"memory per rank (each of {self.layout.world_size} alike):",
        ]
        width = max(len(name) for name, _, _ in plan.rows)
        lines += [f"  {name:<{width}}  {format_bytes(count):>11}  {how}" for name, count, how in plan.rows]
        lines.append(f"  {'total':<{width}}  {format_bytes(plan.total):>11}")
        if plan.device_bytes is not None:
            verdict = "fits" if plan.fits else "does NOT fit"
            lines.append(f"{verdict} {plan.device_name} ({format_bytes(plan.device_bytes)} per rank)")
        return lines

    def to_json(self) -> dict:
        """The same plan for scripts: every figure `lines` prints, in bytes and counts."""
        shape, plan = self.shape, self.plan
        return {
            "model": {
                "parameters": shape.total_params,
                "expert_parameters": shape.expert_params,
                "layers": len(shape.layers),
                "experts_per_layer": shape.num_experts,
            },
            "layout": self.layout.as_dict() | {"data_parallel": self.layout.data_parallel},
            "batch": {
                "micro_batch_size": self.micro_batch_size,
                "grad_accum": self.grad_accum,
                "tokens_per_step": self.tokens_per_step,
                "steps": self.steps,
            },
            "precision": self.precision,
            "notes": list(self.notes),
            "memory_per_rank": {
                "rows": [{"what": name, "bytes": count, "how": how} for name, count, how in plan.rows],
                "total_bytes": plan.total,
                "device": plan.device_name or None,
                "device_bytes": plan.device_bytes,
                "fits": plan.fits,
            },
        }


def _device_budget(device_memory: int | None, ranks_here: int) -> tuple[int | None, str, bool]:
    """(bytes per rank, what they are, whether the device is an accelerator)."""
    if device_memory is not None:
        return device_memory, "the given --device-memory", True
    if torch.cuda.is_available() and os.environ.get("UPCYCLE_DEVICE", "") != "cpu":
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), f"this {props.name}", True
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // max(ranks_here, 1), f"this host's memory shared by {ranks_here} rank(s)", False


def dry_run(recipe: TrainRecipe, world_size: int | None = None, device_memory: int | None = None) -> DryRun:
    """Resolve the run as `upcycle train` would on `world_size` ranks (default: the ranks launched, else 1)."""
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    notes: list[str] = []
    if recipe.model.path is None:  # model.source with model.upcycle
        cached = cached_conversion(recipe)
        if cached is not None:
            recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, path=str(cached)))
            notes.append(f"model: the cached conversion {cached}")
        else:
            notes.append("model: not converted yet; shapes from the conversion plan")
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / "config.json").write_text(json.dumps(planned_config(recipe)))
                shape = model_shape(meta_model(Path(folder), recipe.model.trust_remote_code))
    if recipe.model.path is not None:
        shape = model_shape(meta_model(Path(recipe.model.path), recipe.model.trust_remote_code))
    layout = resolve_layout(recipe.parallel, world, shape.num_experts)
    batch = resolve_batch(recipe.batch, recipe.data.seq_len, layout.data_parallel)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", world if world_size else 1))
    budget, device_name, accelerator = _device_budget(device_memory, ranks_here)
    precision = recipe.run.precision
    if precision == "auto":
        precision = "bf16" if accelerator else "fp32"
        notes.append(f"precision auto -> {precision} ({'an accelerator' if accelerator else 'the CPU'})")
    compute_bytes = 2 if precision == "bf16" else 4
    work = Workload(batch.micro_batch_size, recipe.data.seq_len, compute_bytes, recipe.model.activation_checkpointing)
    plan = plan_memory(shape, layout, work, budget)
    plan.device_name = device_name
    if not accelerator:
        # on the CPU the rank's process itself is part of the budget: torch, transformers, the tokenizer
        runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        plan.rows.append(("runtime (this process, measured)", runtime, "torch and transformers loaded, no weights"))
        # the loader reads through memory maps that stay open (weights it does not copy are views of them): their
        # pages count in the rank's RSS, although the kernel may drop them (clean page cache)
        folder = Path(recipe.model.path) if recipe.model.path is not None else None
        mapped = sum(f.stat().st_size for f in _loaded_files(folder)) // layout.fsdp
        if mapped:
            plan.rows.append(
                ("checkpoint files mapped", mapped, f"1/{layout.fsdp} of the safetensors files; reclaimable page cache")
            )
    return DryRun(
        layout,
        shape,
        precision,
        batch.steps,
        batch.micro_batch_size,
        batch.grad_accum,
        batch.tokens_per_step,
        plan,
        notes,
    )


def _loaded_files(folder: Path | None) -> list[Path]:
    """The weight files transformers maps for this folder (none when it is not a loadable folder yet)."""
    if folder is None or not (folder / "config.json").is_file():
        return []
    try:
        return [
            f
            for f in weight_files(folder, json.loads((folder / "config.json").read_text()))
            if f.suffix == ".safetensors"
        ]
    except (SourceError, json.JSONDecodeError):
        return []
