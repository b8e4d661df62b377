"""The model card (README.md) of every folder `convert` and `export` write: a short human summary of upcycle.json.

upcycle.json stays the machine-readable record; the card is rendered from that same record (plus, when given, the
figures of a verify run and the held-out losses of a training run), so the two cannot disagree. It states only what
the record holds or what was measured.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from upcycle.errors import SourceError
from upcycle.hub import HUB_ID
from upcycle.model_card.growth import GROWN, growth_card
from upcycle.model_card.merged import MERGED, merge_card
from upcycle.model_card.sections import (
    conversion_exactness_after_training,
    downstream_section,
    exactness_section,
    experts_ran,
    held_out_section,
    not_verified_section,
    table,
    verify_section,
)
from upcycle.model_identity import CARD_NAME, LICENSE_FIELDS, source_identity
from upcycle.output_safety import write_text_atomically
from upcycle.spans import layer_spans

MOE_TAGS = ["moe", "mixture-of-experts", "upcycled"]
TOOL_TAG = "upcycle"  # every model upcycle writes, so the Hub can list them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
ROUTERS = {
    "renorm": "softmax, top-k, renormalised",
    "softmax-topk": "softmax, top-k, not renormalised",
}


# ------------------------------------------------------------------------------------------------------- rendering

RANDOM_INIT_METHOD = "trained from a random initialisation"  # upcycle.json exactness.method of such a model


def conversion_card(
    record: dict[str, Any], *, model_id: str, tokenizer: bool = True, verify: dict[str, Any] | None = None
) -> str:
    """The card of a converted (or grown) folder, from its upcycle.json record and optionally a verify report's
    to_json()."""
    source = record.get("source") or {}
    name = source.get("name")
    if record.get("kind") == GROWN:
        return growth_card(
            record,
            title=model_id,
            front=front_matter(source, moe=True),
            loading=_loading_section(model_id, tokenizer),
            verify=verify,
        )
    if record.get("kind") == MERGED:
        return merge_card(
            record, title=model_id, front=front_matter(source, moe=True), loading=_loading_section(model_id, tokenizer)
        )
    origin = f"the dense model {name}" if name else f"a dense {record['family']} model"
    parts = [
        front_matter(source, moe=True),
        f"# {_title(model_id, name, record)}\n",
        f"A Mixture-of-Experts model upcycled from {origin} by upcycle {_tool_version(record)}, without training: "
        "each expert starts from the dense model's MLP weights.\n",
        "## What was done\n",
        table(_conversion_rows(record, with_dtype=True)),
        exactness_section(record["exactness"]),
        verify_section(verify) if verify is not None else not_verified_section(),
        _loading_section(model_id, tokenizer),
        "`upcycle.json` in this folder is the machine-readable record of the conversion: the options, every tensor's "
        "recipe and the sha256 of the source files. This card summarises it.\n",
    ]
    return "\n".join(parts)


def training_card(
    record: dict[str, Any],
    held_out: list[tuple[int, float]],
    *,
    model_id: str,
    config: dict[str, Any],
    tokenizer: bool = True,
    base: dict[str, str] | None = None,
    experts: str | None = None,
) -> str:
    """The card of an exported training run: what was trained, the held-out loss by step, and the conversion it
    started from when upcycle converted it. `base` names the source when the record does not (no conversion)."""
    conversion = record.get("conversion")
    source = (conversion or {}).get("source") or base or {}
    name = source.get("name")
    architecture = (config.get("architectures") or ["?"])[0]
    fresh = record.get("exactness", {}).get("method") == RANDOM_INIT_METHOD
    if conversion:
        what = f"A Mixture-of-Experts model upcycled from {f'the dense model {name}' if name else 'a dense model'}"
        what += f" and then trained with upcycle {_tool_version(record)}.\n"
    elif fresh:
        what = f"A `{architecture}` model trained from a random initialisation with upcycle {_tool_version(record)}. "
        what += "It has the architecture of the folder it was trained from, but none of that folder's weights"
        what += f" (nor those of {name}).\n" if name else ".\n"
    else:
        what = f"A `{architecture}` model{f' based on {name}' if name else ''}, trained with upcycle "
        what += f"{_tool_version(record)}.\n"
    parts = [
        front_matter(source, moe=bool(conversion), derived=not fresh, datasets=record["training"].get("datasets")),
        f"# {model_id}\n",
        what,
        "## Training\n",
        table(_training_rows(record, architecture, config) + ([("Experts ran on", experts)] if experts else [])),
        held_out_section(held_out),
        downstream_section(record["training"].get("downstream")),
    ]
    if conversion:
        parts += ["## Upcycled from\n", table(_conversion_rows(conversion, with_dtype=False))]
        parts.append(conversion_exactness_after_training(conversion["exactness"]))
    parts += [
        _loading_section(model_id, tokenizer),
        "`upcycle.json` in this folder is the machine-readable record of the training and of the conversion it "
        "started from. This card summarises it.\n",
    ]
    return "\n".join(parts)


def front_matter(source: dict[str, Any], moe: bool, derived: bool = True, datasets: list[str] | None = None) -> str:
    """Hugging Face card metadata, written by huggingface_hub's own ModelCardData: what the source states about
    itself, never a guess; a model not derived from the source's weights (trained from a random initialisation)
    names no base model."""
    from huggingface_hub import ModelCardData

    name = source.get("name") or ""
    fields: dict[str, Any] = {
        # the Hub links base_model only as a repo id (owner/name)
        "base_model": name if derived and HUB_ID.fullmatch(name) else None,
        "datasets": list(datasets) if datasets else None,  # Hub ids only: a local file names no dataset
        "library_name": "transformers",
        **{key: source[key] for key in LICENSE_FIELDS if source.get(key)},
        "pipeline_tag": "text-generation",
        "tags": [TOOL_TAG, *(MOE_TAGS if moe else ())],
    }
    return "---\n" + ModelCardData(**fields).to_yaml() + "\n---\n"


def _tool_version(record: dict[str, Any]) -> str:
    return str((record.get("tool") or {}).get("version", "")).strip() or "(unknown version)"


def _conversion_rows(record: dict[str, Any], with_dtype: bool) -> list[tuple[str, str]]:
    options = record["options"]
    copies, shards = options["experts"], options["granularity"]
    rows = [
        ("Target class", f"`{record['architecture']}`"),
        ("Experts", _experts_text(copies, shards, options.get("shared_width", 0))),
        ("Experts per token (top-k)", str(options["top_k"])),
        ("MoE layers", _layers_text(record["moe_layers"], (record.get("config") or {}).get("num_hidden_layers"))),
        ("Router", f"{ROUTERS.get(options['router'], options['router'])}; {options['router_init']} init"),
        ("Method", str(record["exactness"]["method"])),
    ]
    if options["router"] == "softmax-topk" or options["weight_scale"] != "auto":
        rows.append(("Weight scale", str(options["weight_scale"])))
    if options.get("drop_upcycling"):
        ratio = options["drop_upcycling"]
        rows.append(("Drop-Upcycling", f"ratio {ratio:g}: {ratio:.0%} of each expert's intermediate neurons re-drawn"))
    if options.get("noise"):
        rows.append(("Noise", f"Gaussian, {options['noise']:g} x each tensor's std"))
    if with_dtype:
        rows.append(("dtype", str(record["dtype"])))
    rows.append(("Seed", str(options["seed"])))
    return rows


def _experts_text(copies: int, shards: int, shared: int = 0) -> str:
    """Total experts and where they come from: E copies of the dense MLP (of its neurons beside the shared
    expert), each cut into G shards."""
    mlp = (
        f"the dense MLP's neurons after the first {shared} (those make the shared expert)"
        if shared
        else "the dense MLP"
    )
    if shards == 1:
        return f"{copies} copies of {mlp} (E = {copies}, G = 1)"
    return f"{copies * shards} = {copies} copies of {mlp} x {shards} shards each (E = {copies}, G = {shards})"


def _layers_text(moe_layers: list[int], num_layers: int | None) -> str:
    spans = layer_spans(list(moe_layers))
    if num_layers is None:
        return spans
    if len(moe_layers) == num_layers:
        return f"all {num_layers} ({spans})"
    return f"{spans} of {num_layers} layers (the others keep the dense MLP)"


def _training_rows(record: dict[str, Any], architecture: str, config: dict[str, Any]) -> list[tuple[str, str]]:
    training = record["training"]
    rows = [("Class", f"`{architecture}`"), ("dtype", str(config.get("dtype") or config.get("torch_dtype") or "?"))]
    rows.append(("Steps", str(training.get("steps"))))
    data = ((training.get("recipe") or {}).get("data") or {}).get("train") or []
    if data:
        rows.append(("Training data", _files_text(data, training.get("datasets") or [])))
    if training.get("tokens") is not None:
        rows.append(("Training tokens", f"{training['tokens']:,}"))
    if training.get("final_loss") is not None:
        rows.append(("Last training loss", f"{training['final_loss']:.4f}"))
    earlier = len(record.get("trainings") or []) - 1
    if earlier > 0:
        rows.append(("Earlier training runs", f"{earlier} (listed in upcycle.json)"))
    return rows


def _files_text(files: list[str], datasets: list[str]) -> str:
    """The training files by name (the first three), and the Hub datasets they came from when known."""
    names = [Path(str(file)).name for file in files]
    shown = ", ".join(f"`{name}`" for name in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    text = f"{len(names)} file{'s' if len(names) != 1 else ''}: {shown}"
    return text + (f" (from {', '.join(datasets)} on the Hub)" if datasets else "")


CACHE_KEY = re.compile(r"[0-9a-f]{32}")  # how upcycle names a conversion in its cache: no name for people


def _title(model_id: str, source_name: str | None, record: dict[str, Any]) -> str:
    """The folder's name, unless it is a cache key: then what the folder holds, in words."""
    if not CACHE_KEY.fullmatch(model_id):
        return model_id
    options = record.get("options") or {}
    base = (source_name or f"a dense {record.get('family', '')} model").split("/")[-1]
    return f"{base}, upcycled to {options.get('experts', '?')} experts (top-{options.get('top_k', '?')})"


