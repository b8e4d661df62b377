"""Conversion options: what the user asked for, validated before any file is read.

One definition for the command line (``upcycle convert``), the library and a recipe's ``model.upcycle`` section.
Pydantic checks each option's type, range and choices when the options are built (a refusal names the flag,
``--top-k``, or inside a recipe the dotted key); :meth:`UpcycleOptions.validate` checks them together.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from upcycle.errors import OptionError
from upcycle.units import parse_size
from upcycle.validation import Integer, Number, Text, flag, rule, validated

RouterKind = Literal["renorm", "softmax-topk"]
RouterInit = Literal["random", "zero", "tied", "cluster", "hidden"]
Split = Literal["contiguous", "activation"]
OutputDtype = Literal["auto", "float32", "bfloat16", "float16"]


def _text(value: Any) -> Any:
    """YAML reads ``weight_scale: 1.5`` and ``layers: 7`` as numbers; they are spellings."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _size(value: Any) -> Any:
    """``2GB`` (1e9 bytes) or ``2GiB`` (2^30), as ``--shard-size`` reads it; an integer is bytes."""
    if not isinstance(value, str):
        return value
    try:
        return parse_size(value, "")
    except OptionError as error:
        raise rule(error.problem.strip(), error.fix, relative=True) from None


Spelling = Annotated[Text, BeforeValidator(_text)]
Size = Annotated[Integer, BeforeValidator(_size)]


