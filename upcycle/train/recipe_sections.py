"""The sections of a training recipe, one frozen pydantic dataclass per YAML section, each checked when it is built.

Pydantic checks each key's type, range and choices (:mod:`upcycle.validation` words its refusals); a section's
``_check`` adds the rules across its own keys, so a section built in code is as valid as one loaded from YAML.
Paths are kept as written; :mod:`upcycle.train.recipe` resolves them when it loads a recipe. ``model.upcycle`` is
:class:`UpcycleOptions` itself: a recipe converts with exactly the options ``upcycle convert`` takes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from annotated_types import Interval
from pydantic import BeforeValidator, Field

from upcycle.convert.options import UpcycleOptions
from upcycle.errors import OptionError
from upcycle.validation import Flag, Integer, NotBlank, Number, Paths, Text, dotted, validated

Beta = Annotated[Number, Interval(ge=0, lt=1)]
# a list of names, or one string of them separated by commas (as --set eval.tasks=arc_easy,piqa gives it)
TaskNames = Annotated[
    tuple[Text, ...],
    BeforeValidator(lambda v: tuple(p.strip() for p in v.split(",") if p.strip()) if isinstance(v, str) else v),
]


@validated(dotted("model"))
class ModelSection:
    """Which model to train: a folder as it is (``path``), or a dense ``source`` upcycled first (``upcycle``)."""

    path: NotBlank | None = None  # HF folder (MoE or dense) or asset:smollm2; relative to the recipe's folder
    # a dense folder, .gguf file or asset:smollm2, converted before training; its conversion's folder then
    # becomes `path` (a recipe file sets one of the two)
    source: NotBlank | None = None
    upcycle: UpcycleOptions | None = None  # the conversion of `source` (cached, verified, reused)
    experts_implementation: Literal["auto", "upcycle", "grouped_mm", "eager"] = "auto"
    # random: the model's architecture with fresh weights drawn by its class's own initialisation (seed run.seed),
    # the control that tells what upcycling's weights are worth; pretrained: the folder's weights
    init: Literal["pretrained", "random"] = "pretrained"
    activation_checkpointing: Flag = False
    trust_remote_code: Flag = False

    def _check(self) -> None:
        if self.source is None and self.path is None:
            raise OptionError(
                "the recipe sets neither model.path nor model.source.",
                "set model.path to a model folder, or model.source and model.upcycle to upcycle a dense model.",
            )
        if self.source is not None and self.upcycle is None:
            raise OptionError(
                "model.source is set without model.upcycle, so there is nothing to convert.",
                "add model.upcycle (e.g. {experts: 8, top_k: 2}), or use model.path to train the dense model itself.",
            )
        if self.upcycle is not None and self.source is None:
            raise OptionError(
                "model.upcycle is set without model.source.", "set model.source to the dense model to upcycle."
            )
        if self.upcycle is not None:
            from upcycle.convert.targets import check_options  # the targets sit above the options

            try:
                check_options(self.upcycle)
            except OptionError as error:
                raise OptionError(f"model.upcycle: {error.problem}", error.fix) from None


@validated(dotted("data"))
class DataSection:
    """Training and held-out text; after loading, ``train`` and ``eval`` are sorted absolute file paths."""

    # files, folders, globs or asset: names (.txt, .jsonl, .parquet)
    train: Paths = Field(min_length=1, examples=["[train.txt, more/*.jsonl]"])
    eval: Paths = ()  # held-out text, never trained on
    text_field: NotBlank = "text"  # the field holding the text in .jsonl and .parquet files
    seq_len: Integer = Field(1024, ge=2)
    eval_sequences: Integer = Field(64, ge=0, examples=["64", "0 (all)"])  # held-out sequences per evaluation
    cache_dir: Text | None = None  # tokenised-data cache (None: upcycle.assets.cache_dir()/tokens)

    def _check(self) -> None:
        shared = sorted(set(self.train) & set(self.eval))
        if shared:
            raise OptionError(
                f"data.eval: {shared[0]!r} is also in data.train (held-out text must not be trained on).",
                "use disjoint files for data.train and data.eval.",
            )


@validated(dotted("batch"))
class BatchSection:
    """Batch shape and budget; :func:`upcycle.train.batch_size.resolve_batch` makes numbers of it per world size."""

    micro_batch_size: Integer = Field(4, ge=1)  # sequences per rank per micro-step
    grad_accum: Integer | None = Field(None, ge=1)  # micro-steps per optimiser step (default 1)
    global_batch_tokens: Integer | None = Field(None, ge=1)  # alternative to grad_accum, the same on any ranks
    steps: Integer | None = Field(None, ge=1)  # optimiser steps
    tokens: Integer | None = Field(None, ge=1)  # alternative to steps: steps = ceil(tokens / tokens_per_step)

    def _check(self) -> None:
        if self.grad_accum is not None and self.global_batch_tokens is not None:
            raise OptionError(
                "batch.grad_accum and batch.global_batch_tokens are both set; each determines the other.",
                "keep one: global_batch_tokens keeps the batch the same on any number of ranks.",
            )
        if self.steps is not None and self.tokens is not None:
            raise OptionError(
                "batch.steps and batch.tokens are both set; each determines the other.",
                "keep one: tokens keeps the training budget the same whatever the batch size.",
            )
        if self.steps is None and self.tokens is None:
            raise OptionError(
                "the recipe sets neither batch.steps nor batch.tokens.", "set one, e.g. batch.steps: 1000."
            )


@validated(dotted("optim"))
class OptimSection:
    """AdamW with linear warmup to ``lr``, then decay to ``min_lr``."""

    lr: Number = Field(3e-4, gt=0)  # peak
    min_lr: Number = 3e-5  # between 0 and lr: checked with lr
    warmup_steps: Integer = Field(100, ge=0)
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    eps: Number = Field(1e-8, gt=0)
    weight_decay: Number = Field(0.1, ge=0)
    # max global gradient norm (null: no clipping)
    grad_clip: Number | None = Field(1.0, gt=0, examples=["1.0", "null (no clipping)"])

    def _check(self) -> None:
        if not 0 <= self.min_lr <= self.lr:
            raise OptionError(
                f"optim.min_lr: must be between 0 and optim.lr ({self.lr}), got {self.min_lr}.",
                f"use e.g. {self.lr / 10:g}.",
            )


@validated(dotted("moe"))
class MoESection:
    """Router losses and token dropping; ignored for a dense model."""

    # Per MoE layer, as in Megatron-Core (the paper's implementation): the loss is coef x the sum over layers of
    # each layer's E * sum_e f_e * P_e (1.0 when balanced). 1e-2 is the paper's best.
    aux_loss_coef: Number = Field(0.01, ge=0)
    # router z-loss weight, per layer too (the paper saw no effect at 1e-3)
    z_loss_coef: Number = Field(0.0, ge=0, examples=["0", "1e-3"])
    # None = dropless; a factor drops tokens over capacity
    capacity_factor: Number | None = Field(None, gt=0, examples=["1.25", "null (dropless)"])
    # Aux-loss-free balancing (DeepSeek-V3) for sigmoid routers with a score-correction bias (Glm4-MoE, Dots1):
    # after each step every bias moves by this rate towards balance (+ for under-loaded experts). 0 = off, the bias
    # stays as converted (zero) and only the aux loss balances.
    bias_update_rate: Number = Field(0.0, ge=0, examples=["0", "1e-3"])
    # The routers' precision under bf16 (upcycle.train.router_precision): auto = fp32 where the class's own code gates
    # in fp32 (sigmoid routers), float32 = every router, compute = as autocast / FSDP's policy compute.
    router_dtype: Literal["auto", "float32", "compute"] = "auto"


_INTERVAL = ["100", "0 (only at the end)"]


@validated(dotted("run"))
class RunSection:
    """Where results go, how often to evaluate, checkpoint and log, and at what precision."""

    output_dir: NotBlank | None = None  # relative to the recipe's folder (default: ./runs/<recipe name>)
    seed: Integer = Field(0, ge=0, lt=2**63)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    eval_interval: Integer = Field(100, ge=0, examples=_INTERVAL)  # 0 = only at start and end
    checkpoint_interval: Integer = Field(100, ge=0, examples=_INTERVAL)  # 0 = only at end
    checkpoints: Flag = True  # false: no checkpoints at all (short demonstrations)
    keep_checkpoints: Integer = Field(3, ge=1)
    log_interval: Integer = Field(1, ge=1)
    max_bad_steps: Integer = Field(3, ge=1)  # consecutive non-finite steps before stopping
    tensorboard: Flag = True
    export: Flag = True
    # auto (the dtype the model was stored in) | float32 | bfloat16 | float16
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: Flag = False


@validated(dotted("eval"))
class EvalSection:
    """Downstream tasks scored at every evaluation (as ``upcycle eval`` scores them), on their first ``limit`` items."""

    tasks: TaskNames = Field((), examples=["[arc_easy, hellaswag, piqa]", "arc_easy,piqa"])  # none: held-out loss only
    limit: Integer | None = Field(100, ge=1, examples=["100", "null (every item)"])  # items per benchmark
    # null: each task's standard count (5 for MMLU, 0 for the rest)
    shots: Integer | None = Field(None, ge=0, examples=["null (each task's standard)", "0", "5"])
    batch_size: Integer = Field(16, ge=1)  # requests per forward pass
    # steps between task evaluations (each at a held-out evaluation's step, so a multiple of run.eval_interval
    # is best); null: at every held-out evaluation; 0: at step 0 and at the end only
    interval: Integer | None = Field(None, ge=0, examples=["null (every evaluation)", "0 (start and end)", "500"])

    def _check(self) -> None:
        from upcycle.downstream.tasks import TASKS, parse_tasks

        try:
            for name in parse_tasks(self.tasks) if self.tasks else ():
                TASKS[name].check_shots(self.shots)
        except OptionError as error:
            raise OptionError(f"eval.tasks: {error.problem}", error.fix.replace("--shots", "eval.shots")) from None


@validated(dotted("parallel"))
class ParallelSection:
    """How the ranks lay out the model: degrees of sharding, replication and expert and tensor parallelism.

    Only each degree's own range is checked here; whether they fit the world size and the model's expert count
    is known at launch and checked there. A layout changes how a step is computed, not what it trains, so a run
    may resume under another one.
    """

    # ranks sharding the weights (None: all ranks not used by the other degrees)
    fsdp: Integer | None = Field(None, ge=1, examples=["4", "null (the ranks the other degrees leave)"])
    ep: Integer = Field(1, ge=1)  # expert-parallel degree: ranks that split each layer's experts between them
    replicate: Integer = Field(1, ge=1)  # HSDP replicas, e.g. the node count
    tp: Integer = Field(1, ge=1)  # tensor-parallel degree


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "batch": BatchSection,
    "optim": OptimSection,
    "moe": MoESection,
    "run": RunSection,
    "eval": EvalSection,
    "parallel": ParallelSection,
}
"""The recipe's YAML sections, in the order they are written out."""
