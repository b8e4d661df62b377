"""convert writes the tensors on a thread of their own while the config check and the folder checks run: the
folder is published only when both finish, a refusal on either side stops the other and leaves nothing, and what
is written does not depend on what the checks do meanwhile (transformers sets torch's default dtype while it
builds a model)."""

from __future__ import annotations

import errno
import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from hub_models import save_hub_style
from tiny_models import COMMON

from upcycle.convert import UpcycleOptions
from upcycle.convert import plan as plan_module
from upcycle.convert import writer as writer_module
from upcycle.convert.materialize import CachedReader, materialize
from upcycle.convert.plan import NotProven, build_plan
from upcycle.convert.source import DenseSource, memo_sha256
from upcycle.errors import SourceError, UnsupportedModelError
from upcycle.upcycling import convert
from upcycle.verify import written as written_module


@pytest.fixture
def dense(tmp_path: Path) -> Path:
    return save_hub_style({"model_type": "llama", **COMMON}, tmp_path / "dense")


def test_made_tensors_do_not_depend_on_the_default_dtype(dense):
    """Random routers, re-drawn neurons and noise are drawn in fp32 whatever another thread set as the default."""
    source = DenseSource.open(dense)
    plan = build_plan(source, UpcycleOptions(drop_upcycling=0.5, noise=0.01, router_init="random"))
    drawn = [r for r in plan.recipes if r.op == "router" or r.drop_ratio or r.noise]
    assert {r.op for r in drawn} >= {"router", "expert"}

    def made() -> list[torch.Tensor]:
        return [materialize(recipe, CachedReader(source.read)) for recipe in drawn]

    expected = made()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        under_fp16 = made()
    finally:
        torch.set_default_dtype(default)
    assert all(torch.equal(a, b) for a, b in zip(expected, under_fp16, strict=True))


def test_a_refusal_beside_the_writing_stops_it_and_leaves_nothing(dense, tmp_path, monkeypatch):
    made: list[str] = []
    slow = writer_module.materialize

    def counted(recipe, read):
        made.append(recipe.name)
        time.sleep(0.05)
        return slow(recipe, read)

    def refuse(*args) -> None:
        raise UnsupportedModelError("the tokenizer would load differently.", "choose another --target.")

    monkeypatch.setattr(writer_module, "materialize", counted)
    monkeypatch.setattr(written_module, "inspect_written", refuse)
    with pytest.raises(UnsupportedModelError, match="tokenizer would load differently"):
        convert(dense, tmp_path / "moe", UpcycleOptions())
    total = len(build_plan(DenseSource.open(dense), UpcycleOptions(), prove=False).recipes)
    assert len(made) < total  # the writer stopped after the tensor it was making (or before the first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_a_target_the_deferred_check_refuses_is_planned_again_and_proven(dense, tmp_path, monkeypatch):
    """The first candidate, unproven, was written beside a check that refused it: nothing of it is published, and
    the conversion is planned again, every candidate proven before any tensor is made."""
    deferred: list[str] = []

    def refuse(plan, source_config) -> None:
        deferred.append(plan.target)
        raise NotProven("a difference")

    monkeypatch.setattr(plan_module, "prove_plan", refuse)
    result = convert(dense, tmp_path / "moe", UpcycleOptions())
    assert deferred == [result.plan.target]
    record = json.loads((tmp_path / "moe" / "upcycle.json").read_text())
    assert record["config_check"]["equivalent"] is True  # the serial plan's own check admitted it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "moe"]


def test_the_config_check_beside_the_writing_is_recorded(dense, tmp_path):
    result = convert(dense, tmp_path / "moe", UpcycleOptions())
    record = json.loads((tmp_path / "moe" / "upcycle.json").read_text())["config_check"]
    assert record == result.plan.config_check and record["equivalent"] is True
    dry = convert(dense, tmp_path / "dry", UpcycleOptions(), dry_run=True)
    assert dry.plan.config_check == record and not (tmp_path / "dry").exists()


def test_a_source_file_that_cannot_be_hashed_stops_the_conversion(dense, tmp_path, monkeypatch):
    """The hashes upcycle.json records come from a thread of their own: its failure is the command's, never an
    empty record."""

    def unreadable(paths, remembered=False):
        raise OSError(errno.EIO, "Input/output error", str(paths[0]))

    monkeypatch.setattr(writer_module, "hash_files", unreadable)
    with pytest.raises(SourceError, match="to record its sha256 .Input/output error"):
        convert(dense, tmp_path / "moe", UpcycleOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_a_cache_that_cannot_be_written_still_gives_the_digest(dense, tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("UPCYCLE_CACHE", str(blocked))
    path = dense / "config.json"
    assert memo_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
