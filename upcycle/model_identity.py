"""What a dense source says about itself: its name, base model and license, from its config, its own model card or
its GGUF header. Model cards and records name the source by it; nothing here guesses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

CARD_NAME = "README.md"  # a model folder's card, on the Hub and on disk
LICENSE_FIELDS = ("license", "license_name", "license_link")


def source_identity(folder: Path, gguf: Path | None = None) -> dict[str, str]:
    """The source model's name and license as the source itself states them, for upcycle.json's provenance.

    A GGUF's metadata comes first, then the folder's README.md front matter (a name its card declares), then its
    config.json; a key is absent when nothing states it, so the card never names a model or a license the source
    did not.
    """
    statements = [_gguf_identity(gguf) if gguf is not None else {}, _readme_identity(folder), _config_identity(folder)]
    found: dict[str, str] = {}
    name = next((stated["name"] for stated in statements if "name" in stated), None)
    if name is not None:
        found["name"] = name
    # the license fields come together from one statement; a name or link without a license says nothing usable
    licensed = next((stated for stated in statements if "license" in stated), {})
    found.update({key: licensed[key] for key in LICENSE_FIELDS if key in licensed})
    return found


def _config_identity(folder: Path) -> dict[str, str]:
    """The hub id config.json was loaded from (older transformers save it), or the name transformers took from a
    GGUF; a local path names no model and is ignored."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    for key in ("_name_or_path", "_model_name_or_path"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, str) and _names_a_model(value):
            return {"name": value.strip()}
    return {}


def _names_a_model(value: str) -> bool:
    """A hub id or a model's name, not a filesystem path (absolute, relative to here or home, or nested)."""
    text = value.strip()
    return bool(text) and not re.match(r"^([./~\\]|[A-Za-z]:)", text) and text.count("/") <= 1


def _readme_identity(folder: Path) -> dict[str, str]:
    """The name and license a Hugging Face README's front matter declares. Its `base_model` is the source's own
    parent, not the source, so it is not taken as the name."""
    matter = read_front_matter(folder / CARD_NAME)
    found = {key: matter[key].strip() for key in LICENSE_FIELDS if isinstance(matter.get(key), str) and matter[key]}
    index = matter.get("model-index")
    name = matter.get("model_name")
    if not isinstance(name, str) and isinstance(index, list) and index and isinstance(index[0], dict):
        name = index[0].get("name")
    if isinstance(name, str) and name.strip():
        found["name"] = name.strip()
    return found


def _gguf_identity(path: Path) -> dict[str, str]:
    """Name and license from a GGUF's general.* metadata; nothing when the gguf package cannot read it."""
    fields = _gguf_metadata(path)
    keys = {
        "name": ("general.source.huggingface.repository", "general.name", "general.basename"),
        "license": ("general.license",),
        "license_name": ("general.license.name",),
        "license_link": ("general.license.link",),
    }
    found = {}
    for key, candidates in keys.items():
        value = next((fields[c] for c in candidates if isinstance(fields.get(c), str) and fields[c].strip()), None)
        if value is not None:
            found[key] = value.strip()
    return found


def _gguf_metadata(path: Path) -> dict[str, Any]:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        return {key: field.contents() for key, field in reader.fields.items() if key.startswith("general.")}
    except Exception:  # metadata is optional: an unreadable or old-format header just names nothing
        return {}


def read_front_matter(path: Path) -> dict[str, Any]:
    """The YAML block a model card opens with (between two `---` lines); empty when there is none or it is bad."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*$", text, re.DOTALL | re.MULTILINE)
    if match is None:
        return {}
    try:
        matter = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return matter if isinstance(matter, dict) else {}
