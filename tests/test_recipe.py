"""Training recipes: every mistake is caught at load time and named by its dotted key; shipped recipes load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from upcycle.errors import OptionError
from upcycle.train.batch_size import resolve_batch
from upcycle.train.recipe import TrainRecipe, load_recipe, recipe_from_dict
from upcycle.train.recipe_paths import data_files
from upcycle.train.recipe_sections import (
    BatchSection,
    DataSection,
    ModelSection,
    OptimSection,
    ParallelSection,
    RunSection,
)
from upcycle.train.resume import resume_point


def batch_of(recipe: TrainRecipe, world_size: int):
    return resolve_batch(recipe.batch, recipe.data.seq_len, world_size)


RECIPES = Path(__file__).resolve().parent.parent / "upcycle" / "recipes"
SHIPPED = sorted(RECIPES.glob("*.yaml"))
GPU_MOE = ("paper-e8g1t2", "paper-e8g8t8", "drop-upcycling")


def minimal(**sections: dict) -> dict:
    """The smallest valid recipe, with some sections' keys replaced or added."""
    data = {
        "model": {"path": "model"},
        "data": {"train": "text/*.txt", "eval": ["heldout.txt"], "seq_len": 8},
        "batch": {"micro_batch_size": 2, "steps": 10},
        "run": {"output_dir": "out"},
    }
    for name, keys in sections.items():
        data[name] = {**data.get(name, {}), **keys}
    return data


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A recipe folder with training and held-out text beside it."""
    (tmp_path / "text").mkdir()
    for name in ("b.txt", "a.txt", "c.jsonl"):
        (tmp_path / "text" / name).write_text("some text\n")
    (tmp_path / "heldout.txt").write_text("held out\n")
    return tmp_path


def write(folder: Path, data: dict | str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def load(folder: Path, data: dict | str, *overrides: str) -> TrainRecipe:
    return load_recipe(write(folder, data), list(overrides))


def error(folder: Path, data: dict | str, *overrides: str) -> str:
    with pytest.raises(OptionError) as info:
        load(folder, data, *overrides)
    return str(info.value)


# ------------------------------------------------------------------------------------------ shipped recipes


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipe_validates_offline(path: Path) -> None:
    recipe = load_recipe(path, resolve_assets=False)  # no download: asset: names stay as they are
    assert recipe.source == str(path)
    assert recipe.moe.aux_loss_coef == 0.01  # the paper's best
    assert recipe.optim.schedule == "cosine" and recipe.optim.warmup_steps > 0
    assert Path(recipe.run.output_dir).is_absolute()
    assert batch_of(recipe, 1).steps > 0
    if recipe.batch.global_batch_tokens:  # the documented multi-GPU launch divides evenly
        eight = load_recipe(path, ["batch.micro_batch_size=4"], resolve_assets=False)
        assert batch_of(eight, 8).tokens_per_step == batch_of(recipe, 1).tokens_per_step


def test_shipped_recipe_set_is_complete() -> None:
    assert {p.stem for p in SHIPPED} >= {"cpu-quickstart", *GPU_MOE, "dense-control"}
    quick = load_recipe(RECIPES / "cpu-quickstart.yaml", resolve_assets=False)
    assert quick.run.precision == "fp32" and quick.data.seq_len <= 512
    assert quick.data.train == ("asset:shakespeare/train",) and quick.data.eval == ("asset:shakespeare/heldout",)


@pytest.mark.parametrize("name", GPU_MOE)
def test_dense_control_is_the_same_recipe_on_the_dense_model(name: str) -> None:
    """The paper's comparison needs identical data, budget and schedule; only the model and output differ."""
    moe = load_recipe(RECIPES / f"{name}.yaml", resolve_assets=False).to_dict()
    dense = load_recipe(RECIPES / "dense-control.yaml", resolve_assets=False).to_dict()
    assert dense["model"]["path"] == "asset:smollm2"
    for section in ("data", "batch", "optim", "moe"):
        assert moe[section] == dense[section], section
    assert {k: v for k, v in moe["run"].items() if k != "output_dir"} == {
        k: v for k, v in dense["run"].items() if k != "output_dir"
    }
    assert moe["run"]["output_dir"] != dense["run"]["output_dir"]