def _loading_section(model_id: str, tokenizer: bool) -> str:
    lines = ["from transformers import AutoModelForCausalLM" + (", AutoTokenizer" if tokenizer else ""), ""]
    quoted = json.dumps("path/to/this/folder" if CACHE_KEY.fullmatch(model_id) else model_id)
    lines.append(f"model = AutoModelForCausalLM.from_pretrained({quoted})  # this folder, or its Hub repo id")
    if tokenizer:
        lines.append(f"tokenizer = AutoTokenizer.from_pretrained({quoted})")
    code = "\n".join(lines)
    return f"## How to load\n\nPlain transformers, no custom code:\n\n```python\n{code}\n```\n"


# ---------------------------------------------------------------------------------------------------------- files


def held_out_losses(records: list[dict[str, Any]], training: dict[str, Any]) -> list[tuple[int, float]]:
    """(step, eval loss) of the run's metrics records up to the exported step; the training record's own eval
    history (the same records) when the run folder has no log."""
    if not any("eval_loss" in r for r in records):
        records = training.get("eval_history") or []
    last = training.get("steps")
    return [
        (int(r["step"]), float(r["eval_loss"]))
        for r in records
        if "eval_loss" in r and "step" in r and (last is None or r["step"] <= last)
    ]


def write_conversion_card(
    folder: Path, record: dict[str, Any], *, model_id: str | None = None, verify: dict[str, Any] | None = None
) -> Path:
    """Write FOLDER/README.md for a conversion; `model_id` is the name the folder will have (default: its own)."""
    text = conversion_card(record, model_id=model_id or folder.name, tokenizer=_has_tokenizer(folder), verify=verify)
    return write_card(folder, text)


