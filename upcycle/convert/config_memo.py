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

from upcycle.output_safety import write_json_atomically

T = TypeVar("T")
MEMO_FOLDER = "config-facts"
HF_PACKAGE = Path(__file__).resolve().parents[1] / "hf"


CODE = (Path(__file__).resolve(), Path(__file__).resolve().parent / "families" / "__init__.py")  # beside hf/


@functools.cache
def _code_and_versions() -> str | None:
    """What else a fact depends on: the installed transformers and torch, and the bytes of the code that asks
    (the hf package, this module, the families' description). None, so nothing is remembered, when transformers
    is an editable or development install: its version then does not name its code."""
    import torch

    transformers = importlib.metadata.distribution("transformers")
    direct = json.loads(transformers.read_text("direct_url.json") or "{}")
    if "dev" in transformers.version or direct.get("dir_info", {}).get("editable") or "vcs_info" in direct:
        return None
    digest = hashlib.sha256()
    for path in [*sorted(HF_PACKAGE.rglob("*.py")), *CODE]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return json.dumps([transformers.version, torch.__version__, digest.hexdigest()])


def memo_path(kind: str, inputs: Any) -> Path | None:
    """Where the fact is remembered, or None when nothing may be (an editable transformers)."""
    code = _code_and_versions()
    if code is None:
        return None
    from upcycle.assets import cache_dir  # imports torch: not before a conversion runs

    text = json.dumps([kind, inputs, code], sort_keys=True, default=repr)
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

    A value is kept only when `keep` says so and it comes back from JSON exactly as it went in; a remembered value
    is used only when `keep` says so too, and one that cannot be read is computed again (and replaced)."""
    path = memo_path(kind, inputs)
    if path is None:
        return compute()
    try:
        value = decode(json.loads(path.read_text())["value"])
        if keep(value):
            from upcycle.assets import mark_used

            mark_used(path)
            return value
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    value = compute()
    try:
        encoded = encode(value)
        if keep(value) and decode(json.loads(json.dumps(encoded))) == value:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(path, {"kind": kind, "value": encoded})
    except (OSError, TypeError, ValueError):
        pass  # not JSON, or a read-only cache: converted all the same, just not remembered
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
