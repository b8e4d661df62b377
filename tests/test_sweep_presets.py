"""The shipped sweep presets, seeds spent on the best setting, per-seed conversions, and runs side by side.

The preset tests load recipes only (seconds); the run tests train a tiny Llama with SmolLM2's tokenizer on real
Shakespeare text, as the other sweep tests do.
"""

from __future__ import annotations

import json
import os

import pytest
from train_helpers import moe_recipe, source_recipe

from upcycle.errors import OptionError
from upcycle.experiments.grid import parse_axis
from upcycle.experiments.points import grid_points
from upcycle.experiments.presets import PRESETS, describe_presets, size_sets, sweep_settings
from upcycle.experiments.run_data import load_run
from upcycle.experiments.runner import slot_environments
from upcycle.experiments.sizes import SIZES
from upcycle.experiments.sweep import sweep_main
from upcycle.experiments.sweep_plan import SweepPlan
from upcycle.train.recipe import load_recipe
from upcycle.train.shipped_recipes import find_recipe


@pytest.fixture(scope="module", autouse=True)
def cache(module_cache):
    return module_cache


def settings_of(preset: str | None, recipe: str | None = None, **options):
    defaults = {"size": None, "seeds": None, "seeds_for": None, "with_dense": False}
    grid = options.pop("grid", [])
    sets = options.pop("sets", [])
    return sweep_settings(recipe, grid, sets, preset=preset, **(defaults | options))


# ------------------------------------------------------------------------------------------------ presets


def test_each_preset_is_a_plain_sweep_of_the_shipped_recipe_at_the_cpu_size():
    lr, capacity, experts = (settings_of(name) for name in ("lr", "capacity", "experts"))
    cpu = size_sets("cpu")
    # a decade around the sized recipe's peak LR (3e-4), the size's own optim.lr giving way to the grid
    assert lr.grid == ["optim.lr=0.0001,0.0003,0.001"] and lr.with_dense
    assert lr.sets == [s for s in cpu if not s.startswith("optim.lr=")]
    assert capacity.grid == ["moe.capacity_factor=null,1.0,1.25,2.0"] and not capacity.with_dense
    assert capacity.sets == cpu
    assert experts.grid == ["model.upcycle.experts=2,4,8,16"] and experts.with_dense
    assert experts.sets == [*cpu, "model.upcycle.top_k=2", "model.upcycle.granularity=1"]
    for settings in (lr, capacity, experts):
        assert (settings.recipe, settings.size, settings.seeds, settings.seeds_for) == (
            "cpu-quickstart",
            "cpu",
            2,
            "best",
        )
        assert settings.command().startswith(f"upcycle sweep cpu-quickstart --grid {settings.grid[0]} --seeds 2 ")
        # every point of it is a valid recipe: the size's overrides and the grid's values together
        recipe = load_recipe(find_recipe(settings.recipe), [*settings.sets, settings.grid[0].split(",")[0]])
        assert (recipe.data.seq_len, recipe.batch.steps, recipe.model.upcycle.layers) == (128, 12, "24-29")
    assert {p for p in PRESETS} == {"lr", "capacity", "experts"}
    assert [line.split(":")[0] for line in describe_presets()] == ["lr", "capacity", "experts", "compare"]


def test_the_size_is_compares_and_a_users_recipe_keeps_its_own(tiny_pair, texts, tmp_path):
    dense, _ = tiny_pair
    gpu = settings_of("capacity", size="gpu")
    size = SIZES["gpu"]
    assert f"batch.steps={size.steps}" in gpu.sets and f"data.seq_len={size.seq_len}" in gpu.sets
    assert "model.upcycle.layers=all" in gpu.sets and "run.precision=bf16" in gpu.sets
    recipe = source_recipe(dense, tmp_path, texts, optim={"lr": 1e-3})
    mine = settings_of("lr", str(recipe), sets=["batch.steps=3"])
    assert mine.size == "recipe" and mine.sets == ["batch.steps=3"]  # no size overrides, the user's --set kept
    assert mine.grid == ["optim.lr=0.00033,0.001,0.0033"]  # around the recipe's own 1e-3
    assert settings_of(None, str(recipe), grid=["optim.lr=1e-3"]).sets == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"grid": ["optim.lr=1e-3"]}, "--preset lr sets the grid itself"),
        ({"size": "huge"}, "unknown size 'huge'"),
    ],
)
def test_presets_refuse_what_they_cannot_take(options, message):
    with pytest.raises(OptionError, match=message):
        settings_of("lr", **options)


def test_unknown_preset_and_no_recipe_are_refused():
    with pytest.raises(OptionError, match="unknown preset 'warmup'.*lr, capacity, experts, compare"):
        settings_of("warmup")
    with pytest.raises(OptionError, match="no recipe given"):
        settings_of(None)


def test_cli_lists_the_presets_and_sends_compare_to_compare(cli, tmp_path):
    listed = cli("sweep", "--list-presets")
    assert listed.exit_code == 0 and "capacity: what does dropping tokens" in listed.output
    refused = cli("sweep", "--preset", "compare", "--grid", "optim.lr=1e-3", "--out", tmp_path / "out")
    assert refused.exit_code == 2 and "--preset compare takes no --grid" in refused.output
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- seeds and upcycles


