"""Where training records go: JSON lines always, TensorBoard when installed; only rank 0 writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        self.tensorboard_note: str | None = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and resume_step:
            self._truncate_after(resume_step)  # a resumed run keeps the records up to its checkpoint
        elif self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run redoes the steps after its checkpoint: drop their old points, as for the JSON lines
                self._tb = SummaryWriter(
                    str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
                )
            except ImportError:
                self.tensorboard_note = "TensorBoard is not installed (pip install tensorboard); JSON lines only."

    def _truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint; drop their old records so each step appears once."""
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
