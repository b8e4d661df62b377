"""A recipe that names a dense source and its upcycle: validated as a recipe, converted once into a verified cache
entry, reused after, converted again when the source or an option changes; and the recipes that ship by name."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml
from train_helpers import isolated_cache, make_tiny_pair, recipe_dict, run_cli, shakespeare_texts, write_recipe

from upcycle.convert.options import UpcycleOptions
from upcycle.convert.targets import check_options
from upcycle.errors import OptionError, UpcycleError
from upcycle.train import conversion
from upcycle.train.recipe import load_recipe, recipe_from_dict
from upcycle.train.shipped_recipes import copy_recipe, find_recipe, shipped_recipes, summary

REPO_RECIPES = Path(__file__).resolve().parent.parent / "upcycle" / "recipes"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """A cache folder of its own (in-process and for subprocesses), sharing the real assets without fetching."""
    root = isolated_cache(tmp_path / "cache")
    monkeypatch.setenv("UPCYCLE_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return make_tiny_pair(tmp_path_factory.mktemp("tiny"))[0]


def source_recipe(dense: Path, out: Path, **upcycle) -> dict:
    data = recipe_dict(dense, out, shakespeare_texts())
    data["model"] = {"source": str(dense), "upcycle": {"experts": 4, "top_k": 2, **upcycle}}
    data["model"]["experts_implementation"] = "grouped_mm"
    data["batch"]["steps"] = 2
    data["run"].update(eval_interval=0, checkpoint_interval=0, export=False)
    return data


# ----------------------------------------------------------------------------------------------- the recipe


def test_upcycle_section_takes_converts_options_and_round_trips(dense: Path, tmp_path: Path) -> None:
    data = source_recipe(dense, tmp_path / "run", layers=1, weight_scale=1.5, router="softmax-topk")
    recipe = recipe_from_dict(data, tmp_path)
    assert recipe.model.path is None and recipe.model.source == str(dense)
    assert recipe.model.upcycle == UpcycleOptions(
        experts=4, top_k=2, layers="1", weight_scale="1.5", router="softmax-topk"
    )
    options = recipe.model.upcycle
    assert (options.experts, options.top_k, options.layers, options.weight_scale_factor_override()) == (4, 2, "1", 1.5)
    again = recipe_from_dict(json.loads(json.dumps(recipe.to_dict())), Path("/elsewhere"))
    assert again == recipe


def test_the_options_json_and_so_the_conversion_key_are_what_they_were() -> None:
    """The conversion cache is keyed by the options' JSON: a recipe and convert give the same, and it did not move."""
    assert UpcycleOptions().to_json() == {
        "experts": 8, "top_k": 2, "granularity": 1, "router": "renorm", "router_init": "random", "router_std": None,
        "weight_scale": "auto", "drop_upcycling": 0.0, "noise": 0.0, "layers": "all", "target": "auto",
        "dtype": "auto", "shard_size": 2_000_000_000, "seed": 0, "extra": {},
    }  # fmt: skip
    data = {
        "model": {"source": "d", "upcycle": {"experts": 8, "top_k": 2, "noise": 0, "weight_scale": 2}},
        "data": {"train": "asset:shakespeare/train"},
        "batch": {"steps": 1},
        "run": {"output_dir": "o"},
    }
    recipe = recipe_from_dict(data, Path("/base"), resolve_assets=False)
    built = UpcycleOptions(experts=8, top_k=2, noise=0.0, weight_scale="2")
    assert json.dumps(recipe.model.upcycle.to_json(), sort_keys=True) == json.dumps(built.to_json(), sort_keys=True)


def test_options_built_directly_are_refused_in_one_line_naming_the_flag() -> None:
    for options, line in [
        ({"experts": 0}, "--experts: must be at least 1, got 0. Fix: use e.g. 8."),
        ({"router": "sigmoid"}, "--router: unknown value 'sigmoid'. Fix: choose one of renorm, softmax-topk."),
        ({"shard_size": "2XB"}, "--shard-size: '2XB' is not a size."),
        ({"seed": True}, "--seed: expected an integer, got true."),
    ]:
        with pytest.raises(OptionError) as info:
            UpcycleOptions(**options)
        assert str(info.value).startswith(line) and "\n" not in str(info.value)
    with pytest.raises(OptionError, match="exceeds the number of experts"):  # options together: when converted
        check_options(UpcycleOptions(experts=2, top_k=3))


