"""Reproduce the paper's central comparison at small scale: the dense control against its upcycled MoEs.

``compare`` trains, from one dense model (SmolLM2-135M by default) on the same fixed text, the dense control and
the paper's MoE variants for the same number of training tokens, then reports what the paper's Table 1 reports:
held-out loss and perplexity at equal tokens, relative improvement over the dense control, and throughput; plus
an equal-FLOPs view (each run's held-out loss interpolated at the training FLOPs the dense control spent) and a
plot of held-out loss against tokens and against FLOPs for every run. Every number comes from the runs'
``metrics.jsonl`` (written by ``upcycle train``'s own loop), so ``upcycle plot RUN_DIR...`` redraws any set of
runs, including ones trained by hand.

FLOPs per training token (forward + backward), from the model configuration::

    6 * N_active + 12 * n_layers * (n_heads * head_dim) * seq_len

where N_active counts the weight-matrix parameters a token uses: attention projections, the router, the dense
MLP or only its top-k experts' MLPs (k/E of the expert weights), and the LM head; not the input-embedding
lookup, norms or biases (the PaLM appendix B convention; attention scores and values without causal halving).

Each run (convert, then train) runs in its own Python process by default, so the memory of one model is
returned before the next loads; a finished run (``result.json`` in its folder) is reused when the command is
run again with the same settings, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upcycle.errors import OptionError, OutputError, UpcycleError
from upcycle.output_safety import exists, refuse_existing, refuse_overlap, staged

FLOPS_FORMULA = (
    "FLOPs/token = 6 x N_active + 12 x layers x (heads x head_dim) x seq_len  "
    "(N_active: attention, router, dense MLP or top-k experts' MLPs, LM head; no embedding lookup)"
)
RESULT_FILE = "result.json"
RUN_INFO_FILE = "run_info.json"


# ------------------------------------------------------------------------------------------ variants and sizes


@dataclass(frozen=True)
class Variant:
    """One arm of the comparison: the dense control (``options`` None) or an upcycle of it."""

    name: str
    label: str  # as in the paper's tables
    options: dict[str, Any] | None = None  # UpcycleOptions fields; None = the dense model itself
    recipe: dict[str, Any] | None = None  # a user recipe (then the model is its model.path, no conversion)

    @property
    def is_dense(self) -> bool:
        return self.options is None and self.recipe is None


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("dense", "Dense (continued training)"),
        Variant("e8g1t2-renorm", "E8G1T2, topK-then-softmax (renormalised)", {"experts": 8, "top_k": 2}),
        Variant(
            "e8g1t2-softmax",
            "E8G1T2, softmax-then-topK + weight scaling",
            {"experts": 8, "top_k": 2, "router": "softmax-topk"},
        ),
        Variant("e8g8t8", "E8G8T8, virtual groups", {"experts": 8, "granularity": 8, "top_k": 8}),
        Variant("drop-upcycling", "E8G1T2, Drop-Upcycling r=0.5", {"experts": 8, "top_k": 2, "drop_upcycling": 0.5}),
    )
}
DEFAULT_VARIANTS = ("dense", "e8g1t2-renorm", "e8g1t2-softmax", "e8g8t8")


@dataclass(frozen=True)
class Size:
    """Everything that sets a comparison's cost: the same for every run, so tokens are equal."""

    name: str
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    steps: int
    eval_interval: int
    eval_sequences: int  # held-out sequences per evaluation (0 = all)
    lr: float
    min_lr: float
    warmup_steps: int
    precision: str = "auto"
    layers: int | None = None  # keep only the first N decoder layers of the dense model (None = all)
    moe_layers: str = "all"  # which decoder layers become MoE (convert's --layers); the others stay dense
    budget: str = ""  # what it is sized for, printed with the plan
    experts_implementation: str = "auto"

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch_size * self.grad_accum

    def describe(self) -> str:
        depth = "all layers" if self.layers is None else f"first {self.layers} layers only"
        depth += ", MoE in every layer" if self.moe_layers == "all" else f", MoE in layers {self.moe_layers} only"
        return (
            f"{self.name} size: {self.steps} steps x {self.micro_batch_size * self.grad_accum} sequences x "
            f"{self.seq_len} tokens = {self.steps * self.tokens_per_step:,} training tokens per run, "
            f"held-out loss every {self.eval_interval} steps on "
            f"{'all' if not self.eval_sequences else self.eval_sequences} held-out sequences, "
            f"peak LR {self.lr:g}, {self.precision} ({depth})"
        )


