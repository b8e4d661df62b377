"""Config equivalence: do two config.json files make transformers compute the same function, layer by layer?

Both configs go through `probe.compute_spec` (transformers' own classes, nothing from upcycle's mapping) and
everything that decides the computation is compared: vocabulary and tied head, special tokens, rotary tables at
lengths up to twice the context (every rope type, dynamic and long-context switches included), per layer the
attention heads, head size, scaling, arguments and mask at sampled positions, norm epsilons and outputs,
activations, and the whole probe's hidden states and logits. The MLP itself is the weight check's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from upcycle.hf.generation_probe import (
    causal_lm_class,
    class_hooks,
    compare_generation,
    generation_spec,
    switch_points,
)
from upcycle.hf.probe import (
    PROBE_TOKENS,
    ComputeSpec,
    LayerSpec,
    NormSpec,
    ProbeError,
    compute_spec,
    far_probe_position,
    load_config,
    rope_probe_lengths,
    window_fields,
)

_ATTENTION_FIELDS = {
    "parameters": "the attention parameters",
    "heads": "the number of query heads",
    "kv_heads": "the number of key/value heads",
    "head_dim": "the head size",
    "value_dim": "the value head size",
    "scaling": "the attention scaling",
    "sliding_window": "the window passed to the attention kernel (flash-attention windows by it)",
    "softcap": "the attention logit soft-capping",
    "mixer": "the token mixer without attention (its parameters)",
}
PROBE_TOLERANCE = 1e-5  # relative; both probes run the same fp32 operations, so equal configs agree to ~1e-7


@dataclass
class ConfigDifference:
    where: str  # "model", "rotary", "final norm", "layer 3"
    what: str
    dense: Any
    moe: Any

    def line(self) -> str:
        return f"{self.where}: {self.what} is {_show(self.dense)} in the dense model but {_show(self.moe)} in the MoE"


@dataclass
class ConfigReport:
    equivalent: bool
    differences: list[ConfigDifference] = field(default_factory=list)
    error: str | None = None  # the probe could not run; nothing is proven
    layers: list[dict] = field(default_factory=list)  # the dense model's per-layer computation
    moe_layers: list[int] = field(default_factory=list)  # layers whose MLP is a MoE block in the MoE config
    smallest_window: int | None = None
    probe_tokens: int = PROBE_TOKENS
    mask_positions_up_to: int = 0
    rope_lengths: list[int] = field(default_factory=list)
    generation_points: list[int] = field(default_factory=list)  # lengths greedy generation was compared across

    @property
    def first_problem(self) -> str | None:
        if self.error:
            return self.error
        return self.differences[0].line() if self.differences else None

    def record(self) -> dict:
        """The summary a written folder's upcycle.json keeps of the check that admitted it."""
        import transformers

        return {
            "equivalent": self.equivalent,
            "transformers": transformers.__version__,
            "smallest_window": self.smallest_window,
            "moe_layers": self.moe_layers,
            "generation_points": self.generation_points,
        }

    def to_json(self) -> dict:
        return {
            "equivalent": self.equivalent,
            "error": self.error,
            "differences": [d.line() for d in self.differences],
            "layers": self.layers,
            "moe_layers": self.moe_layers,
            "smallest_window": self.smallest_window,
            "probe_tokens": self.probe_tokens,
            "mask_positions_up_to": self.mask_positions_up_to,
            "rope_lengths": self.rope_lengths,
            "generation_points": self.generation_points,
        }