def test_upcycle_keys_are_checked_like_every_other_key(dense: Path, tmp_path: Path) -> None:
    def refused(**upcycle) -> str:
        with pytest.raises(OptionError) as info:
            recipe_from_dict(source_recipe(dense, tmp_path / "run", **upcycle), tmp_path)
        return str(info.value)

    assert "model.upcycle: --top-k 5 exceeds the number of experts 4" in refused(top_k=5)
    assert "unknown key model.upcycle.expert (did you mean model.upcycle.experts?)" in refused(expert=2)
    assert "model.upcycle.noise: expected a number, got 'loud'" in refused(noise="loud")
    data = source_recipe(dense, tmp_path / "run")
    data["model"]["path"] = str(dense)
    with pytest.raises(OptionError, match="model.path and model.source are both set"):
        recipe_from_dict(data, tmp_path)
    del data["model"]["path"], data["model"]["upcycle"]
    with pytest.raises(OptionError, match="model.source is set without model.upcycle"):
        recipe_from_dict(data, tmp_path)


def test_set_reaches_into_the_upcycle_section(dense: Path, tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", source_recipe(dense, tmp_path / "run"))
    recipe = load_recipe(path, ["model.upcycle.experts=8", "model.upcycle.layers=0-1", "model.upcycle.top_k=4"])
    assert (recipe.model.upcycle.experts, recipe.model.upcycle.layers, recipe.model.upcycle.top_k) == (8, "0-1", 4)
    with pytest.raises(OptionError, match="did you mean model.upcycle.granularity"):
        load_recipe(path, ["model.upcycle.granularty=2"])
    plain = load_recipe(path, ["model.upcycle=null", "model.source=null", f"model.path={dense}"])
    assert plain.model.path == str(dense) and plain.model.upcycle is None and plain.model.source is None
    whole = load_recipe(path, ["model.upcycle={experts: 2, top_k: 1}"])
    assert whole.model.upcycle == UpcycleOptions(experts=2, top_k=1)


# ------------------------------------------------------------------------------------------ the conversion


def test_conversion_is_made_once_verified_and_reused(dense: Path, tmp_path: Path, cache: Path) -> None:
    recipe = recipe_from_dict(source_recipe(dense, tmp_path / "run"), tmp_path)
    first_recipe, first = conversion.prepare_model(recipe)
    assert first is not None and not first.reused and first.convert_seconds > 0 and first.verify_seconds > 0
    assert first.folder.parent == cache / "conversions" and first_recipe.model.path == str(first.folder)
    record = json.loads(conversion.record_path(first.folder).read_text())
    assert record["key"] == first.key and record["verify"]["tensor_mismatches"] == 0
    assert set(record["verify"]["proof"]) == {"config", "tokenizer and generation settings", "weights"}
    assert record["exact"] is True
    assert record["source_sha256"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dense.iterdir()}
    card = (first.folder / "README.md").read_text()  # the model card carries the check's figures
    assert "## Verification" in card and f"{record['verify']['tensors_checked']} tensors re-made" in card
    weights = sorted(first.folder.glob("*.safetensors"))
    written = [p.stat().st_mtime_ns for p in weights]

    second_recipe, second = conversion.prepare_model(recipe)
    assert second.reused and second.folder == first.folder and second_recipe == first_recipe
    assert [p.stat().st_mtime_ns for p in weights] == written and weights  # nothing rewritten

    _, other = conversion.prepare_model(recipe_from_dict(source_recipe(dense, tmp_path / "r", seed=1), tmp_path))
    assert not other.reused and other.folder != first.folder  # another option, another entry


def test_a_changed_source_or_a_missing_record_converts_again(dense: Path, tmp_path: Path, cache: Path) -> None:
    import shutil

    source = tmp_path / "dense"
    shutil.copytree(dense, source)
    recipe = recipe_from_dict(source_recipe(source, tmp_path / "run"), tmp_path)
    _, first = conversion.prepare_model(recipe)
    conversion.record_path(first.folder).unlink()  # as if killed between conversion and verification
    _, again = conversion.prepare_model(recipe)
    assert not again.reused and again.folder == first.folder
    config = json.loads((source / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 2
    (source / "config.json").write_text(json.dumps(config))
    _, changed = conversion.prepare_model(recipe)
    assert not changed.reused and changed.key != first.key


def test_a_conversion_that_fails_its_check_is_not_kept(dense: Path, tmp_path: Path, cache: Path, monkeypatch) -> None:
    recipe = recipe_from_dict(source_recipe(dense, tmp_path / "run"), tmp_path)
    monkeypatch.setattr(conversion, "checks_hold", lambda report: False)
    with pytest.raises(UpcycleError, match="failed its own check"):
        conversion.prepare_model(recipe)
    assert not [p for p in (cache / "conversions").iterdir() if not p.name.startswith(".")]


def test_train_converts_then_reuses_and_dry_run_plans_without_converting(dense: Path, tmp_path: Path, cache) -> None:
    path = write_recipe(tmp_path / "r.yaml", source_recipe(dense, tmp_path / "run"))
    planned = run_cli("train", str(path), "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert "not converted yet; shapes from the conversion plan" in planned.stdout
    assert "4 experts per layer" in planned.stdout and not (cache / "conversions").exists()
    first = run_cli("train", str(path))
    assert first.returncode == 0, first.stderr
    assert "converted in" in first.stdout and "verified in" in first.stdout
    second = run_cli("train", str(path), "--set", f"run.output_dir={tmp_path / 'run2'}")
    assert second.returncode == 0, second.stderr
    assert "(reused;" in second.stdout
    again = run_cli("train", str(path), "--dry-run")
    assert "model: the cached conversion" in again.stdout
    state = json.loads((tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()[0])
    assert state  # the run wrote its metrics


# -------------------------------------------------------------------------------------- shipped by name


def test_every_repository_recipe_ships_and_each_has_a_one_line_summary() -> None:
    shipped = shipped_recipes()
    assert set(shipped) == {p.stem for p in REPO_RECIPES.glob("*.yaml")}
    for name, path in shipped.items():
        assert path.read_bytes() == (REPO_RECIPES / f"{name}.yaml").read_bytes()
        assert 20 < len(summary(path)) <= 110, name
        recipe = load_recipe(path, resolve_assets=False)
        assert recipe.model.path is not None or recipe.model.upcycle is not None


def test_shipped_recipes_name_their_source_and_run_under_runs_of_the_current_folder(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("cpu-quickstart", "paper-e8g1t2", "paper-e8g8t8", "drop-upcycling", "multi-node"):
        recipe = load_recipe(find_recipe(name), resolve_assets=False)
        assert recipe.model.source == "asset:smollm2" and recipe.model.path is None, name
        assert recipe.run.output_dir == str(tmp_path / "runs" / name)
    assert load_recipe(find_recipe("paper-e8g8t8"), resolve_assets=False).model.upcycle.granularity == 8


def test_a_local_file_wins_over_a_shipped_name_and_unknown_names_list_the_choices(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cpu-quickstart").write_text("model: {path: m}\n")
    assert find_recipe("cpu-quickstart") == Path("cpu-quickstart")
    assert find_recipe("dense-control.yaml") == shipped_recipes()["dense-control"]
    with pytest.raises(OptionError, match="one of: cpu-quickstart, dense-control"):
        find_recipe("nope")


def test_recipes_copy_writes_an_editable_copy_and_never_overwrites_unasked(tmp_path: Path) -> None:
    copied = copy_recipe("cpu-quickstart", tmp_path)
    assert copied == tmp_path / "cpu-quickstart.yaml"
    assert yaml.safe_load(copied.read_text()) == yaml.safe_load(shipped_recipes()["cpu-quickstart"].read_text())
    with pytest.raises(UpcycleError, match="already exists"):
        copy_recipe("cpu-quickstart", tmp_path)
    copied.write_text("edited")
    copy_recipe("cpu-quickstart", copied, force=True)
    assert copied.read_text() != "edited"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left behind


def test_recipes_commands(cli, tmp_path: Path) -> None:
    listed = cli("recipes")
    assert listed.exit_code == 0
    for name in shipped_recipes():
        assert name in listed.stdout
    shown = cli("recipes", "show", "paper-e8g8t8")
    assert shown.exit_code == 0 and shown.stdout == shipped_recipes()["paper-e8g8t8"].read_text()
    assert cli("recipes", "show", "nope").exit_code == 2
    assert cli("recipes", "copy", "dense-control", tmp_path).exit_code == 0
    assert (tmp_path / "dense-control.yaml").is_file()
    assert cli("recipes", "copy", "dense-control", tmp_path).exit_code == 2
