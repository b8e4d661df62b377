"""Training recipes: YAML in, a validated, immutable :class:`TrainRecipe` out, before anything runs.

A recipe is nested frozen dataclasses, one per YAML section (:mod:`upcycle.train.recipe_sections`). Every value is
type-checked and range-checked when a section is built, so an unknown key, a wrong type or an impossible setting
stops the run at once with the full dotted key in the message (``optim.lr: expected a number, got 'fast'.``),
never after the model has loaded. Paths are made absolute at load time (:mod:`upcycle.train.recipe_paths`);
``--set`` overrides are applied to the YAML data first (:mod:`upcycle.train.overrides`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from upcycle.errors import OptionError
from upcycle.train.batch_size import check_whole_micro_batches
from upcycle.train.overrides import apply_overrides
from upcycle.train.recipe_fields import StrictLoader, UnknownKey, describe, section_mapping, type_error
from upcycle.train.recipe_keys import unknown_key
from upcycle.train.recipe_paths import absolute_path, data_files, model_path
from upcycle.train.recipe_sections import (
    SECTIONS,
    BatchSection,
    DataSection,
    ModelSection,
    MoESection,
    OptimSection,
    ParallelSection,
    RunSection,
)


@dataclass(frozen=True, kw_only=True)
class TrainRecipe:
    """A whole training run, validated; ``source`` is the YAML file it came from (None if built in code)."""

    model: ModelSection
    data: DataSection
    batch: BatchSection
    optim: OptimSection = field(default_factory=OptimSection)
    moe: MoESection = field(default_factory=MoESection)
    run: RunSection
    parallel: ParallelSection = field(default_factory=ParallelSection)
    source: str | None = None

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"TrainRecipe.{name} must be a {cls.__name__}")  # a programming error
        check_whole_micro_batches(self.batch.global_batch_tokens, self.data.seq_len, self.batch.micro_batch_size)
        if self.run.output_dir is None:
            raise OptionError("missing required key run.output_dir.", "add output_dir: under run:.")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready data (lists, not tuples); :func:`recipe_from_dict` rebuilds the same recipe."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            out[name] = {f.name: _plain(getattr(section, f.name)) for f in fields(section)}
        out["source"] = self.source
        return out

    def to_yaml(self) -> str:
        """The resolved recipe as YAML, e.g. to save next to checkpoints."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):  # a nested section, e.g. model.upcycle
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


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
    top = [*SECTIONS, "source"]
    for key in data:
        if not isinstance(key, str) or key not in top:
            raise unknown_key(str(key), top, None)
    source = data.get("source")
    if source is not None and not isinstance(source, str):
        raise type_error("source", "a string", source, "recipes/my.yaml")
    try:
        kwargs = {name: section_mapping(cls, data.get(name), name) for name, cls in SECTIONS.items()}
        model, dat, run = ModelSection(**kwargs["model"]), DataSection(**kwargs["data"]), RunSection(**kwargs["run"])
        batch, optim = BatchSection(**kwargs["batch"]), OptimSection(**kwargs["optim"])
        moe, parallel = MoESection(**kwargs["moe"]), ParallelSection(**kwargs["parallel"])
    except UnknownKey as error:  # the nearest valid key, from every section's keys
        raise unknown_key(error.key, error.known, error.section) from None
    if model.path is not None and model.source is not None:
        raise OptionError(
            "model.path and model.source are both set.",
            "keep one: path trains a folder as it is, source (with upcycle) converts a dense model first.",
        )
    base = Path(base_dir).expanduser().absolute()
    output_dir = run.output_dir if run.output_dir is not None else default_output
    return TrainRecipe(
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
        batch=batch,
        optim=optim,
        moe=moe,
        run=dataclasses.replace(run, output_dir=None if output_dir is None else absolute_path(str(output_dir), base)),
        parallel=parallel,
        source=source,
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
