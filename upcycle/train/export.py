"""The end of training: an HF-native checkpoint (per-expert layout on disk) that loads in plain transformers."""

from __future__ import annotations

import json
import os
import shutil
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import nn

from upcycle.convert.writer import COPIED_FILES
from upcycle.train.distributed import Dist, barrier


def full_state_dict(model: nn.Module, info: Dist) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU (gathered on every rank when sharded; only rank 0 keeps using them)."""
    if not info.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_model(model: nn.Module, info: Dist, source: Path, out: Path, summary: dict[str, Any]) -> Path | None:
    """Write OUT atomically: weights in the source checkpoint's dtype, tokenizer, upcycle.json + training summary."""
    state = full_state_dict(model, info)
    if info.is_main:
        declared = getattr(model.config, "dtype", None)
        dtype = declared if isinstance(declared, torch.dtype) else getattr(torch, str(declared or "float32"))
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp, state_dict=state)
            for path in source.iterdir():
                if path.is_file() and any(fnmatch(path.name, p) for p in COPIED_FILES):
                    shutil.copy2(path, tmp / path.name)
            provenance = (
                json.loads((source / "upcycle.json").read_text()) if (source / "upcycle.json").is_file() else {}
            )
            provenance["training"] = summary
            (tmp / "upcycle.json").write_text(json.dumps(provenance, indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    barrier(info)
    return out if info.is_main else None


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """Export on demand: any saved training checkpoint, as an HF-native folder (single process)."""
    from upcycle.loading import load_causal_lm_strict
    from upcycle.train.checkpoint import load_checkpoint, read_trainer_state
    from upcycle.train.distributed import Dist

    state = read_trainer_state(checkpoint)
    source = Path(state["recipe"]["model"]["path"])
    model = load_causal_lm_strict(source, torch.float32)
    load_checkpoint(checkpoint, model, None)
    summary = {
        "steps": state["step"],
        "tokens": state.get("tokens"),
        "eval_history": state.get("eval_history", []),
        "recipe": state["recipe"],
        "from_checkpoint": str(checkpoint),
    }
    exported = export_model(model, Dist(0, 1, 0, torch.device("cpu")), source, out, summary)
    assert exported is not None
    return exported