@validated(flag)
class UpcycleOptions:
    """Every choice that shapes the converted checkpoint; recorded verbatim in upcycle.json."""

    experts: Integer = Field(8, ge=1)  # expansion rate E: copies of each dense MLP
    top_k: Integer = Field(2, ge=1)  # experts each token uses (T in the paper)
    granularity: Integer = Field(1, ge=1)  # G: shards per copy (virtual groups when > 1)
    router: RouterKind = "renorm"  # renorm: softmax→top-k→renormalise; softmax-topk: no renormalisation
    router_init: RouterInit = "random"
    router_std: Number | None = Field(None, ge=0)  # None: the source config's initializer_range (0.02 when absent)
    weight_scale: Spelling = "auto"  # "auto", "none" or a float factor s
    drop_upcycling: Number = Field(0.0, ge=0, lt=1, examples=[0.5])  # fraction r of neurons re-drawn per expert
    noise: Number = Field(0.0, ge=0, examples=[0.01])  # Gaussian noise std, relative to each dense tensor's std
    layers: Spelling = "all"  # which decoder layers become MoE (others stay dense)
    target: Text = "auto"  # checked against the targets by convert.targets.check_options
    dtype: OutputDtype = "auto"
    shard_size: Size = Field(2 * 1000**3, ge=1000**2, examples=["2GB"])  # bytes per safetensors file: 2GB
    seed: Integer = 0
    extra: dict = Field(default_factory=dict)  # reserved for forward compatibility of upcycle.json
    shared_width: Integer = Field(0, ge=0)  # dense MLP neurons kept always on, as the target's shared expert
    split: Split = "contiguous"  # G > 1: which neurons make each shard (activation: those that fire together)
    calibration: Text = ""  # cluster router, activation split: a UTF-8 text file ("": Shakespeare's training split)
    calibration_tokens: Integer = Field(4096, ge=16)  # tokens of it the dense model runs
    router_prompts: Text = ""  # --router-init hidden: a YAML file of prompts per expert (mergekit-moe's semantics)

    @property
    def num_experts(self) -> int:
        return self.experts * self.granularity

    def to_json(self) -> dict:
        """The options as upcycle.json records them; a shared width of 0 (none) and the calibration of a router not
        made from data are left out, so every conversion made before those options existed keeps its record and its
        cache key."""
        data = asdict(self)
        if not data["shared_width"]:
            del data["shared_width"]
        if self.split == "contiguous":
            del data["split"]
        if self.router_init != "cluster" and self.split != "activation":  # recorded only where they shape tensors
            del data["calibration"], data["calibration_tokens"]
        if self.router_init != "hidden":
            del data["router_prompts"]
        return data

    def validate(self) -> None:
        """The options together (each alone was checked when built), with the reason and the fix.

        Not when built: `convert` and a recipe call it through `targets.check_options`, so a caller may still build
        options no conversion takes, e.g. to study their scale factors.
        """
        if self.top_k > self.num_experts:
            raise OptionError(
                f"--top-k {self.top_k} exceeds the number of experts "
                f"{self.num_experts} (= experts {self.experts} x granularity {self.granularity}).",
                f"choose --top-k between 1 and {self.num_experts}.",
            )
        if self.granularity > 1 and self.top_k % self.granularity:
            raise OptionError(
                f"--top-k {self.top_k} is not a multiple of --granularity {self.granularity}: with virtual "
                "groups a token must take every shard of a copy, or the MoE no longer equals the dense MLP.",
                f"use --top-k {self.granularity * max(1, self.top_k // self.granularity)} "
                f"(a multiple of {self.granularity}).",
            )
        if self.granularity > 1 and self.router != "renorm":
            raise OptionError(
                "--router softmax-topk with --granularity > 1 has no native transformers class: the "
                "group-limited routers (Glm4-MoE, Dots1) score with a sigmoid, not a softmax.",
                "use --router renorm with virtual groups (exact), or --granularity 1.",
            )
        if self.calibration and self.router_init != "cluster" and self.split != "activation":
            raise OptionError(
                "--calibration is read only by --router-init cluster and --split activation.",
                "add one of them, or drop --calibration.",
            )
        if self.split == "activation" and (self.granularity == 1 or self.shared_width):
            raise OptionError(
                "--split activation groups each copy's neurons into its G shards: it needs --granularity > 1, and "
                "is not combined with --shared-width yet (the shared expert takes the first neurons by index).",
                "add -g 2 (or more) and drop --shared-width, or drop --split.",
            )
        if bool(self.router_prompts) != (self.router_init == "hidden"):
            raise OptionError(
                "--router-init hidden and --router-prompts go together: the prompts say what each expert is for.",
                "pass both (a YAML file with one entry of positive_prompts per expert copy), or neither.",
            )
        if self.router_init == "tied" and self.granularity == 1:
            raise OptionError(
                "--router-init tied ties router rows within a virtual group and needs --granularity > 1.",
                "use --router-init random (or zero).",
            )
        self.weight_scale_factor_override()

    def weight_scale_factor_override(self) -> float | None:
        """The explicit factor from --weight-scale FLOAT; None for 'auto' and 'none'."""
        if self.weight_scale in ("auto", "none"):
            return None
        try:
            value = float(self.weight_scale)
        except ValueError:
            raise OptionError(
                f"--weight-scale {self.weight_scale!r} is neither 'auto', 'none' nor a number.",
                "pass --weight-scale auto.",
            ) from None
        if not (value > 0 and math.isfinite(value)):
            raise OptionError(f"--weight-scale must be positive (got {value}).", "pass --weight-scale auto.")
        return value


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """Parse 'all', '0-11', '0,2,4-6' or '-4--1' (negative counts from the end) into layer indices."""
    text = spec.strip().lower()
    if text in ("all", "*", ""):
        return tuple(range(num_layers))
    chosen: set[int] = set()

    def index(token: str) -> int:
        value = int(token)
        value = value + num_layers if value < 0 else value
        if not 0 <= value < num_layers:
            raise ValueError(token)
        return value

    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            body = part[1:] if part.startswith("-") else part
            if "-" in body:
                cut = body.index("-") + (len(part) - len(body))
                lo, hi = index(part[:cut]), index(part[cut + 1 :])
                if lo > hi:
                    raise ValueError(part)
                chosen.update(range(lo, hi + 1))
            else:
                chosen.add(index(part))
    except ValueError:
        raise OptionError(
            f"--layers {spec!r} is not a valid layer list for a model with {num_layers} layers.",
            f"use 'all', a range like '0-{num_layers - 1}', or a list like '0,2,4'.",
        ) from None
    if not chosen:
        raise OptionError(f"--layers {spec!r} selects no layer.", "use --layers all.")
    return tuple(sorted(chosen))
