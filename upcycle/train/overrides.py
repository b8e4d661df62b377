"""``--set key=value`` overrides: applied to the raw recipe data, before it is validated like the file itself.

Each value is parsed as YAML (``--set optim.betas=[0.8,0.9]``, ``--set optim.grad_clip=null``), so an override is
checked exactly as the same value written in the recipe file would be. Relative paths mean what they mean in the
shell: relative to the current directory, not to the recipe's folder.
"""

from __future__ import annotations

from typing import Any

import yaml

from upcycle.errors import OptionError
from upcycle.train.recipe_fields import StrictLoader, field_types
from upcycle.train.recipe_keys import dotted_keys, unknown_key
from upcycle.train.recipe_paths import PATH_KEYS, command_line_path
from upcycle.train.recipe_sections import SECTIONS


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
                f"set one of its keys, e.g. --set {key}.{next(iter(field_types(SECTIONS[section])))}=...",
            )
        if key not in dotted_keys():
            if key == "source":
                raise OptionError("--set source: source is set from the recipe file.", "remove this --set.")
            origin = f" in --set {item}"
            if section in SECTIONS:
                raise unknown_key(key, list(field_types(SECTIONS[section])), section, origin)
            raise unknown_key(key, list(SECTIONS), None, origin)
        try:
            value = yaml.load(text, Loader=StrictLoader) if text.strip() else None
        except yaml.YAMLError:
            value = text  # not YAML: take it literally; type checks still apply
        if key in PATH_KEYS:
            value = command_line_path(value)
        target = out.get(section)
        if not isinstance(target, dict):
            target = out[section] = {}
        target[leaf] = value
    return out
