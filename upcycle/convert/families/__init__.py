"""The registry of dense source families: one module per family, and the reasons the others are refused.

`describe_dense` is the one entry point: it identifies the family, reads the config as transformers resolves it,
applies the family's refusals, and checks the checkpoint's tensors against what the family's transformers class
saves for that config (built on the meta device, so the expected set is transformers' own, never a guess).
"""

from __future__ import annotations

import importlib
import json
import re
from typing import TypeVar

from upcycle.convert.config_memo import from_json, remembered, to_json
from upcycle.convert.families.base import (
    MLP_PROJECTIONS,
    DenseModel,
    Family,
    MlpLayout,
    SourceRef,
    Traits,
)
from upcycle.convert.families.refused import REFUSED
from upcycle.errors import SourceError, UnsupportedModelError
from upcycle.hf.config import UnknownConfigError, load_config, resolved_fields

FAMILY_MODULES = (
    "llama", "mistral", "qwen2", "qwen3", "olmo2", "ernie4_5", "hunyuan_v1_dense", "seed_oss", "internlm3",
    "iquestcoder", "ministral", "ministral3", "cwm", "smollm3", "cohere2", "phi3", "granite", "granite_swa", "lfm2",
    "exaone",
)  # fmt: skip
T = TypeVar("T")
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
FAMILIES: dict[str, Family] = {
    f.model_type: f for f in (importlib.import_module(f"{__name__}.{m}").FAMILY for m in FAMILY_MODULES)
}


def family_of(config: dict) -> Family:
    """The family record for a config.json, or the refusal that names why there is none."""
    model_type = config.get("model_type")
    family = FAMILIES.get(str(model_type))
    if family is not None:
        if not _installed(family.model_type):
            import transformers

            raise UnsupportedModelError(
                f"{family.title} models need transformers >= {family.min_transformers or '5.17'}; "
                f"{transformers.__version__} is installed and does not know model_type {model_type!r}.",
                f"pip install 'transformers>={family.min_transformers}'.",
            )
        return family
    reason = REFUSED.get(str(model_type)) or _diagnose(str(model_type))
    raise UnsupportedModelError(
        f"model_type {model_type!r} cannot be upcycled exactly: {reason}.",
        f"upcycle converts {', '.join(sorted(FAMILIES))} (see `upcycle families`).",
    )


