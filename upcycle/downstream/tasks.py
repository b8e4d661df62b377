"""The tasks `upcycle eval` scores: where their items live, how they are scored, and which figure leads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from upcycle.errors import OptionError

Kind = Literal["choice", "last_word"]
Metric = Literal["acc", "acc_norm", "bpb"]
# olmes: ready-made requests in the item source; mmlu_*: upcycle builds the harness' MMLU prompts (downstream.mmlu)
Prompt = Literal["olmes", "mmlu_letters", "mmlu_continuation"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    title: str
    kind: Kind  # choice: pick the most likely continuation; last_word: greedy-decode the gold continuation
    primary: Metric  # the figure papers report for the task, and the one the macro average takes
    shots: tuple[int, ...]  # the few-shot counts the item source has prompts for
    split: str
    # acc_norm needs choices that differ in their continuation: WinoGrande's share one (the option sits in the context)
    length_normalised: bool = True
    prompt: Prompt = "olmes"
    default_shots: int = 0  # what papers report the task with, when the user names no count

    def check_shots(self, shots: int | None) -> int:
        """The few-shot count to use: ``shots``, or the task's default when None; refused when not on offer."""
        shots = self.default_shots if shots is None else shots
        if shots not in self.shots:
            counts = ", ".join(str(n) for n in self.shots)
            raise OptionError(f"{self.name} has prompts for {counts} shots, not {shots}.", f"Use --shots {counts}.")
        return shots

    def variant(self, shots: int) -> str:
        """The item source's request folder for this many shots."""
        shots = self.check_shots(shots)
        return "bpb_0shot" if self.kind == "last_word" else f"rc_{shots}shot"


# acc_norm where lm-evaluation-harness' reports and the upcycling papers lead with it (choices of unequal length);
# acc where the choices are one word or share their text (BoolQ yes/no, WinoGrande's shared suffix, SciQ).
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("arc_easy", "ARC-Easy", "choice", "acc_norm", (0, 5), "validation"),
        TaskSpec("arc_challenge", "ARC-Challenge", "choice", "acc_norm", (0, 5), "validation"),
        TaskSpec("hellaswag", "HellaSwag", "choice", "acc_norm", (0, 5), "validation"),
        TaskSpec("piqa", "PIQA", "choice", "acc_norm", (0, 5), "validation"),
        TaskSpec("winogrande", "WinoGrande", "choice", "acc", (0, 5), "validation", length_normalised=False),
        TaskSpec("boolq", "BoolQ", "choice", "acc", (0, 5), "validation"),
        TaskSpec("sciq", "SciQ", "choice", "acc", (0, 5), "validation"),
        TaskSpec("openbookqa", "OpenBookQA", "choice", "acc_norm", (0, 5), "validation"),
        TaskSpec("socialiqa", "SocialIQA", "choice", "acc", (0, 5), "validation"),
        TaskSpec("csqa", "CommonsenseQA", "choice", "acc", (0, 5), "validation"),
        TaskSpec("lambada", "LAMBADA", "last_word", "acc", (0,), "test"),
        # letters A-D: one character each, so acc_norm would repeat acc; the harness reports acc only
        TaskSpec("mmlu", "MMLU", "choice", "acc", tuple(range(6)), "test", False, "mmlu_letters", default_shots=5),
        TaskSpec(
            "mmlu_continuation",
            "MMLU (cloze)",
            "choice",
            "acc_norm",
            tuple(range(6)),
            "test",
            prompt="mmlu_continuation",
            default_shots=5,
        ),
    )
}
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "sciq", "openbookqa")


def parse_tasks(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Task names from ``a,b,c`` (or a list), in the order given, each known and named once; ``all`` for every task."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if names == ["all"]:
        return tuple(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        known = ", ".join(TASKS)
        what = f"unknown task {unknown[0]!r}" if unknown else "no task named"
        raise OptionError(f"{what}.", f"Choose from: {known} (or all).")
    if len(set(names)) != len(names):
        raise OptionError(f"a task is named twice in {','.join(names)}.", "Name each task once.")
    return tuple(names)


def parse_request(text: str | list[str] | tuple[str, ...], shots: int | None) -> tuple[str, ...]:
    """The task names, each checked against the shot count asked for: all of it known before a model loads."""
    names = parse_tasks(text)
    for task in names:
        TASKS[task].check_shots(shots)
    return names