# ----------------------------------------------------------------------------------------- keys and types


def test_minimal_recipe_gets_the_documented_defaults(folder: Path) -> None:
    recipe = load(folder, minimal())
    assert recipe.optim == OptimSection()
    assert recipe.moe.aux_loss_coef == 0.01 and recipe.moe.capacity_factor is None
    assert recipe.model.experts_implementation == "auto" and recipe.run.precision == "auto"
    assert recipe.data.seq_len == 8 and recipe.data.eval_sequences == 64 and recipe.data.text_field == "text"


@pytest.mark.parametrize(
    ("section", "key", "message"),
    [
        ("data", "seqlen", "unknown key data.seqlen (did you mean data.seq_len?)"),
        ("optim", "learning_rate", "unknown key optim.learning_rate"),
        ("data", "lr", "unknown key data.lr (did you mean optim.lr?)"),  # right name, wrong section
        ("batch", "micro_batch", "unknown key batch.micro_batch (did you mean batch.micro_batch_size?)"),
    ],
)
def test_unknown_key_is_named_with_a_suggestion(folder: Path, section: str, key: str, message: str) -> None:
    text = error(folder, minimal(**{section: {key: 1}}))
    assert message in text
    assert "Fix:" in text


def test_unknown_top_level_key_is_named(folder: Path) -> None:
    data = minimal()
    data["optimizer"] = {"lr": 1.0}
    assert "unknown key optimizer (did you mean optim?)" in error(folder, data)
    data = minimal()
    data["seq_len"] = 8
    assert "unknown key seq_len (did you mean data.seq_len?)" in error(folder, data)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("optim", "lr", "fast", "optim.lr: expected a number, got 'fast'"),
        ("data", "seq_len", "long", "data.seq_len: expected an integer, got 'long'"),
        ("data", "seq_len", 8.5, "data.seq_len: expected an integer, got 8.5"),
        ("data", "train", 3, "data.train: expected a list of strings, got 3"),
        ("data", "eval", ["heldout.txt", 7], "data.eval[1]: expected a string, got 7"),
        ("optim", "betas", [0.9], "optim.betas: expected a list of 2 numbers"),
        ("optim", "betas", [0.9, "x"], "optim.betas[1]: expected a number, got 'x'"),
        ("model", "path", 7, "model.path: expected a string, got 7"),
        ("run", "compile", "yes please", "run.compile: expected true or false, got 'yes please'"),
        ("optim", "lr", float("nan"), "optim.lr: expected a finite number"),
    ],
)
def test_wrong_type_is_named(folder: Path, section: str, key: str, value: object, message: str) -> None:
    assert message in error(folder, minimal(**{section: {key: value}}))


def test_bool_is_not_an_int_and_int_is_not_a_bool(folder: Path) -> None:
    assert "batch.steps: expected an integer, got true" in error(folder, minimal(batch={"steps": True}))
    assert "optim.lr: expected a number, got true" in error(folder, minimal(optim={"lr": True}))
    assert "run.tensorboard: expected true or false, got 1" in error(folder, minimal(run={"tensorboard": 1}))


def test_integer_fields_reject_exponents_with_the_integer_spelled_out(folder: Path) -> None:
    text = error(folder, "model: {path: m}\ndata: {train: heldout.txt}\nbatch: {tokens: 1e9}\nrun: {output_dir: o}\n")
    assert "batch.tokens: expected an integer, got '1e9'" in text
    assert "1_000_000_000" in text


def test_float_fields_accept_ints_and_yaml11_exponent_strings(folder: Path) -> None:
    # PyYAML (YAML 1.1) reads 1e-3 as the string '1e-3', 1.0e-3 as a float: both must mean 0.001.
    text = yaml.safe_dump(minimal()) + "optim:\n  lr: 1e-3\n  min_lr: 1.0e-4\n  eps: 1E-8\n  grad_clip: 2\n"
    recipe = load(folder, text)
    assert recipe.optim.lr == 1e-3 and recipe.optim.min_lr == 1e-4 and recipe.optim.eps == 1e-8
    assert recipe.optim.grad_clip == 2.0 and isinstance(recipe.optim.grad_clip, float)


