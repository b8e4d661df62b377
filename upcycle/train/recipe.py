"""Training recipes: YAML in, a validated, immutable :class:`TrainRecipe` out, before anything runs.

A recipe is nested frozen pydantic dataclasses, one per YAML section (:mod:`upcycle.train.recipe_sections`). Every
value is type-checked and range-checked when a recipe is built, so an unknown key, a wrong type or an impossible
setting stops the run at once with the full dotted key in one line (``optim.lr: expected a number, got 'fast'.``),
never after the model has loaded. Paths are made absolute at load time (:mod:`upcycle.train.recipe_paths`);
``--set`` overrides are applied to the YAML data first (:mod:`upcycle.train.overrides`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError

from upcycle.errors import OptionError
from upcycle.train.batch_size import check_whole_micro_batches
from upcycle.train.overrides import apply_overrides
from upcycle.train.recipe_keys import unknown_key
from upcycle.train.recipe_paths import absolute_path, data_files, model_path
from upcycle.train.recipe_sections import (
    BatchSection,
    DataSection,
    EvalSection,
    ModelSection,
    MoESection,
    OptimSection,
    ParallelSection,
    RunSection,
)
from upcycle.validation import StrictLoader, Text, describe, dotted, one_line, validated

_EMPTY = BeforeValidator(lambda value: {} if value is None else value)  # "moe:" with nothing under it


def _section() -> Any:
    """A missing section is its defaults, checked: a section may require keys (data.train)."""
    return Field(default_factory=dict, validate_default=True)


@validated(dotted())
class TrainRecipe:
    """A whole training run, validated; ``source`` is the YAML file it came from (None if built in code)."""

    model: Annotated[ModelSection, _EMPTY] = _section()
    data: Annotated[DataSection, _EMPTY] = _section()
    batch: Annotated[BatchSection, _EMPTY] = _section()
    optim: Annotated[OptimSection, _EMPTY] = _section()
    moe: Annotated[MoESection, _EMPTY] = _section()
    run: Annotated[RunSection, _EMPTY] = _section()
    eval: Annotated[EvalSection, _EMPTY] = _section()
    parallel: Annotated[ParallelSection, _EMPTY] = _section()
    source: Text | None = None

    def _check(self) -> None:
        check_whole_micro_batches(self.batch.global_batch_tokens, self.data.seq_len, self.batch.micro_batch_size)
        if self.run.output_dir is None:
            raise OptionError("missing required key run.output_dir.", "add output_dir: under run:.")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready data (lists, not tuples); :func:`recipe_from_dict` rebuilds the same recipe."""
        return _RECIPE.dump_python(self, mode="json")

    def to_yaml(self) -> str:
        """The resolved recipe as YAML, e.g. to save next to checkpoints."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


_RECIPE = TypeAdapter(TrainRecipe)


def recipe_from_dict(
    data: dict[str, Any], base_dir: Path, *, resolve_assets: bool = True, default_output: Path | None = None
) -> TrainRecipe:
    """Validate recipe data (as parsed from YAML) and resolve its paths against ``base_dir``.

    ``resolve_assets=False`` keeps ``asset:`` names as they are (no download), for offline validation only:
    such a recipe cannot be trained. ``default_output`` is the run folder when the recipe names none.
    """
    if not isinstance(data, dict):
        raise OptionError(
            f"a recipe must be a mapping of sections, got {describe(data)}.",
            "see `upcycle recipes show cpu-quickstart`.",
        )
    run = data.get("run")
    if default_output is not None and (run is None or isinstance(run, dict) and run.get("output_dir") is None):
        data = {**data, "run": {**(run or {}), "output_dir": str(default_output)}}
    try:
        recipe = _RECIPE.validate_python(data)
    except ValidationError as error:  # unknown keys get the nearest valid key, from every section's keys
        raise one_line(error, TrainRecipe, dotted(), unknown_key) from None
    model, dat = recipe.model, recipe.data
    if model.path is not None and model.source is not None:
        raise OptionError(
            "model.path and model.source are both set.",
            "keep one: path trains a folder as it is, source (with upcycle) converts a dense model first.",
        )
    base = Path(base_dir).expanduser().absolute()
    return dataclasses.replace(
        recipe,
        model=dataclasses.replace(
            model,
            path=None if model.path is None else model_path(model.path, base, resolve_assets, "model.path"),
            source=None if model.source is None else model_path(model.source, base, resolve_assets, "model.source"),
        ),
        data=dataclasses.replace(
            dat,
            train=data_files(dat.train, "data.train", base, resolve_assets),
            eval=data_files(dat.eval, "data.eval", base, resolve_assets),
            cache_dir=None if dat.cache_dir is None else absolute_path(dat.cache_dir, base),
        ),
        run=dataclasses.replace(recipe.run, output_dir=absolute_path(str(recipe.run.output_dir), base)),
    )


def load_recipe(
    path: Path | str, overrides: list[str] | tuple[str, ...] | None = (), *, resolve_assets: bool = True
) -> TrainRecipe:
    """Read a YAML recipe, apply ``--set key=value`` overrides, validate it and resolve its paths."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise OptionError(
            f"recipe {path} does not exist.", "pass a YAML recipe, or the name of one `upcycle recipes` lists."
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise OptionError(f"recipe {path}{where}: {problem}.", "fix the YAML syntax there.") from None
    except UnicodeDecodeError:
        raise OptionError(f"recipe {path} is not UTF-8 text.", "save it as UTF-8.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise OptionError(
            f"recipe {path} must be a mapping of sections, got {describe(data)}.",
            "see `upcycle recipes show cpu-quickstart`.",
        )
    data = apply_overrides(data, overrides or ())
    default_output = Path.cwd() / "runs" / path.stem
    recipe = recipe_from_dict(data, path.parent, resolve_assets=resolve_assets, default_output=default_output)
    return dataclasses.replace(recipe, source=absolute_path(str(path), Path.cwd()))
