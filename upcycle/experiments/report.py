"""The end of a comparison or sweep: its JSON and markdown files written whole, and the same words on screen.

Both commands write ``OUT/<stem>.json`` (everything, the environment it was measured in included) and
``OUT/<stem>.md`` (a header saying what ran, the table, the findings), then echo the table and findings.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from upcycle.output_safety import write_json_atomically, write_text_atomically


def environment() -> dict[str, Any]:
    """Where the numbers were measured: date, machine, library versions, device."""
    import torch
    import transformers

    from upcycle import __version__

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "upcycle": __version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def write_report(
    out: Path,
    stem: str,
    header: str,
    payload: dict[str, Any],
    summary: dict[str, Any],
    markdown: str,
    figures: Sequence[Path],
    echo: Callable[[str], None],
    wall_note: str = "",
) -> tuple[Path, Path]:
    """Write ``OUT/<stem>.json`` and ``OUT/<stem>.md``; echo the table, findings, wall time and what was written.

    ``payload`` holds what is particular to the command; the summary, table, environment and wall time are added.
    """
    seconds = payload["seconds"]
    json_path = out / f"{stem}.json"
    write_json_atomically(
        json_path, {**payload, "environment": environment(), "summary": summary, "markdown": markdown}
    )
    findings = "\n".join(f"- {line}" for line in summary["findings"])
    table_path = out / f"{stem}.md"
    write_text_atomically(table_path, f"{header}\n\n{markdown}\n{findings}\n")
    echo("")
    echo(markdown)
    for line in summary["findings"]:
        echo(f"- {line}")
    echo(f"wall time {seconds / 60:.1f} min{wall_note}")
    echo(f"wrote {table_path}, {json_path}, {', '.join(str(p) for p in figures)}")
    return json_path, table_path