def _diagnose(model_type: str) -> str:
    """Why an unregistered model type is refused, from what transformers builds for it."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING:
        return "the installed transformers does not know this model type"
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "transformers has no causal language model class for it (not a decoder-only text model)"
    from upcycle.hf.moe_modules import moe_blocks
    from upcycle.hf.skeleton import SkeletonError, meta_model

    try:
        model = meta_model(CONFIG_MAPPING[model_type](), "eager")
    except SkeletonError:
        return "transformers cannot build it from its default config, so upcycle cannot inspect it"
    if moe_blocks(model):
        return "it is already a mixture of experts"
    names = {name.rsplit(".", 2)[-2] for name, _ in model.named_parameters() if name.endswith(".weight")}
    if not {"gate_proj", "up_proj", "down_proj"} <= names:
        return "its MLP is not a gated (gate/up/down) MLP that native MoE experts copy"
    return (
        "no native MoE class is known to compute its decoder layer exactly (upcycle registers a family only "
        "once the config check, the fuzzer and a logits test prove one)"
    )


def transformers_names(config: dict, tensors: dict[str, T]) -> dict[str, T]:
    """A checkpoint's tensors under the names transformers' class gives them (the family's renames applied)."""
    family = FAMILIES.get(str(config.get("model_type")))
    if family is None or not family.checkpoint_renames:
        return tensors
    renamed: dict[str, T] = {}
    for name, tensor in tensors.items():
        for pattern, replacement in family.checkpoint_renames:
            name = re.sub(pattern, replacement, name)
        renamed[name] = tensor
    return renamed


def _installed(model_type: str) -> bool:
    def known() -> bool:
        from transformers import CONFIG_MAPPING

        return model_type in CONFIG_MAPPING

    return remembered("installed", model_type, known, keep=bool)


def describe_dense(config: dict, tensors: set[str] | dict) -> DenseModel:
    """Identify the family, refuse configs without an exact native target, and check the tensors against the config."""
    family = family_of(config)
    check_layer_count(config, tensors)  # before transformers builds a config (or a model) of that many layers
    try:
        resolved = remembered("resolved fields", config, lambda: resolved_fields(config), to_json, from_json)
    except UnknownConfigError as error:
        raise SourceError(f"config.json cannot be read: {error}.", "re-save the model with save_pretrained.") from None
    expected = _expected_tensors(config)
    try:
        hidden = int(resolved["hidden_size"])
        heads = int(resolved["num_attention_heads"])
        num_layers = int(resolved["num_hidden_layers"])
        model = DenseModel(
            spec=family,
            config=config,
            resolved=resolved,
            traits=family.traits(resolved),
            num_layers=num_layers,
            hidden_size=hidden,
            intermediate_size=_intermediate_size(family, expected, resolved),
            num_heads=heads,
            num_kv_heads=int(resolved.get("num_key_value_heads") or heads),
            head_dim=int(resolved.get("head_dim") or hidden // heads),
            tie_word_embeddings=bool(resolved.get("tie_word_embeddings", False)),
            layer_windows=family.windows(resolved, num_layers),
            expected=expected,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise SourceError(
            f"config.json lacks or garbles a required field ({error}).",
            "re-save the model with save_pretrained.",
        ) from None
    _refuse_unrunnable(model)
    for refusal in family.refusals:
        reason = refusal(model)
        if reason:
            raise UnsupportedModelError(
                f"this {family.title} model cannot be upcycled exactly: {reason}.", _nearest(model)
            )
    _check_tensors(model, tensors)
    return model


def check_layer_count(config: dict, tensors: dict) -> None:
    """config.json's layer count against the layers the weight files hold, before transformers builds any layer."""
    declared = next((config[key] for key in ("num_hidden_layers", "num_layers", "n_layer") if key in config), None)
    if declared is None:
        return
    stored = {int(match.group(1)) for name in tensors if (match := LAYER_INDEX.search(name))}
    held = max(stored) + 1 if stored else 0
    if not isinstance(declared, int) or isinstance(declared, bool) or declared != held:
        raise SourceError(
            f"config.json declares {declared!r} decoder layers but the weight files hold {held}.",
            "pass the config that belongs to these weights (or every shard of the checkpoint).",
        )


def _nearest(model: DenseModel) -> str:
    return f"{model.title} models without it convert exactly to {' or '.join(model.spec.targets)}."


def _refuse_unrunnable(model: DenseModel) -> None:
    """Configs transformers itself cannot run, and layer kinds no target copies."""
    if model.num_heads % model.num_kv_heads:
        raise SourceError(
            f"num_attention_heads {model.num_heads} is not a multiple of num_key_value_heads {model.num_kv_heads} "
            "(as transformers reads config.json; an absent field takes the class default), so transformers cannot "
            "run this model.",
            "fix config.json so the key/value heads divide the attention heads.",
        )
    types = model.resolved.get("layer_types") or []
    if "sliding_attention" in types and not model.resolved.get("sliding_window"):
        raise SourceError(
            "layer_types names sliding-window layers but the config sets no sliding_window (use_sliding_window is "
            "off or the window is null), so transformers cannot run this model.",
            "set use_sliding_window and sliding_window, or make every layer full_attention.",
        )
    unknown = set(types) - model.spec.layer_kinds
    if unknown:
        raise UnsupportedModelError(
            f"this {model.title} model has layer types {sorted(unknown)} that upcycle does not know.",
            "only full and sliding-window attention layers can be upcycled exactly.",
        )
    if model.resolved.get("mlp_bias"):
        raise UnsupportedModelError(
            "this model has MLP biases (mlp_bias=true); native MoE experts have none.",
            "only bias-free MLPs can be upcycled exactly.",
        )


def _intermediate_size(family: Family, expected: dict[str, tuple[int, ...]], resolved: dict) -> int:
    """The MLP width the class really builds (LFM2 derives it from the config's), from its gate's shape."""
    mlp = family.mlp
    gate = expected.get(f"model.layers.0.{mlp.gate_up or mlp.gate}")
    if gate is None:
        return int(resolved["intermediate_size"])
    return gate[0] // 2 if mlp.gate_up else gate[0]


def _expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor the family's transformers class saves for this config, with its shape (tied copies left out).

    Remembered per config for the process (a merge describes the base and every expert model, often one config)
    and on disk (`config_memo`)."""
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in _EXPECTED:
        _EXPECTED[key] = remembered(
            "expected tensors",
            config,
            lambda: _build_expected_tensors(config),
            encode=lambda shapes: [[name, list(shape)] for name, shape in shapes.items()],
            decode=lambda pairs: {name: tuple(shape) for name, shape in pairs},
        )
    return dict(_EXPECTED[key])


_EXPECTED: dict[str, dict[str, tuple[int, ...]]] = {}


def _build_expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    from upcycle.hf.skeleton import SkeletonError, meta_model

    try:
        model = meta_model(load_config(config), "eager")
    except (UnknownConfigError, SkeletonError) as error:
        raise SourceError(f"config.json cannot be read: {error}.", "re-save the model with save_pretrained.") from None
    seen: set[int] = set()
    expected: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue  # a tied weight is saved once, under its first name
        seen.add(id(tensor))
        expected[name] = tuple(tensor.shape)
    return expected


def _check_tensors(model: DenseModel, tensors: set[str] | dict) -> None:
    """Names and, when known, shapes: a config that does not describe its weights fails here, not at load time."""
    names = set(tensors)
    ignorable = {n for n in names if n.endswith("rotary_emb.inv_freq")}
    if model.tie_word_embeddings:
        ignorable |= {"lm_head.weight"} & names
    expected = model.expected
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected) - ignorable)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SourceError(
            f"the source lacks tensor {missing[0]!r}{more} that a {model.family} model with this config must have.",
            "pass the complete checkpoint (all shards) for this config.",
        )
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise SourceError(
            f"the source holds tensor {unexpected[0]!r}{more} that a {model.family} model with "
            "this config does not have.",
            "check that config.json matches the weights.",
        )
    mlp = model.mlp_tensor_names()
    module = model.spec.mlp.down.rsplit(".", 2)[0] + "."  # "mlp."
    stray = sorted(
        n
        for n in expected
        if n not in mlp
        and (layer := model.layer_of(n)) is not None
        and n.startswith(model.layer_prefix(layer) + module)
    )
    if stray or not mlp <= set(expected):
        raise UnsupportedModelError(
            f"the {model.title} MLP holds {stray[0] if stray else sorted(mlp - set(expected))[0]!r}, which is not "
            "a gate, up or down weight, so experts cannot copy it.",
            "only bias-free gated MLPs can be upcycled exactly.",
        )
    if isinstance(tensors, dict):
        for name, shape in expected.items():
            actual = tuple(getattr(tensors[name], "shape", shape))
            if actual != shape:
                raise SourceError(
                    f"{name} has shape {list(actual)} but config.json implies {list(shape)} (as transformers "
                    "reads it, absent fields taking the class defaults).",
                    "fix config.json (e.g. an absent head_dim takes the class default) so it matches the weights.",
                )


__all__ = [
    "FAMILIES",
    "MLP_PROJECTIONS",
    "REFUSED",
    "DenseModel",
    "Family",
    "MlpLayout",
    "SourceRef",
    "Traits",
    "describe_dense",
    "family_of",
]
