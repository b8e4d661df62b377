"""``--set key=value`` overrides: applied to the raw recipe data, before it is validated like the file itself.

Each value is parsed as YAML (``--set optim.betas=[0.8,0.9]``, ``--set optim.grad_clip=null``), so an override is
checked exactly as the same value written in the recipe file would be. Relative paths mean what they mean in the
shell: relative to the current directory, not to the recipe's folder.
"""

from __future__ import annotations

from typing import Any

import yaml

from upcycle.errors import OptionError
from upcycle.hub import is_hub_id
from upcycle.train.recipe_keys import dotted_keys, unknown_key
from upcycle.train.recipe_paths import MODEL_KEYS, PATH_KEYS, command_line_path
from upcycle.train.recipe_sections import SECTIONS
from upcycle.validation import StrictLoader, nested_model


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``data`` with each ``key=value`` applied (value parsed as YAML); relative paths become cwd-relative."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        key, text = split_override(item)
        value = parse_value(text)
        if key in PATH_KEYS and not (key in MODEL_KEYS and isinstance(value, str) and is_hub_id(value)):
            value = command_line_path(value)
        *parents, name = key.split(".")
        target = out
        for part in parents:  # copied on the way down: the caller's data is left as it was
            inner = target.get(part)
            target[part] = dict(inner) if isinstance(inner, dict) else {}
            target = target[part]
        target[name] = value
    return out


def split_override(item: str, option: str = "--set") -> tuple[str, str]:
    """``key=value`` split into a checked key (a recipe key, or a nested section) and the value's text."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise OptionError(f"{option} {item!r} is not key=value.", f"write e.g. {option} optim.lr=1e-4.")
    check_key(key, item, option)
    return key, text


def check_key(key: str, item: str, option: str = "--set") -> None:
    """Refuse a key no recipe has (naming the nearest valid one), a whole section, or ``source``."""
    parts = key.split(".")
    if len(parts) == 1 and key in SECTIONS:
        example = next(iter(SECTIONS[key].__pydantic_fields__))  # type: ignore[attr-defined]
        raise OptionError(
            f"{option} {key}: {key} is a section.", f"set one of its keys, e.g. {option} {key}.{example}=..."
        )
    if key in dotted_keys() or (len(parts) > 1 and _settings(parts) is not None):  # model.upcycle={experts: 4}
        return
    if key == "source":
        raise OptionError(f"{option} source: source is set from the recipe file.", f"remove this {option}.")
    depth = next((i for i in range(len(parts) - 1, 0, -1) if _settings(parts[:i]) is not None), 0)
    owner = _settings(parts[:depth])
    known = list(owner.__pydantic_fields__) if owner is not None else list(SECTIONS)  # type: ignore[attr-defined]
    raise unknown_key(key, known, ".".join(parts[:depth]) or None, f" in {option} {item}")


def parse_value(text: str) -> Any:
    """A value as YAML (empty: null); text that is not YAML is taken literally (type checks still apply)."""
    try:
        return yaml.load(text, Loader=StrictLoader) if text.strip() else None
    except yaml.YAMLError:
        return text


def _settings(path: list[str]) -> type | None:
    """The section or nested settings at a dotted path (``model.upcycle``: UpcycleOptions), else None."""
    cls = SECTIONS.get(path[0]) if path else None
    for part in path[1:]:
        cls = nested_model(cls, part) if cls is not None and part in cls.__pydantic_fields__ else None
    return cls
