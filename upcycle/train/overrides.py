"""``--set key=value`` overrides: applied to the raw recipe data, before it is validated like the file itself.

Each value is parsed as YAML (``--set optim.betas=[0.8,0.9]``, ``--set optim.grad_clip=null``), so an override is
checked exactly as the same value written in the recipe file would be. Relative paths mean what they mean in the
shell: relative to the current directory, not to the recipe's folder.
"""

from __future__ import annotations

from typing import Any

import yaml

from upcycle.errors import OptionError
from upcycle.train.recipe_fields import StrictLoader, field_types, nested_section
from upcycle.train.recipe_keys import dotted_keys, unknown_key
from upcycle.train.recipe_paths import PATH_KEYS, command_line_path
from upcycle.train.recipe_sections import SECTIONS


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``data`` with each ``key=value`` applied (value parsed as YAML); relative paths become cwd-relative."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        key, text = split_override(item)
        value = parse_value(text)
        if key in PATH_KEYS:
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
    section, dot, _ = key.partition(".")
    if section in SECTIONS and not dot:
        raise OptionError(
            f"{option} {key}: {key} is a section.",
            f"set one of its keys, e.g. {option} {key}.{next(iter(field_types(SECTIONS[section])))}=...",
        )
    if key in dotted_keys() or _is_nested_section(key):  # model.upcycle=null or ={experts: 4} too
        return
    if key == "source":
        raise OptionError(f"{option} source: source is set from the recipe file.", f"remove this {option}.")
    origin = f" in {option} {item}"
    nested = _nested_keys(key)
    if nested is not None:
        parent, known = nested
        raise unknown_key(key, known, parent, origin)
    if section in SECTIONS:
        raise unknown_key(key, list(field_types(SECTIONS[section])), section, origin)
    raise unknown_key(key, list(SECTIONS), None, origin)


def parse_value(text: str) -> Any:
    """A value as YAML (empty: null); text that is not YAML is taken literally (type checks still apply)."""
    try:
        return yaml.load(text, Loader=StrictLoader) if text.strip() else None
    except yaml.YAMLError:
        return text


def _is_nested_section(key: str) -> bool:
    section, _, name = key.partition(".")
    hint = field_types(SECTIONS[section]).get(name) if section in SECTIONS else None
    return hint is not None and nested_section(hint) is not None


def _nested_keys(key: str) -> tuple[str, list[str]] | None:
    """For ``model.upcycle.expert``: the nested section's key (``model.upcycle``) and its valid keys."""
    parts = key.split(".")
    if len(parts) < 3 or parts[0] not in SECTIONS:
        return None
    hint = field_types(SECTIONS[parts[0]]).get(parts[1])
    nested = nested_section(hint) if hint is not None else None
    return None if nested is None else (f"{parts[0]}.{parts[1]}", list(field_types(nested)))
