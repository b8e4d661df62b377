"""Where a command may write: never into or over its own input, never over what it did not write unless told.

Every command that writes a folder or file (convert, export, train, compare, plot) goes through these helpers:

* :func:`refuse_overlap`: OUT must not be, lie inside, or contain anything the command reads (compared with
  symlinks resolved, so two spellings of one place are one place). No flag overrides it: no user means it.
* :func:`refuse_existing`: an existing OUT is replaced only with ``--force``, only by the same kind of thing, and a
  folder only when it holds nothing but a model's files (what upcycle writes, or any Hugging Face model folder).
* :func:`staged` / :func:`publish_atomically`: the new content is written completely into a temporary sibling,
  the old OUT is moved aside, the new one renamed in, and the old one removed only then; a failure puts the old
  one back. A process killed in between leaves hidden siblings that :func:`sweep_stale` tidies (or restores).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from upcycle.errors import OutputError
from upcycle.model_files import foreign_entries

TMP_MARK = ".upcycle-tmp-"
OLD_MARK = ".upcycle-old-"
Kind = Literal["folder", "file"]


def resolved(path: Path | str) -> Path:
    """Absolute, with ``~``, ``..`` and symlinks resolved as far as the path exists: one place, one spelling."""
    return Path(path).expanduser().resolve()


def relation(out: Path | str, source: Path | str) -> str | None:
    """How OUT sits relative to SOURCE: "is", "is inside", "contains", or None when they are apart."""
    o, s = resolved(out), resolved(source)
    if o == s:
        return "is"
    if o.is_relative_to(s):
        return "is inside"
    if s.is_relative_to(o):
        return "contains"
    return None


def refuse_overlap(out: Path | str, inputs: Iterable[tuple[str, Path | str]], option: str = "OUT") -> None:
    """Refuse an OUT that is, lies inside or contains an input (named by ``what``): writing it would damage it.

    ``inputs`` are (what, path) pairs such as ("the source", SRC). Nothing has been written when this raises.
    """
    for what, source in inputs:
        found = relation(out, source)
        if found is not None:
            where = resolved(source)
            link = "" if resolved(out) == Path(out).absolute() else f" (it resolves to {resolved(out)})"
            raise OutputError(
                f"{option} {out}{link} {found} {what} {where}; upcycle never writes into or over what it reads.",
                f"choose another {option}: not {where}, not inside it, not a folder containing it.",
            )


def exists(path: Path) -> bool:
    """True for anything at PATH, a dangling symlink included (it would be replaced too)."""
    return path.exists() or path.is_symlink()


def refuse_existing(
    out: Path, force: bool, *, kind: Kind = "folder", option: str = "OUT", flag: str = "--force"
) -> None:
    """An existing OUT is replaced only when the user said so (``flag``), and only by the same kind of thing.

    What killed runs left beside OUT is tidied first, so an OUT set aside by a kill counts as existing again.
    """
    if out.parent.exists() and not out.parent.is_dir():
        raise OutputError(f"the parent of {out} is a file, not a folder.", f"choose another {option}.")
    sweep_stale(out)
    if not exists(out):
        return
    if not force:
        raise OutputError(
            f"{option} {out} already exists; upcycle never replaces what it did not write unasked.",
            f"choose a new {option} or pass {flag} to replace it.",
        )
    if not (out.is_dir() if kind == "folder" else out.is_file()):
        raise OutputError(f"{option} {out} exists and is not a {kind}.", f"choose another {option}.")
    foreign = foreign_entries(out) if kind == "folder" and not out.is_symlink() else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(
            f"{option} {out} holds {shown}, which no model folder holds; {flag} replaces only a model folder (one "
            "upcycle wrote, or config, weights, tokenizer and card files), never anything else.",
            f"choose another {option}, or move those files out of {out} first.",
        )


def free_space(out: Path | str) -> tuple[int, Path]:
    """Free bytes where OUT will be written (its nearest existing folder) and that folder; refused when that folder
    cannot be written at all (a read-only file system, no permission), which free space would not say."""
    where = Path(out).absolute().parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not os.access(where, os.W_OK):
        raise OutputError(
            f"cannot write {out}: {where} is not writable (a read-only file system, or no permission).",
            "choose an OUT on a writable disk.",
        )
    return shutil.disk_usage(where).free, where


def temporary_sibling(out: Path) -> Path:
    """The hidden folder or file beside OUT that a run of this process writes before publishing it."""
    return out.parent / f".{out.name}{TMP_MARK}{os.getpid()}"


def remove(path: Path) -> None:
    """Delete a folder, file or symlink (never a symlink's target); missing is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write a small file whole or not at all: a kill mid-write leaves the old file (or none), never half."""
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written whole or not at all."""
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def publish_atomically(
    tmp: Path, out: Path, force: bool = False, aside: Path | None = None, on_aside: Callable[[], None] | None = None
) -> None:
    """Rename the fully written TMP to OUT, so OUT is always either the old content or the complete new one.

    An existing OUT (only with ``force``) is moved aside first (to ``aside``, default a hidden sibling), put back if
    the new one cannot be renamed in, and removed only once the new one is in place. A file replaces a file in one
    ``os.replace``. ``on_aside`` runs between the two renames (tests kill the process there).
    """
    if not exists(out):
        os.replace(tmp, out)
        return
    if not force:
        raise OutputError(
            f"{out} appeared while it was being written; upcycle never replaces what it did not write unasked.",
            "choose a new output or pass --force to replace it.",
        )
    if tmp.is_file() and out.is_file() and not out.is_symlink():
        os.replace(tmp, out)
        return
    old = aside if aside is not None else out.parent / f".{out.name}{OLD_MARK}{os.getpid()}"
    remove(old)
    os.replace(out, old)
    if on_aside is not None:
        on_aside()
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    remove(old)


def sweep_stale(out: Path) -> None:
    """Tidy what killed runs left beside OUT: their temporary copies go; an old OUT set aside comes back if OUT
    is missing (the kill fell between the two renames), else goes (the new OUT made it in)."""
    if not out.parent.is_dir():
        return
    for mark in (TMP_MARK, OLD_MARK):
        for stale in out.parent.glob(f".{out.name}{mark}*"):
            if not left_by_dead_writer(stale.name):
                continue
            if mark == OLD_MARK and not exists(out):
                os.replace(stale, out)
            else:
                remove(stale)


@contextlib.contextmanager
def staged(out: Path, force: bool = False, kind: Kind = "folder") -> Iterator[Path]:
    """Yield a temporary sibling to write OUT's new content into; publish it on success, remove it on failure."""
    sweep_stale(out)
    tmp = temporary_sibling(out)
    remove(tmp)
    try:
        if kind == "folder":
            tmp.mkdir(parents=True)
        yield tmp
        publish_atomically(tmp, out, force)
    except BaseException:
        remove(tmp)
        raise


def left_by_dead_writer(name: str) -> bool:
    """A `.OUT.upcycle-tmp-PID` or `.OUT.upcycle-old-PID` sibling (see `staged`) whose process is gone."""
    if TMP_MARK not in name and OLD_MARK not in name:
        return False
    pid = name.rsplit("-", 1)[-1]
    return pid.isdigit() and not process_alive(int(pid))


def process_alive(pid: int) -> bool:
    """Whether a process of this host still runs (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