def write_training_card(
    folder: Path,
    record: dict[str, Any],
    metrics: list[dict[str, Any]],
    trained_from: Path,
    *,
    model_id: str | None = None,
) -> Path:
    """Write FOLDER/README.md for an export; the held-out losses come from the run's `metrics` records."""
    config = json.loads((folder / "config.json").read_text())
    base = None if record.get("conversion") else source_identity(trained_from)
    text = training_card(
        record,
        held_out_losses(metrics, record["training"]),
        model_id=model_id or folder.name,
        config=config,
        tokenizer=_has_tokenizer(folder),
        base=base,
        experts=experts_ran(metrics),
    )
    return write_card(folder, text)


def rewrite_conversion_card(folder: Path, verify: dict[str, Any] | None = None) -> Path:
    """Re-render the card of an existing converted folder from its upcycle.json, with verify figures when given."""
    try:
        record = json.loads((folder / "upcycle.json").read_text())
    except (OSError, ValueError):
        raise SourceError(
            f"{folder} has no readable upcycle.json.", "pass the OUT folder of `upcycle convert`."
        ) from None
    if record.get("kind") == "trained" or "options" not in record:
        raise SourceError(f"{folder} is not a conversion (it was trained or written otherwise).", "pass a convert OUT.")
    return write_conversion_card(folder, record, verify=verify)


def write_card(folder: Path, text: str) -> Path:
    """FOLDER/README.md replaced in one rename, so a reader sees the old card or the new one, never half of one."""
    path = folder / CARD_NAME
    write_text_atomically(path, text)
    return path


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


__all__ = [
    "CARD_NAME",
    "conversion_card",
    "held_out_losses",
    "rewrite_conversion_card",
    "training_card",
    "write_card",
    "write_conversion_card",
    "write_training_card",
]
