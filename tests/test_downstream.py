"""`upcycle eval`: the harness' request protocol, per-item outcomes, and an exact upcycle scoring as its dense model."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import statistics
import sys

import pytest
import torch
from transformers import AutoTokenizer

from upcycle import assets
from upcycle.convert import UpcycleOptions
from upcycle.downstream import TASKS, parse_tasks
from upcycle.downstream.items import Item, Request, load_items
from upcycle.downstream.loglikelihood import Scored, encode, score
from upcycle.downstream.metrics import mean_and_stderr, outcome
from upcycle.downstream.run import evaluate
from upcycle.downstream.sources import load_task_items
from upcycle.errors import OptionError, SourceError
from upcycle.hf.loading import load_causal_lm_strict
from upcycle.upcycling import convert

SLICE = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada", "mmlu")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(assets.smollm2_folder())


def test_a_pair_is_tokenised_as_the_harness_does(tokenizer):
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    pair = encode(tokenizer, Request("Question: 2+2?\nAnswer: ", "four"), window=2048)  # the space moves right
    assert pair.continuation == ids("Question: 2+2?\nAnswer: four")[len(ids("Question: 2+2?\nAnswer:")) :]
    assert pair.input_ids + pair.continuation[-1:] == ids("Question: 2+2?\nAnswer: four")
    empty = encode(tokenizer, Request("", " four"), window=2048)  # nothing to condition on: start from <bos>/<eos>
    assert empty.input_ids[0] in (tokenizer.bos_token_id, tokenizer.eos_token_id)
    cut = encode(tokenizer, Request("one two three four five six", " seven"), window=4)  # the left goes first
    assert len(cut.input_ids) == 4 and cut.continuation == ids(" seven")


def test_a_tokenizer_that_adds_a_bos_conditions_every_request_on_it():
    from tokenizers.processors import TemplateProcessing

    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_folder())
    plain = encode(tokenizer, Request("Question: 2+2?\nAnswer:", " four"), window=2048)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    token = tokenizer.convert_ids_to_tokens(bos)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"{token} $A", special_tokens=[(token, bos)])
    with_bos = encode(tokenizer, Request("Question: 2+2?\nAnswer:", " four"), window=2048)
    assert with_bos.input_ids == [bos, *plain.input_ids] and with_bos.continuation == plain.continuation
    starts_with_it = encode(tokenizer, Request("", token + " four"), window=2048)  # the prefix is not doubled
    assert starts_with_it.input_ids[:2] != [bos, bos] and starts_with_it.input_ids[0] == bos


def test_a_batch_scores_as_each_request_alone(tiny_pair, tokenizer):
    dense, _ = tiny_pair
    model = load_causal_lm_strict(dense)
    requests = [
        Request("The cat sat on the", " mat"),
        Request("A", " long answer of several words here"),
        Request("Question: why?\nAnswer:", " because"),
    ]
    batched = score(model, tokenizer, requests, batch_size=3)
    for request, together in zip(requests, batched, strict=True):
        e = encode(tokenizer, request, 2048)
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, -len(e.continuation) :].float(), -1)
        target = torch.tensor(e.continuation)
        alone = logprobs.gather(-1, target[:, None]).sum().item()
        assert together.logprob == pytest.approx(alone, abs=1e-4) and together.tokens == len(e.continuation)
        assert together.greedy == bool((logprobs.argmax(-1) == target).all())


def test_outcomes_follow_the_harness_definitions():
    spec = TASKS["arc_easy"]
    item = Item(0, "x", (Request("Q:", " a"), Request("Q:", " bbbb")), gold=1)
    result = outcome(spec, item, [Scored(-2.0, False, 1), Scored(-4.0, False, 2)])
    assert result.prediction == 0 and result.acc == 0.0  # -2 beats -4 ...
    assert result.prediction_norm == 1 and result.acc_norm == 1.0  # ... but -4/4 beats -2/1 (the space not counted)
    assert result.gold_bits_per_byte == pytest.approx(4.0 / math.log(2) / len(" bbbb"))
    tie = outcome(spec, item, [Scored(-1.0, False, 1), Scored(-1.0, False, 1)])
    assert tie.prediction == 0  # ties go to the first choice, as numpy's argmax
    word = outcome(TASKS["lambada"], Item(0, "x", (Request("c", " w"),), 0), [Scored(-0.1, True, 1)])
    assert word.acc == 1.0
    values = [1.0, 0.0, 1.0, 1.0]
    assert mean_and_stderr(values) == pytest.approx((0.75, statistics.stdev(values) / 2))


def test_task_names_and_shots_are_checked():
    assert parse_tasks("piqa, arc_easy") == ("piqa", "arc_easy") and parse_tasks("all") == tuple(TASKS)
    for bad in ("arc_easy,nope", "", "piqa,piqa"):
        with pytest.raises(OptionError):
            parse_tasks(bad)
    with pytest.raises(OptionError, match="--shots 0"):
        TASKS["lambada"].variant(5)


def test_items_are_the_first_of_a_fixed_order_and_damage_is_named(tmp_path):
    folder = assets.eval_tasks_dir()
    items = load_items(folder, TASKS["arc_easy"], 0, None)
    assert len(items) == 570 and all(len(i.choices) in (3, 4, 5) for i in items)  # ARC-Easy validation, 0-shot
    assert load_items(folder, TASKS["arc_easy"], 0, 5) == items[:5]
    assert len(load_items(folder, TASKS["hellaswag"], 5, None)) == 1000  # the 5-shot prompts: a fixed 1,000
    copy = tmp_path / "tasks"
    shutil.copytree(folder / "piqa", copy / "piqa")
    data = copy / "piqa" / "rc_0shot" / "requests.jsonl.gz"
    data.write_bytes(gzip.compress(b'{"doc_id": 0, "idx": 0')[:40])
    with pytest.raises(SourceError, match="damaged"):
        load_items(copy, TASKS["piqa"], 0, None)


def test_mmlu_is_prompted_as_the_harness_prompts_it():
    """lm-evaluation-harness' ``mmlu`` and ``mmlu_continuation`` templates, filled in by hand for the first
    abstract-algebra question with one example (the subject's first dev question)."""
    folder = assets.eval_tasks_dir()
    letters = load_task_items(folder, TASKS["mmlu"], 1, 1)[0]
    question = "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q."
    assert letters.native_id == "abstract_algebra/0" and letters.gold == 1
    assert {c.context for c in letters.choices} == {
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        f"{question}\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    }
    assert [c.continuation for c in letters.choices] == [" A", " B", " C", " D"]
    cloze = load_task_items(folder, TASKS["mmlu_continuation"], 0, 1)[0]
    assert {c.context for c in cloze.choices} == {
        f"The following are questions (with answers) about abstract algebra.\n\nQuestion: {question}\nAnswer:"
    }
    assert [c.continuation for c in cloze.choices] == [" 0", " 4", " 2", " 6"] and cloze.gold == 1


def test_mmlu_items_take_the_subjects_in_turn_and_default_to_five_shots(tmp_path, monkeypatch):
    folder = assets.eval_tasks_dir()
    items = load_task_items(folder, TASKS["mmlu"], 0, None)
    assert len(items) == 14042 and len({i.doc_id for i in items}) == 14042  # the test split of all 57 subjects
    first = load_task_items(folder, TASKS["mmlu"], 0, 60)
    assert first == items[:60] and len({i.native_id.split("/")[0] for i in first[:57]}) == 57
    assert [i.native_id for i in first[57:]] == ["abstract_algebra/1", "anatomy/1", "astronomy/1"]
    assert TASKS["mmlu"].check_shots(None) == 5 and TASKS["arc_easy"].check_shots(None) == 0
    with pytest.raises(OptionError, match="0, 1, 2, 3, 4, 5"):
        TASKS["mmlu"].check_shots(6)
    copy = tmp_path / "tasks"
    shutil.copytree(folder / "mmlu", copy / "mmlu")
    (copy / "mmlu" / "anatomy" / "test.arrow").write_bytes(b"not arrow")
    with pytest.raises(SourceError, match="damaged"):
        load_task_items(copy, TASKS["mmlu"], 0, 1)
    shutil.rmtree(copy / "mmlu" / "anatomy")
    with pytest.raises(SourceError, match="56 MMLU subjects"):
        load_task_items(copy, TASKS["mmlu"], 0, 1)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    with pytest.raises(OptionError, match=r"upcycle\[eval\]"):
        load_task_items(folder, TASKS["mmlu"], 0, 1)


def test_the_command_reports_and_refuses(cli, tiny_pair):
    dense, _ = tiny_pair
    result = cli("eval", dense, "--tasks", "arc_easy,lambada", "--limit", "3", "--json", "--per-item")
    assert result.exit_code == 0, result.stdout
    report = json.loads(result.stdout)
    assert [t["task"] for t in report["tasks"]] == ["arc_easy", "lambada"] and report["limit"] == 3
    assert all(len(t["predictions"]) == 3 and t["items"] == 3 for t in report["tasks"])
    assert report["macro_average"] == pytest.approx(sum(t["score"] for t in report["tasks"]) / 2)
    shown = cli("eval", dense, "--tasks", "winogrande", "--limit", "2")
    assert shown.exit_code == 0 and "WinoGrande" in shown.stdout and "macro average" in shown.stdout
    mixed = json.loads(cli("eval", dense, "--tasks", "piqa,mmlu,mmlu_continuation", "--limit", "2", "--json").stdout)
    assert [(t["task"], t["shots"], t["items"]) for t in mixed["tasks"]] == [
        ("piqa", 0, 2),
        ("mmlu", 5, 2),
        ("mmlu_continuation", 5, 2),
    ]
    assert mixed["tasks"][1]["acc_norm"] is None and mixed["tasks"][2]["acc_norm"] is not None
    single = cli("eval", dense, "--tasks", "piqa", "--limit", "1", "--json")  # no spread: no error, and valid JSON
    task = json.loads(single.stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))["tasks"][0]
    assert task["acc_stderr"] is None and task["acc_norm"] is not None
    for args, words in (
        (("--tasks", "mmlu_pro"), "unknown task"),
        (("--tasks", "lambada", "--shots", "5"), "--shots 0"),
        (("--dtype", "float8"), "unknown --dtype"),
        (("--limit", "0"), "limit"),
    ):
        refused = cli("eval", dense, *args)
        assert refused.exit_code == 2 and words in refused.stderr, (args, refused.stderr)
    missing = cli("eval", dense.parent / "nowhere", "--limit", "1")
    assert missing.exit_code == 2 and "config.json" in missing.stderr


@pytest.mark.slow
def test_the_exact_upcycle_of_smollm2_predicts_every_item_as_the_dense_model(tmp_path):
    """Step 0 is the dense model: the same choice on every item of a fixed slice of seven tasks."""
    dense = assets.smollm2_folder()
    moe = tmp_path / "moe"
    convert(dense, moe, UpcycleOptions())
    reports = [evaluate(folder, SLICE, limit=10, batch_size=8) for folder in (dense, moe)]
    for before, after in zip(reports[0].tasks, reports[1].tasks, strict=True):
        assert [o.prediction for o in before.outcomes] == [o.prediction for o in after.outcomes], before.task
        assert [o.prediction_norm for o in before.outcomes] == [o.prediction_norm for o in after.outcomes]
        assert after.bits_per_byte == pytest.approx(before.bits_per_byte, rel=1e-4)


def test_training_scores_the_recipe_tasks_at_every_evaluation(tiny_pair, texts, tmp_path):
    from train_helpers import recipe_dict

    from upcycle.train.loop import train
    from upcycle.train.metrics import read_metrics
    from upcycle.train.recipe import recipe_from_dict

    _, moe = tiny_pair
    tasks = {"tasks": "arc_easy,lambada", "limit": 3, "batch_size": 4}
    train(recipe_from_dict(recipe_dict(moe, tmp_path / "run", texts, eval=tasks), tmp_path))
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "tasks"]
    assert [r["step"] for r in records] == [0, 3, 6] and all(
        set(r["tasks"]) == {"arc_easy", "lambada"} for r in records
    )
    before = evaluate(moe, ["arc_easy", "lambada"], limit=3, batch_size=4).compact()  # step 0 is the folder itself
    assert records[0]["tasks"] == before["tasks"] and records[0]["macro_average"] == before["macro_average"]
    export = tmp_path / "run" / "export"
    assert json.loads((export / "upcycle.json").read_text())["training"]["downstream"]["step"] == 6
    card = (export / "README.md").read_text()
    assert "Downstream tasks at step 6" in card and "| ARC-Easy | 0 | 3 | acc_norm |" in card