def test_missing_required_keys_are_named(folder: Path) -> None:
    data = minimal()
    del data["model"]["path"]
    assert "the recipe sets neither model.path nor model.source" in error(folder, data)
    data = minimal()
    del data["batch"]
    assert "the recipe sets neither batch.steps nor batch.tokens" in error(folder, data)


def test_a_recipe_file_without_output_dir_runs_under_runs_slash_its_name(folder: Path, monkeypatch) -> None:
    monkeypatch.chdir(folder)
    data = minimal()
    del data["run"]
    recipe = load_recipe(write(folder, data))
    assert recipe.run.output_dir == str(folder / "runs" / "recipe")
    built = minimal()
    del built["run"]
    with pytest.raises(OptionError, match="missing required key run.output_dir"):
        recipe_from_dict(built, folder)  # a recipe built in code has no file name to go by


def test_empty_section_means_defaults_and_a_scalar_section_is_rejected(folder: Path) -> None:
    recipe = load(folder, yaml.safe_dump(minimal()) + "moe:\n")
    assert recipe.moe.aux_loss_coef == 0.01
    assert "moe: expected a mapping of keys, got 3" in error(folder, minimal() | {"moe": 3})


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"optim": {"lr": 0}}, "optim.lr: must be positive"),
        ({"optim": {"lr": 1e-4, "min_lr": 1e-3}}, "optim.min_lr: must be between 0 and optim.lr"),
        ({"optim": {"min_lr": -1.0}}, "optim.min_lr: must be between 0 and optim.lr"),
        ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas[1]: must be in [0, 1)"),
        ({"optim": {"warmup_steps": -1}}, "optim.warmup_steps: must be 0 or more"),
        ({"optim": {"schedule": "wsd"}}, "optim.schedule: unknown value 'wsd'"),
        ({"optim": {"grad_clip": 0}}, "optim.grad_clip: must be positive"),
        ({"data": {"seq_len": 1}}, "data.seq_len: must be at least 2"),
        ({"data": {"train": []}}, "data.train: is empty"),
        ({"moe": {"capacity_factor": 0}}, "moe.capacity_factor: must be positive"),
        ({"moe": {"aux_loss_coef": -0.01}}, "moe.aux_loss_coef: must be 0 or more"),
        ({"run": {"precision": "fp16"}}, "run.precision: unknown value 'fp16'"),
        ({"run": {"keep_checkpoints": 0}}, "run.keep_checkpoints: must be at least 1"),
        ({"model": {"experts_implementation": "triton"}}, "model.experts_implementation: unknown value 'triton'"),
        ({"batch": {"micro_batch_size": 0}}, "batch.micro_batch_size: must be at least 1"),
    ],
)
def test_out_of_range_values_are_named(folder: Path, sections: dict, message: str) -> None:
    assert message in error(folder, minimal(**sections))


def test_yaml_mistakes_are_reported_with_their_place(folder: Path) -> None:
    assert "recipe.yaml, line 2, column 1: found character" in error(folder, "model:\n\tpath: m\n")
    assert "'lr' is given twice" in error(folder, yaml.safe_dump(minimal()) + "optim:\n  lr: 1.0\n  lr: 2.0\n")
    assert "must be a mapping of sections" in error(folder, "- a\n- b\n")
    with pytest.raises(OptionError, match="does not exist"):
        load_recipe(folder / "nope.yaml")