SIZES: dict[str, Size] = {
    # 2 CPU cores, fp32. The full E8 top-2 upcycle of all 30 layers of SmolLM2 (0.69 B parameters, ~15 GB with
    # AdamW) took 82 s for one step of 4 x 128 tokens on this shared 2-core machine (~20 s at best), so four MoE
    # runs of it overrun 30 minutes. Cutting the model to its first layers is no way out: it breaks a trained
    # model (held-out loss 3.95 for all 30 layers, 19.3 for the first 6, 11.6 for the first 3 + last 3).
    # So the CPU size keeps the whole real model and upcycles only its last 6 decoder layers (24-29; the other
    # 24 keep their dense MLP): every arm starts from SmolLM2 itself, the exact upcycles at its loss. Each run
    # is 12 steps of 2 x 128 tokens: enough to see the direction of the first steps, not converged gains.
    "cpu": Size(
        "cpu",
        seq_len=128,
        micro_batch_size=2,
        grad_accum=1,
        steps=12,
        eval_interval=3,
        eval_sequences=8,
        lr=3e-4,
        min_lr=3e-5,
        warmup_steps=2,
        precision="fp32",
        moe_layers="24-29",
        budget="under 30 minutes on 2 CPU cores, all runs and seeds included",
    ),
    # One GPU (bf16), about 10 minutes for the default variants with two seeds of the dense control and the best
    # MoE: ~1.3 M tokens per run (just under one pass over the Shakespeare training text).
    "gpu": Size(
        "gpu",
        seq_len=1024,
        micro_batch_size=8,
        grad_accum=4,
        steps=40,
        eval_interval=5,
        eval_sequences=0,
        lr=3e-4,
        min_lr=3e-5,
        warmup_steps=4,
        precision="bf16",
        budget="about 10 minutes on one GPU, all runs and seeds included (not yet measured)",
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the comparison, complete enough to be executed in another process."""

    variant: str
    label: str
    seed: int
    run_dir: str
    recipe: dict[str, Any]  # a full recipe (paths absolute)
    convert_from: str | None = None  # dense folder to upcycle into model_dir first
    convert_options: dict[str, Any] | None = None
    model_dir: str | None = None
    keep_model: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------- FLOPs per token


@dataclass(frozen=True)
class ModelCost:
    total_params: int
    active_params: int  # weight-matrix parameters a token uses (see FLOPS_FORMULA)
    layers: int
    attn_width: int  # heads x head_dim
    experts: int  # routed experts per MoE layer (0 for a dense model)
    top_k: int
    architecture: str

    def flops_per_token(self, seq_len: int) -> float:
        return 6.0 * self.active_params + 12.0 * self.layers * self.attn_width * seq_len


def model_cost(model_dir: Path | str) -> ModelCost:
    """Parameter counts from the configuration alone (the model is built on the meta device, nothing loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from upcycle.moe_modules import moe_blocks, router_of

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # zeroed shared experts
        model = AutoModelForCausalLM.from_config(config)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    expert_params: set[int] = set()
    fraction: dict[int, float] = {}
    experts = top_k = 0
    for _, module in moe_blocks(model):
        block_experts, gate = module.experts, router_of(module)
        weight = getattr(gate, "weight", None)
        n = int(weight.shape[0]) if weight is not None else int(getattr(config, "num_experts", 0) or 0)
        k = int(getattr(config, "num_experts_per_tok", 0) or getattr(gate, "top_k", 0) or 1)
        experts, top_k = n, k
        for p in block_experts.parameters():
            expert_params.add(id(p))
            fraction[id(p)] = k / n if n else 1.0
    total = active = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.ndim < 2:
            continue  # norms, biases, score-correction biases: negligible FLOPs
        if p is embed and (head_weight is None or head_weight is not embed):
            continue  # an untied input embedding is a lookup, not a matmul
        active += round(p.numel() * fraction.get(id(p), 1.0))
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return ModelCost(
        total_params=total,
        active_params=active,
        layers=int(config.num_hidden_layers),
        attn_width=heads * head_dim,
        experts=experts,
        top_k=top_k,
        architecture=type(model).__name__,
    )


# ------------------------------------------------------------------------------------------------- planning


def truncated_model(src: Path, out: Path, layers: int) -> Path:
    """The first ``layers`` decoder layers of ``src`` with its final norm and head, saved as a new HF folder."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch

    from upcycle.loading import load_causal_lm_strict

    model = load_causal_lm_strict(src, torch.float32)
    total = model.config.num_hidden_layers
    if not 1 <= layers <= total:
        raise OptionError(f"layers={layers}: the model has {total} decoder layers.", f"use 1 to {total}.")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = list(model.config.layer_types)[:layers]
    with staged(out, force=True) as tmp:  # OUT is compare's own models/base-first*: an earlier copy goes
        model.save_pretrained(tmp)
        for path in Path(src).iterdir():
            if path.is_file() and (path.name.startswith("tokenizer") or path.suffix == ".jinja"):
                shutil.copy2(path, tmp / path.name)
    return out


def _recipe(size: Size, model: str, run_dir: Path, seed: int, train: Any, heldout: Any) -> dict[str, Any]:
    return {
        "model": {"path": model, "experts_implementation": size.experts_implementation},
        "data": {"train": train, "eval": heldout, "seq_len": size.seq_len, "eval_sequences": size.eval_sequences},
        "batch": {"micro_batch_size": size.micro_batch_size, "grad_accum": size.grad_accum, "steps": size.steps},
        "optim": {"lr": size.lr, "min_lr": size.min_lr, "warmup_steps": size.warmup_steps, "schedule": "cosine"},
        "moe": {"aux_loss_coef": 0.01, "z_loss_coef": 0.0, "capacity_factor": None},
        "run": _run_section(size, run_dir, seed),
    }


def _run_section(size: Size, run_dir: Path, seed: int) -> dict[str, Any]:
    return {
        "output_dir": str(run_dir),
        "seed": seed,
        "precision": size.precision,
        "eval_interval": size.eval_interval,
        "checkpoints": False,
        "export": False,
        "tensorboard": False,
        "log_interval": 1,
    }


def recipe_variant(path: Path) -> Variant:
    """A user recipe as one arm: its model, data, optimiser and MoE settings; the size sets batch and evaluation."""
    from upcycle.train.recipe import load_recipe

    recipe = load_recipe(path)  # validates and resolves every path
    data = recipe.to_dict()
    data["model"]["path"] = recipe.model.path
    data["data"]["train"], data["data"]["eval"] = list(recipe.data.train), list(recipe.data.eval)
    data.pop("source", None)
    return Variant(Path(path).stem, f"{Path(path).stem} (recipe)", recipe=data)


def _spec(variant: Variant, seed: int, size: Size, out: Path, base: Path, train: Any, heldout: Any, keep: bool):
    run_dir = out / "runs" / f"{variant.name}-s{seed}"
    if variant.recipe is not None:
        recipe = json.loads(json.dumps(variant.recipe))
        recipe["data"].update(seq_len=size.seq_len, eval_sequences=size.eval_sequences)
        recipe["batch"] = {
            "micro_batch_size": size.micro_batch_size,
            "grad_accum": size.grad_accum,
            "steps": size.steps,
        }
        recipe["run"] = _run_section(size, run_dir, seed)
        return RunSpec(variant.name, variant.label, seed, str(run_dir), recipe)
    if variant.is_dense:
        return RunSpec(
            variant.name, variant.label, seed, str(run_dir), _recipe(size, str(base), run_dir, seed, train, heldout)
        )
    model_dir = out / "models" / f"{variant.name}-s{seed}"
    options = {**(variant.options or {}), "seed": seed, "dtype": "float32"}
    if size.moe_layers != "all":
        options["layers"] = size.moe_layers
    recipe = _recipe(size, str(model_dir), run_dir, seed, train, heldout)
    return RunSpec(variant.name, variant.label, seed, str(run_dir), recipe, str(base), options, str(model_dir), keep)


# ------------------------------------------------------------------------------------------------- executing


class _LineReporter:
    """The training loop's progress as plain lines (the worker's log)."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo

    def start(self, info: dict[str, Any]) -> None:
        self.echo(f"start: {json.dumps(info)}")

    def step(self, record: dict[str, Any]) -> None:
        self.echo(
            f"step {record['step']}: loss {record['loss']:.4f} aux {record['aux_loss']:.4f} "
            f"{record['tokens_per_s']:.0f} tok/s {record['step_seconds']:.1f} s"
        )

    def evaluated(self, record: dict[str, Any]) -> None:
        self.echo(f"eval step {record['step']}: held-out loss {record['eval_loss']:.4f}")

    def message(self, text: str) -> None:
        self.echo(text)


def execute_run(spec: RunSpec, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Convert (for an upcycle), train, and write ``result.json`` and ``run_info.json`` in the run folder."""
    from upcycle.train.loop import train
    from upcycle.train.recipe import recipe_from_dict

    started = time.perf_counter()
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    exact: bool | None = None
    convert_seconds = 0.0
    model_dir = Path(spec.recipe["model"]["path"])
    if spec.convert_from is not None:
        from upcycle.convert import UpcycleOptions, convert

        echo(f"convert {spec.convert_from} -> {model_dir} {spec.convert_options}")
        result = convert(Path(spec.convert_from), model_dir, UpcycleOptions(**(spec.convert_options or {})), force=True)
        exact = bool(result.plan.exactness.exact)
        convert_seconds = result.seconds
    cost = model_cost(model_dir)
    recipe = recipe_from_dict(spec.recipe, run_dir)
    info = {
        "variant": spec.variant,
        "label": spec.label,
        "seed": spec.seed,
        "model": str(model_dir),
        "architecture": cost.architecture,
        "experts": cost.experts,
        "top_k": cost.top_k,
        "total_params": cost.total_params,
        "active_params": cost.active_params,
        "seq_len": recipe.data.seq_len,
        "flops_per_token": cost.flops_per_token(recipe.data.seq_len),
        "flops_formula": FLOPS_FORMULA,
        "exact_at_init": exact,
        "convert_options": spec.convert_options,
    }
    (run_dir / RUN_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    summary = train(recipe, _LineReporter(echo))
    if spec.model_dir and not spec.keep_model:
        shutil.rmtree(spec.model_dir, ignore_errors=True)
    result = {
        "spec": spec.to_json(),
        "steps": summary.steps,
        "tokens": summary.tokens,
        "final_loss": summary.final_loss,
        "train_seconds": summary.seconds,
        "convert_seconds": convert_seconds,
        "seconds": time.perf_counter() - started,
    }
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _finished(spec: RunSpec) -> dict[str, Any] | None:
    path = Path(spec.run_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return result if result.get("spec") == json.loads(json.dumps(spec.to_json())) else None


def _run_isolated(spec: RunSpec, echo: Callable[[str], None]) -> dict[str, Any]:
    """One run in its own interpreter (its memory is freed when it exits); its output goes to run_dir/log.txt."""
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    log_path = run_dir / "log.txt"
    with log_path.open("w") as log:
        code = subprocess.call(
            [sys.executable, "-m", "upcycle.compare", "--worker", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise UpcycleError(
            f"run {run_dir.name} failed (exit code {code}): {' | '.join(tail)}", f"see the full log in {log_path}."
        )
    return json.loads((run_dir / RESULT_FILE).read_text())


# ------------------------------------------------------------------------------------------------- analysis


@dataclass
class RunData:
    """One finished run as read back from its folder."""

    run_dir: str
    name: str
    variant: str
    label: str
    seed: int | None
    flops_per_token: float | None
    tokens_per_step: int
    evals: list[dict[str, Any]]  # step, tokens, flops, eval_loss, eval_ppl
    tokens_per_s: float | None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def final_tokens(self) -> int:
        return self.evals[-1]["tokens"] if self.evals else 0

    @property
    def final_flops(self) -> float | None:
        return self.evals[-1]["flops"] if self.evals and self.flops_per_token else None

    def loss_at(self, x: float, axis: str) -> float | None:
        """Held-out loss at ``x`` tokens or FLOPs, linear between evaluations; None outside the run."""
        points = [(e[axis], e["eval_loss"]) for e in self.evals if e.get(axis) is not None]
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            if x0 <= x <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        if points and math.isclose(points[-1][0], x, rel_tol=1e-9):
            return points[-1][1]
        return None


def _tokens_per_step_from(run_dir: Path, trains: list[dict[str, Any]]) -> int:
    for record in trains:
        if record.get("step"):
            return int(record["tokens"] // record["step"])
    recipe = run_dir / "recipe.resolved.json"
    if recipe.is_file():
        data = json.loads(recipe.read_text())
        batch = data["batch"]
        return int(data["data"]["seq_len"] * batch["micro_batch_size"] * (batch.get("grad_accum") or 1))
    return 0


def load_run(run_dir: Path | str) -> RunData:
    """A run folder of ``upcycle compare`` or ``upcycle train``: its evaluations in tokens and FLOPs."""
    from upcycle.train.metrics import read_metrics

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise OptionError(f"{run_dir} holds no metrics.jsonl records.", "pass folders written by upcycle train.")
    trains = [r for r in records if r.get("kind") == "train"]
    info_path = run_dir / RUN_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    flops_per_token = info.get("flops_per_token")
    if flops_per_token is None:
        flops_per_token = _flops_from_recipe(run_dir)
    per_step = _tokens_per_step_from(run_dir, trains)
    evals = []
    for r in records:
        if r.get("kind") != "eval":
            continue
        tokens = int(r["step"] * per_step)
        evals.append(
            {
                "step": r["step"],
                "tokens": tokens,
                "flops": tokens * flops_per_token if flops_per_token else None,
                "eval_loss": r["eval_loss"],
                "eval_ppl": r["eval_ppl"],
            }
        )
    speeds = [r["tokens_per_s"] for r in trains if r.get("step", 0) > 1 and not r.get("skipped")]
    speeds = speeds or [r["tokens_per_s"] for r in trains]
    return RunData(
        run_dir=str(run_dir),
        name=run_dir.name,
        variant=info.get("variant", run_dir.name),
        label=info.get("label", run_dir.name),
        seed=info.get("seed"),
        flops_per_token=flops_per_token,
        tokens_per_step=per_step,
        evals=evals,
        tokens_per_s=statistics.median(speeds) if speeds else None,
        info=info,
    )


def _flops_from_recipe(run_dir: Path) -> float | None:
    """FLOPs per token for a plain ``upcycle train`` run, while its model folder still exists."""
    path = run_dir / "recipe.resolved.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    model = Path(data.get("model", {}).get("path", ""))
    if not (model / "config.json").is_file():
        return None
    try:
        return model_cost(model).flops_per_token(int(data["data"]["seq_len"]))
    except Exception:  # noqa: BLE001 - an unknown architecture only loses the FLOPs axis
        return None


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(runs: list[RunData], dense_variant: str | None = None) -> dict[str, Any]:
    """The comparison table as data: per variant (seeds averaged), loss at equal tokens and at equal FLOPs."""
    if not runs:
        raise OptionError("no runs to compare.", "pass at least one run folder.")
    variants: list[str] = []
    for run in runs:
        if run.variant not in variants:
            variants.append(run.variant)
    if dense_variant is None:
        dense_variant = next((r.variant for r in runs if r.info.get("experts") == 0), variants[0])
    equal_tokens = min(r.final_tokens for r in runs)
    with_flops = [r for r in runs if r.final_flops]
    equal_flops = min(r.final_flops for r in with_flops) if len(with_flops) == len(runs) else None  # type: ignore[type-var]
    rows = []
    for variant in variants:
        group = [r for r in runs if r.variant == variant]
        at_tokens = [r.loss_at(equal_tokens, "tokens") for r in group]
        at_flops = [r.loss_at(equal_flops, "flops") for r in group] if equal_flops else [None]
        step0 = [r.evals[0]["eval_loss"] for r in group if r.evals and r.evals[0]["step"] == 0]
        speeds = [r.tokens_per_s for r in group if r.tokens_per_s]
        loss_t, std_t = _mean_std([v for v in at_tokens if v is not None])
        flops_values = [v for v in at_flops if v is not None]
        loss_f, std_f = _mean_std(flops_values) if flops_values else (None, None)
        rows.append(
            {
                "variant": variant,
                "label": group[0].label,
                "seeds": [r.seed for r in group],
                "runs": [r.name for r in group],
                "active_params": group[0].info.get("active_params"),
                "total_params": group[0].info.get("total_params"),
                "flops_per_token": group[0].flops_per_token,
                "exact_at_init": group[0].info.get("exact_at_init"),
                "step0_loss": statistics.fmean(step0) if step0 else None,
                "loss_equal_tokens": loss_t,
                "loss_equal_tokens_std": std_t,
                "loss_equal_tokens_per_seed": at_tokens,
                "ppl_equal_tokens": math.exp(loss_t),
                "loss_equal_flops": loss_f,
                "loss_equal_flops_std": std_f,
                "loss_equal_flops_per_seed": at_flops,
                "ppl_equal_flops": math.exp(loss_f) if loss_f is not None else None,
                "tokens_per_s": statistics.fmean(speeds) if speeds else None,
            }
        )
    dense = next(row for row in rows if row["variant"] == dense_variant)
    for row in rows:
        row["improvement_equal_tokens_pct"] = (
            100.0 * (dense["loss_equal_tokens"] - row["loss_equal_tokens"]) / (dense["loss_equal_tokens"])
        )
        row["improvement_equal_flops_pct"] = (
            100.0 * (dense["loss_equal_flops"] - row["loss_equal_flops"]) / dense["loss_equal_flops"]
            if row["loss_equal_flops"] is not None and dense["loss_equal_flops"] is not None
            else None
        )
    return {
        "dense_variant": dense_variant,
        "equal_tokens": equal_tokens,
        "equal_flops": equal_flops,
        "flops_formula": FLOPS_FORMULA,
        "rows": rows,
        "findings": findings(rows, dense_variant),
    }


def findings(rows: list[dict[str, Any]], dense_variant: str) -> list[str]:
    """Plain sentences: does the paper's direction reproduce here, by how much, against what seed noise."""
    by = {row["variant"]: row for row in rows}
    dense = by[dense_variant]
    noise = [r["loss_equal_tokens_std"] for r in rows if r["loss_equal_tokens_std"] is not None]
    noise_text = (
        f"seed noise (std of held-out loss over seeds, largest of {len(noise)} variants): {max(noise):.4f}"
        if noise
        else "seed noise: unmeasured (one seed per variant)"
    )
    sd = max(noise) if noise else None
    out = [noise_text]

    def verdict(diff: float) -> str:
        if sd is not None and abs(diff) <= 2 * sd:
            return "within seed noise (|diff| <= 2 std)"
        return "yes" if diff > 0 else "no"

    moes = [r for r in rows if r["variant"] != dense_variant]
    if moes:
        best = min(moes, key=lambda r: r["loss_equal_tokens"])
        diff = dense["loss_equal_tokens"] - best["loss_equal_tokens"]
        out.append(
            f"MoE beats dense at equal tokens: {verdict(diff)}; best MoE {best['variant']} "
            f"{best['loss_equal_tokens']:.4f} vs dense {dense['loss_equal_tokens']:.4f} "
            f"({best['improvement_equal_tokens_pct']:+.2f} %)."
        )
        if best["loss_equal_flops"] is not None and dense["loss_equal_flops"] is not None:
            diff_f = dense["loss_equal_flops"] - best["loss_equal_flops"]
            out.append(
                f"{best['variant']} beats dense at equal FLOPs: {verdict(diff_f)} "
                f"({best['improvement_equal_flops_pct']:+.2f} %)."
            )
    if "e8g1t2-softmax" in by and "e8g1t2-renorm" in by:
        soft, renorm = by["e8g1t2-softmax"], by["e8g1t2-renorm"]
        diff = renorm["loss_equal_tokens"] - soft["loss_equal_tokens"]
        out.append(
            f"softmax-then-topK + weight scaling beats topK-then-softmax: {verdict(diff)} "
            f"({soft['loss_equal_tokens']:.4f} vs {renorm['loss_equal_tokens']:.4f}, diff {diff:+.4f})."
        )
    if "e8g8t8" in by:
        fine = by["e8g8t8"]
        diff = dense["loss_equal_tokens"] - fine["loss_equal_tokens"]
        out.append(
            f"E8G8T8 (virtual groups) beats dense: {verdict(diff)} "
            f"({fine['loss_equal_tokens']:.4f} vs {dense['loss_equal_tokens']:.4f}, "
            f"{fine['improvement_equal_tokens_pct']:+.2f} %)."
        )
    return out


def _fmt(value: float | None, digits: int = 4, std: float | None = None) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if std is not None else text


def _si(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


def markdown_table(summary: dict[str, Any]) -> str:
    """The paper's Table 1, small: held-out loss and perplexity at equal tokens and equal FLOPs."""
    tokens, flops = summary["equal_tokens"], summary["equal_flops"]
    header = (
        f"| model | seeds | active params | FLOPs/token | held-out loss @ step 0 | loss @ {tokens:,} tokens | "
        f"ppl | Δ vs dense | loss @ {_si(flops)}FLOPs | ppl | Δ vs dense | tokens/s |"
    )
    lines = [header, "|" + "---|" * 12]
    for row in summary["rows"]:
        pct_f = row["improvement_equal_flops_pct"]
        lines.append(
            "| "
            + " | ".join(
                [
                    row["label"],
                    ",".join(str(s) for s in row["seeds"]),
                    _si(row["active_params"]),
                    _si(row["flops_per_token"]),
                    _fmt(row["step0_loss"]),
                    _fmt(row["loss_equal_tokens"], std=row["loss_equal_tokens_std"]),
                    _fmt(row["ppl_equal_tokens"], 2),
                    f"{row['improvement_equal_tokens_pct']:+.2f} %",
                    _fmt(row["loss_equal_flops"], std=row["loss_equal_flops_std"]),
                    _fmt(row["ppl_equal_flops"], 2),
                    "–" if pct_f is None else f"{pct_f:+.2f} %",
                    _fmt(row["tokens_per_s"], 0),
                ]
            )
            + " |"
        )
    notes = [
        "",
        "Held-out loss: mean cross-entropy per token on the fixed held-out text (mean ± std over seeds); "
        "ppl = exp(loss); Δ = relative loss improvement over the dense control (positive = better).",
        f"Equal FLOPs: each run's held-out loss interpolated linearly between evaluations at the training FLOPs "
        f"of the cheapest run ({_si(flops)}FLOPs). {summary['flops_formula']}.",
    ]
    return "\n".join(lines + notes) + "\n"


# ------------------------------------------------------------------------------------------------------ plot


def plot_runs(runs: Sequence[RunData], out: Path | str, title: str | None = None, force: bool = False) -> Path:
    """Held-out loss against training tokens and against training FLOPs, one line per run, as a PNG.

    Drawn into a temporary file beside OUT and renamed over it, so OUT is never half written; an existing OUT is
    replaced only with ``force``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    variants = list(dict.fromkeys(r.variant for r in runs))
    colors = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    has_flops = any(r.flops_per_token for r in runs)
    fig, axes = plt.subplots(1, 2 if has_flops else 1, figsize=(11 if has_flops else 6, 4.2), squeeze=False)
    seed_index: dict[str, int] = {}
    for run in runs:
        color = colors(variants.index(run.variant) % 10)
        index = seed_index[run.variant] = seed_index.get(run.variant, -1) + 1
        label = run.label if run.seed is None else f"{run.label} (seed {run.seed})"
        style = dict(color=color, linestyle=styles[index % len(styles)], marker="o", markersize=3, linewidth=1.4)
        xs = [e["tokens"] for e in run.evals]
        ys = [e["eval_loss"] for e in run.evals]
        axes[0][0].plot(xs, ys, label=label, **style)
        if has_flops and run.flops_per_token:
            axes[0][1].plot([e["flops"] for e in run.evals], ys, label=label, **style)
    axes[0][0].set_xlabel("training tokens")
    axes[0][0].set_ylabel("held-out loss")
    axes[0][0].set_title("held-out loss vs tokens")
    if has_flops:
        axes[0][1].set_xlabel("training FLOPs (6·N_active + 12·L·d_attn·S per token)")
        axes[0][1].set_title("held-out loss vs FLOPs")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with staged(out, force, kind="file") as tmp:
            fig.savefig(tmp, dpi=90, format=out.suffix[1:].lower() or "png")
    finally:
        plt.close(fig)
    return out


def plot_main(
    run_dirs: Sequence[Path | str], out: Path | str = "compare.png", title: str | None = None, force: bool = False
) -> Path:
    """``upcycle plot RUN_DIR... --out PNG``: draw any set of runs (compare runs or plain ``upcycle train`` runs).

    OUT may not lie in (or be, or contain) a run folder it reads: a run folder holds what its run wrote. An
    existing OUT is replaced only with ``force``, atomically.
    """
    if not run_dirs:
        raise OptionError("no run folders given.", "pass one or more folders written by upcycle train or compare.")
    for d in run_dirs:
        if not Path(d).is_dir():
            raise OptionError(f"{d} is not a folder.", "pass run folders (they hold metrics.jsonl).")
    out = Path(out)
    refuse_overlap(out, [("the run folder", d) for d in run_dirs], option="--out")
    refuse_existing(out, force, kind="file", option="--out")
    runs = [load_run(d) for d in run_dirs]
    return plot_runs(runs, out, title, force)


# ---------------------------------------------------------------------------------------------------- compare


@dataclass
class CompareResult:
    out: Path
    summary: dict[str, Any]
    markdown: str
    json_path: Path
    table_path: Path
    plot_path: Path
    seconds: float


def _environment() -> dict[str, Any]:
    import torch
    import transformers

    from upcycle import __version__

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "upcycle": __version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


COMPARE_FOLDERS = ("runs", "models")
COMPARE_FILES = ("compare.md", "compare.png", "compare.json")


def _is_compare_entry(path: Path) -> bool:
    """A name compare writes into OUT (or the temporary sibling of one left by a killed run)."""
    names = (*COMPARE_FOLDERS, *COMPARE_FILES)
    return path.name in names or any(path.name.startswith(f".{n}.upcycle-") for n in names)


def check_compare_out(out: Path, force: bool = False) -> None:
    """Refuse an OUT that holds files compare did not write, unless ``force``.

    Compare owns what it writes into OUT (``runs/``, ``models/``, ``compare.md/.png/.json``): it resumes
    finished runs there and replaces the rest, so a folder holding only those is continued without asking. A
    folder holding anything else is someone else's: with ``force`` compare writes its own names beside those
    files and never touches them.
    """
    if not exists(out):
        return
    if not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder.", "choose another --out folder.")
    wrong_kind = [
        p.name
        for p in out.iterdir()
        if (p.name in COMPARE_FOLDERS and not p.is_dir()) or (p.name in COMPARE_FILES and not p.is_file())
    ]
    if wrong_kind:
        raise OutputError(
            f"--out {out} holds {', '.join(wrong_kind)} of a kind compare does not write there.",
            "move it away or choose another --out folder.",
        )
    foreign = sorted(p.name for p in out.iterdir() if not _is_compare_entry(p))
    if foreign and not force:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(
            f"--out {out} holds files compare did not write ({shown}); compare only continues its own folders.",
            "choose a new or empty --out folder, or pass --force to write beside them (they are left untouched).",
        )


def _local_paths(value: Any) -> list[Path]:
    """The local files among data entries (a string or a list of them); ``asset:`` names are not paths yet."""
    entries = value if isinstance(value, (list, tuple)) else [value]
    return [Path(e) for e in entries if isinstance(e, (str, Path)) and not str(e).startswith("asset:")]


def _compare_inputs(
    recipes: Sequence[Path | str], arms: Sequence[Variant], base: Path | None, train: Any, heldout: Any
) -> list[tuple[str, Path]]:
    """Everything compare reads, which OUT must keep clear of: recipe files, model folders and data files."""
    inputs: list[tuple[str, Path]] = [("the recipe", Path(r)) for r in recipes]
    for arm in arms:
        if arm.recipe is not None:
            inputs.append((f"the model folder of {arm.name}", Path(arm.recipe["model"]["path"])))
            data = arm.recipe["data"]
            inputs += [(f"a data file of {arm.name}", f) for f in _local_paths([*data["train"], *data["eval"]])]
    if base is not None:
        inputs.append(("the dense model", base))
        inputs += [("a data file", f) for f in _local_paths(train) + _local_paths(heldout)]
    return inputs


def compare_main(
    recipes: Sequence[Path | str] = (),
    size: str | Size = "cpu",
    out: Path | str = "runs/compare",
    seeds: int = 2,
    variants: Sequence[str] | None = None,
    *,
    base: Path | str | None = None,
    train: Any = "asset:shakespeare/train",
    heldout: Any = "asset:shakespeare/heldout",
    isolate: bool = True,
    keep_models: bool = False,
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> CompareResult:
    """``upcycle compare [RECIPE...] --size cpu|gpu --out DIR --seeds N``.

    With no recipe, trains the dense control and the paper's upcycles (``variants``, default
    :data:`DEFAULT_VARIANTS`) of ``base`` (SmolLM2-135M by default) on the fixed Shakespeare split. With
    recipes, each recipe is one arm (its model, data and optimiser; the size sets batch, sequence length and
    evaluation so every arm sees the same tokens); the dense control is the arm whose model has no experts.
    The dense control and the best MoE (lowest held-out loss at seed 0) run with ``seeds`` seeds, the others
    with seed 0. Writes ``OUT/compare.json``, ``OUT/compare.md`` and ``OUT/compare.png``.

    OUT is compare's own folder (see :func:`check_compare_out`): it resumes the finished runs there, refuses a
    folder holding other files unless ``force``, and never lies over or inside what it reads (recipes, model
    folders, data files).
    """
    started = time.perf_counter()
    size_obj = SIZES.get(size) if isinstance(size, str) else size
    if size_obj is None:
        raise OptionError(f"unknown size {size!r}.", f"use one of {', '.join(SIZES)}.")
    if seeds < 1:
        raise OptionError(f"--seeds must be at least 1, got {seeds}.", "use 2 to measure seed noise.")
    out = Path(out).absolute()
    if recipes:
        arms = [recipe_variant(Path(r)) for r in recipes]
        if variants:
            raise OptionError("give recipes or variants, not both.", "drop --variants when passing recipes.")
    else:
        names = list(variants or DEFAULT_VARIANTS)
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise OptionError(f"unknown variant {unknown[0]!r}.", f"use some of {', '.join(VARIANTS)}.")
        if "dense" not in names:
            names.insert(0, "dense")
        arms = [VARIANTS[n] for n in names]
    echo(size_obj.describe())
    echo(f"sized for: {size_obj.budget}")
    base_path: Path | None = None
    if not recipes:
        if base is None:
            from upcycle.assets import smollm2_folder

            base_path = smollm2_folder()
        else:
            base_path = Path(base).absolute()
    refuse_overlap(out, _compare_inputs(recipes, arms, base_path, train, heldout), option="--out")
    check_compare_out(out, force)
    out.mkdir(parents=True, exist_ok=True)
    if base_path is not None:
        if size_obj.layers is not None:
            echo(f"NOTE: the model is cut down to its first {size_obj.layers} decoder layers (+ final norm and head).")
            base_path = truncated_model(base_path, out / "models" / f"base-first{size_obj.layers}", size_obj.layers)
        echo(f"dense model: {base_path}")
    echo(f"text: train {train}, held out {heldout} (fixed split)")
    echo(f"{FLOPS_FORMULA}")
    (out / "runs").mkdir(exist_ok=True)

    def spec_for(arm: Variant, seed: int) -> RunSpec:
        return _spec(arm, seed, size_obj, out, base_path or Path("."), train, heldout, keep_models)

    first = [spec_for(arm, 0) for arm in arms]
    dense_arms = [a for a in arms if a.is_dense] or [a for a in arms if a.recipe and _is_dense_recipe(a)]
    more_dense = [spec_for(a, s) for a in dense_arms[:1] for s in range(1, seeds)]
    total = len(first) + len(more_dense) + (seeds - 1 if len(arms) > len(dense_arms[:1]) else 0)
    echo(
        f"plan: {total} runs ({len(arms)} arms at seed 0, then {seeds - 1} more seed(s) of the dense control "
        f"and of the best MoE), one process each"
        if isolate
        else f"plan: {total} runs, in this process"
    )
    results: dict[str, dict[str, Any]] = {}
    done = 0

    def run(spec: RunSpec) -> None:
        nonlocal done
        done += 1
        previous = _finished(spec)
        if previous is not None:
            echo(f"[{done}/{total}] {spec.variant} seed {spec.seed}: reusing the finished run in {spec.run_dir}")
            results[spec.run_dir] = previous
            return
        echo(
            f"[{done}/{total}] {spec.variant} seed {spec.seed}: {'converting and ' if spec.convert_from else ''}"
            f"training ({time.perf_counter() - started:.0f} s elapsed)"
        )
        result = _run_isolated(spec, echo) if isolate else execute_run(spec, echo=lambda _t: None)
        results[spec.run_dir] = result
        run_data = load_run(spec.run_dir)
        losses = " -> ".join(f"{e['eval_loss']:.4f}" for e in run_data.evals)
        echo(f"    held-out loss {losses}; {result['seconds']:.0f} s")

    for spec in first + more_dense:
        run(spec)
    dense_name = dense_arms[0].name if dense_arms else arms[0].name
    moe_specs = [s for s in first if s.variant != dense_name]
    if moe_specs and seeds > 1:
        best = min(moe_specs, key=lambda s: load_run(s.run_dir).evals[-1]["eval_loss"])
        best_arm = next(a for a in arms if a.name == best.variant)
        echo(f"best MoE at seed 0: {best.variant}; running it with {seeds - 1} more seed(s)")
        for s in range(1, seeds):
            run(spec_for(best_arm, s))
    run_dirs = [Path(s) for s in results]
    runs = [load_run(d) for d in run_dirs]
    summary = summarise(runs, dense_name)
    markdown = markdown_table(summary)
    plot_path = plot_runs(runs, out / "compare.png", f"upcycle compare, {size_obj.name} size", force=True)
    seconds = time.perf_counter() - started
    payload = {
        "size": dataclasses.asdict(size_obj),
        "size_description": size_obj.describe(),
        "budget": size_obj.budget,
        "environment": _environment(),
        "base_model": str(base_path) if base_path else None,
        "data": {"train": train, "heldout": heldout},
        "seconds": seconds,
        "summary": summary,
        "runs": [dataclasses.asdict(r) for r in runs],
        "markdown": markdown,
    }
    payload["model_note"] = (
        f"{base_path} (the dense model cut down to its first {size_obj.layers} decoder layers + final norm and head)"
        if size_obj.layers is not None
        else str(base_path or "the recipes' models")
    )
    json_path = out / "compare.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    table_path = out / "compare.md"
    header = [f"{size_obj.describe()}; sized for {size_obj.budget}.", f"Model: {payload['model_note']}.", "", ""]
    findings_text = "\n".join(f"- {line}" for line in summary["findings"])
    table_path.write_text("\n".join(header) + markdown + "\n" + findings_text + "\n")
    echo("")
    echo(markdown)
    for line in summary["findings"]:
        echo(f"- {line}")
    echo(f"wall time {seconds / 60:.1f} min ({size_obj.budget})")
    if size_obj.layers is not None:
        echo(f"NOTE: every model here is SmolLM2 cut down to its first {size_obj.layers} decoder layers.")
    echo(f"wrote {table_path}, {plot_path}, {json_path}")
    return CompareResult(out, summary, markdown, json_path, table_path, plot_path, seconds)


def _is_dense_recipe(arm: Variant) -> bool:
    try:
        return model_cost(arm.recipe["model"]["path"]).experts == 0  # type: ignore[index]
    except Exception:  # noqa: BLE001
        return False


def _worker(argv: list[str]) -> int:
    spec = RunSpec(**json.loads(Path(argv[1]).read_text()))
    execute_run(spec, echo=lambda text: print(text, flush=True))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[1:]))
    sys.exit("usage: python -m upcycle.compare --worker SPEC.json (internal; use `upcycle compare`)")
