"""YAML values into typed recipe fields: a strict YAML loader, strict coercion, and the base of every section.

Strict because YAML guesses types: a key given twice, a bool where an int belongs or a string where a number
belongs stops the run at load time with the full dotted key in the message, never after the model has loaded.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from dataclasses import fields
from functools import cache
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from upcycle.errors import OptionError

_NUMBER = re.compile(r"^[+-]?(\d+(_\d+)*(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def describe(value: Any) -> str:
    """A value as the user wrote it in YAML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list ({', '.join(describe(v) for v in value)})" if len(value) <= 4 else "a list"
    return repr(value)


def type_error(key: str, expected: str, value: Any, example: str) -> OptionError:
    return OptionError(
        f"{key}: expected {expected}, got {describe(value)}.", f"set {key} to {expected}, e.g. {example}."
    )


def coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` strictly and return it in canonical form.

    Strict because YAML guesses types: a bool is never an int, a string never a number, except for float
    fields, where numeric strings are accepted (PyYAML reads ``1e-3`` as a string; it is YAML 1.1).
    """
    origin, args = get_origin(hint), get_args(hint)
    if isinstance(hint, type) and issubclass(hint, Section):  # a nested section, e.g. model.upcycle
        return _nested_section(hint, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(inner, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise type_error(key, "true or false", value, "true")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise type_error(key, "an integer", value, _integer_example(value))
        return value
    if hint is float:
        number: Any = value
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            number = float(value.strip().replace("_", ""))
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise type_error(key, "a number", value, "3e-4")
        if not math.isfinite(number):
            raise type_error(key, "a finite number", value, "3e-4")
        return float(number)
    if hint is str:
        if not isinstance(value, str):
            raise type_error(key, "a string", value, "'text'")
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]: a list in YAML
        if isinstance(value, str):  # one path is a list of one
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise type_error(key, "a list of strings", value, "[a.txt, b.txt]")
        return tuple(coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:  # fixed length, e.g. betas
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise type_error(key, f"a list of {len(args)} numbers", value, "[0.9, 0.95]")
        return tuple(coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    raise TypeError(f"recipe field {key} has an unsupported type {hint!r}")  # pragma: no cover - schema bug


def _nested_section(cls: type[Section], value: Any, key: str) -> Section:
    """A mapping in the YAML made into its section (``model.upcycle``)."""
    return value if isinstance(value, cls) else cls(**section_mapping(cls, value, key))


class UnknownKey(OptionError):
    """A key no section has; `recipe_from_dict` names the nearest valid one (it knows every section)."""

    def __init__(self, key: str, known: list[str], section: str) -> None:
        super().__init__(f"unknown key {key}.", f"remove it, or use a key valid in {section}: {', '.join(known)}.")
        self.key, self.known, self.section = key, known, section


def section_mapping(cls: type[Section], raw: Any, key: str) -> dict[str, Any]:
    """A section's YAML mapping, checked: a mapping, no unknown key (the nearest valid one named), none missing."""
    if raw is None:  # "moe:" with nothing under it: every default
        raw = {}
    if not isinstance(raw, dict):
        raise OptionError(f"{key}: expected a mapping of keys, got {describe(raw)}.", f"indent the keys under {key}:.")
    known = list(field_types(cls))
    for name in raw:
        if name not in known:
            raise UnknownKey(f"{key}.{name}", known, key)
    for f in fields(cls):
        if f.name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise OptionError(f"missing required key {key}.{f.name}.", f"add {f.name}: under {key}:.")
    return dict(raw)


def _integer_example(value: Any) -> str:
    """For ``1e9`` (a string to PyYAML) or ``2.0``, the integer spelling the user meant."""
    try:
        number = float(str(value).replace("_", "")) if not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if math.isfinite(number) and number == int(number):
        return f"{int(number):_} (digits only: no decimal point or exponent)"
    return "1000 or 1_000_000"


def require(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise OptionError(f"{key}: {problem}.", fix)


def one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    require(value in allowed, key, f"unknown value {value!r}", f"choose one of {', '.join(allowed)}.")


class Section:
    """Base of every recipe section: types are coerced and ranges checked when an instance is made."""

    _name = ""  # dotted prefix of this section in the recipe ("optim"), for error messages

    def __post_init__(self) -> None:
        for name, hint in field_types(type(self)).items():
            object.__setattr__(self, name, coerce(hint, getattr(self, name), self._key(name)))
        self._check()

    def _key(self, name: str) -> str:
        return f"{self._name}.{name}" if self._name else name

    def _check(self) -> None:
        """Range and consistency checks of this section alone."""


def nested_section(hint: Any) -> type[Section] | None:
    """The section class a field holds (``UpcycleSection | None`` -> ``UpcycleSection``), else None."""
    for candidate in (hint, *get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None


@cache
def field_types(cls: type) -> dict[str, Any]:
    """Each field's type, evaluated (the annotations are strings under ``from __future__ import annotations``)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (plain PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