@pytest.mark.parametrize(
    ("sections", "line"),
    [
        (
            {"model": {"source": "dense", "upcycle": {"experts": "x"}}},
            "model.upcycle.experts: expected an integer, got 'x'. "
            "Fix: set model.upcycle.experts to an integer, e.g. 1000 or 1_000_000.",
        ),
        (
            {"model": {"source": "dense", "upcycle": {"noise": -1}}},
            "model.upcycle.noise: must be 0 or more, got -1. Fix: use e.g. 0.01.",
        ),
        (
            {"model": {"source": "dense", "upcycle": {"router": "sigmoid"}}},
            "model.upcycle.router: unknown value 'sigmoid'. Fix: choose one of renorm, softmax-topk.",
        ),
        (
            {"optim": {"betas": [0.9, 1.5]}},
            "optim.betas[1]: must be in [0, 1), got 1.5. Fix: use e.g. 0.95.",
        ),
        (
            {"run": {"seed": -1}},
            "run.seed: must be in [0, 2**63), got -1. Fix: use e.g. 0.",
        ),
    ],
)
def test_a_validation_error_is_one_line_naming_the_dotted_key(folder: Path, sections: dict, line: str) -> None:
    """Pydantic's error, at any depth, becomes the one line users see (problem and fix), never its dump."""
    data = minimal(**sections)
    if "model" in sections:
        del data["model"]["path"]
    assert error(folder, data) == line


def test_upcycle_shard_size_reads_a_size_as_the_command_line_does(folder: Path) -> None:
    """model.upcycle is convert's options, --shard-size included: GB = 1e9, GiB = 2^30, an integer is bytes."""
    data = minimal(model={"source": "dense", "upcycle": {"experts": 4, "shard_size": "500MB"}})
    del data["model"]["path"]
    assert load(folder, data).model.upcycle.shard_size == 500 * 1000**2
    assert load(folder, data, "model.upcycle.shard_size=2GiB").model.upcycle.shard_size == 2 * 1024**3
    assert load(folder, data, "model.upcycle.shard_size=3000000").model.upcycle.shard_size == 3_000_000
    default = load(folder, data, "model.upcycle={experts: 4}")
    assert (
        default.model.upcycle.shard_size == 2 * 1000**3 and default.to_dict()["model"]["upcycle"]["shard_size"] == 2e9
    )
    assert error(folder, data, "model.upcycle.shard_size=2XB").startswith(
        "model.upcycle.shard_size: '2XB' is not a size. Fix: write it like 2GB"
    )
    assert "model.upcycle.shard_size: must be at least 1_000_000, got 5." in error(
        folder, data, "model.upcycle.shard_size=5"
    )


