"""The files a Hugging Face model folder holds, by name pattern: one list for copying, exporting and replacing."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

# Beside the weights and config.json: what shapes what a user gets from the folder (tokenizer, chat template,
# generation settings) and what travels with the weights (licence files). Copied from a source, proven equal.
COPIED_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.tiktoken",
    "chat_template*",
    "generation_config.json",
    "LICENSE*",
    "NOTICE*",
)
MODEL_FOLDER_FILES = (
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "upcycle.json",
    "README.md",
    ".gitattributes",
    *COPIED_FILES,
)


def is_model_file(path: Path) -> bool:
    return path.is_file() and any(fnmatch(path.name, pattern) for pattern in MODEL_FOLDER_FILES)


def foreign_entries(folder: Path) -> list[str]:
    """What in FOLDER a model folder does not hold (subfolders included), sorted: the user's, not a model's."""
    return sorted(path.name + ("/" if path.is_dir() else "") for path in folder.iterdir() if not is_model_file(path))


def copied_files(folder: Path) -> list[Path]:
    """The tokenizer, generation and licence files of a model folder (what convert copies)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch(p.name, pat) for pat in COPIED_FILES))


def record_files(folder: Path) -> dict[str, str]:
    """The sha256 of each copied file in FOLDER, as upcycle.json records them."""
    from upcycle.hashing import file_sha256

    return {path.name: file_sha256(path) for path in copied_files(folder)}