def check_config_equivalence(dense_config: dict, moe_config: dict, source_is_moe: bool = False) -> ConfigReport:
    """Probe both configs at the same positions and compare everything but the MLP weights.

    The source is a dense model (an upcycling), or with `source_is_moe` a MoE whose sparse layers must stay the
    same (a growth: its MoE blocks are compared by `moe_block_probe`)."""
    try:
        dense_cfg, moe_cfg = load_config(dense_config), load_config(moe_config)
        windows = window_fields(dense_cfg) | window_fields(moe_cfg)
        horizon = max(
            int(getattr(dense_cfg, "max_position_embeddings", 0) or 0),
            int(getattr(moe_cfg, "max_position_embeddings", 0) or 0),
        )
        lengths = sorted(set(rope_probe_lengths(dense_cfg, horizon)) | set(rope_probe_lengths(moe_cfg, horizon)))
        far = max(far_probe_position(c, horizon, windows) for c in (dense_cfg, moe_cfg))
        dense = compute_spec(dense_config, windows, horizon, lengths, far)
        moe = compute_spec(moe_config, windows, horizon, lengths, far)
    except ProbeError as error:
        return ConfigReport(False, error=f"the configs cannot be checked: {error}")
    differences = compare_specs(dense, moe, source_is_moe)
    points: list[int] = []
    if not differences:  # the forward passes agree: does generation, with its cache, agree too?
        try:
            hooks_differ = class_hooks(causal_lm_class(dense_cfg)) != class_hooks(causal_lm_class(moe_cfg))
            points = switch_points([dense_cfg, moe_cfg], hooks_differ)
            dense_run, moe_run = generation_spec(dense_config, points), generation_spec(moe_config, points)
        except ProbeError as error:
            return ConfigReport(False, error=f"the configs cannot be checked for generation: {error}")
        differences = [
            ConfigDifference("generation", what, a, b) for what, a, b in compare_generation(dense_run, moe_run, points)
        ]
    dense_windows = [layer.window for layer in dense.layers if layer.window is not None]
    return ConfigReport(
        equivalent=not differences,
        differences=differences,
        layers=[layer.summary() for layer in dense.layers],
        moe_layers=[layer.index for layer in moe.layers if layer.mlp == "moe"],
        smallest_window=min(dense_windows) if dense_windows else None,
        mask_positions_up_to=max((max(layer.mask_rows) for layer in dense.layers if layer.mask_rows), default=0),
        rope_lengths=dense.rope_lengths,
        generation_points=points,
    )


def compare_specs(dense: ComputeSpec, moe: ComputeSpec, source_is_moe: bool = False) -> list[ConfigDifference]:
    """Every difference, model-level first, then layer by layer, then the probe's outputs."""
    found: list[ConfigDifference] = []

    def differ(where: str, what: str, a: Any, b: Any) -> None:
        if not _same(a, b):
            found.append(ConfigDifference(where, what, a, b))

    differ("model", "the vocabulary size", dense.vocab_size, moe.vocab_size)
    differ("model", "the hidden size", dense.hidden_size, moe.hidden_size)
    differ("model", "the number of decoder layers", len(dense.layers), len(moe.layers))
    differ(
        "model",
        "tie_word_embeddings (LM head shares the embedding)",
        dense.tie_word_embeddings,
        moe.tie_word_embeddings,
    )
    for token, value in dense.special_tokens.items():
        differ("model", token, value, moe.special_tokens.get(token))
    dense_moe = [layer.index for layer in dense.layers if layer.mlp == "moe"]
    if source_is_moe:
        differ("model", "the MoE layers", dense_moe, [layer.index for layer in moe.layers if layer.mlp == "moe"])
    elif dense_moe:
        found.append(ConfigDifference("model", "the MoE layers", dense_moe, "a dense model was expected"))
    found += _compare_rotary(dense, moe)
    found += _compare_norms("final norm", dense.final_norms, moe.final_norms)
    for a, b in zip(dense.layers, moe.layers, strict=False):
        found += _compare_layer(a, b)
    if not found:
        found += _compare_probe(dense, moe)
    return found


def _compare_rotary(dense: ComputeSpec, moe: ComputeSpec) -> list[ConfigDifference]:
    """The rotary tables, module by module (paired in order: classes may name the one module differently)."""
    if len(dense.rotary) != len(moe.rotary):
        return [ConfigDifference("rotary", "the rotary embedding modules", sorted(dense.rotary), sorted(moe.rotary))]
    lengths = dense.rope_lengths
    for name, moe_name in zip(sorted(dense.rotary), sorted(moe.rotary), strict=True):
        for length, (a, b) in zip(lengths, zip(dense.rotary[name], moe.rotary[moe_name], strict=True), strict=True):
            if a[0].shape != b[0].shape:
                return [
                    ConfigDifference(
                        "rotary",
                        f"the number of rotated dimensions per head ({name})",
                        a[0].shape[-1],
                        b[0].shape[-1],
                    )
                ]
            error = max(_relative(a[0], b[0]), _relative(a[1], b[1]))
            if error > PROBE_TOLERANCE:
                what = f"the rotary table at sequence length {length} ({name}; relative difference {error:.3g})"
                return [ConfigDifference("rotary", what, _rope_text(dense.rope), _rope_text(moe.rope))]
    return []