def test_ranks_score_the_tasks_as_one_process(tiny_pair, texts, tmp_path):
    from train_helpers import recipe_dict, run_ranks, write_recipe

    from upcycle.train.metrics import read_metrics

    _, moe = tiny_pair
    sections = {  # no held-out text: the tasks' forwards are the first FSDP2 sees, then training ones follow
        "data": {"eval": []},
        "batch": {"micro_batch_size": 2, "grad_accum": None, "global_batch_tokens": 4 * 2 * 32, "steps": 2},
        "run": {"export": False, "checkpoints": False},
        "eval": {"tasks": ["piqa"], "limit": 5, "batch_size": 2},
    }
    recipe = write_recipe(tmp_path / "two.yaml", recipe_dict(moe, tmp_path / "two", texts, **sections))
    launched = run_ranks(2, "train", str(recipe))  # FSDP over two gloo ranks: every forward is collective
    assert launched.returncode == 0, launched.stderr[-3000:]
    step0 = next(r for r in read_metrics(tmp_path / "two") if r["kind"] == "tasks" and r["step"] == 0)
    alone = evaluate(moe, ["piqa"], limit=5, batch_size=2).compact()
    assert step0["tasks"]["piqa"]["score"] == alone["tasks"]["piqa"]["score"]
    assert step0["tasks"]["piqa"]["bits_per_byte"] == pytest.approx(alone["tasks"]["piqa"]["bits_per_byte"], rel=1e-4)
    assert [r["step"] for r in read_metrics(tmp_path / "two") if r["kind"] == "tasks"] == [0, 2]


def test_task_evaluations_follow_their_interval_and_survive_a_resume(tmp_path):
    from upcycle.train.distributed import Dist
    from upcycle.train.recipe_sections import EvalSection
    from upcycle.train.task_scoring import TaskScoring

    one = Dist(0, 1, 0, torch.device("cpu"))

    def due(interval, held_out_steps=()):
        scoring = TaskScoring(EvalSection(tasks=("piqa",), interval=interval), None, one, 12, "fp32")
        return [step for step in range(13) if scoring.due(step, step in held_out_steps)]

    assert due(0) == [0, 12]
    assert due(5) == [0, 5, 10, 12]  # its own schedule, whatever the held-out loss's
    assert due(None, held_out_steps=(4, 8)) == [0, 4, 8, 12]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"kind": "tasks", "step": s, "tasks": {}}) + "\n" for s in (0, 5, 10))
    )
    scoring = TaskScoring(EvalSection(tasks=("piqa",)), None, one, 12, "fp32")
    scoring.restore(tmp_path, 8)
    assert scoring.latest["step"] == 5  # the last one up to the checkpoint
