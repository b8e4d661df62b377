"""The sections of a training recipe, one frozen dataclass per YAML section, each checked when it is built.

Types are coerced by :class:`upcycle.train.recipe_fields.Section`; each section's ``_check`` adds the ranges and
the consistency of its own keys, so a section built in code is as valid as one loaded from YAML. Paths are kept
as written; :mod:`upcycle.train.recipe` resolves them when it loads a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from upcycle.errors import OptionError
from upcycle.train.recipe_fields import Section, one_of, require

if TYPE_CHECKING:
    from upcycle.convert.options import UpcycleOptions

PRECISIONS = ("auto", "bf16", "fp32")
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "constant", "linear")
EXPERTS_IMPLEMENTATIONS = ("auto", "upcycle", "grouped_mm", "eager")


@dataclass(frozen=True, kw_only=True)
class UpcycleSection(Section):
    """The conversion a recipe asks for: ``upcycle convert``'s options, under ``model.upcycle``."""

    _name = "model.upcycle"
    experts: int = 8  # expansion rate E: copies of each dense MLP
    granularity: int = 1  # G: shards per copy (virtual groups when > 1)
    top_k: int = 2
    router: str = "renorm"  # renorm (exact) | softmax-topk (the paper's router, approximate at step 0)
    router_init: str = "random"  # random | zero | tied
    weight_scale: str = "auto"  # auto | none | a number
    drop_upcycling: float = 0.0  # Drop-Upcycling ratio r (0 = off)
    noise: float = 0.0  # Gaussian noise std relative to each tensor's std
    layers: str = "all"  # which decoder layers become MoE: all, 0-11, 0,2,4 ...
    target: str = "auto"  # auto, or a target class from `upcycle families`
    dtype: str = "auto"  # auto (as the source) | float32 | bfloat16 | float16
    seed: int = 0  # routers, Drop-Upcycling and noise

    def __post_init__(self) -> None:
        for name in ("weight_scale", "layers"):  # YAML reads `weight_scale: 1.5` and `layers: 7` as numbers
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                object.__setattr__(self, name, str(value))
        super().__post_init__()

    def options(self) -> UpcycleOptions:
        """The same choices as `upcycle convert` takes them."""
        from upcycle.convert.options import UpcycleOptions

        return UpcycleOptions(**{f.name: getattr(self, f.name) for f in fields(self)})

    def _check(self) -> None:
        from upcycle.convert.targets import check_options

        try:
            check_options(self.options())
        except OptionError as error:
            raise OptionError(f"model.upcycle: {error.problem}", error.fix) from None


@dataclass(frozen=True, kw_only=True)
class ModelSection(Section):
    """Which model to train: a folder as it is (``path``), or a dense ``source`` upcycled first (``upcycle``)."""

    _name = "model"
    path: str | None = None  # HF folder (MoE or dense) or asset:smollm2; relative to the recipe's folder
    # a dense folder, .gguf file or asset:smollm2, converted before training; its conversion's folder then
    # becomes `path` (a recipe file sets one of the two)
    source: str | None = None
    upcycle: UpcycleSection | None = None  # the conversion of `source` (cached, verified, reused)
    experts_implementation: str = "auto"  # auto | upcycle | grouped_mm | eager
    activation_checkpointing: bool = False
    trust_remote_code: bool = False

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
        for name in ("path", "source"):
            value = getattr(self, name)
            require(value is None or bool(value.strip()), f"model.{name}", "is empty", f"set model.{name} or omit it.")
        one_of(self.experts_implementation, EXPERTS_IMPLEMENTATIONS, "model.experts_implementation")