def _compare_norms(where: str, dense: dict[str, NormSpec], moe: dict[str, NormSpec]) -> list[ConfigDifference]:
    if sorted(dense) != sorted(moe):
        return [ConfigDifference(where, "the norms", sorted(dense), sorted(moe))]
    found = []
    for name, a in dense.items():
        b = moe[name]
        if not _same(a.eps, b.eps):
            found.append(ConfigDifference(where, f"{name} epsilon", a.eps, b.eps))
        elif (a.outputs is None) != (b.outputs is None) or (
            a.outputs is not None
            and b.outputs is not None
            and (a.outputs.shape != b.outputs.shape or _relative(a.outputs, b.outputs) > PROBE_TOLERANCE)
        ):
            found.append(ConfigDifference(where, f"what {name} computes", "one norm", "another"))
    return found


def _compare_layer(a: LayerSpec, b: LayerSpec) -> list[ConfigDifference]:
    where = f"layer {a.index}"
    found = []
    for key in sorted(set(a.attention) | set(b.attention)):
        if not _same(a.attention.get(key), b.attention.get(key)):
            what = _ATTENTION_FIELDS.get(key, f"attention argument {key}")
            found.append(ConfigDifference(where, what, a.attention.get(key), b.attention.get(key)))
    for q in sorted(set(a.mask_rows) & set(b.mask_rows)):
        if a.mask_rows[q] != b.mask_rows[q]:
            found.append(
                ConfigDifference(
                    where,
                    f"the attention mask (keys seen by the query at position {q})",
                    f"{_window_text(a)}, keys {_ranges_text(a.mask_rows[q])}",
                    f"{_window_text(b)}, keys {_ranges_text(b.mask_rows[q])}",
                )
            )
            break
    found += _compare_norms(where, a.norms, b.norms)
    if not _same_activations(a.activations, b.activations):
        found.append(ConfigDifference(where, "the MLP activation", sorted(a.activations), sorted(b.activations)))
    return found


def _compare_probe(dense: ComputeSpec, moe: ComputeSpec) -> list[ConfigDifference]:
    """Static fields agree; the probe run must agree too (it sees wiring, scalings and multipliers)."""
    for index, (a, b) in enumerate(zip(dense.layer_outputs, moe.layer_outputs, strict=False)):
        error = _relative(a, b)
        if error > PROBE_TOLERANCE:
            what = f"the output of the attention block and residuals on the probe (relative difference {error:.3g})"
            return [ConfigDifference(f"layer {index}", what, "one function", "another")]
    if dense.logits is not None and moe.logits is not None:
        error = _relative(dense.logits, moe.logits)
        if error > PROBE_TOLERANCE:
            what = f"the final norm and head on the probe (relative difference {error:.3g})"
            return [ConfigDifference("model", what, "one function", "another")]
    if dense.far_logits is not None and moe.far_logits is not None:
        error = _relative(dense.far_logits, moe.far_logits)
        if error > PROBE_TOLERANCE:
            what = (
                f"the probe's output at positions from {dense.far_position} (relative difference {error:.3g}; a "
                "computation that depends on the position itself, such as query scaling)"
            )
            return [ConfigDifference("model", what, "one function", "another")]
    return []


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _same_activations(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Compared where both classes take the activation from the config (an `act_fn`); a class that hard-codes it
    (LFM2's F.silu) has nothing a config could change, and its pairing is proven by the family's logits test."""
    if not a or not b:
        return True

    def covered(xs: dict[str, torch.Tensor], ys: dict[str, torch.Tensor]) -> bool:
        return all(any(_relative(x, y) <= PROBE_TOLERANCE for y in ys.values()) for x in xs.values())

    return covered(a, b) and covered(b, a)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    scale = a.double().abs().max().item()
    diff = (a.double() - b.double()).abs().max().item()
    if not math.isfinite(diff):
        return 0.0 if torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()]) else math.inf
    return diff / scale if scale else diff


def _window_text(layer: LayerSpec) -> str:
    return "full attention" if layer.window is None else f"a sliding window of {layer.window}"


def _ranges_text(ranges: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(f"{start}..{end - 1}" for start, end in ranges) or "none"


def _rope_text(rope: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(rope.items())) + "}"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)
