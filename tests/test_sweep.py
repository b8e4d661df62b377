"""`upcycle sweep` on tiny real models: the grid, its validation, run names, the runs, and a sweep killed midway.

The planning tests load recipes only (seconds). The end-to-end tests train a tiny Llama with SmolLM2's tokenizer
on real Shakespeare text; the kill test runs the real CLI, each run in its own process, kills the whole process
group with SIGKILL in the middle of the second run, and checks that the rerun skips the finished run, resumes
the interrupted one and ends with exactly the table of a sweep that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import moe_recipe, run_cli, source_recipe

from upcycle.errors import OptionError, OutputError
from upcycle.experiments.grid import combine, parse_axis, split_values
from upcycle.experiments.naming import run_name, safe_name, variant_name
from upcycle.experiments.points import grid_points
from upcycle.experiments.run_data import RESULT_FILE, load_run
from upcycle.experiments.run_spec import RunSpec
from upcycle.experiments.sweep import sweep_main
from upcycle.experiments.sweep_plan import SweepPlan
from upcycle.train.metrics import read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def cache(module_cache):
    return module_cache


# ------------------------------------------------------------------------------------------------ the grid


def test_values_split_on_top_level_commas_only():
    assert split_values("1e-4,3e-4, 1e-3") == ["1e-4", "3e-4", "1e-3"]
    assert split_values("[0.8,0.9],[0.9,0.95]") == ["[0.8,0.9]", "[0.9,0.95]"]
    assert split_values("{experts: 4, top_k: 2},{experts: 8}") == ["{experts: 4, top_k: 2}", "{experts: 8}"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values("null,1.25,2.0") == ["null", "1.25", "2.0"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim.lr", "--grid 'optim.lr' is not key=value"),
        ("optim.lrr=1e-4,3e-4", "unknown key optim.lrr in --grid optim.lrr=1e-4,3e-4 (did you mean optim.lr?)"),
        ("learning_rate=1e-4", "did you mean optim.lr?"),
        ("model.upcycle.expert=2,4", "did you mean model.upcycle.experts?"),
        ("optim=1", "--grid optim: optim is a section"),
        ("optim.lr=", "has an empty value"),
        ("optim.lr=1e-4,,3e-4", "has an empty value"),
        ("run.output_dir=a,b", "the sweep sets run.output_dir itself"),
        ("run.export=true,false", "the sweep sets run.export itself"),
    ],
)
def test_bad_grid_options_are_refused_with_the_key(text, message):
    with pytest.raises(OptionError) as info:
        parse_axis(text)
    assert message in str(info.value)


def test_product_varies_the_last_key_fastest_and_zip_pairs_values():
    lr, cf = parse_axis("optim.lr=1e-4,3e-4"), parse_axis("moe.capacity_factor=null,1.25")
    assert combine([lr, cf]) == [
        ("optim.lr=1e-4", "moe.capacity_factor=null"),
        ("optim.lr=1e-4", "moe.capacity_factor=1.25"),
        ("optim.lr=3e-4", "moe.capacity_factor=null"),
        ("optim.lr=3e-4", "moe.capacity_factor=1.25"),
    ]
    assert combine([lr, cf], zip_axes=True) == [
        ("optim.lr=1e-4", "moe.capacity_factor=null"),
        ("optim.lr=3e-4", "moe.capacity_factor=1.25"),
    ]
    assert combine([]) == [()]  # no grid: the recipe itself
    with pytest.raises(OptionError, match="optim.lr has 2, model.upcycle.experts has 3"):
        combine([lr, parse_axis("model.upcycle.experts=2,4,8")], zip_axes=True)
    with pytest.raises(OptionError, match="--grid optim.lr is given twice"):
        combine([lr, parse_axis("optim.lr=1e-3")])


def test_run_names_are_readable_stable_and_safe():
    assert run_name({"optim.lr": 0.0003}, 0) == "optim.lr=0.0003,seed=0"
    assert run_name({"optim.lr": 0.001, "moe.capacity_factor": None}, 1) == (
        "optim.lr=0.001,moe.capacity_factor=null,seed=1"
    )
    assert run_name({"model.upcycle.experts": 8}, 0, control=True) == "dense,model.upcycle.experts=8,seed=0"
    assert variant_name({}) == "recipe" and variant_name({}, control=True) == "dense"
    # a path (or a list, or a mapping) is kept to safe characters, with a hash so no two points share a folder
    a, b = variant_name({"model.source": "/data/a b"}), variant_name({"model.source": "/data/a_b"})
    assert a != b and a == variant_name({"model.source": "/data/a b"})
    assert all(ch.isalnum() or ch in "._=,+-" for ch in a + b)
    long = safe_name("x" * 500)
    assert len(long) < 120 and long != safe_name("x" * 499)
    betas = variant_name({"optim.betas": [0.9, 0.95]})
    assert betas.startswith("optim.betas=_0.9,0.95_-") and "/" not in betas


# ------------------------------------------------------------------------------------------ the points


def test_points_take_the_values_the_recipe_reads(tiny_pair, texts, tmp_path):
    dense, moe = tiny_pair
    recipe = moe_recipe(moe, tmp_path, texts)
    axes = [parse_axis("optim.lr=3e-4,1e-3"), parse_axis("moe.capacity_factor=null,1.25")]
    points = grid_points(recipe, axes)
    assert [p.values for p in points] == [
        {"optim.lr": 0.0003, "moe.capacity_factor": None},
        {"optim.lr": 0.0003, "moe.capacity_factor": 1.25},
        {"optim.lr": 0.001, "moe.capacity_factor": None},
        {"optim.lr": 0.001, "moe.capacity_factor": 1.25},
    ]
    assert points[1].recipe.optim.lr == 0.0003 and points[1].recipe.moe.capacity_factor == 1.25
    assert points[0].name == "optim.lr=0.0003,moe.capacity_factor=null"
    assert points[0].label == "optim.lr=0.0003, moe.capacity_factor=null"

    # the dense control follows the keys a dense model has, and stays fixed along the router's
    upcycling = source_recipe(dense, tmp_path, texts)
    axes = [parse_axis("model.upcycle.experts=2,4"), parse_axis("optim.lr=1e-3,3e-3")]
    points = grid_points(upcycling, axes, with_dense=True)
    controls = [p for p in points if p.control]
    assert [p.values for p in controls] == [{"optim.lr": 0.001}, {"optim.lr": 0.003}]
    assert points[:2] == controls and len(points) == 6
    for control in controls:
        model = control.recipe.model
        assert model.path == str(dense) and model.source is None and model.upcycle is None
    assert [p.recipe.model.upcycle.experts for p in points[2:]] == [2, 2, 4, 4]


def test_every_point_is_validated_before_anything_runs(tiny_pair, texts, tmp_path, cache):
    dense, moe = tiny_pair
    recipe = moe_recipe(moe, tmp_path, texts)
    upcycling = source_recipe(dense, tmp_path, texts)
    out = tmp_path / "out"

    def refused(path, grid, **options) -> str:
        with pytest.raises(OptionError) as info:
            sweep_main(path, grid, out=out, echo=lambda _: None, **options)
        assert not out.exists(), "nothing is written before every point is valid"
        return str(info.value)

    assert "would train one run" in refused(recipe, [])  # no grid: `upcycle train`, not a sweep
    assert "--grid optim.lr=-1e-3: optim.lr: must be positive, got -0.001" in refused(recipe, ["optim.lr=1e-3,-1e-3"])
    assert "--grid optim.lr=fast: optim.lr: expected a number, got 'fast'" in refused(recipe, ["optim.lr=1e-3,fast"])
    assert "--grid batch.steps=2.5: batch.steps: expected an integer" in refused(recipe, ["batch.steps=2,2.5"])
    message = refused(recipe, ["optim.lr=1e-3,0.001"])
    assert "optim.lr=1e-3 and optim.lr=0.001 are the same setting (optim.lr=0.001)" in message
    # the conversion options too: one the options forbid, and one the model cannot take (it has layers 0 and 1)
    assert "--grid model.upcycle.top_k=8: model.upcycle: --top-k 8 exceeds the number of experts 4" in refused(
        upcycling, ["model.upcycle.top_k=2,8"]
    )
    message = refused(upcycling, ["model.upcycle.layers=1,5"])
    assert message.startswith("--grid model.upcycle.layers=5: model.upcycle:") and "5" in message
    # the dense control needs a source to train as it is, and cannot take model.path or the whole section
    assert "--with-dense needs a recipe that upcycles a dense model.source" in refused(
        recipe, ["optim.lr=1e-3"], with_dense=True
    )
    assert "--with-dense cannot sweep model.upcycle:" in refused(
        upcycling, ["model.upcycle={experts: 2},{experts: 4}"], with_dense=True
    )
    assert "--seeds and --grid run.seed both set the seeds" in refused(recipe, ["run.seed=1,2"], seeds=2)
    assert "--seeds and --set run.seed both set the seed" in refused(recipe, [], seeds=2, sets=["run.seed=3"])
    assert "--set optim.lr and --grid optim.lr are both given" in refused(
        recipe, ["optim.lr=1e-3"], sets=["optim.lr=1e-2"]
    )
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds files sweep did not write.*--beside-others"):
        sweep_main(recipe, ["optim.lr=1e-3"], out=out, echo=lambda _: None)


def test_cli_reports_a_bad_point_in_one_line(tiny_pair, texts, tmp_path, cli):
    _, moe = tiny_pair
    recipe = moe_recipe(moe, tmp_path, texts)
    result = cli("sweep", recipe, "--grid", "optim.lr=1e-3,-1", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "--grid optim.lr=-1: optim.lr: must be positive" in result.output and "Traceback" not in result.output


def test_plan_runs_seed_by_seed_each_in_its_own_resumable_folder(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    recipe = moe_recipe(moe, tmp_path, texts, run={"checkpoints": False, "eval_interval": 3, "export": True})
    points = grid_points(recipe, [parse_axis("optim.lr=1e-3,3e-3")])
    plan = SweepPlan(recipe, ("optim.lr",), tuple(points), (0, 1), tmp_path / "out")
    specs = plan.specs()
    assert [(s.variant, s.seed) for s in specs] == [
        ("optim.lr=0.001", 0),
        ("optim.lr=0.003", 0),
        ("optim.lr=0.001", 1),
        ("optim.lr=0.003", 1),
    ]
    for spec in specs:
        run = spec.recipe.run
        assert spec.run_dir == tmp_path / "out" / "runs" / f"{spec.variant},seed={spec.seed}"
        assert run.seed == spec.seed and spec.resumable
        # checkpoints (at every evaluation, as the recipe had none) so a killed run resumes; nothing else written
        assert (run.checkpoints, run.checkpoint_interval, run.keep_checkpoints) == (True, 3, 1)
        assert not run.export and not run.tensorboard
        assert spec.sweep == {"point": {"optim.lr": spec.recipe.optim.lr}, "control": False}
        assert RunSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert "2 point(s) x seeds 0, 1 = 4 runs" in plan.describe()


# ---------------------------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def swept(tiny_pair, texts, tmp_path_factory, cache):
    """A real sweep in this process: E2 and E4 upcycles of the tiny model and their dense control, two seeds."""
    dense, _ = tiny_pair
    folder = tmp_path_factory.mktemp("sweep")
    recipe = source_recipe(dense, folder, texts, batch={"steps": 2}, run={"eval_interval": 1, "checkpoint_interval": 1})
    lines: list[str] = []
    return sweep_experts(recipe, folder / "out", lines.append), lines, recipe


def sweep_experts(recipe: Path, out: Path, echo):
    """E2 and E4 with their dense control, seeds 0 and 1, in this process."""
    return sweep_main(
        recipe, ["model.upcycle.experts=2,4"], seeds=2, with_dense=True, out=out, isolate=False, echo=echo
    )


def test_sweep_writes_table_json_and_a_plot_per_key(swept):
    result, lines, _ = swept
    out = result.out
    summary = json.loads(result.json_path.read_text())["summary"]
    rows = {row["variant"]: row for row in summary["rows"]}
    assert list(rows) == ["dense", "model.upcycle.experts=2", "model.upcycle.experts=4"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        f"{variant},seed={seed}" for variant in rows for seed in (0, 1)
    )
    for row in summary["rows"]:
        assert row["seeds"] == [0, 1] and row["loss_equal_tokens_std"] is not None
        finals = [
            [r for r in read_metrics(out / "runs" / n) if r["kind"] == "eval"][-1]["eval_loss"] for n in row["runs"]
        ]
        assert row["loss_equal_tokens"] == pytest.approx(sum(finals) / 2, rel=1e-12)
        assert row["ppl_equal_tokens"] == pytest.approx(math.exp(row["loss_equal_tokens"]))
        assert f"{row['loss_equal_tokens']:.4f} ± {row['loss_equal_tokens_std']:.4f}" in result.markdown
    dense = rows["dense"]
    assert dense["control"] and dense["point"] == {} and dense["improvement_equal_tokens_pct"] == 0.0
    for experts in (2, 4):
        row = rows[f"model.upcycle.experts={experts}"]
        assert row["point"] == {"model.upcycle.experts": experts} and row["control_variant"] == "dense"
        assert row["exact_at_init"] is True  # each value converted into the verified cache, exactly
        assert row["step0_loss"] == pytest.approx(dense["step0_loss"], rel=1e-4)
        assert row["flops_per_token"] > dense["flops_per_token"]  # top-2 of E experts: twice the dense MLP
        expected = 100 * (dense["loss_equal_tokens"] - row["loss_equal_tokens"]) / dense["loss_equal_tokens"]
        assert row["improvement_equal_tokens_pct"] == pytest.approx(expected)
    best = min((r for r in summary["rows"] if not r["control"]), key=lambda r: r["loss_equal_tokens"])
    assert [r["variant"] for r in summary["rows"] if r["best"]] == [best["variant"]] == [summary["best"]]
    best_line = next(line for line in result.markdown.splitlines() if line.startswith("| ★"))
    assert f"| {best['point']['model.upcycle.experts']} |" in best_line
    assert "| dense control | – |" in result.markdown
    assert summary["findings"][1].startswith(f"best setting at equal tokens: {best['label']}")

    png = (out / "sweep-model.upcycle.experts.png").read_bytes()
    assert result.plot_paths == [out / "sweep-model.upcycle.experts.png"]
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert result.markdown in result.table_path.read_text()
    assert not list((out / "runs").glob("*/checkpoints"))  # they only served a resume
    assert any("dense control: one run for every value of model.upcycle.experts" in line for line in lines)


def test_a_sweep_run_again_reuses_every_finished_run(swept):
    result, _, recipe = swept
    lines: list[str] = []
    again = sweep_experts(recipe, result.out, lines.append)
    assert sum("reusing the finished run" in line for line in lines) == 6
    assert again.summary == result.summary


def test_zipped_keys_with_a_capacity_factor_report_dropped_tokens(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    recipe = moe_recipe(moe, tmp_path, texts, batch={"steps": 2}, run={"eval_interval": 2})
    result = sweep_main(
        recipe,
        ["optim.lr=1e-3,3e-3", "moe.capacity_factor=null,0.5"],
        zip_axes=True,
        out=tmp_path / "out",
        isolate=False,
        echo=lambda _: None,
    )
    rows = result.summary["rows"]
    assert [r["point"] for r in rows] == [
        {"optim.lr": 0.001, "moe.capacity_factor": None},
        {"optim.lr": 0.003, "moe.capacity_factor": 0.5},
    ]
    assert rows[0]["dropped_fraction"] is None and rows[1]["dropped_fraction"] > 0
    # capacity 0.5 leaves room for half of the T*k assignments: every layer drops at least half of them
    per_layer = rows[1]["dropped_per_layer"]
    assert list(per_layer) == ["0", "1"] and all(0.5 <= d < 1.0 for d in per_layer.values())
    assert rows[1]["dropped_fraction"] == pytest.approx(sum(per_layer.values()) / 2, abs=1e-6)
    assert "| setting | layer 0 | layer 1 |" in result.markdown
    assert "| dropped |" in result.markdown.splitlines()[0] and "Δ vs dense" not in result.markdown
    assert [p.name for p in result.plot_paths] == ["sweep-optim.lr.png", "sweep-moe.capacity_factor.png"]


# ------------------------------------------------------------------------------- killed midway, run again


@pytest.mark.slow  # three sweeps through the real CLI, every run in its own process
def test_a_sweep_killed_midway_resumes_to_the_table_of_an_uninterrupted_one(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    recipe = moe_recipe(moe, tmp_path, texts, batch={"steps": 8}, run={"eval_interval": 2, "checkpoint_interval": 2})
    grid = ["--grid", "optim.lr=1e-3,3e-3"]
    first, second = "optim.lr=0.001,seed=0", "optim.lr=0.003,seed=0"

    reference = run_cli("sweep", str(recipe), *grid, "--out", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "upcycle", "sweep", str(recipe), *grid, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the sweep and the run it is in die together
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "runs" / first / RESULT_FILE).is_file() and list((out / "runs" / second).glob("checkpoints/step-*")):
            break
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (out / "runs" / first / RESULT_FILE).is_file()
    assert not (out / "runs" / second / RESULT_FILE).exists(), "the kill must land while the second run trains"
    partial = [r["step"] for r in read_metrics(out / "runs" / second) if r["kind"] == "train"]
    assert 2 <= len(partial) < 8
    finished_at = (out / "runs" / first / RESULT_FILE).stat().st_mtime_ns

    resumed = run_cli("sweep", str(recipe), *grid, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[1/2] optim.lr=0.001 seed 0: reusing the finished run" in resumed.stdout
    assert "[2/2] optim.lr=0.003 seed 0: resuming from step" in resumed.stdout
    assert (out / "runs" / first / RESULT_FILE).stat().st_mtime_ns == finished_at  # not run again
    log = (out / "runs" / second / "log.txt").read_text()
    assert "resumed from the checkpoint of step" in log
    assert json.loads((out / "runs" / second / RESULT_FILE).read_text())["resumed_from"] >= 2

    def measured(folder: Path) -> list[dict]:
        rows = json.loads((folder / "sweep.json").read_text())["summary"]["rows"]
        return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]

    assert measured(out) == measured(tmp_path / "reference")  # the same held-out losses, bit for bit
    for name in (first, second):
        assert load_run(out / "runs" / name).evals == load_run(tmp_path / "reference" / "runs" / name).evals
    table = (out / "sweep.md").read_text()
    for row in measured(out):
        assert f"{row['loss_equal_tokens']:.4f}" in table
