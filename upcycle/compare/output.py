"""What compare may write, and where: OUT is compare's own folder, and never lies over or inside what it reads.

Compare resumes and replaces what it wrote into OUT, so it must know its own names (a folder holding anything
else is someone else's), and it must keep OUT clear of its inputs (recipe files, model folders, data files), which
a run folder or a replaced file could otherwise swallow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from upcycle.compare.variants import Variant
from upcycle.errors import OutputError
from upcycle.output_safety import exists

COMPARE_FOLDERS = ("runs", "models")
COMPARE_FILES = ("compare.md", "compare.png", "compare.json")


def _is_compare_entry(path: Path) -> bool:
    """A name compare writes into OUT (or the temporary sibling of one left by a killed run)."""
    names = (*COMPARE_FOLDERS, *COMPARE_FILES)
    return path.name in names or any(path.name.startswith(f".{n}.upcycle-") for n in names)


def check_compare_out(out: Path, force: bool = False) -> None:
    """Refuse an OUT that holds files compare did not write, unless ``force``.

    Compare owns what it writes into OUT (``runs/``, ``models/``, ``compare.md/.png/.json``): it resumes
    finished runs there and replaces the rest, so a folder holding only those is continued without asking. A
    folder holding anything else is someone else's: with ``force`` compare writes its own names beside those
    files and never touches them.
    """
    if not exists(out):
        return
    if not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder.", "choose another --out folder.")
    wrong_kind = [
        p.name
        for p in out.iterdir()
        if (p.name in COMPARE_FOLDERS and not p.is_dir()) or (p.name in COMPARE_FILES and not p.is_file())
    ]
    if wrong_kind:
        raise OutputError(
            f"--out {out} holds {', '.join(wrong_kind)} of a kind compare does not write there.",
            "move it away or choose another --out folder.",
        )
    foreign = sorted(p.name for p in out.iterdir() if not _is_compare_entry(p))
    if foreign and not force:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(
            f"--out {out} holds files compare did not write ({shown}); compare only continues its own folders.",
            "choose a new or empty --out folder, or pass --force to write beside them (they are left untouched).",
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
