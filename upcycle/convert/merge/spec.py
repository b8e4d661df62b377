"""The merge a user asks for, in mergekit-moe's own YAML format, validated before any model is opened.

base_model: path/or/hub-id          # attention, norms, embeddings and head come from here
gate_mode: hidden                   # hidden | cheap_embed | random | uniform_random
dtype: bfloat16                     # optional: the output dtype (default: the base's)
experts_per_token: 2
experts:
  - source_model: path/or/hub-id    # its MLP becomes expert 0 of every layer
    positive_prompts: ["def fib(n):"]
    negative_prompts: ["Once upon a time"]   # optional
    residual_scale: 1.0             # optional: multiplies the expert's down projection
shared_experts:                     # optional, Qwen2-MoE only: one always-on expert
  - source_model: path/or/hub-id
    positive_prompts: ["..."]       # its sigmoid gate's row, as for a routed expert
architecture: mixtral               # optional: mixtral | qwen (Qwen2-MoE) | qwen3 (Qwen3-MoE)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from upcycle.errors import OptionError
from upcycle.validation import Integer, Number, StrictLoader, Text, dotted, validated

GateMode = Literal["hidden", "cheap_embed", "random", "uniform_random"]
# mergekit-moe's output architectures (`architecture:` matches a prefix of their names) and upcycle's target for each
ARCHITECTURES = {"mixtral": "mixtral", "qwen": "qwen2_moe", "qwen3": "qwen3_moe"}


@validated(dotted())
class MergeExpert:
    """One expert: a dense model whose MLP it is, and the prompts its router row is made from."""

    source_model: Text = Field(min_length=1)
    positive_prompts: tuple[Text, ...] = ()
    negative_prompts: tuple[Text, ...] = ()
    residual_scale: Number | None = None
    noise_scale: Number | None = None

    def _check(self) -> None:
        if self.noise_scale is not None:
            raise OptionError(
                "noise_scale is not supported: mergekit adds unseeded noise, which no record could reproduce.",
                "remove noise_scale (upcycle convert --noise adds seeded noise to copies).",
            )


@validated(dotted())
class MergeSpec:
    base_model: Text = Field(min_length=1)
    experts: tuple[MergeExpert, ...] = ()
    gate_mode: GateMode = "hidden"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    experts_per_token: Integer = Field(2, ge=1)
    shared_experts: tuple[MergeExpert, ...] = ()
    architecture: Text | None = None

    def _check(self) -> None:
        if not self.experts:
            raise OptionError("experts: none listed.", "list one entry with its source_model per expert.")
        if self.experts_per_token > len(self.experts):
            raise OptionError(
                f"experts_per_token {self.experts_per_token} exceeds the {len(self.experts)} experts listed.",
                f"list more experts or set experts_per_token to at most {len(self.experts)}.",
            )
        if len(self.shared_experts) > 1:
            raise OptionError(
                f"{len(self.shared_experts)} shared_experts: the classes written hold one shared expert.",
                "list one shared expert.",
            )
        if self.architecture is not None and self.target is None:
            raise OptionError(
                f"architecture: unknown value {self.architecture!r}.", f"choose one of {', '.join(ARCHITECTURES)}."
            )
        if self.gate_mode in ("hidden", "cheap_embed"):
            for kind, experts in (("experts", self.experts), ("shared_experts", self.shared_experts)):
                for index, expert in enumerate(experts):
                    if not expert.positive_prompts:
                        raise OptionError(
                            f"{kind}[{index}] has no positive_prompts, which gate_mode {self.gate_mode} needs.",
                            "add positive_prompts, or use gate_mode: random.",
                        )
            prompts = {(e.positive_prompts, e.negative_prompts) for e in self.experts}
            if len(self.experts) > 1 and len(prompts) == 1:
                raise OptionError(
                    "every expert has the same prompts: their router rows would be identical.",
                    "give each expert prompts that reflect what it should receive, or use gate_mode: random.",
                )

    @property
    def target(self) -> str | None:
        """upcycle's target for `architecture:` (mergekit's names: Mixtral, Qwen MoE, Qwen3 MoE; any spelling)."""
        if self.architecture is None:
            return None
        wanted = self.architecture.lower().replace("-", "").replace("_", "").replace(" ", "").removesuffix("moe")
        return ARCHITECTURES.get({"qwen2": "qwen"}.get(wanted, wanted))

    @property
    def gated(self) -> tuple[MergeExpert, ...]:
        """The experts a router row is made for: the routed ones, then the shared one (its sigmoid gate's row)."""
        return self.experts + self.shared_experts

    def to_json(self) -> dict:
        return {
            "base_model": self.base_model,
            "gate_mode": self.gate_mode,
            "experts_per_token": self.experts_per_token,
            "experts": [_expert_json(e) for e in self.experts],
            "shared_experts": [_expert_json(e) for e in self.shared_experts],
            **({"dtype": self.dtype} if self.dtype else {}),
            **({"architecture": self.architecture} if self.architecture else {}),
        }

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


def _expert_json(expert: MergeExpert) -> dict:
    data: dict = {"source_model": expert.source_model, "positive_prompts": list(expert.positive_prompts)}
    if expert.negative_prompts:
        data["negative_prompts"] = list(expert.negative_prompts)
    if expert.residual_scale is not None:
        data["residual_scale"] = expert.residual_scale
    return data


def read_merge_spec(path: Path) -> MergeSpec:
    """The merge in a mergekit-moe YAML file. Model paths mean what they mean to mergekit-moe: a folder (relative
    to the working directory) or a Hub id."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise OptionError(f"cannot read the merge config {path}: {error}.", "pass a mergekit-moe YAML file.") from None
    if not isinstance(data, dict):
        raise OptionError(f"{path.name} is not a mapping of keys.", "write base_model:, experts: and so on.")
    return MergeSpec(**data)
