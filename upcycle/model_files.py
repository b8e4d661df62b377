"""The files a Hugging Face model folder holds, by name pattern: one list for copying, exporting and replacing."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

from upcycle.errors import SourceError

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


# The checks below need nothing but the file system, so the command line runs them before it imports torch: a
# wrong path is reported at once, by the same words the library uses.


def check_source_folder(folder: Path) -> None:
    """A dense model folder convert can read: it exists, is a folder and holds config.json."""
    if not folder.exists():
        raise SourceError(
            f"source {folder} does not exist.",
            "pass a local Hugging Face model folder (with config.json and *.safetensors) or a .gguf file.",
        )
    if not folder.is_dir():
        raise SourceError(
            f"source {folder} is a file, not a model folder.",
            "pass the folder that holds config.json, or a .gguf file.",
        )
    if not (folder / "config.json").is_file():
        raise SourceError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder.",
            "pass the folder written by save_pretrained (config.json + weights).",
        )


def check_source_path(path: Path) -> None:
    """A source convert can read: a .gguf file, or a model folder."""
    if path.suffix.lower() != ".gguf":
        check_source_folder(path)
    elif not path.is_file():
        raise SourceError(f"source {path} does not exist.", "pass an existing .gguf file or model folder.")


def check_model_folder(folder: Path) -> None:
    """A folder transformers can load a model from (dense or MoE)."""
    if not (folder / "config.json").is_file():
        raise SourceError(
            f"{folder} is not a Hugging Face model folder (no config.json).",
            "pass a folder written by save_pretrained or `upcycle convert`.",
        )


def check_converted_folder(folder: Path) -> None:
    """An OUT folder of `upcycle convert`, the only kind verify proves."""
    if not (folder / "upcycle.json").is_file() or not (folder / "config.json").is_file():
        raise SourceError(
            f"{folder} has no upcycle.json/config.json, so it was not written by upcycle convert.",
            "pass the OUT folder of `upcycle convert`.",
        )
