"""The end of training: an HF-native checkpoint (per-expert layout on disk) that loads in plain transformers.

An export is published atomically (see :mod:`upcycle.output_safety`): OUT is the old export or the complete new
one, never a mix. It replaces an existing OUT only when told (``force``); the training loop tells it so only for
a folder that holds nothing but what an export writes (:func:`check_replaceable_export`), i.e. its own earlier
export.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import nn

from upcycle.errors import OutputError, UpcycleError
from upcycle.model_card import CARD_NAME, RANDOM_INIT_METHOD, write_training_card
from upcycle.model_files import COPIED_FILES
from upcycle.output_safety import exists, refuse_existing, refuse_overlap, resolved, staged
from upcycle.redaction import redact_local_paths
from upcycle.train.distributed import Dist, barrier
from upcycle.train.metrics import read_metrics

EXPORT_FILES = (
    "config.json", "model*.safetensors", "model.safetensors.index.json", "upcycle.json", CARD_NAME, *COPIED_FILES,
)  # fmt: skip


def full_state_dict(model: nn.Module, info: Dist) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU (gathered on every rank when sharded; only rank 0 keeps using them)."""
    if not info.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def engine_detached(model: nn.Module) -> Iterator[None]:
    """Rank 0 writes the already gathered weights alone: without this, a model sharded by transformers' engine
    would gather again inside `save_pretrained` and wait there for ranks that are not saving."""
    config = getattr(model, "config", None)
    saved = getattr(config, "distributed_config", None)
    if saved is None:
        yield
        return
    config.distributed_config = None
    try:
        yield
    finally:
        config.distributed_config = saved


def foreign_files(folder: Path) -> list[str]:
    """What in FOLDER an upcycle export would not have written (subfolders included): the user's, not ours."""
    return sorted(
        p.name for p in folder.iterdir() if not (p.is_file() and any(fnmatch(p.name, pat) for pat in EXPORT_FILES))
    )


def check_replaceable_export(out: Path) -> None:
    """Refuse unless OUT is absent or holds only an export's files, so replacing it loses nothing of the user's."""
    if not exists(out):
        return
    if not out.is_dir():
        raise OutputError(
            f"{out} exists and is not a folder; training writes its export there.",
            "move it away, or set run.output_dir to a new folder (or run.export: false).",
        )
    foreign = foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(
            f"{out} holds files an upcycle export does not write ({shown}); the run's export would replace them.",
            "move them elsewhere, or set run.output_dir to a new folder (or run.export: false).",
        )


def export_settings(folder: Path, export_dtype: str = "auto") -> tuple[torch.dtype, bool]:
    """The export's dtype (`export_dtype`, or for "auto" the dtype the model in `folder` was stored in) and the
    model's own use_cache: read from its folder, since training loads it in fp32 and turns its cache off."""
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    name = export_dtype
    if name == "auto":
        name = config.get("dtype") or config.get("torch_dtype") or _stored_dtype(folder)
    return getattr(torch, str(name)), bool(config.get("use_cache", True))


def _stored_dtype(folder: Path) -> str:
    """The dtype of the first floating-point tensor on disk, for a config that does not declare one."""
    from upcycle.convert.source import index_weights

    for info in index_weights(folder).values():
        if info.dtype.is_floating_point:
            return str(info.dtype).removeprefix("torch.")
    return "float32"


def export_model(
    model: nn.Module,
    info: Dist,
    source: Path,
    out: Path,
    summary: dict[str, Any],
    force: bool = False,
    dtype: torch.dtype = torch.float32,
    use_cache: bool = True,
    run_dir: Path | None = None,
) -> Path | None:
    """Write OUT atomically: weights in `dtype`, `use_cache` as the source had it, tokenizer, an upcycle.json that
    records the training (the conversion's record, with its exactness claim, moves under "conversion"), and a
    README.md model card rendered from that record and the held-out losses in RUN_DIR's metrics.jsonl (default: the
    recipe's run.output_dir).

    An existing OUT is replaced only with ``force`` (moved aside, removed once the new export is in place).
    """
    state = full_state_dict(model, info)
    if info.is_main:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        _drop_tied_copies(model, state)
        out.parent.mkdir(parents=True, exist_ok=True)
        with staged(out, force) as tmp:
            with engine_detached(model):
                model.save_pretrained(tmp, state_dict=state)
            # save_pretrained writes the training's fp32 and use_cache=False: the export says what it holds
            config = json.loads((tmp / "config.json").read_text())
            config["dtype"], config["use_cache"] = str(dtype).removeprefix("torch."), use_cache
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for path in source.iterdir():
                if path.is_file() and any(fnmatch(path.name, p) for p in COPIED_FILES):
                    shutil.copy2(path, tmp / path.name)
            record = redact_local_paths(training_record(source, summary))  # the run folder keeps the local record
            (tmp / "upcycle.json").write_text(json.dumps(record, indent=2) + "\n")
            name = f"{out.parent.name}/{out.name}" if out.name == "export" else out.name  # a run's export: RUN/export
            log_dir = run_dir or _recipe_run_dir(summary)
            metrics = read_metrics(log_dir) if log_dir is not None else []
            write_training_card(tmp, record, metrics, source, model_id=name)
    barrier(info)
    return out if info.is_main else None


