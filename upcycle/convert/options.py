"""Conversion options: what the user asked for, validated once, before any file is read."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from upcycle.errors import OptionError

RouterKind = Literal["renorm", "softmax-topk"]
RouterInit = Literal["random", "zero", "tied"]
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class UpcycleOptions:
    """Every choice that shapes the converted checkpoint; recorded verbatim in upcycle.json."""

    experts: int = 8  # expansion rate E: copies of each dense MLP
    top_k: int = 2  # experts each token uses (T in the paper)
    granularity: int = 1  # G: shards per copy along the intermediate dim (virtual groups when > 1)
    router: RouterKind = "renorm"  # renorm: softmax→top-k→renormalise; softmax-topk: no renormalisation
    router_init: RouterInit = "random"
    router_std: float | None = None  # None: the source config's initializer_range (0.02 when absent)
    weight_scale: str = "auto"  # "auto", "none" or a float factor s
    drop_upcycling: float = 0.0  # fraction r of intermediate neurons re-drawn per expert
    noise: float = 0.0  # Gaussian noise std, relative to each dense tensor's std
    layers: str = "all"  # which decoder layers become MoE (others stay dense)
    target: str = "auto"
    dtype: str = "auto"
    shard_size: int = 2 * 1000**3  # bytes per output safetensors file: 2GB, as `--shard-size` reads it
    seed: int = 0
    extra: dict = field(default_factory=dict)  # reserved for forward compatibility of upcycle.json

    @property
    def num_experts(self) -> int:
        return self.experts * self.granularity

    def to_json(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Reject inconsistent options with the reason and the fix, before touching any file."""
        if self.experts < 1:
            raise OptionError(f"--experts must be at least 1 (got {self.experts}).", "pass --experts 8.")
        if self.granularity < 1:
            raise OptionError(f"--granularity must be at least 1 (got {self.granularity}).", "pass -g 1.")
        if self.top_k < 1:
            raise OptionError(f"--top-k must be at least 1 (got {self.top_k}).", "pass --top-k 2.")
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
        if self.router not in ("renorm", "softmax-topk"):
            raise OptionError(f"unknown --router {self.router!r}.", "choose renorm or softmax-topk.")
        if self.router_init not in ("random", "zero", "tied"):
            raise OptionError(f"unknown --router-init {self.router_init!r}.", "choose random, zero or tied.")
        if self.router_init == "tied" and self.granularity == 1:
            raise OptionError(
                "--router-init tied ties router rows within a virtual group and needs --granularity > 1.",
                "use --router-init random (or zero).",
            )
        if not 0.0 <= self.drop_upcycling < 1.0:
            raise OptionError(
                f"--drop-upcycling must be a ratio in [0, 1) (got {self.drop_upcycling}).",
                "pass e.g. --drop-upcycling 0.5.",
            )
        if self.noise < 0 or not math.isfinite(self.noise):
            raise OptionError(f"--noise must be a finite std >= 0 (got {self.noise}).", "pass --noise 0.01.")
        if self.router_std is not None and (self.router_std < 0 or not math.isfinite(self.router_std)):
            raise OptionError(f"router std must be >= 0 (got {self.router_std}).", "omit it.")
        self.weight_scale_factor_override()
        if self.dtype not in DTYPES:
            raise OptionError(f"unknown --dtype {self.dtype!r}.", f"choose one of: {', '.join(DTYPES)}.")
        if self.shard_size < 1000**2:
            raise OptionError(f"--shard-size must be at least 1MB (got {self.shard_size} bytes).", "use 2GB.")

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
