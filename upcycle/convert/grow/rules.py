"""Which MoE classes can grow from E to m*E experts exactly, and why the others cannot.

Growing copies every expert m times (new expert j is old expert j // m, router rows and biases repeated the same
way) and raises top-k from k to m*k. A token then picks all m copies of each of its k experts, and:

- softmax scores: each copy scores p/m (the softmax runs over m times as many equal logits), so the m copies of
  an expert sum to p, renormalised or not;
- sigmoid scores: each copy scores the expert's full s, so only a renormalised top-k (s / (m * sum)) gives the
  copies s in sum; without renormalisation the expert would count m times;
- group-limited routing (DeepSeek-V3 style) ranks groups by the sum of their best two scores; two copies of one
  expert change that sum, so it is exact only when every group is kept (topk_group == n_group) or there is one.

The rules are the reasoning; the block probe (`hf.moe_block_probe`) checks each grown config against what
transformers computes, and `verify` checks the written model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from upcycle.errors import OptionError, UnsupportedModelError


@dataclass(frozen=True)
class GrowRule:
    """Where one class keeps its expert count and top-k, and how it scores experts."""

    experts_keys: tuple[str, ...]  # config.json names of the routed-expert count (the first present is used)
    scoring: Literal["softmax", "sigmoid"]
    top_k_key: str = "num_experts_per_tok"
    norm_key: str | None = None  # the config field that says whether top-k weights are renormalised
    norm_default: bool = True  # its value when absent (or the behaviour when the class has no such field)
    grouped: bool = False  # reads n_group / topk_group
    scoring_key: str | None = None  # the config field that chooses softmax or sigmoid, where the class has one

    def scoring_of(self, config: dict) -> str:
        return str(config.get(self.scoring_key, self.scoring)) if self.scoring_key else self.scoring


_SOFTMAX = GrowRule(("num_experts", "num_local_experts"), "softmax", norm_key="norm_topk_prob", norm_default=False)
_SIGMOID_GROUPED = GrowRule(("n_routed_experts",), "sigmoid", norm_key="norm_topk_prob", grouped=True)

RULES: dict[str, GrowRule] = {
    "mixtral": GrowRule(("num_local_experts",), "softmax"),  # always renormalised
    "granitemoe": GrowRule(("num_local_experts",), "softmax"),  # a softmax over the top-k logits: renormalised
    "granitemoe_swa": GrowRule(("num_local_experts",), "softmax"),
    "hunyuan_v1_moe": GrowRule(("num_experts",), "softmax", top_k_key="moe_topk"),
    "cohere2_moe": GrowRule(("num_experts",), "softmax", norm_key="norm_topk_prob", scoring_key="expert_selection_fn"),
    "qwen2_moe": _SOFTMAX,
    "qwen3_moe": _SOFTMAX,
    "olmoe": _SOFTMAX,
    "flex_olmo": _SOFTMAX,
    "glm4_moe": _SIGMOID_GROUPED,
    "dots1": GrowRule(("n_routed_experts",), "sigmoid", norm_key="norm_topk_prob", norm_default=False, grouped=True),
    "deepseek_v3": _SIGMOID_GROUPED,
}


@dataclass(frozen=True)
class Growth:
    """A class's routing as read from one config, and the counts before and after growing by `factor`."""

    model_type: str
    rule: GrowRule
    experts_key: str
    experts: int
    top_k: int
    factor: int
    scoring: str = "softmax"  # how this config scores experts: softmax or sigmoid
    tied_groups: int = 0  # group-limited routing over this many groups, each with identical router rows

    @property
    def grown_experts(self) -> int:
        return self.experts * self.factor

    @property
    def grown_top_k(self) -> int:
        return self.top_k * self.factor

    def grown_config(self, config: dict) -> dict:
        """config.json with m times the experts and the top-k; nothing else changes."""
        grown = dict(config)
        for key in self.rule.experts_keys:  # every spelling present, so no reader sees the old count
            if key in grown:
                grown[key] = self.grown_experts
        grown[self.rule.top_k_key] = self.grown_top_k
        return grown

    def to_json(self) -> dict:
        return {
            "factor": self.factor,
            "experts": [self.experts, self.grown_experts],
            "top_k": [self.top_k, self.grown_top_k],
            "scoring": self.scoring,
            "tied_groups": self.tied_groups,
        }


