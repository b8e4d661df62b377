"""The recipes that ship with upcycle: found by name from any folder, listed, shown and copied for editing.

They are package data (``upcycle/recipes``), the same files in a checkout and in a wheel. Each recipe's first
comment line is its summary.
"""

from __future__ import annotations

from pathlib import Path

from upcycle.errors import OptionError
from upcycle.output_safety import refuse_existing, staged

SUFFIX = ".yaml"


def recipes_dir() -> Path:
    """The package's ``recipes/`` folder."""
    folder = Path(__file__).resolve().parents[1] / "recipes"
    if folder.is_dir() and any(folder.glob(f"*{SUFFIX}")):
        return folder
    raise OptionError(
        "this installation of upcycle carries no recipes.", "reinstall upcycle from its wheel or a full checkout."
    )


def shipped_recipes() -> dict[str, Path]:
    """{name: file}, sorted by name."""
    return {path.stem: path for path in sorted(recipes_dir().glob(f"*{SUFFIX}"))}


def summary(path: Path) -> str:
    """The recipe's first comment line, without the comment mark."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("#").strip()
    return ""


def shipped_recipe(name: str) -> Path:
    """The shipped recipe called ``name`` (``cpu-quickstart`` or ``cpu-quickstart.yaml``)."""
    recipes = shipped_recipes()
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if stem not in recipes:
        raise OptionError(f"no recipe named {name!r} ships with upcycle.", f"use one of: {', '.join(recipes)}.")
    return recipes[stem]


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file as given, or else a shipped recipe of that name; a local file always wins over a name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    text = str(name_or_path)
    if "/" in text or path.suffix not in ("", SUFFIX):
        raise OptionError(
            f"recipe {path} does not exist.", "pass a YAML recipe, or the name of one `upcycle recipes` lists."
        )
    try:
        return shipped_recipe(text)
    except OptionError:
        names = ", ".join(shipped_recipes())
        raise OptionError(
            f"recipe {text!r} is neither a file nor a recipe that ships with upcycle.",
            f"pass a YAML file, or one of: {names}.",
        ) from None


def copy_recipe(name: str, dest: Path, force: bool = False) -> Path:
    """Write an editable copy of a shipped recipe to ``dest`` (a file, or a folder to put NAME.yaml in)."""
    source = shipped_recipe(name)
    dest = Path(dest).expanduser()
    target = dest / source.name if dest.is_dir() else dest
    if target.suffix != SUFFIX:
        raise OptionError(f"{target} is not a {SUFFIX} file name.", f"name the copy e.g. my-{source.name}.")
    refuse_existing(target, force, kind="file", option="DEST")
    if not target.parent.is_dir():
        raise OptionError(
            f"folder {target.parent} does not exist.", "create it first, or copy into an existing folder."
        )
    with staged(target, force=force, kind="file") as tmp:
        tmp.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    return target
