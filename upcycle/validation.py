"""Settings as frozen pydantic dataclasses whose bad input is one line a user can act on.

Pydantic checks types, bounds, choices and unknown keys; :func:`one_line` words its first error as one
:class:`OptionError` naming the key as the user wrote it (``optim.betas[1]``, or ``--top-k`` on the command line),
never as a pydantic dump. Leaf types are strict because YAML guesses types: ``true`` is no integer and ``'8'`` no
number, but an integer is a number, and so is ``1e-3``, a string to PyYAML (YAML 1.1). Rules across fields live in
a class's ``_check``, raising :class:`OptionError`; they run once its fields are valid.
"""

from __future__ import annotations

import functools
import math
import re
import types
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, StringConstraints, ValidationError, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError, PydanticUndefined
from typing_extensions import dataclass_transform

from upcycle.errors import OptionError

Loc = tuple[str | int, ...]
Namer = Callable[[Loc], str]
Unknown = Callable[[str, list[str], str | None], OptionError]
T = TypeVar("T")
_NUMBER = re.compile(r"^[+-]?(\d+(_\d+)*(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _yaml_number(value: Any) -> Any:
    """``'1e-3'`` as 1e-3: PyYAML reads an exponent without a point as a string (YAML 1.1)."""
    return float(value.replace("_", "")) if isinstance(value, str) and _NUMBER.match(value.strip()) else value


Integer = Annotated[int, Strict()]  # not true, not 2.0, not '8'
Flag = Annotated[bool, Strict()]  # true or false, not 1 or 'yes'
Text = Annotated[str, Strict()]  # not a number
NotBlank = Annotated[str, StringConstraints(strict=True, pattern=r"\S")]  # a path or a name: something in it
Number = Annotated[float, BeforeValidator(_yaml_number), Strict()]  # finite (see the config); an int is one
Paths = Annotated[tuple[Text, ...], BeforeValidator(lambda v: (v,) if isinstance(v, str) else v)]  # one is a list


def dotted(prefix: str = "") -> Namer:
    """Keys as a recipe writes them: ``("betas", 1)`` under ``optim`` is ``optim.betas[1]``."""
    return lambda loc: (prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)).lstrip(".")


def flag(loc: Loc) -> str:
    """Keys as the command line spells them: ``("top_k",)`` is ``--top-k``."""
    return "--" + str(loc[0]).replace("_", "-") if loc else ""


@dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(Field,))
def validated(name: Namer) -> Callable[[type[T]], type[T]]:
    """A frozen, keyword-only pydantic dataclass whose bad input raises one :class:`OptionError` (keys by ``name``).

    Its ``_check``, if any, runs once the fields are valid; an :class:`OptionError` it raises is collected like
    pydantic's own errors, so the first refusal in field order is the one reported.
    """

    def build(cls: type[T]) -> type[T]:
        def _rules(self: Any) -> Any:
            try:
                self._check()
            except OptionError as error:
                raise rule(error.problem, error.fix) from None
            return self

        if "_check" in cls.__dict__:
            cls._rules = model_validator(mode="after")(_rules)  # type: ignore[attr-defined]
        model = pydantic_dataclass(
            cls, config=ConfigDict(extra="forbid", allow_inf_nan=False), frozen=True, kw_only=True
        )
        init = model.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as error:
                raise one_line(error, model, name) from None

        model.__init__ = __init__  # type: ignore[method-assign]
        return model

    return build


def rule(problem: str, fix: str | None, *, relative: bool = False) -> PydanticCustomError:
    """A refusal for pydantic to collect (``relative``: worded without its own key)."""
    return PydanticCustomError("rule", "{problem}", {"problem": problem, "fix": fix, "relative": relative})


def one_line(error: ValidationError, root: type, name: Namer, unknown: Unknown | None = None) -> OptionError:
    """Pydantic's first error (an unknown key before any other) as one line naming its key."""
    errors = error.errors()
    first = next((e for e in errors if e["type"] in _UNKNOWN), errors[0])
    loc, kind, value, ctx = first["loc"], first["type"], first["input"], first.get("ctx") or {}
    if kind in _UNKNOWN:
        known = list(getattr(_bare(_walk(root, loc[:-1])[0]), "__pydantic_fields__", {}))
        return (unknown or _unknown)(name((*loc[:-1], str(loc[-1]))), known, name(loc[:-1]) or None)
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a list too short for its fixed length
        loc, kind = loc[:-1], "tuple_type"
    hint, info = _walk(root, loc)
    key, example = name(loc), _suggest(info, loc)
    if kind == "missing":
        return OptionError(f"missing required key {key}.", f"add {loc[-1]}: under {name(loc[:-1])}:.")
    if kind == "rule":
        return OptionError(f"{key}: {ctx['problem']}" if ctx["relative"] and key else ctx["problem"], ctx["fix"])
    if kind == "literal_error":
        choices = ", ".join(map(str, get_args(_bare(hint))))
        return OptionError(f"{key}: unknown value {describe(value)}.", f"choose one of {choices}.")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bounds = _bounds(info, hint) or ctx
        fix = f"use {_number(bounds['ge'])} or more." if "ge" in bounds else f"use a value that is {_range(bounds)}."
        fix = f"use e.g. {example}." if example else fix
        return OptionError(f"{key}: must be {_range(bounds)}, got {describe(value)}.", fix)
    if kind == "string_pattern_mismatch" or (kind == "too_short" and ctx.get("min_length") == 1):
        return OptionError(f"{key}: is empty.", f"use e.g. {example}." if example else f"set {key} or omit it.")
    expected, example = ("a finite number", "3e-4") if kind == "finite_number" else _expected(hint, info, value)
    fix = f"set {key} to {expected}, e.g. {example}." if example else f"indent the keys under {key}:."  # a section
    return OptionError(f"{key}: expected {expected}, got {describe(value)}.", fix)


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


