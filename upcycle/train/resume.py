"""Resuming a run: where its data stream stands, and whether the recipe still trains what the run trained.

A checkpoint records the stream position (sequences consumed), the tokens trained, the recipe and the content key
of the training data (the token cache's sha256 over the text, the tokenizer and the settings). A resumed run
continues from that position, not from step x the current batch, and its recipe is compared with the saved one:
a change that alters what is trained (the model, the training data or its content, the seed, the global batch)
is refused with the list of differences unless `--allow-changes` names each of them. A new sequence length is
always refused: it packs the stream anew, so which documents were already trained could no longer be told from
the rest. Fewer steps than the checkpoint's are refused (nothing would be trained, and the record would claim
steps it did not take). Other differences (learning rate, more steps, intervals) are allowed and reported.
Where the run lives (`run.output_dir`) and how its ranks are laid out (the `parallel` section) are not compared:
neither changes what is trained. `model.init` is never changed on resume: the checkpoint's weights are continued
whatever it says, so a new value could only mislabel them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from upcycle.errors import OptionError

# name for --allow-changes -> the recipe keys it covers (dotted); "global_batch" is the resolved sequences per step
GUARDED = {
    "model": ("model.path", "model.source"),  # a changed upcycle option changes model.path (its cache folder)
    "data": ("data.train", "data.text_field"),  # and the data's content (check_same_data)
    "seed": ("run.seed",),
    "global_batch": (),
}
IGNORED = {"run.output_dir"}  # where the run lives, not what it trains
IGNORED_SECTIONS = {"parallel"}  # how the ranks lay out the model, not what it trains


@dataclass(frozen=True)
class ResumePoint:
    step: int
    position: int  # sequences of the data stream consumed
    tokens: int  # tokens trained so far
    bad_steps: int  # consecutive non-finite steps at the checkpoint
    history: list[dict[str, Any]]
    notes: list[str]  # what changed and was allowed, for the user


def resume_point(
    state: dict[str, Any],
    recipe: dict[str, Any],
    global_batch: int,
    world_size: int,
    allow: set[str],
    steps: int | None = None,
) -> ResumePoint:
    """Check the resumed recipe against the saved one and place the data stream; refuse unannounced changes."""
    unknown = allow - set(GUARDED)
    if unknown:
        extra = " (a new seq_len is never accepted: it re-packs the data)" if "seq_len" in unknown else ""
        raise OptionError(
            f"--allow-changes names {', '.join(sorted(unknown))}, which upcycle does not guard{extra}.",
            f"name any of: {', '.join(GUARDED)}.",
        )
    saved = state.get("recipe") or {}
    step = int(state["step"])
    saved_init = (saved.get("model") or {}).get("init", "pretrained")  # checkpoints before model.init: pretrained
    if saved_init != recipe["model"].get("init", "pretrained"):
        raise OptionError(
            f"the checkpoint's run trained from {saved_init} weights, this recipe says model.init="
            f"{recipe['model'].get('init')}: the checkpoint's weights are what a resume continues.",
            f"resume with model.init={saved_init}, or start a new run.",
        )
    saved_len = (saved.get("data") or {}).get("seq_len")
    if saved_len is not None and int(saved_len) != int(recipe["data"]["seq_len"]):
        raise OptionError(
            f"the checkpoint's run packed its data in sequences of {saved_len} tokens, this recipe in "
            f"{recipe['data']['seq_len']}: re-packed, the data would mix sequences already trained with ones never "
            "seen.",
            f"resume with data.seq_len={saved_len}, or start a new run from the export (model.path).",
        )
    if steps is not None and steps < step:
        raise OptionError(
            f"the checkpoint is at step {step}, beyond this recipe's batch.steps={steps}: nothing would be trained.",
            f"resume with batch.steps >= {step} (= {step} re-exports the finished run), or start a new run.",
        )
    saved_batch = int(state.get("global_batch_sequences") or _saved_batch(state, step))
    changed = _differences(_flatten(saved), _flatten(recipe))
    guarded: dict[str, list[str]] = {}
    for name, keys in GUARDED.items():
        lines = [f"{key}: {changed[key][0]!r} -> {changed[key][1]!r}" for key in keys if key in changed]
        if name == "global_batch" and saved_batch != global_batch:
            lines.append(f"sequences per step: {saved_batch} -> {global_batch}{_rank_note(state, world_size)}")
        if lines:
            guarded[name] = lines
    refused = {name: lines for name, lines in guarded.items() if name not in allow}
    if refused:
        listed = "; ".join(line for lines in refused.values() for line in lines)
        raise OptionError(
            f"the resumed run would train on something else than the checkpoint's run: {listed}.",
            f"resume with the saved recipe (RUN_DIR/recipe.resolved.json), or pass --allow-changes "
            f"{','.join(refused)} to accept the change.",
        )
    covered = {key for keys in GUARDED.values() for key in keys}
    notes = [f"changed (allowed): {line}" for lines in guarded.values() for line in lines]
    notes += [f"changed: {key}: {old!r} -> {new!r}" for key, (old, new) in changed.items() if key not in covered]
    position = int(state.get("data_position", step * saved_batch))
    tokens = int(state.get("tokens", position * int(saved.get("data", {}).get("seq_len", 0) or 0)))
    return ResumePoint(
        step, position, tokens, int(state.get("bad_steps", 0)), list(state.get("eval_history", [])), notes
    )


def check_same_data(state: dict[str, Any], tokens_sha256: str | None, allow: set[str]) -> str | None:
    """Refuse training data whose tokens changed since the checkpoint (the paths may be the same); a note when
    `--allow-changes data` accepts it, or when the checkpoint predates the record.

    The token stream's own sha256 is compared, not what produced it: a newer tokenizers release or upcycle that
    tokenises the same text to the same tokens resumes; any other text, tokenizer or settings does not.
    """
    saved = state.get("train_tokens_sha256")
    if saved is None:
        return "note: the checkpoint does not record its data's content (an older upcycle wrote it): not compared"
    if saved == tokens_sha256:
        return None
    if "data" in allow:
        return "changed (allowed): the training tokens differ from the checkpoint's (their sha256 differs)"
    raise OptionError(
        "the training data changed since the checkpoint (same recipe, other tokens: sha256 "
        f"{str(tokens_sha256)[:12]}, recorded {saved[:12]}); the resumed run would continue a different stream.",
        "restore the data the run trained on, or pass --allow-changes data to accept the change.",
    )


def _saved_batch(state: dict[str, Any], step: int) -> int:
    if step and state.get("data_position"):
        return int(state["data_position"]) // step
    raise OptionError("the checkpoint does not record its global batch.", "resume with the upcycle that wrote it.")


def _rank_note(state: dict[str, Any], world_size: int) -> str:
    saved_world = state.get("world_size")
    if saved_world is not None and saved_world != world_size:
        return (
            f" (the recipe sets batch.grad_accum, so the global batch follows the {saved_world} -> {world_size} "
            "ranks; set batch.global_batch_tokens to keep it fixed)"
        )
    return ""


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, name + ".")
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose value changed; a key the saved recipe lacks (added by a newer upcycle) counts only if guarded."""
    guarded = {key for keys in GUARDED.values() for key in keys}
    return {
        key: (saved.get(key), current.get(key))
        for key in sorted(set(saved) | set(current))
        if not _ignored(key) and saved.get(key) != current.get(key) and (key in saved or key in guarded)
    }


def _ignored(key: str) -> bool:
    return key in IGNORED or key.partition(".")[0] in IGNORED_SECTIONS
