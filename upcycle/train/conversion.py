"""A recipe's ``model.source`` upcycled once: converted into a content-addressed cache, verified, then reused.

The cache key is a sha256 over the source's files (their own sha256), the conversion options and upcycle's
version, so a changed weight file, option or release converts again and nothing else does. Each entry is the
folder ``upcycle convert`` writes plus a record beside it (``<key>.json``) that is written only after the folder
passed the config and weight checks of ``upcycle verify``: an entry without its record is converted again. The
record holds the sha256 of every file of the folder, and every reuse hashes them again: a damaged entry is set
aside and converted again, never trained on. One lock per key makes the ranks of a node (or two runs started
together) convert it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upcycle import __version__
from upcycle.assets import cache_dir, cache_lock, mark_used
from upcycle.convert.exactness import Exactness
from upcycle.errors import SourceError, UpcycleError
from upcycle.hub import ModelSource, resolve_model
from upcycle.output_safety import remove, write_json_atomically
from upcycle.train.cache_integrity import changed_files, describe, folder_digests, set_aside
from upcycle.train.launch_checks import checked_in_this_launch, mark_checked
from upcycle.train.recipe import TrainRecipe
from upcycle.train.source_hashes import source_hashes

KEY_FORMAT = 2  # bump when what goes into the key (or the record) changes; 2: records hold the files' sha256


@dataclass(frozen=True)
class Conversion:
    """Where a recipe's upcycle lives and what it cost this time."""

    folder: Path
    key: str
    reused: bool
    hash_seconds: float
    convert_seconds: float  # 0 when reused
    verify_seconds: float  # 0 when reused
    record: dict[str, Any]  # the entry's record: key inputs, the verify figures

    @property
    def seconds(self) -> float:
        return self.hash_seconds + self.convert_seconds + self.verify_seconds


def conversions_dir() -> Path:
    return cache_dir() / "conversions"


def conversion_key(hashes: dict[str, str], options: dict[str, Any]) -> str:
    """sha256 of everything that decides the converted checkpoint's content."""
    inputs = {"format": KEY_FORMAT, "tool": __version__, "source_sha256": hashes, "options": options}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def prepare_model(
    recipe: TrainRecipe, echo: Callable[[str], None] = lambda _: None
) -> tuple[TrainRecipe, Conversion | None]:
    """The recipe with ``model.path`` pointing at its verified conversion (unchanged when it names no source)."""
    model = recipe.model
    if model.upcycle is None or model.source is None:
        return recipe, None
    named = source_model(model.source)
    source = named.folder
    started = time.perf_counter()
    hashes = source_hashes(source)
    hash_seconds = time.perf_counter() - started
    options = model.upcycle
    key = conversion_key(hashes, options.to_json())
    folder = conversions_dir() / key[:32]
    with cache_lock(f"conversion-{key[:32]}"):
        record = read_record(folder, key)
        if record is not None:
            started = time.perf_counter()
            files = [p for p in folder.rglob("*") if p.is_file()]
            already = checked_in_this_launch(folder, files)
            problems = [] if already else entry_problems(folder, record)
            if not problems:
                mark_checked(folder, files)
            else:
                aside = set_aside(folder)
                set_aside(record_path(folder))
                echo(
                    f"warning: the cached conversion {folder} is damaged ({describe(problems)}); set aside as "
                    f"{aside.name}, converting again"
                )
                record = None
        if record is not None:
            checked = (
                "re-checked by another rank of this launch"
                if already
                else f"re-checked in {time.perf_counter() - started:.1f} s"
            )
            mark_used(folder)
            echo(f"conversion reused: {folder} (source hashed in {hash_seconds:.1f} s, {checked})")
            conversion = Conversion(folder, key, True, hash_seconds, 0.0, 0.0, record)
        else:
            echo(f"converting {named.repo_id or source} -> {folder}")
            conversion = _convert_and_verify(named, folder, key, hashes, options, model.trust_remote_code, echo)
            conversion = dataclasses.replace(conversion, hash_seconds=hash_seconds)
    return dataclasses.replace(recipe, model=dataclasses.replace(model, path=str(folder))), conversion


def source_model(source: str) -> ModelSource:
    """``model.source`` on disk: a path as it is, a Hub id's snapshot (fetched once, or found in the cache)."""
    named = resolve_model(source)
    if not named.folder.exists():
        raise SourceError(
            f"model.source {source} does not exist.", "point model.source at a dense folder, a .gguf file or a Hub id."
        )
    return named