def read_growth(config: dict, factor: int, tied_groups: bool = False) -> Growth:
    """The growth of this config by `factor`, or the reason it cannot be exact. `tied_groups`: every expert group's
    router rows (and score biases) are identical, as in upcycle's virtual groups, so copies leave every group's
    score as it was."""
    if factor < 2:
        raise OptionError(f"--factor {factor} grows nothing.", "pass --factor 2 or more.")
    model_type = str(config.get("model_type"))
    rule = RULES.get(model_type)
    if rule is None:
        raise UnsupportedModelError(
            f"upcycle grow has no rule for model_type {model_type!r}; it grows {', '.join(sorted(RULES))}.",
            "grow one of those classes (upcycle convert writes most of them).",
        )
    key = next((k for k in rule.experts_keys if isinstance(config.get(k), int)), None)
    experts, top_k = config.get(key) if key else None, config.get(rule.top_k_key)
    if not isinstance(experts, int) or not isinstance(top_k, int) or experts < 1 or top_k < 1:
        raise UnsupportedModelError(
            f"this {model_type} config.json does not state its expert count ({' or '.join(rule.experts_keys)}) and "
            f"top-k ({rule.top_k_key}) as integers.",
            "grow a checkpoint whose config.json states both.",
        )
    problem = _routing_problem(config, rule, factor, tied_groups)
    if problem:
        raise UnsupportedModelError(f"growing this {model_type} model would not be exact: {problem}.", _FIX)
    assert key is not None
    groups = limited_groups(config, rule) if tied_groups else 0
    return Growth(model_type, rule, key, experts, top_k, factor, rule.scoring_of(config), groups)


_FIX = "nothing was written; upcycle grows only where the grown model computes what the original does."


def limited_groups(config: dict, rule: GrowRule) -> int:
    """The number of expert groups a router ranks and keeps only some of (0: no group-limited routing)."""
    if not rule.grouped:
        return 0
    groups, kept = int(config.get("n_group") or 1), int(config.get("topk_group") or 1)
    return groups if groups > 1 and kept < groups else 0


def _routing_problem(config: dict, rule: GrowRule, factor: int, tied_groups: bool) -> str | None:
    normalised = config.get(rule.norm_key, rule.norm_default) if rule.norm_key else rule.norm_default
    scoring = rule.scoring_of(config)
    if scoring not in ("softmax", "sigmoid"):
        return f"it scores experts with {scoring!r}, which upcycle has no growth rule for"
    if scoring == "sigmoid" and not normalised:
        return (
            f"its sigmoid router gives each of the {factor} copies of an expert the expert's whole score and "
            f"{rule.norm_key} is false, so the copies would count the expert {factor} times"
        )
    groups = limited_groups(config, rule)
    if not groups:
        return None
    kept, per_group = int(config.get("topk_group") or 1), config[_experts_key(config, rule)] // groups
    top_k = config.get(rule.top_k_key)
    whole = top_k % per_group == 0  # with tied rows, a token takes whole groups: no tie is broken inside one
    if not tied_groups or not whole:
        why = "these are not" if not tied_groups else f"but top-k {top_k} is not a multiple of {per_group}"
        return (
            f"its router keeps {kept} of {groups} expert groups, ranked by the sum of each group's two best scores, "
            "and copies of one expert change those sums (unless every group's router rows are identical and a token "
            f"takes whole groups, as in upcycle's virtual groups; {why})"
        )
    return None


def _experts_key(config: dict, rule: GrowRule) -> str:
    return next(k for k in rule.experts_keys if isinstance(config.get(k), int))


def grow_markdown() -> str:
    """The table of the classes `upcycle grow` grows, and when each is exact: read from the rules."""
    lines = [
        "| MoE class | expert scores | grows exactly (E -> m·E, top-k -> m·k) when |",
        "|---|---|---|",
    ]
    for model_type, rule in sorted(RULES.items()):
        scores = (f"`{rule.scoring_key}`" if rule.scoring_key else rule.scoring) + (", group-limited" * rule.grouped)
        when = []
        if rule.scoring == "sigmoid" or rule.scoring_key:
            default = "true" if rule.norm_default else "false"
            condition = f"`{rule.norm_key}` is true (default {default})"
            when.append(f"with sigmoid scores, {condition}" if rule.scoring_key else condition)
        if rule.grouped:
            when.append("every group is kept (`topk_group` = `n_group`), or each group's router rows are identical")
        lines.append(f"| `{model_type}` | {scores} | {'; '.join(when) or 'always'} |")
    return "\n".join(lines) + "\n"