def test_sections_are_validated_when_built_in_code_too() -> None:
    with pytest.raises(OptionError, match="optim.lr: must be positive"):
        OptimSection(lr=-1.0)
    with pytest.raises(OptionError, match="data.seq_len: expected an integer"):
        DataSection(train=("a.txt",), seq_len="8")  # type: ignore[arg-type]
    recipe_model = ModelSection(path="m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe_model.path = "other"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------- --set


def test_set_overrides_nested_list_bool_float_and_null(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)
    (folder / "x.txt").write_text("x")
    (folder / "y.txt").write_text("y")
    recipe = load(
        folder,
        minimal(),
        "optim.lr=1e-4",
        "optim.betas=[0.8, 0.9]",
        "run.tensorboard=false",
        "data.train=[x.txt, y.txt]",
        "optim.grad_clip=null",
        "moe.capacity_factor=1.25",
        "data.seq_len=16",
    )
    assert recipe.optim.lr == 1e-4 and recipe.optim.betas == (0.8, 0.9)
    assert recipe.run.tensorboard is False
    assert recipe.data.train == (str(folder / "x.txt"), str(folder / "y.txt"))
    assert recipe.optim.grad_clip is None and recipe.moe.capacity_factor == 1.25 and recipe.data.seq_len == 16


def test_set_paths_are_relative_to_the_current_directory(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = folder / "cwd"
    elsewhere.mkdir()
    (elsewhere / "mine.txt").write_text("mine")
    monkeypatch.chdir(elsewhere)
    recipe = load(folder, minimal(), "data.train=mine.txt", "run.output_dir=runs/x", "model.path=m2")
    assert recipe.data.train == (str(elsewhere / "mine.txt"),)
    assert recipe.run.output_dir == str(elsewhere / "runs" / "x") and recipe.model.path == str(elsewhere / "m2")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.seqlen=16", "unknown key data.seqlen in --set data.seqlen=16 (did you mean data.seq_len?)"),
        ("optimizer.lr=1e-4", "unknown key optimizer.lr in --set optimizer.lr=1e-4 (did you mean optim.lr?)"),
        ("optim.lr.peak=1", "unknown key optim.lr.peak"),
        ("optim.lr", "--set 'optim.lr' is not key=value"),
        ("=3", "--set '=3' is not key=value"),
        ("optim=3", "--set optim: optim is a section"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("run.tensorboard=maybe", "run.tensorboard: expected true or false, got 'maybe'"),
    ],
)
def test_bad_set_is_named(folder: Path, override: str, message: str) -> None:
    assert message in error(folder, minimal(), override)


def test_set_does_not_change_the_file_data(folder: Path) -> None:
    data = minimal()
    path = write(folder, data)
    before = path.read_text()
    load_recipe(path, ["optim.lr=1e-4", "batch.steps=3"])
    assert path.read_text() == before
    assert load_recipe(path).batch.steps == 10


# ------------------------------------------------------------------------------------------ paths and data


def test_relative_paths_resolve_against_the_recipe_folder(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder / "text")  # the current directory must not matter
    recipe = load(folder, minimal(data={"cache_dir": "cache"}))
    assert recipe.model.path == str(folder / "model")
    assert recipe.run.output_dir == str(folder / "out")
    assert recipe.data.cache_dir == str(folder / "cache")
    assert recipe.data.eval == (str(folder / "heldout.txt"),)


def test_globs_expand_to_sorted_absolute_files(folder: Path) -> None:
    recipe = load(folder, minimal(data={"train": ["text/*.txt", "text/c.jsonl"]}))
    assert recipe.data.train == tuple(str(folder / "text" / n) for n in ("a.txt", "b.txt", "c.jsonl"))


def test_folder_expands_to_its_text_files(folder: Path) -> None:
    (folder / "text" / "notes.md").write_text("not training text")
    recipe = load(folder, minimal(data={"train": "text"}))
    assert recipe.data.train == tuple(str(folder / "text" / n) for n in ("a.txt", "b.txt", "c.jsonl"))


def test_missing_data_is_named(folder: Path) -> None:
    assert "data.train: 'nothing/*.txt' matches no file" in error(folder, minimal(data={"train": "nothing/*.txt"}))
    assert "data.eval: 'gone.txt' does not exist" in error(folder, minimal(data={"eval": "gone.txt"}))
    (folder / "table.csv").write_text("a,b")
    assert "table.csv is not a supported text file" in error(folder, minimal(data={"train": "table.csv"}))


def test_data_entries_keep_their_order_and_each_expands_sorted(folder: Path) -> None:
    """The recipe orders the data; a glob or folder never depends on the file system's listing order."""
    (folder / "text" / "sub").mkdir()
    (folder / "text" / "sub" / "d.jsonl").write_text('{"text": "x"}\n')
    (folder / "text" / "sub" / "skip.csv").write_text("a,b")
    got = data_files(("heldout.txt", "text/*.txt", "text/sub"), "data.train", folder, resolve_assets=False)
    assert got == tuple(str(folder / n) for n in ("heldout.txt", "text/a.txt", "text/b.txt", "text/sub/d.jsonl"))
    with pytest.raises(OptionError, match=r"data.train: 'nothing/\*.txt' matches no file"):
        data_files(("nothing/*.txt",), "data.train", folder, resolve_assets=False)


def test_held_out_text_must_not_be_trained_on(folder: Path) -> None:
    text = error(folder, minimal(data={"train": "text/*.txt", "eval": "text/a.txt"}))
    assert "data.eval" in text and "a.txt" in text and "also in data.train" in text


def test_assets_are_checked_by_name_and_kept_when_not_resolved(folder: Path) -> None:
    data = minimal(data={"train": "asset:shakespeare/train", "eval": "asset:shakespeare/heldout"})
    data["model"]["path"] = "asset:smollm2"
    recipe = load_recipe(write(folder, data), resolve_assets=False)
    assert recipe.data.train == ("asset:shakespeare/train",) and recipe.model.path == "asset:smollm2"
    with pytest.raises(OptionError, match="data.train: unknown asset 'asset:austen'"):
        load_recipe(write(folder, minimal(data={"train": "asset:austen"})), resolve_assets=False)
    with pytest.raises(OptionError, match="model.path: unknown asset"):
        load_recipe(write(folder, minimal(model={"path": "asset:llama"})), resolve_assets=False)


# ------------------------------------------------------------------------------------------------ parallel


def test_parallel_section_defaults_set_and_round_trip(folder: Path) -> None:
    recipe = load(folder, minimal())
    assert recipe.parallel == ParallelSection()
    assert recipe.to_dict()["parallel"] == {"fsdp": None, "ep": 1, "replicate": 1, "tp": 1}
    laid_out = load(folder, minimal(parallel={"replicate": 2}), "parallel.ep=8", "parallel.fsdp=4")
    assert (laid_out.parallel.fsdp, laid_out.parallel.ep, laid_out.parallel.replicate, laid_out.parallel.tp) == (
        4,
        8,
        2,
        1,
    )
    assert recipe_from_dict(laid_out.to_dict(), Path("/somewhere/else")) == laid_out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("parallel.ep=0", "parallel.ep: must be at least 1, got 0"),
        ("parallel.replicate=-2", "parallel.replicate: must be at least 1, got -2"),
        ("parallel.tp=0", "parallel.tp: must be at least 1, got 0"),
        ("parallel.fsdp=0", "parallel.fsdp: must be at least 1, got 0"),
        ("parallel.ep=2.0", "parallel.ep: expected an integer, got 2.0"),
        ("parallel.fsdp=true", "parallel.fsdp: expected an integer, got true"),
        ("parallel.ep_degree=2", "unknown key parallel.ep_degree"),
        ("parallel.expert_parallel_degree=2", "(did you mean parallel.ep?)"),
        ("parallel=8", "--set parallel: parallel is a section"),
    ],
)
def test_parallel_degrees_must_be_positive_integers(folder: Path, override: str, message: str) -> None:
    assert message in error(folder, minimal(), override)


