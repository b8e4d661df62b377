"""A config.json as transformers reads it: the model class's own defaults filled in for every absent field."""

from __future__ import annotations

import copy
from typing import Any


class UnknownConfigError(Exception):
    """transformers does not know the model type, or rejects the config."""


def load_config(config: dict) -> Any:
    """The PretrainedConfig transformers builds from this config.json (what `from_pretrained` would see)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UnknownConfigError(f"the installed transformers does not know model_type {model_type!r}")
    try:
        return CONFIG_MAPPING[model_type].from_dict(copy.deepcopy(config))  # transformers edits nested dicts
    except Exception as error:  # transformers validates configs with ValueError, TypeError, KeyError ...
        raise UnknownConfigError(
            f"transformers rejects this {model_type} config ({type(error).__name__}: {error})"
        ) from None


def resolved_fields(config: dict) -> dict[str, Any]:
    """Every field of the loaded config as plain JSON values, defaults included."""
    loaded = load_config(config)
    fields = loaded.to_dict()
    for key in ("head_dim", "sliding_window", "layer_types", "rope_parameters"):
        if key not in fields and hasattr(loaded, key):
            fields[key] = getattr(loaded, key)
    return fields
