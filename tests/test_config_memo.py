"""The config facts convert remembers: a second conversion of a model plans without importing transformers, a
memo is keyed by the code and versions that computed it, a refusal is never remembered, and `upcycle cache` lists
and checks the memos."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hub_models import save_hub_style
from tiny_models import COMMON

from upcycle.cache.checks import verify_entries
from upcycle.cache.entries import list_entries
from upcycle.convert import UpcycleOptions, config_memo
from upcycle.convert.plan import config_verdict
from upcycle.hf.config import resolved_fields
from upcycle.upcycling import convert

PLAN_ONLY = """
import sys
from pathlib import Path
from upcycle.convert import UpcycleOptions
from upcycle.convert.plan import build_plan
from upcycle.convert.source import DenseSource

plan = build_plan(DenseSource.open(Path(sys.argv[1])), UpcycleOptions(experts=4, top_k=2), prove=sys.argv[2] == "1")
print(plan.target, bool(plan.config_check), "transformers" in sys.modules)
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("UPCYCLE_CACHE", str(root))
    return root


def plan_in_a_new_process(dense: Path, prove: bool) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PLAN_ONLY, str(dense), "1" if prove else "0"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return done.stdout.split()


def test_a_second_conversion_plans_without_transformers(cache, tmp_path):
    dense = save_hub_style({"model_type": "qwen2", **COMMON}, tmp_path / "dense")
    assert plan_in_a_new_process(dense, prove=False)[2] == "True"  # nothing remembered yet: transformers asked
    convert(dense, tmp_path / "moe", UpcycleOptions(experts=4, top_k=2))
    assert plan_in_a_new_process(dense, prove=False) == ["qwen2_moe", "False", "False"]
    assert plan_in_a_new_process(dense, prove=True) == ["qwen2_moe", "True", "False"]  # the verdict, remembered
    kinds = sorted(json.loads(p.read_text())["kind"] for p in (cache / config_memo.MEMO_FOLDER).iterdir())
    assert kinds == ["config check", "expected tensors", "installed", "resolved fields"]


def test_a_memo_is_keyed_by_the_code_that_computed_it(cache, tmp_path, monkeypatch):
    before = config_memo.memo_path("resolved fields", {"model_type": "llama"})
    edited = tmp_path / "hf"
    shutil.copytree(config_memo.HF_PACKAGE, edited)
    (edited / "config.py").write_text((edited / "config.py").read_text() + "\n# an edit\n")
    monkeypatch.setattr(config_memo, "HF_PACKAGE", edited)
    config_memo._code_and_versions.cache_clear()
    try:
        assert config_memo.memo_path("resolved fields", {"model_type": "llama"}) != before
    finally:
        config_memo._code_and_versions.cache_clear()


def test_values_come_back_exactly_and_a_refusal_is_not_remembered(cache):
    config = {"model_type": "llama", **COMMON}
    fields = resolved_fields(config)
    assert any(not isinstance(key, str) for key in fields["id2label"])  # what plain JSON would turn into strings
    assert config_memo.from_json(json.loads(json.dumps(config_memo.to_json(fields)))) == fields
    moe = {**config, "model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 1,
           "rms_norm_eps": 1e-3}  # fmt: skip
    record, problem = config_verdict(config, moe)
    assert record is None and "in the dense model but" in problem
    assert not (cache / config_memo.MEMO_FOLDER / config_memo.memo_path("config check", [config, moe]).name).exists()


def test_the_cache_lists_and_checks_the_memos(cache, tmp_path):
    dense = save_hub_style({"model_type": "llama", **COMMON}, tmp_path / "dense")
    convert(dense, tmp_path / "moe", UpcycleOptions())
    memos = sorted((cache / config_memo.MEMO_FOLDER).iterdir())
    memos[0].write_text("{half")
    entries = [e for e in list_entries(cache) if e.kind == "config fact"]
    assert len(entries) == len(memos) >= 3  # the saved tensors too, unless this process described the config before
    verify_entries(entries)
    assert [e.problem for e in entries] == ["not readable JSON"] + [None] * (len(memos) - 1)
