"""One finished run read back from its folder: its held-out losses in training tokens and in training FLOPs.

Every number of a comparison comes from here, that is from the run's own ``metrics.jsonl`` (written by the
training loop), so a table or plot can be redrawn from any run folder, including one trained by hand with
``upcycle train``. Compare adds ``run_info.json`` (what the run is: variant, seed, parameter counts, FLOPs per
token) and, once the run is done, ``result.json``.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upcycle.errors import OptionError
from upcycle.experiments.flops import model_cost

RESULT_FILE = "result.json"  # written last: the run finished (and with which spec)
RUN_INFO_FILE = "run_info.json"  # written before training: what the run is


@dataclass
class RunData:
    """One finished run as read back from its folder."""

    run_dir: str
    name: str
    variant: str
    label: str
    seed: int | None
    flops_per_token: float | None
    tokens_per_step: int
    evals: list[dict[str, Any]]  # step, tokens, flops, eval_loss, eval_ppl
    tokens_per_s: float | None
    info: dict[str, Any] = field(default_factory=dict)
    downstream: dict[str, Any] | None = None  # the last downstream evaluation (a "tasks" record), if the run had one

    @property
    def final_tokens(self) -> int:
        return self.evals[-1]["tokens"] if self.evals else 0

    @property
    def final_flops(self) -> float | None:
        return self.evals[-1]["flops"] if self.evals and self.flops_per_token else None

    def loss_at(self, x: float, axis: str) -> float | None:
        """Held-out loss at ``x`` tokens or FLOPs, linear between evaluations; None outside the run."""
        points = [(e[axis], e["eval_loss"]) for e in self.evals if e.get(axis) is not None]
        for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
            if x0 <= x <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        if points and math.isclose(points[-1][0], x, rel_tol=1e-9):
            return points[-1][1]
        return None


def load_run(run_dir: Path | str) -> RunData:
    """A run folder of ``upcycle compare`` or ``upcycle train``: its evaluations in tokens and FLOPs."""
    from upcycle.train.metrics import read_metrics

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise OptionError(f"{run_dir} holds no metrics.jsonl records.", "pass folders written by upcycle train.")
    trains = [r for r in records if r.get("kind") == "train"]
    info_path = run_dir / RUN_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    flops_per_token = info.get("flops_per_token")
    if flops_per_token is None:
        flops_per_token = _flops_from_recipe(run_dir)
    per_step = _tokens_per_step(run_dir, trains)
    evals = []
    for r in records:
        if r.get("kind") != "eval":
            continue
        tokens = int(r["step"] * per_step)
        evals.append(
            {
                "step": r["step"],
                "tokens": tokens,
                "flops": tokens * flops_per_token if flops_per_token else None,
                "eval_loss": r["eval_loss"],
                "eval_ppl": r["eval_ppl"],
            }
        )
    speeds = [r["tokens_per_s"] for r in trains if r.get("step", 0) > 1 and not r.get("skipped")]
    speeds = speeds or [r["tokens_per_s"] for r in trains]  # the first step pays for warm-up: left out if we can
    return RunData(
        run_dir=str(run_dir),
        name=run_dir.name,
        variant=info.get("variant", run_dir.name),
        label=info.get("label", run_dir.name),
        seed=info.get("seed"),
        flops_per_token=flops_per_token,
        tokens_per_step=per_step,
        evals=evals,
        tokens_per_s=statistics.median(speeds) if speeds else None,
        info=info,
        downstream=next((r for r in reversed(records) if r.get("kind") == "tasks"), None),
    )


def _tokens_per_step(run_dir: Path, trains: list[dict[str, Any]]) -> int:
    for record in trains:
        if record.get("step"):
            return int(record["tokens"] // record["step"])
    recipe = run_dir / "recipe.resolved.json"
    if recipe.is_file():
        data = json.loads(recipe.read_text())
        batch = data["batch"]
        return int(data["data"]["seq_len"] * batch["micro_batch_size"] * (batch.get("grad_accum") or 1))
    return 0


def _flops_from_recipe(run_dir: Path) -> float | None:
    """FLOPs per token for a plain ``upcycle train`` run, while its model folder still exists."""
    path = run_dir / "recipe.resolved.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    model = Path(data.get("model", {}).get("path") or "")
    if not (model / "config.json").is_file():
        return None
    try:
        return model_cost(model).flops_per_token(int(data["data"]["seq_len"]))
    except Exception:  # noqa: BLE001 - an unknown architecture only loses the FLOPs axis
        return None