def _drop_tied_copies(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A tied LM head is stored once, as one process saves it: a sharded layout gathers the head and the embedding
    as two tensors, which would otherwise both be written (a larger export that differs by layout)."""
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return
    tied = getattr(model, "_tied_weights_keys", None)
    for target, source in tied.items() if isinstance(tied, dict) else []:
        if target in state and source in state and torch.equal(state[target], state[source]):
            del state[target]


def _recipe_run_dir(summary: dict[str, Any]) -> Path | None:
    """The run folder the recipe wrote its metrics.jsonl into, when the summary records one."""
    output_dir = ((summary.get("recipe") or {}).get("run") or {}).get("output_dir")
    return Path(output_dir) if output_dir else None


def training_record(source: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """upcycle.json of a trained model: what was trained from what. A trained model is no longer the dense model's
    equal, so it claims no exactness; the conversion's claim (about step 0) is kept under "conversion"."""
    from upcycle import __version__

    previous = json.loads((source / "upcycle.json").read_text()) if (source / "upcycle.json").is_file() else {}
    if ((summary.get("recipe") or {}).get("model") or {}).get("init") == "random":
        previous = {}  # fresh weights: neither the conversion nor earlier trainings of the folder are this model's
        method = RANDOM_INIT_METHOD
    elif (previous.get("exactness") or {}).get("method") == RANDOM_INIT_METHOD:
        method = RANDOM_INIT_METHOD  # trained further, it still started from fresh weights
    else:
        method = "trained after conversion"
    conversion = previous.get("conversion") if "training" in previous else (previous or None)
    summary = {**summary, "datasets": training_datasets(summary)}
    trainings = [*previous.get("trainings", []), {**summary, "from": str(source)}] if "training" in previous else []
    return {
        "tool": {"name": "upcycle", "version": __version__},
        "kind": "trained",
        "exactness": {"exact": False, "method": method, "notes": []},
        "conversion": conversion,
        "trainings": trainings or [{**summary, "from": str(source)}],
        "training": {**summary, "from": str(source)},
    }


def training_datasets(summary: dict[str, Any]) -> list[str]:
    """The Hub datasets the training files came from (recorded before local paths are redacted), in first-seen
    order; files from anywhere else name none."""
    from upcycle.hub import hub_dataset_id

    files = (((summary.get("recipe") or {}).get("data") or {}).get("train")) or []
    found = [hub_dataset_id(file) for file in files]
    return list(dict.fromkeys(name for name in found if name))


def run_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint was saved in (RUN/checkpoints/step-N), or None for a checkpoint moved elsewhere."""
    from upcycle.train.checkpoint_manifest import CHECKPOINTS

    where = resolved(checkpoint)
    return where.parent.parent if where.parent.name == CHECKPOINTS else None


def find_checkpoint(run_dir: Path) -> Path:
    """RUN_DIR itself when it is one checkpoint folder, else the latest checkpoint of the run in it."""
    from upcycle.train.checkpoint_manifest import MANIFEST, latest_checkpoint

    checkpoint = run_dir if (run_dir / MANIFEST).is_file() else latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UpcycleError(f"{run_dir} holds no checkpoint.", "pass a run folder of `upcycle train`.")
    return checkpoint


def refuse_export_overlap(out: Path, checkpoint: Path, model_dir: Path) -> None:
    """OUT must keep clear of what the export reads: the checkpoint, the model folder the run trained, the run.

    ``RUN/export`` is the one place inside the run folder that is allowed: it is where ``upcycle train`` writes
    the run's own export, so ``upcycle export RUN RUN/export --force`` redoes it (existing OUT rules still apply).
    """
    inputs: list[tuple[str, Path]] = [("the checkpoint", checkpoint), ("the model folder the run trained", model_dir)]
    run = run_of(checkpoint)
    if run is not None and resolved(out) != resolved(run / "export"):
        inputs.append(("the run folder", run))
    refuse_overlap(out, inputs)


def export_checkpoint(checkpoint: Path, out: Path, force: bool = False) -> Path:
    """Export on demand: any saved training checkpoint, as an HF-native folder (single process).

    Everything is checked before the model is loaded: OUT apart from its inputs (:func:`refuse_export_overlap`),
    and an existing OUT replaced only with ``force``, atomically.
    """
    from upcycle.hf.loading import load_causal_lm_strict
    from upcycle.train.checkpoint import load_checkpoint, read_trainer_state
    from upcycle.train.distributed import Dist

    state = read_trainer_state(checkpoint)
    source = Path(state["recipe"]["model"]["path"])
    out = Path(out).absolute()
    refuse_export_overlap(out, Path(checkpoint), source)
    refuse_existing(out, force)
    model = load_causal_lm_strict(source, torch.float32)
    load_checkpoint(checkpoint, model, None)
    summary = {
        "steps": state["step"],
        "tokens": state.get("tokens"),
        "final_loss": state.get("last_loss"),
        "eval_history": state.get("eval_history", []),
        "recipe": state["recipe"],
        "from_checkpoint": str(checkpoint),
    }
    dtype, use_cache = export_settings(source, state["recipe"].get("run", {}).get("export_dtype", "auto"))
    exported = export_model(
        model,
        Dist(0, 1, 0, torch.device("cpu")),
        source,
        out,
        summary,
        force=force,
        dtype=dtype,
        use_cache=use_cache,
        run_dir=run_of(Path(checkpoint)),
    )
    assert exported is not None
    return exported
