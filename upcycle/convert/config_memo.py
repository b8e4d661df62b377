"""What transformers says about a config, remembered on disk so a later conversion need not ask it again.

Three facts cost most of a conversion's planning, each a pure function of config contents and of the code that
asks transformers: whether transformers knows a model type, a config's resolved fields and the tensors its class
saves, and the config check's verdict on a (dense, MoE) config pair. A memo is keyed by the sha256 of the inputs,
the transformers and torch versions, and the bytes of upcycle's `hf` package (the code that asks), so an upgrade
or an edit computes anew. The next conversion of the same dense model (another expert count, the next run of a
sweep) then plans without importing transformers, and a pair's passing verdict is reused instead of probed
again. Only a passing verdict is kept: a refusal is computed anew each time, with its reasons. `upcycle verify`
never reads these memos; it checks the written folder itself.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from upcycle.assets import cache_dir, mark_used
from upcycle.output_safety import write_json_atomically

T = TypeVar("T")
MEMO_FOLDER = "config-facts"
HF_PACKAGE = Path(__file__).resolve().parents[1] / "hf"


@functools.cache
def _code_and_versions() -> str:
    """What else a fact depends on: the installed transformers and torch, and the hf package's source bytes."""
    import torch

    digest = hashlib.sha256()
    for path in sorted(HF_PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(HF_PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return json.dumps([importlib.metadata.version("transformers"), torch.__version__, digest.hexdigest()])


def memo_path(kind: str, inputs: Any) -> Path:
    text = json.dumps([kind, inputs, _code_and_versions()], sort_keys=True, default=repr)
    return cache_dir() / MEMO_FOLDER / f"{hashlib.sha256(text.encode()).hexdigest()}.json"


def remembered(
    kind: str,
    inputs: Any,
    compute: Callable[[], T],
    encode: Callable[[T], Any] = lambda value: value,
    decode: Callable[[Any], T] = lambda value: value,
    keep: Callable[[T], bool] = lambda value: True,
) -> T:
    """compute(), or what it returned before for the same kind, inputs, versions and code.

    A value is kept only when `keep` says so and it comes back from JSON exactly as it went in; a memo that cannot
    be read is computed again (and replaced)."""
    path = memo_path(kind, inputs)
    try:
        value = decode(json.loads(path.read_text())["value"])
        mark_used(path)
        return value
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = compute()
    encoded = encode(value)
    if keep(value) and decode(json.loads(json.dumps(encoded))) == value:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(path, {"kind": kind, "value": encoded})
        except OSError:
            pass  # a read-only cache still converts, just without remembering
    return value


def to_json(value: Any) -> Any:
    """A config value as JSON keeps it: dicts with keys other than strings (id2label's ints) and tuples tagged."""
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: to_json(item) for key, item in value.items()}
        return {"__pairs__": [[to_json(key), to_json(item)] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [to_json(item) for item in value]}
    if isinstance(value, list):
        return [to_json(item) for item in value]
    return value


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__pairs__"}:
            return {from_json(key): from_json(item) for key, item in value["__pairs__"]}
        if set(value) == {"__tuple__"}:
            return tuple(from_json(item) for item in value["__tuple__"])
        return {key: from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json(item) for item in value]
    return value
