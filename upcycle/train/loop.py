"""The training entry: recipe in, checkpoints, metrics and an HF-native export out.

It is the project's own loop (not a generic trainer) so that the MoE terms are really applied, resume is exact
(the data position, the schedule and the RNG are functions of the step), and the same code runs on one CPU, one
GPU, or many ranks under `torchrun` with FSDP2. `train` guards the run folder, converts the recipe's model when it
names a source, joins the process group and hands over to `upcycle.train.trainer.Trainer`, whose methods are the
run's phases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path

from upcycle.assets import in_use
from upcycle.output_safety import refuse_overlap
from upcycle.train.conversion import prepare_model
from upcycle.train.distributed import init_distributed, shutdown
from upcycle.train.export import check_replaceable_export
from upcycle.train.recipe import TrainRecipe
from upcycle.train.reporting import Reporter, SilentReporter, announce
from upcycle.train.run_folder import check_run_folder, clear_earlier_run, run_lock
from upcycle.train.run_state import TrainSummary
from upcycle.train.trainer import Trainer, TrainingDiverged

__all__ = ["Reporter", "TrainSummary", "TrainingDiverged", "check_output_dir", "train"]


def train(
    recipe: TrainRecipe,
    reporter: Reporter | None = None,
    resume: bool = False,
    allow_changes: set[str] | frozenset[str] = frozenset(),
    force: bool = False,
    resume_from: Path | None = None,
) -> TrainSummary:
    """Run the recipe to its last step (or resume it); returns what happened.

    A resumed run continues the checkpoint's data stream (the latest, or `resume_from`); `allow_changes` names the
    recipe changes that alter what is trained (see `upcycle.train.resume`) which the user accepts. A run folder
    holding another run is refused unless resumed or replaced (`force`); see `upcycle.train.run_folder`.
    """
    started = time.perf_counter()
    first_rank = int(os.environ.get("RANK", "0")) == 0
    main_rank = reporter is not None and first_rank
    run_dir = Path(recipe.run.output_dir)
    resuming = resume or resume_from is not None
    if recipe.model.path is not None:  # before anything is written: not over the model, no user file in export/
        check_output_dir(recipe)
    reads_folder = first_rank or resuming or not force  # a new run under --force: rank 0 alone, as it clears it
    if reads_folder:  # before anything is converted or written
        check_run_folder(run_dir, resuming, resume_from, force)
    with run_lock(run_dir, enabled=first_rank):
        # again, now that the folder is ours
        checkpoint = check_run_folder(run_dir, resuming, resume_from, force) if reads_folder else None
        if force and checkpoint is None and first_rank:
            clear_earlier_run(run_dir)
        # before the process group exists: converting may take minutes, longer than a collective waits
        if main_rank and recipe.model.source is not None:
            announce(reporter, "converting, or re-checking the cached conversion")
        recipe, conversion = prepare_model(recipe, reporter.message if main_rank else lambda _: None)
        info = init_distributed()
        report = reporter if (reporter is not None and info.is_main) else SilentReporter()
        held = in_use(conversion.folder) if conversion is not None else contextlib.nullcontext()
        try:
            with held:  # `upcycle cache prune` leaves the conversion alone while the run reads it (export too)
                check_output_dir(recipe)  # again, now that model.path names the model really trained
                summary = Trainer(recipe, info, report, checkpoint, set(allow_changes)).run(started)
        finally:
            shutdown(info)
    return dataclasses.replace(summary, conversion=conversion)


def check_output_dir(recipe: TrainRecipe) -> None:
    """Refuse, before any data is tokenised or any step runs, a run folder whose writes would damage something.

    The run folder must keep clear of the model it trains (not it, not inside it, not containing it); its
    ``export`` folder may only hold an earlier upcycle export (replaced at the end, atomically). Another run's
    records are refused earlier (`check_run_folder`).
    """
    run_dir = Path(recipe.run.output_dir)
    model_dir = [("model.path", recipe.model.path)]
    refuse_overlap(run_dir, model_dir, option="run.output_dir")
    if recipe.run.export:
        refuse_overlap(run_dir / "export", model_dir, option="run.output_dir/export")
        check_replaceable_export(run_dir / "export")