def cached_conversion(recipe: TrainRecipe) -> Path | None:
    """The verified conversion of the recipe's source, if the cache holds it; nothing is converted."""
    model = recipe.model
    if model.upcycle is None or model.source is None:
        return None
    try:
        source = source_model(model.source).folder
    except SourceError:
        return None
    key = conversion_key(source_hashes(source), model.upcycle.to_json())
    folder = conversions_dir() / key[:32]
    return folder if read_record(folder, key) is not None else None


def planned_config(recipe: TrainRecipe) -> dict[str, Any]:
    """The config.json the recipe's conversion will write, from its plan alone (headers and config read)."""
    from upcycle.upcycling import convert

    model = recipe.model
    assert model.upcycle is not None and model.source is not None
    scratch = conversions_dir() / "planned"  # never written: a dry run only checks where it would write
    plan = convert(
        source_model(model.source).folder,
        scratch,
        model.upcycle,
        dry_run=True,
        trust_remote_code=model.trust_remote_code,
    ).plan
    return plan.config


def record_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.json"


def read_record(folder: Path, key: str) -> dict[str, Any] | None:
    """The entry's record when the entry is complete and verified under this very key, else None."""
    path = record_path(folder)
    if not path.is_file() or not (folder / "upcycle.json").is_file() or not (folder / "config.json").is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def entry_problems(folder: Path, record: dict[str, Any]) -> list[str]:
    """What is not as the record's sha256 say (every byte of the folder is read); empty when the entry is intact."""
    recorded = record.get("files")
    if not isinstance(recorded, dict) or not recorded:
        return ["its record holds no file hashes"]
    return changed_files(recorded, folder_digests(folder))


def _convert_and_verify(
    named: ModelSource,
    folder: Path,
    key: str,
    hashes: dict[str, str],
    options: Any,
    trust_remote_code: bool,
    echo: Callable[[str], None],
) -> Conversion:
    from upcycle.model_card import rewrite_conversion_card
    from upcycle.upcycling import convert
    from upcycle.verify import verify

    source = named.folder
    remove(record_path(folder))  # a stale record must never vouch for the folder written now
    # a Hub id is converted by id at the commit resolved above, so upcycle.json names the repository
    result = convert(
        named.repo_id or source,
        folder,
        options,
        force=True,
        trust_remote_code=trust_remote_code,
        revision=named.revision,
    )
    echo(f"converted in {result.seconds:.1f} s; verifying config and weights")
    started = time.perf_counter()
    report = verify(source, folder, function=False, trust_remote_code=trust_remote_code)
    verify_seconds = time.perf_counter() - started
    if not checks_hold(report):
        remove(folder)
        raise UpcycleError(
            f"the conversion of {source} failed its own check: {report.verdict}.",
            "report this as a bug in upcycle, with the recipe; nothing was kept in the cache.",
        )
    rewrite_conversion_card(folder, report.to_json())  # the folder's README.md now carries the figures
    record = {
        "key": key,
        "source": named.repo_id or str(source),
        **named.provenance(),
        "source_sha256": hashes,
        "options": options.to_json(),
        "tool_version": __version__,
        "exact": report.exact_by_design,
        "exactness": Exactness.from_json(report.exactness).label,  # "exact up to rounding to bfloat16", ...
        "method": report.method,
        "verify": verify_summary(report),
        "convert_seconds": round(result.seconds, 3),
        "verify_seconds": round(verify_seconds, 3),
        "files": folder_digests(folder),  # re-hashed on every reuse
    }
    write_json_atomically(record_path(folder), record)
    echo(f"verified in {verify_seconds:.1f} s: {', '.join(record['verify']['proof'])}")
    return Conversion(folder, key, False, 0.0, result.seconds, verify_seconds, record)


def checks_hold(report: Any) -> bool:
    """The config, tokenizer/generation and weight checks passed (the function check is not run here: it needs
    minutes, not seconds)."""
    weights = report.weights
    config_ok = report.config.equivalent and report.config_matches_plan is not False
    return bool(config_ok and report.files.ok and weights is not None and weights.ok)


def verify_summary(report: Any) -> dict[str, Any]:
    """The figures of a config-and-weights verification, as recorded and shown in the model card."""
    return {
        "proof": report.proof,
        "config_equivalent": report.config.equivalent,
        "config_matches_plan": report.config_matches_plan,
        "tensors_checked": report.weights.tensors_checked,
        "tensor_mismatches": len(report.weights.mismatches),
        "source_matches_provenance": report.weights.source_matches_provenance,
        "function_check": "not run (config and weights only)",
    }