def test_parallel_section_is_validated_when_built_in_code_too() -> None:
    assert ParallelSection(fsdp=None).fsdp is None
    with pytest.raises(OptionError, match="parallel.ep: must be at least 1"):
        ParallelSection(ep=0)


def test_resume_on_another_parallel_layout_is_no_change(folder: Path) -> None:
    """A run may resume under another layout: the parallel section is not what is trained."""
    saved = load(folder, minimal()).to_dict()
    state = {"step": 4, "recipe": saved, "global_batch_sequences": 2, "data_position": 8}
    moved = load(folder, minimal(), "parallel.ep=2", "parallel.replicate=2", "parallel.fsdp=4", "optim.lr=1e-4")
    point = resume_point(state, moved.to_dict(), global_batch=2, world_size=8, allow=set())
    assert point.position == 8
    assert point.notes == ["changed: optim.lr: 0.0003 -> 0.0001"]  # other allowed changes are still reported
    before_the_section = {k: v for k, v in saved.items() if k != "parallel"}  # a checkpoint from an older upcycle
    old_state = state | {"recipe": before_the_section}
    assert resume_point(old_state, moved.to_dict(), 2, 8, set()).notes == point.notes
    reseeded = load(folder, minimal(), "parallel.ep=2", "run.seed=1").to_dict()
    with pytest.raises(OptionError, match=r"run.seed: 0 -> 1"):  # what is trained is still guarded
        resume_point(state, reseeded, 2, 8, set())


# ------------------------------------------------------------------------------------------- round trips


def test_to_dict_round_trips(folder: Path) -> None:
    recipe = load(folder, minimal(optim={"betas": [0.8, 0.99]}, batch={"global_batch_tokens": 64, "steps": 3}))
    data = recipe.to_dict()
    assert data["data"]["train"] == [str(folder / "text" / n) for n in ("a.txt", "b.txt")]  # lists, not tuples
    assert data["optim"]["betas"] == [0.8, 0.99]
    assert recipe_from_dict(data, Path("/somewhere/else")) == recipe
    saved = write(folder / "text", recipe.to_yaml(), "resolved.yaml")  # absolute paths: any folder will do
    assert dataclasses.replace(load_recipe(saved), source=recipe.source) == recipe


# --------------------------------------------------------------------------------------------- batch maths


