"""`upcycle compare` in miniature, end to end: tiny real-tokenizer Llama, real Shakespeare, 2 steps per run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from tiny_models import make_dense

from upcycle import assets
from upcycle.convert import UpcycleOptions
from upcycle.experiments.compare import compare_main, plot_main
from upcycle.experiments.flops import model_cost
from upcycle.experiments.paper_recipe import paper_recipe, paper_settings
from upcycle.experiments.run_data import RESULT_FILE, RUN_INFO_FILE, load_run
from upcycle.experiments.run_spec import RunSpec
from upcycle.experiments.sizes import SIZES, Size
from upcycle.experiments.sweep_plan import SweepPlan
from upcycle.experiments.variants import VARIANTS, arm_points
from upcycle.model_files import COPIED_FILES
from upcycle.train.metrics import read_metrics
from upcycle.upcycling import convert

VOCAB = 49152  # SmolLM2's tokenizer: the text is real tokens
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = Size(
    "tiny",
    seq_len=32,
    micro_batch_size=2,
    grad_accum=1,
    steps=2,
    eval_interval=1,
    eval_sequences=4,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=1,
    precision="fp32",
    moe_layers="1",  # as the CPU size: only the last decoder layer becomes MoE
    budget="a CI test: seconds",
    experts_implementation="grouped_mm",
)


@pytest.fixture(scope="module", autouse=True)
def cache(module_cache):
    return module_cache


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare-model")
    dense = make_dense(
        "llama", root / "dense", vocab_size=VOCAB, num_hidden_layers=2, intermediate_size=64, tie_word_embeddings=True
    )
    for path in assets.smollm2_folder().iterdir():
        if any(path.match(pattern) for pattern in COPIED_FILES):
            shutil.copy2(path, dense / path.name)
    return dense


@pytest.fixture(scope="module")
def texts() -> tuple[list[str], list[str]]:
    train_files, heldout = assets.shakespeare_split()
    return [str(p) for p in train_files[:1]], [str(heldout[0])]


@pytest.fixture(scope="module")
def compared(tiny_dense, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    lines: list[str] = []
    result = compare_main(
        size=TINY,
        out=out,
        seeds=2,
        variants=["dense", "e8g1t2-renorm", "e8g1t2-softmax", "e8g8t8"],
        base=tiny_dense,
        train=texts[0],
        heldout=texts[1],
        isolate=False,
        echo=lines.append,
    )
    return result, lines


def test_compare_writes_consistent_table_plot_and_json(compared):
    result, lines = compared
    out = result.out
    payload = json.loads(result.json_path.read_text())
    summary = payload["summary"]
    rows = {row["variant"]: row for row in summary["rows"]}
    assert list(rows) == ["dense", "e8g1t2-renorm", "e8g1t2-softmax", "e8g8t8"]
    # two seeds for the dense control and for the MoE that was best at seed 0, one for the others
    run_names = sorted(p.name for p in (out / "runs").iterdir())
    moes = [v for v in rows if v != "dense"]
    best0 = min(moes, key=lambda v: load_run(out / "runs" / f"{v}-s0").evals[-1]["eval_loss"])
    assert sorted(name for name in run_names if name.endswith("-s1")) == sorted(["dense-s1", f"{best0}-s1"])
    assert rows["dense"]["seeds"] == [0, 1] and rows[best0]["seeds"] == [0, 1]
    assert all(rows[v]["seeds"] == [0] for v in moes if v != best0)

    tokens = TINY.steps * TINY.tokens_per_step
    assert summary["equal_tokens"] == tokens
    for row in summary["rows"]:
        # the table's numbers are the runs' own final held-out losses from metrics.jsonl
        finals = []
        for name in row["runs"]:
            evals = [r for r in read_metrics(out / "runs" / name) if r["kind"] == "eval"]
            assert [r["step"] for r in evals] == [0, 1, 2]
            finals.append(evals[-1]["eval_loss"])
        assert row["loss_equal_tokens"] == pytest.approx(sum(finals) / len(finals), rel=1e-12)
        assert row["ppl_equal_tokens"] == pytest.approx(math.exp(row["loss_equal_tokens"]))
        assert f"{row['loss_equal_tokens']:.4f}" in result.markdown
        assert row["label"] in result.markdown
        assert row["flops_per_token"] > 0 and row["tokens_per_s"] > 0
    dense = rows["dense"]
    assert dense["improvement_equal_tokens_pct"] == 0.0
    for row in summary["rows"]:
        expected = 100 * (dense["loss_equal_tokens"] - row["loss_equal_tokens"]) / dense["loss_equal_tokens"]
        assert row["improvement_equal_tokens_pct"] == pytest.approx(expected)
    # equal FLOPs: the dense control spends the fewest FLOPs, so it is compared at its own last evaluation
    assert summary["equal_flops"] == pytest.approx(tokens * dense["flops_per_token"])
    assert dense["loss_equal_flops"] == pytest.approx(dense["loss_equal_tokens"])
    # E8G1T2 uses twice the dense MLP per token: more FLOPs per token, so fewer tokens at equal FLOPs
    assert rows["e8g1t2-renorm"]["flops_per_token"] > dense["flops_per_token"]
    assert rows["e8g8t8"]["active_params"] == pytest.approx(dense["active_params"], rel=0.01)
    # exact upcycles start at the dense model's held-out loss; softmax-topk with scaling is approximate
    assert rows["e8g1t2-renorm"]["step0_loss"] == pytest.approx(dense["step0_loss"], rel=1e-4)
    assert rows["e8g8t8"]["step0_loss"] == pytest.approx(dense["step0_loss"], rel=1e-4)
    assert rows["e8g1t2-renorm"]["exact_at_init"] is True and rows["e8g1t2-softmax"]["exact_at_init"] is False

    assert result.markdown in result.table_path.read_text() and "tiny size" in result.table_path.read_text()
    assert payload["markdown"] == result.markdown
    assert len(payload["runs"]) == len(run_names) == 6
    assert all(
        (out / "runs" / n / RESULT_FILE).is_file() and (out / "runs" / n / RUN_INFO_FILE).is_file() for n in run_names
    )
    assert not (out / "models").exists()  # upcycles are converted into the verified cache, not into OUT
    assert not list((out / "runs").glob("*/checkpoints"))  # they only served a resume
    png = result.plot_path.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert any("tiny size" in line for line in lines) and any("FLOPs/token" in line for line in lines)
    assert payload["summary"]["findings"][0].startswith("seed noise")


def test_compare_reuses_finished_runs(compared, tiny_dense, texts):
    result, _ = compared
    lines: list[str] = []
    again = compare_main(
        size=TINY,
        out=result.out,
        seeds=2,
        variants=["dense", "e8g1t2-renorm", "e8g1t2-softmax", "e8g8t8"],
        base=tiny_dense,
        train=texts[0],
        heldout=texts[1],
        isolate=False,
        echo=lines.append,
    )
    assert sum("reusing" in line for line in lines) == 6
    assert again.summary["rows"] == result.summary["rows"]


def test_plot_main_draws_any_runs(compared, tmp_path):
    result, _ = compared
    runs = sorted((result.out / "runs").iterdir())
    png = plot_main(runs[:2], tmp_path / "two.png", title="two runs")
    assert png.read_bytes().startswith(PNG_MAGIC)
    run = load_run(runs[0])
    assert run.evals[0]["tokens"] == 0 and run.evals[-1]["tokens"] == TINY.steps * TINY.tokens_per_step


def test_model_cost_counts_only_active_experts(tiny_dense, tmp_path):
    dense = model_cost(tiny_dense)
    moe_dir = tmp_path / "moe"
    convert(tiny_dense, moe_dir, UpcycleOptions(experts=4, top_k=2))
    moe = model_cost(moe_dir)
    hidden, inter, layers = 64, 64, 2  # every layer is MoE here
    mlp = 3 * hidden * inter
    assert moe.experts == 4 and moe.top_k == 2 and dense.experts == 0
    # two experts' MLPs instead of one, plus the router (E x H) per layer
    assert moe.active_params - dense.active_params == layers * (mlp + 4 * hidden)
    assert moe.total_params - dense.total_params == layers * (3 * mlp + 4 * hidden)
    seq = 128
    assert dense.flops_per_token(seq) == 6 * dense.active_params + 12 * layers * hidden * seq


@pytest.mark.slow  # a whole Python process: imports, conversion-free training, its own log
def test_compare_runs_each_run_in_its_own_process(tiny_dense, texts, tmp_path):
    result = compare_main(
        size=TINY,
        out=tmp_path / "out",
        seeds=1,
        variants=["dense"],
        base=tiny_dense,
        train=texts[0],
        heldout=texts[1],
        echo=lambda _text: None,
    )
    assert [row["variant"] for row in result.summary["rows"]] == ["dense"]
    run_dir = result.out / "runs" / "dense-s0"
    spec = RunSpec.from_json(json.loads((run_dir / "spec.json").read_text()))
    # the worker ran the very spec it was given, and says so in its result (what a rerun is matched against)
    assert json.loads((run_dir / RESULT_FILE).read_text())["spec"] == spec.to_json()
    assert spec.recipe.run.output_dir == str(run_dir) and spec.recipe.batch.steps == TINY.steps
    assert "eval step 2: held-out loss" in (run_dir / "log.txt").read_text()


@pytest.mark.parametrize("name", sorted(SIZES))
def test_every_size_plans_runs_of_equal_tokens_that_survive_the_process_boundary(name, tiny_dense, texts, tmp_path):
    size = SIZES[name]
    paper = paper_recipe(size, tiny_dense, texts[0], texts[1], tmp_path / "runs")
    points = arm_points(tuple(VARIANTS.values()), VARIANTS["dense"], size, paper)
    plan = SweepPlan(None, (), tuple(points), (0, 1), tmp_path, seeds_for="best")
    best = next(p for p in points if p.name == "e8g1t2-renorm")
    specs = plan.first() + plan.then(best)
    assert len(specs) == plan.total == len(VARIANTS) + 2
    assert sorted((s.variant, s.seed) for s in specs if s.seed == 1) == [("dense", 1), ("e8g1t2-renorm", 1)]
    for spec in specs:
        recipe = spec.recipe
        batch = recipe.batch
        assert recipe.data.seq_len * batch.micro_batch_size * batch.grad_accum * batch.steps == size.tokens
        assert (recipe.optim.lr, recipe.run.precision, recipe.run.seed) == (size.lr, size.precision, spec.seed)
        shipped = paper_settings()  # the one paper recipe: its optimiser and router losses, the size's schedule
        assert recipe.moe == shipped.moe and (recipe.optim.betas, recipe.optim.weight_decay) == (
            shipped.optim.betas, shipped.optim.weight_decay,
        )  # fmt: skip
        assert spec.run_dir == tmp_path / "runs" / f"{spec.variant}-s{spec.seed}"
        assert RunSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
        if spec.variant == "dense":
            assert recipe.model.path == str(tiny_dense) and recipe.model.upcycle is None
            continue
        upcycle = recipe.model.upcycle  # what the worker converts with, into the verified cache
        assert recipe.model.source == str(tiny_dense) and recipe.model.path is None
        assert (upcycle.layers, upcycle.seed, upcycle.dtype) == (size.moe_layers, spec.seed, "float32")
        assert {k: getattr(upcycle, k) for k in VARIANTS[spec.variant].options} == VARIANTS[spec.variant].options


def test_bad_input(tmp_path):
    from upcycle.errors import OptionError

    with pytest.raises(OptionError, match="unknown size"):
        compare_main(size="huge", out=tmp_path)
    with pytest.raises(OptionError, match="unknown variant"):
        compare_main(size=TINY, out=tmp_path, variants=["e99"], base=tmp_path)
    with pytest.raises(OptionError, match="recipes or variants"):
        compare_main([tmp_path / "arm.yaml"], size=TINY, out=tmp_path, variants=["dense"])
    with pytest.raises(OptionError, match="no run folders"):
        plot_main([], tmp_path / "x.png")


def test_compare_scores_every_arm_on_the_same_downstream_tasks(tiny_dense, texts, tmp_path):
    result = compare_main(
        size=TINY,
        out=tmp_path / "out",
        seeds=1,
        variants=["dense", "e8g1t2-renorm"],
        base=tiny_dense,
        train=texts[0],
        heldout=texts[1],
        isolate=False,
        tasks=["arc_easy", "lambada"],
        task_limit=3,
        echo=lambda _text: None,
    )
    rows = {row["variant"]: row for row in result.summary["rows"]}
    for row in rows.values():
        run = load_run(result.out / "runs" / f"{row['runs'][0]}")
        scored = [r["step"] for r in read_metrics(result.out / "runs" / row["runs"][0]) if r["kind"] == "tasks"]
        assert scored == [0, TINY.steps]  # at the start and the end only
        assert row["downstream"] == {task: run.downstream["tasks"][task]["score"] for task in ("arc_easy", "lambada")}
        assert row["downstream_macro"] == run.downstream["macro_average"] and row["downstream_items"]["arc_easy"] == 3
    header = result.markdown.splitlines()[0]
    assert "| arc_easy | lambada | tasks avg |" in header and "Downstream tasks (%)" in result.markdown
    from upcycle.errors import OptionError

    with pytest.raises(OptionError, match="unknown task"):
        compare_main(size=TINY, out=tmp_path / "other", variants=["dense"], base=tiny_dense, tasks=["arc_eas"])