def test_each_seed_seeds_the_conversion_unless_the_sweep_holds_it(tiny_pair, texts, tmp_path):
    dense, _ = tiny_pair
    recipe = source_recipe(dense, tmp_path, texts)
    points = grid_points(recipe, [parse_axis("optim.lr=1e-3,3e-3")])
    seeded = SweepPlan(recipe, ("optim.lr",), tuple(points), (0, 1, 2), tmp_path / "out")
    assert [s.recipe.model.upcycle.seed for s in seeded.specs()] == [0, 0, 1, 1, 2, 2]
    held = SweepPlan(recipe, ("optim.lr",), tuple(points), (0, 1, 2), tmp_path / "out", seed_upcycle=False)
    assert {s.recipe.model.upcycle.seed for s in held.specs()} == {0}
    once = SweepPlan(recipe, ("optim.lr",), tuple(points), None, tmp_path / "out")  # the recipe's own seed
    assert [s.recipe.model.upcycle.seed for s in once.specs()] == [0, 0]
    with pytest.raises(OptionError, match="unknown --seeds-for 'most'"):
        SweepPlan(recipe, ("optim.lr",), tuple(points), (0, 1), tmp_path / "out", seeds_for="most")


@pytest.fixture(scope="module")
def best_only(tiny_pair, texts, tmp_path_factory):
    """E2 and E4 with their dense control; seed 1 only for the dense control and the better upcycle."""
    dense, _ = tiny_pair
    folder = tmp_path_factory.mktemp("best-only")
    recipe = source_recipe(dense, folder, texts, batch={"steps": 2}, run={"eval_interval": 1})
    lines: list[str] = []
    result = sweep_main(
        recipe,
        ["model.upcycle.experts=2,4"],
        seeds=2,
        seeds_for="best",
        with_dense=True,
        out=folder / "out",
        isolate=False,
        echo=lines.append,
    )
    return result, lines


def test_seeds_for_best_runs_the_best_setting_and_its_control_again(best_only):
    result, lines = best_only
    runs = result.out / "runs"
    at_seed_0 = {e: load_run(runs / f"model.upcycle.experts={e},seed=0").evals[-1]["eval_loss"] for e in (2, 4)}
    best = min(at_seed_0, key=at_seed_0.get)
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        [
            "dense,seed=0",
            "dense,seed=1",
            "model.upcycle.experts=2,seed=0",
            "model.upcycle.experts=4,seed=0",
            f"model.upcycle.experts={best},seed=1",
        ]
    )
    rows = {r["variant"]: r for r in result.summary["rows"]}
    assert rows[f"model.upcycle.experts={best}"]["seeds"] == [0, 1] and rows["dense"]["seeds"] == [0, 1]
    assert rows[f"model.upcycle.experts={6 - best}"]["seeds"] == [0]
    assert any(f"best at seed 0: model.upcycle.experts={best}; running it with 1 more seed" in x for x in lines)
    assert any("= 5 runs, in this process" in line for line in lines)
    # seed 1 converted its own upcycle (another router draw): another cache entry, still exact
    infos = [
        json.loads((runs / f"model.upcycle.experts={best},seed={s}" / "run_info.json").read_text()) for s in (0, 1)
    ]
    assert infos[0]["model"] != infos[1]["model"] and all(i["exact_at_init"] for i in infos)
    assert [i["upcycle"]["seed"] for i in infos] == [0, 1]


# -------------------------------------------------------------------------------------------- side by side


def test_each_slot_gets_its_own_visible_gpu_and_a_share_of_the_threads(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    slots = slot_environments(2)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["4", "6"]
    assert all(int(s["OMP_NUM_THREADS"]) == max(1, (os.cpu_count() or 1) // 2) for s in slots)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slot_environments(3)] == ["0", "1", "2"]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting is kept
    assert {s["OMP_NUM_THREADS"] for s in slot_environments(2)} == {"3"}


@pytest.mark.slow  # two sweeps, one of them two worker processes at once
def test_runs_side_by_side_measure_what_runs_one_by_one_measure(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    recipe = moe_recipe(moe, tmp_path, texts, batch={"steps": 2}, run={"eval_interval": 1})
    grid = ["optim.lr=1e-3,3e-3,1e-2"]
    lines: list[str] = []
    together = sweep_main(recipe, grid, out=tmp_path / "together", parallel=2, echo=lines.append)
    alone = sweep_main(recipe, grid, out=tmp_path / "alone", isolate=False, echo=lambda _: None)
    started = [i for i, line in enumerate(lines) if ": training on slot" in line]
    first_done = next(i for i, line in enumerate(lines) if "held-out loss" in line)
    assert len(started) == 3 and started[1] < first_done  # the second run started before the first finished
    assert any("= 3 runs, one process each, 2 at a time" in line for line in lines)
    for name in ("optim.lr=0.001,seed=0", "optim.lr=0.003,seed=0", "optim.lr=0.01,seed=0"):
        side, one = (load_run(folder / "runs" / name).evals for folder in (together.out, alone.out))
        # the same steps and tokens; the losses to float precision (a worker has half the threads)
        assert [(e["step"], e["tokens"]) for e in side] == [(e["step"], e["tokens"]) for e in one]
        assert [e["eval_loss"] for e in side] == pytest.approx([e["eval_loss"] for e in one], rel=1e-5)
    # the table lists the settings in grid order, whatever order the runs finished in
    assert [r["variant"] for r in together.summary["rows"]] == ["optim.lr=0.001", "optim.lr=0.003", "optim.lr=0.01"]
