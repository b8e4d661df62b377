"""`upcycle cache`: what the cache folder holds, whether it is intact, and removing what is no longer wanted."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Annotated, Any

import typer
from rich.table import Table

from upcycle.cli.app import EXIT_NOT_EQUIVALENT, SIZE_SYNTAX, app, console, failing

cache_app = typer.Typer(help="What upcycle keeps in its cache folder: list it, verify it, prune it.")
app.add_typer(cache_app, name="cache")

GROUPED = ("source index", "sha256 memo", "config fact")  # hundreds of tiny files: one row each kind in the table
JsonOption = Annotated[bool, typer.Option("--json", help="Print the entries as JSON instead of a table.")]


def _rows(entries: list[Any], now: float) -> tuple[list[tuple[str, ...]], list[str]]:
    """Table rows (entry, kind, size, last use) and the notes printed under the table: why an entry can go."""
    from upcycle.cache import age_text
    from upcycle.units import format_bytes

    rows, notes, groups = [], [], defaultdict(list)
    for entry in entries:
        if entry.kind in GROUPED:
            groups[entry.kind].append(entry)
            continue
        kind = entry.kind + (" (in use)" if entry.users else "")
        if entry.problem:
            kind = f"[red]{entry.kind}, damaged[/]"
            notes.append(f"{entry.name}: {entry.problem}")
        elif entry.obsolete:
            notes.append(f"{entry.name}: {entry.obsolete}")
        rows.append((_short(entry.name), kind, format_bytes(entry.bytes), age_text(entry.last_used, now)))
    for kind, members in groups.items():
        folder = members[0].name.split("/")[0]
        stale = [entry for entry in members if entry.obsolete]
        if stale:
            notes.append(f"{folder}/: {len(stale)} of {len(members)} stale ({stale[0].obsolete})")
        size = format_bytes(sum(entry.bytes for entry in members))
        newest = age_text(max(entry.last_used for entry in members), now)
        rows.append((f"{folder}/ ({len(members)} file{'s' if len(members) != 1 else ''})", kind, size, newest))
    return rows, notes


def _short(name: str) -> str:
    """A content-hashed entry by the first 12 characters of its key (JSON gives the whole name)."""
    folder, _, key = name.rpartition("/")
    hashed = len(key.split(".")[0]) >= 32 and all(c in "0123456789abcdef" for c in key.split(".")[0])
    return f"{folder}/{key[:12]}" if folder and hashed else name


def _print_table(entries: list[Any], title: str) -> None:
    import time

    from upcycle.assets import cache_dir
    from upcycle.units import format_bytes

    table = Table("entry", "kind", "size", "last used", title=title, title_justify="left")
    rows, notes = _rows(entries, time.time())
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for note in notes:
        console.print(f"  {note}", highlight=False, markup=False)
    console.print(f"{format_bytes(sum(e.bytes for e in entries))} in {cache_dir()}", highlight=False)


@cache_app.command("list")
def cache_list_cmd(json_out: JsonOption = False) -> None:
    """Every entry with its size and last use (set when it was built or last reused)."""
    from upcycle.cache import list_entries

    entries = list_entries()
    if json_out:
        print(json.dumps([entry.to_json() for entry in entries], indent=2))
        return
    _print_table(entries, "upcycle cache")


@cache_app.command("verify")
def cache_verify_cmd(json_out: JsonOption = False) -> None:
    """Check every entry: conversions and token streams against their recorded sha256 (every byte is read), the
    rest for the files their builder puts there. Exit 1 when one is damaged (`upcycle cache prune --damaged`)."""
    from rich.progress import Progress

    from upcycle.cache import list_entries, verify_entries

    entries = list_entries()
    with Progress(console=console, transient=True, disable=json_out) as progress:
        bar = progress.add_task("verifying", total=len(entries))
        verify_entries(entries, on_entry=lambda _: progress.advance(bar))
    damaged = [entry for entry in entries if entry.problem]
    if json_out:
        print(json.dumps([entry.to_json() for entry in entries], indent=2))
    else:
        _print_table(entries, "upcycle cache verify")
        console.print(f"{len(damaged)} damaged" if damaged else "every entry is intact", highlight=False)
    raise typer.Exit(EXIT_NOT_EQUIVALENT if damaged else 0)


@cache_app.command("prune")
def cache_prune_cmd(
    older_than: Annotated[
        str | None, typer.Option(help="Also remove entries unused for longer than this: 30d, 12h, 2w.")
    ] = None,
    max_size: Annotated[
        str | None, typer.Option(help=f"Then remove the least recently used until the cache fits ({SIZE_SYNTAX}).")
    ] = None,
    damaged: Annotated[bool, typer.Option("--damaged", help="Verify every entry and remove the damaged ones.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would go and remove nothing.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Remove what is no longer wanted: obsolete entries always (older layouts, entries set aside as damaged,
    leftovers of killed builds, index entries whose folder is gone), then what the options ask. Every entry can
    be rebuilt: the next command that needs it fetches or converts it again."""
    from upcycle.units import format_bytes, parse_age, parse_size

    with failing():
        age = parse_age(older_than, "--older-than") if older_than is not None else None
        limit = parse_size(max_size, "--max-size") if max_size is not None else None
    from upcycle.cache import list_entries, plan_prune, remove_entry, verify_entries

    entries = list_entries()
    if damaged:
        verify_entries(entries)
    plan = plan_prune(entries, older_than_s=age, max_bytes=limit, damaged=damaged)
    removed, kept_busy, busy_bytes = [], [], 0
    for entry, why in plan.remove:
        if dry_run or remove_entry(entry):
            removed.append({"entry": entry.name, "kind": entry.kind, "bytes": entry.bytes, "why": why})
        else:
            kept_busy.append(entry.name)
            busy_bytes += entry.bytes
    freed = sum(item["bytes"] for item in removed)
    if json_out:
        report = {"dry_run": dry_run, "removed": removed, "freed_bytes": freed, "busy": kept_busy}
        print(json.dumps(report, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    by_reason: dict[tuple[str, str], list[str]] = defaultdict(list)
    for item in removed:
        by_reason[item["kind"], item["why"]].append(item["entry"])
    for (kind, why), names in by_reason.items():
        what = names[0] if len(names) == 1 else f"{len(names)} {kind} entries"
        console.print(f"{verb} {what}: {why}", highlight=False)
    for name in kept_busy:
        console.print(f"kept {name}: a process is building or reading it", highlight=False)
    verb = "would free" if dry_run else "freed"
    console.print(f"{verb} {format_bytes(freed)}; {format_bytes(plan.keep_bytes + busy_bytes)} kept", highlight=False)