@dataclass(frozen=True, kw_only=True)
class DataSection(Section):
    """Training and held-out text; after loading, ``train`` and ``eval`` are sorted absolute file paths."""

    _name = "data"
    train: tuple[str, ...]  # files, folders, globs or asset: names (.txt, .jsonl, .parquet)
    eval: tuple[str, ...] = ()  # held-out text, never trained on
    text_field: str = "text"  # the field holding the text in .jsonl and .parquet files
    seq_len: int = 1024
    eval_sequences: int = 64  # held-out sequences per evaluation (0 = all)
    cache_dir: str | None = None  # tokenised-data cache (None: upcycle.assets.cache_dir()/tokens)

    def _check(self) -> None:
        require(bool(self.train), "data.train", "is empty", "list at least one training file or glob.")
        require(bool(self.text_field), "data.text_field", "is empty", "use the default, text.")
        require(self.seq_len >= 2, "data.seq_len", f"must be at least 2, got {self.seq_len}", "use e.g. 1024.")
        require(self.eval_sequences >= 0, "data.eval_sequences", "must be 0 (all) or more", "use e.g. 64.")
        shared = sorted(set(self.train) & set(self.eval))
        if shared:
            raise OptionError(
                f"data.eval: {shared[0]!r} is also in data.train (held-out text must not be trained on).",
                "use disjoint files for data.train and data.eval.",
            )


@dataclass(frozen=True, kw_only=True)
class BatchSection(Section):
    """Batch shape and budget; :func:`upcycle.train.batch_size.resolve_batch` makes numbers of it per world size."""

    _name = "batch"
    micro_batch_size: int = 4  # sequences per rank per micro-step
    grad_accum: int | None = None  # micro-steps per optimiser step (default 1)
    global_batch_tokens: int | None = None  # alternative to grad_accum, the same on any number of ranks
    steps: int | None = None  # optimiser steps
    tokens: int | None = None  # alternative to steps: steps = ceil(tokens / tokens_per_step)

    def _check(self) -> None:
        for name in ("micro_batch_size", "grad_accum", "global_batch_tokens", "steps", "tokens"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"batch.{name}", f"must be at least 1, got {value}", "use 1 or more.")
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


@dataclass(frozen=True, kw_only=True)
class OptimSection(Section):
    """AdamW with linear warmup to ``lr``, then decay to ``min_lr``."""

    _name = "optim"
    lr: float = 3e-4  # peak
    min_lr: float = 3e-5
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant | linear
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # max global gradient norm (null: no clipping)

    def _check(self) -> None:
        require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}", "use e.g. 3e-4.")
        require(
            0 <= self.min_lr <= self.lr,
            "optim.min_lr",
            f"must be between 0 and optim.lr ({self.lr}), got {self.min_lr}",
            f"use e.g. {self.lr / 10:g}.",
        )
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be 0 or more", "use e.g. 100.")
        one_of(self.schedule, SCHEDULES, "optim.schedule")
        for i, beta in enumerate(self.betas):
            require(0 <= beta < 1, f"optim.betas[{i}]", f"must be in [0, 1), got {beta}", "use [0.9, 0.95].")
        require(self.eps > 0, "optim.eps", f"must be positive, got {self.eps}", "use 1e-8.")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be 0 or more", "use e.g. 0.1.")
        require(
            self.grad_clip is None or self.grad_clip > 0,
            "optim.grad_clip",
            f"must be positive, got {self.grad_clip}",
            "use e.g. 1.0, or null for no clipping.",
        )


@dataclass(frozen=True, kw_only=True)
class MoESection(Section):
    """Router losses and token dropping; ignored for a dense model."""

    _name = "moe"
    # Per MoE layer, as in Megatron-Core (the paper's implementation): the loss is coef x the sum over layers of
    # each layer's E * sum_e f_e * P_e (1.0 when balanced). 1e-2 is the paper's best.
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0  # router z-loss weight, per layer too (the paper saw no effect at 1e-3)
    capacity_factor: float | None = None  # None = dropless; a factor drops tokens over capacity
    # Aux-loss-free balancing (DeepSeek-V3) for sigmoid routers with a score-correction bias (Glm4-MoE, Dots1):
    # after each step every bias moves by this rate towards balance (+ for under-loaded experts). 0 = off, the bias
    # stays as converted (zero) and only the aux loss balances.
    bias_update_rate: float = 0.0
    # The routers' precision under bf16 (upcycle.train.router_precision): auto = fp32 where the class's own code gates
    # in fp32 (sigmoid routers), float32 = every router, compute = as autocast / FSDP's policy compute.
    router_dtype: str = "auto"

    def _check(self) -> None:
        require(
            self.router_dtype in ("auto", "float32", "compute"),
            "moe.router_dtype",
            f"must be auto, float32 or compute, got {self.router_dtype!r}",
            "use auto.",
        )
        require(self.aux_loss_coef >= 0, "moe.aux_loss_coef", "must be 0 or more", "use 0.01.")
        require(self.z_loss_coef >= 0, "moe.z_loss_coef", "must be 0 or more", "use 0 or 1e-3.")
        require(self.bias_update_rate >= 0, "moe.bias_update_rate", "must be 0 or more", "use 0 or 1e-3.")
        require(
            self.capacity_factor is None or self.capacity_factor > 0,
            "moe.capacity_factor",
            f"must be positive, got {self.capacity_factor}",
            "use e.g. 1.25, or null for dropless.",
        )