def batch_recipe(folder: Path, **batch: int | None) -> TrainRecipe:
    base = load(folder, minimal(data={"seq_len": 128}, batch={"micro_batch_size": 4, "steps": 1}))
    return dataclasses.replace(base, batch=BatchSection(**{"micro_batch_size": 4, "steps": None} | batch))


def test_resolve_batch_from_global_batch_tokens(folder: Path) -> None:
    recipe = batch_recipe(folder, global_batch_tokens=4096, tokens=10_000)  # 32 sequences of 128
    for world, accum in ((1, 8), (2, 4), (8, 1)):
        b = batch_of(recipe, world)
        assert (b.grad_accum, b.world_size, b.global_batch_sequences, b.tokens_per_step) == (accum, world, 32, 4096)
        assert b.steps == 3  # ceil(10000 / 4096): the budget is the same on any number of ranks
        assert b.total_tokens == 3 * 4096


def test_resolve_batch_from_grad_accum_and_the_default(folder: Path) -> None:
    b = batch_of(batch_recipe(folder, grad_accum=3, steps=7), 2)
    assert (b.micro_batch_size, b.grad_accum, b.global_batch_sequences, b.tokens_per_step, b.steps) == (
        4,
        3,
        24,
        24 * 128,
        7,
    )
    assert batch_of(batch_recipe(folder, steps=5), 1).grad_accum == 1  # neither given: no accumulation


def test_resolve_batch_rejects_an_indivisible_global_batch(folder: Path) -> None:
    recipe = batch_recipe(folder, global_batch_tokens=4096, steps=1)
    with pytest.raises(OptionError, match=r"not a multiple of .* world size \(128 x 4 x 3 = 1536\)") as info:
        batch_of(recipe, 3)
    assert "world size that divides the 32 sequences" in str(info.value)
    with pytest.raises(OptionError, match="set batch.micro_batch_size to a divisor of 2"):
        batch_of(recipe, 16)  # 2 sequences per rank, micro-batch of 4


def test_global_batch_must_be_a_whole_number_of_micro_batches_at_load(folder: Path) -> None:
    text = error(folder, minimal(data={"seq_len": 128}, batch={"micro_batch_size": 4, "global_batch_tokens": 1000}))
    assert "batch.global_batch_tokens (1000) is not a multiple of data.seq_len x batch.micro_batch_size" in text


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"steps": 10, "tokens": 1000}, "batch.steps and batch.tokens are both set"),
        ({"steps": None}, "neither batch.steps nor batch.tokens"),
        ({"grad_accum": 2, "global_batch_tokens": 64}, "batch.grad_accum and batch.global_batch_tokens are both set"),
        ({"tokens": 0, "steps": None}, "batch.tokens: must be at least 1"),
    ],
)
def test_batch_conflicts_are_caught_at_load(folder: Path, batch: dict, message: str) -> None:
    data = minimal()
    data["batch"] = {k: v for k, v in (data["batch"] | batch).items() if v is not None}
    assert message in error(folder, data)


def test_resolve_batch_rejects_a_bad_world_size(folder: Path) -> None:
    recipe = batch_recipe(folder, steps=1)
    for world in (0, -1, True):
        with pytest.raises(OptionError, match="world size must be a positive integer"):
            batch_of(recipe, world)  # type: ignore[arg-type]


def test_run_section_refuses_an_empty_output_dir() -> None:
    with pytest.raises(OptionError, match="run.output_dir: is empty"):
        RunSection(output_dir=" ")


def test_shipped_moe_recipes_use_the_papers_per_layer_aux_coefficient():
    """The paper's best load-balancing weight is 1e-2 applied to every MoE layer (Megatron-Core); z-loss off."""
    from pathlib import Path

    from upcycle.train.recipe import load_recipe

    shipped = sorted((Path(__file__).resolve().parent.parent / "upcycle" / "recipes").glob("*.yaml"))
    moe = [path for path in shipped if path.stem != "dense-control"]
    assert len(moe) == 5  # quickstart, E8G1T2, E8G8T8, Drop-Upcycling, multi-node
    for path in moe:
        recipe = load_recipe(path, [])
        assert recipe.moe.aux_loss_coef == 1e-2 and recipe.moe.z_loss_coef == 0.0, path.name
