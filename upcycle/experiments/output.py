"""What compare may write, and where: OUT is compare's own folder, and never lies over or inside what it reads.

Compare (and sweep) resume and replace what they wrote into OUT, so each must know its own names (a folder holding
anything else is someone else's), and keep OUT clear of its inputs (recipe files, model folders, data files), which
a run folder or a replaced file could otherwise swallow.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upcycle.errors import OutputError
from upcycle.experiments.variants import Variant
from upcycle.output_safety import exists

COMPARE_FOLDERS = ("runs", "models")
COMPARE_FILES = ("compare.md", "compare.png", "compare.json")


@dataclass(frozen=True)
class OwnedNames:
    """The names a command writes into its OUT folder: it resumes and replaces those, and only those."""

    command: str  # as the user types it: compare, sweep
    folders: tuple[str, ...]
    files: tuple[str, ...]
    file_patterns: tuple[str, ...] = ()  # files whose names vary, e.g. sweep-*.png (one per swept key)

    def is_file(self, name: str) -> bool:
        return name in self.files or any(fnmatch.fnmatchcase(name, p) for p in self.file_patterns)

    def owns(self, path: Path) -> bool:
        """A name the command writes into OUT (or the temporary sibling of one left by a killed run)."""
        name = path.name
        if name in self.folders or self.is_file(name):
            return True
        stem, mark, _ = name[1:].partition(".upcycle-")  # .NAME.upcycle-tmp-PID, written beside NAME
        return name.startswith(".") and bool(mark) and (stem in self.folders or self.is_file(stem))


COMPARE_NAMES = OwnedNames("compare", COMPARE_FOLDERS, COMPARE_FILES)


def check_compare_out(out: Path, beside_others: bool = False) -> None:
    """Refuse an OUT that holds files compare did not write, unless ``beside_others``.

    Compare owns what it writes into OUT (``runs/``, ``models/``, ``compare.md/.png/.json``): it resumes
    finished runs there and replaces the rest, so a folder holding only those is continued without asking. A
    folder holding anything else is someone else's: with ``beside_others`` compare writes its own names beside those
    files and never touches them.
    """
    check_owned_out(out, beside_others, COMPARE_NAMES)


def check_owned_out(out: Path, beside_others: bool, names: OwnedNames) -> None:
    """Refuse an OUT that holds files ``names.command`` did not write, unless ``beside_others`` (see
    check_compare_out)."""
    if not exists(out):
        return
    if not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder.", "choose another --out folder.")
    wrong_kind = [
        p.name
        for p in out.iterdir()
        if (p.name in names.folders and not p.is_dir()) or (names.is_file(p.name) and not p.is_file())
    ]
    if wrong_kind:
        raise OutputError(
            f"--out {out} holds {', '.join(wrong_kind)} of a kind {names.command} does not write there.",
            "move it away or choose another --out folder.",
        )
    foreign = sorted(p.name for p in out.iterdir() if not names.owns(p))
    if foreign and not beside_others:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(
            f"--out {out} holds files {names.command} did not write ({shown}); {names.command} only continues its "
            "own folders.",
            "choose a new or empty --out folder, or pass --beside-others to write beside them (left untouched).",
        )


def _local_paths(value: Any) -> list[Path]:
    """The local files among data entries (a string or a list of them); ``asset:`` names are not paths yet."""
    entries = value if isinstance(value, (list, tuple)) else [value]
    return [Path(e) for e in entries if isinstance(e, (str, Path)) and not str(e).startswith("asset:")]


def compare_inputs(
    recipes: Sequence[Path | str], arms: Sequence[Variant], base: Path | None, train: Any, heldout: Any
) -> list[tuple[str, Path]]:
    """Everything compare reads, which OUT must keep clear of: recipe files, model folders and data files."""
    inputs: list[tuple[str, Path]] = [("the recipe", Path(r)) for r in recipes]
    for arm in arms:
        if arm.recipe is not None:
            inputs.append((f"the model folder of {arm.name}", Path(arm.recipe.model.path)))
            data = [*arm.recipe.data.train, *arm.recipe.data.eval]
            inputs += [(f"a data file of {arm.name}", f) for f in _local_paths(data)]
    if base is not None:
        inputs.append(("the dense model", base))
        inputs += [("a data file", f) for f in _local_paths(train) + _local_paths(heldout)]
    return inputs