@dataclass(frozen=True, kw_only=True)
class RunSection(Section):
    """Where results go, how often to evaluate, checkpoint and log, and at what precision."""

    _name = "run"
    output_dir: str | None = None  # relative to the recipe's folder (default: ./runs/<recipe name>)
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    eval_interval: int = 100  # 0 = only at start and end
    checkpoint_interval: int = 100  # 0 = only at end
    checkpoints: bool = True  # false: no checkpoints at all (short demonstrations)
    keep_checkpoints: int = 3
    log_interval: int = 1
    max_bad_steps: int = 3  # consecutive non-finite steps before stopping
    tensorboard: bool = True
    export: bool = True
    export_dtype: str = "auto"  # auto (the dtype the model was stored in) | float32 | bfloat16 | float16
    compile: bool = False

    def _check(self) -> None:
        require(
            self.output_dir is None or bool(self.output_dir.strip()),
            "run.output_dir",
            "is empty",
            "set run.output_dir to a folder.",
        )
        one_of(self.export_dtype, EXPORT_DTYPES, "run.export_dtype")
        require(0 <= self.seed < 2**63, "run.seed", f"must be in [0, 2**63), got {self.seed}", "use e.g. 0.")
        one_of(self.precision, PRECISIONS, "run.precision")
        for name in ("eval_interval", "checkpoint_interval"):
            require(getattr(self, name) >= 0, f"run.{name}", "must be 0 or more", "use e.g. 100 (0 = only at the end).")
        for name in ("keep_checkpoints", "log_interval", "max_bad_steps"):
            require(getattr(self, name) >= 1, f"run.{name}", "must be at least 1", "use 1 or more.")


@dataclass(frozen=True, kw_only=True)
class ParallelSection(Section):
    """How the ranks lay out the model: degrees of sharding, replication and expert and tensor parallelism.

    Only each degree's own range is checked here; whether they fit the world size and the model's expert count
    is known at launch and checked there. A layout changes how a step is computed, not what it trains, so a run
    may resume under another one.
    """

    _name = "parallel"
    fsdp: int | None = None  # ranks sharding the weights (None: all ranks not used by the other degrees)
    ep: int = 1  # expert-parallel degree: ranks that split each layer's experts between them
    replicate: int = 1  # HSDP replicas, e.g. the node count
    tp: int = 1  # tensor-parallel degree

    def _check(self) -> None:
        require(
            self.fsdp is None or self.fsdp >= 1,
            "parallel.fsdp",
            f"must be at least 1, got {self.fsdp}",
            "use 1 or more, or null for all ranks not used by the other degrees.",
        )
        for name in ("ep", "replicate", "tp"):
            value = getattr(self, name)
            require(value >= 1, f"parallel.{name}", f"must be at least 1, got {value}", "use 1 or more.")


SECTIONS: dict[str, type[Section]] = {
    "model": ModelSection,
    "data": DataSection,
    "batch": BatchSection,
    "optim": OptimSection,
    "moe": MoESection,
    "run": RunSection,
    "parallel": ParallelSection,
}
"""The recipe's YAML sections, in the order they are written out."""