def nested_model(cls: type, name: str) -> type | None:
    """The settings class a field holds (``model.upcycle``: UpcycleOptions), else None."""
    hint = _bare(cls.__pydantic_fields__[name].annotation)  # type: ignore[attr-defined]
    return hint if hasattr(hint, "__pydantic_fields__") else None


_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden", "invalid_key")
_PLURAL = {str: "strings", float: "numbers", int: "integers"}
_WORDS = {bool: ("true or false", "true"), float: ("a number", "3e-4"), str: ("a string", "'text'")}


def _unknown(key: str, known: list[str], owner: str | None) -> OptionError:
    return OptionError(f"unknown key {key}.", f"remove it, or use one of {', '.join(known)}.")


def _bare(hint: Any) -> Any:
    """``Annotated[int, ...] | None`` -> ``int``."""
    while get_origin(hint) in (Annotated, Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    return hint


def _walk(root: type, loc: Loc) -> tuple[Any, FieldInfo | None]:
    """The type ``loc`` points at from ``root``, and the field holding it (the list's, for an item)."""
    hint, info = root, None
    for part in loc:
        hint = _bare(hint)
        if isinstance(part, int) and get_origin(hint) is tuple:
            hint = get_args(hint)[0 if get_args(hint)[-1] is Ellipsis else part]
        else:
            info = getattr(hint, "__pydantic_fields__", {}).get(part)
            hint = None if info is None else info.annotation
    return hint, info


def _bounds(info: FieldInfo | None, hint: Any) -> dict[str, Any]:
    """The bounds (``{"ge": 0, "lt": 1}``) of a field, or of a list's annotated item."""
    found = [*(info.metadata if info else []), *(get_args(hint)[1:] if get_origin(hint) is Annotated else [])]
    return {k: getattr(m, k) for m in found for k in ("gt", "ge", "lt", "le") if getattr(m, k, None) is not None}


def _range(bounds: dict[str, Any]) -> str:
    low, high = (_number(bounds.get(a, bounds.get(b))) for a, b in (("ge", "gt"), ("le", "lt")))
    if bounds.keys() == {"ge"}:
        return "0 or more" if low == "0" else f"at least {low}"
    if bounds.keys() == {"gt"}:
        return "positive" if low == "0" else f"above {low}"
    return f"in {'[' if 'ge' in bounds else '('}{low}, {high}{']' if 'le' in bounds else ')'}"


def _suggest(info: FieldInfo | None, loc: Loc) -> str | None:
    """What to suggest: the field's examples, else its default (the item's, for ``optim.betas[1]``)."""
    if info is None:
        return None
    if info.examples:
        return " or ".join(map(str, info.examples))
    default = info.default
    if isinstance(default, tuple) and loc and isinstance(loc[-1], int):
        default = default[loc[-1]] if loc[-1] < len(default) else None
    if default is None or default is PydanticUndefined or default == ():
        return None
    return str(list(default)) if isinstance(default, tuple) else str(default)


def _expected(hint: Any, info: FieldInfo | None, value: Any) -> tuple[str, str | None]:
    """What a field takes, in words, and an example (None for a section: its fix is to indent)."""
    hint = _bare(hint)
    if hasattr(hint, "__pydantic_fields__"):
        return "a mapping of keys", None
    if get_origin(hint) is tuple:
        items = [_bare(a) for a in get_args(hint)]
        count = "" if items[-1] is Ellipsis else f"{len(items)} "
        return f"a list of {count}{_PLURAL[items[0]]}", _suggest(info, ()) or "[a.txt, b.txt]"
    return ("an integer", _integer_example(value)) if hint is int else _WORDS.get(hint, ("a mapping", "{}"))


def _integer_example(value: Any) -> str:
    """For ``1e9`` (a string to PyYAML) or ``2.0``, the integer spelling the user meant."""
    number = _yaml_number(value) if isinstance(value, (str, float)) else math.nan
    if isinstance(number, float) and math.isfinite(number) and number == int(number):
        return f"{int(number):_} (digits only: no decimal point or exponent)"
    return "1000 or 1_000_000"


def _number(value: Any) -> str:
    """A bound as people write it: ``2**63``, not its 19 digits; ``1_000_000``."""
    if isinstance(value, int) and value > 2**32 and not value & (value - 1):
        return f"2**{value.bit_length() - 1}"
    return f"{value:_}" if isinstance(value, int) else str(value)


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
