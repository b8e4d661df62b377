"""`upcycle grow`: E -> m*E experts, exact, on MoE checkpoints upcycle wrote and on ones it did not.

The originals are tiny random MoEs built from transformers' own config classes and saved by transformers (the
layouts real checkpoints have), plus upcycle's own conversions of a dense model. Each grown folder must load
cleanly, generate what the original generates, and pass `verify` (weights, config probe, block probe, logits).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import load_clean
from moe_models import MOES, SMALL, make_moe
from safetensors.torch import load_file, save_file

from upcycle.convert import UpcycleOptions
from upcycle.convert.grow.rules import RULES
from upcycle.errors import OptionError, UnsupportedModelError
from upcycle.growing import grow
from upcycle.hf.moe_block_probe import probe_grown_block
from upcycle.upcycling import convert
from upcycle.verify import verify


def generated(folder, ids):
    model = load_clean(folder)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        return model(ids).logits, out


@pytest.mark.parametrize("case", list(MOES))
def test_a_grown_moe_computes_and_generates_what_the_original_does(case, tmp_path):
    original = make_moe(case, tmp_path / "original")
    result = grow(original, tmp_path / "grown", 2)
    config = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert result.plan.growth["experts"] == [4, 8] and result.plan.growth["top_k"] == [2, 4]
    assert config[RULES[config["model_type"]].top_k_key] == 4
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, tokens = generated(original, ids)
    grown_logits, grown_tokens = generated(tmp_path / "grown", ids)
    assert torch.equal(tokens, grown_tokens)
    assert (logits - grown_logits).abs().max() <= 1e-5 * logits.abs().max()
    report = verify(original, tmp_path / "grown", min_tokens=64, mode="full")
    assert report.equivalent, report.verdict
    assert report.weights is not None and report.weights.ok and report.weights.tensors_checked > 0
    assert report.config.equivalent and report.function is not None


def test_growing_an_upcycle_with_virtual_groups_stays_exact(dense_dir, tmp_path):
    dense = dense_dir("llama")
    convert(dense, tmp_path / "moe", UpcycleOptions(experts=2, granularity=2, top_k=2))
    result = grow(tmp_path / "moe", tmp_path / "grown", 3)
    assert result.plan.growth["experts"] == [4, 12] and result.plan.growth["top_k"] == [2, 6]
    # two copies of two shards on a group-limited router (keeps 1 of 2 groups): growing is exact only because
    # each group's router rows are identical, which the plan reads and the block probe reproduces
    assert result.plan.target == "glm4_moe" and result.plan.growth["tied_groups"] == 2
    assert verify(tmp_path / "moe", tmp_path / "grown", min_tokens=64, mode="full").equivalent
    # and against the dense model it all began from, through the conversion's own record
    assert verify(dense, tmp_path / "moe", min_tokens=64, mode="full").equivalent


def test_a_changed_expert_in_a_grown_model_fails_verify(tmp_path):
    original = make_moe("qwen3_moe", tmp_path / "original")
    grow(original, tmp_path / "grown", 2)
    shard = next((tmp_path / "grown").glob("model-*.safetensors"))
    tensors = load_file(shard)
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, shard, metadata={"format": "pt"})
    report = verify(original, tmp_path / "grown", min_tokens=64, mode="full")
    assert not report.equivalent
    assert [m.tensor for m in report.weights.mismatches] == [name]


def test_the_block_probe_catches_a_growth_that_forgets_top_k():
    config = transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2).to_dict()
    right = {**config, "num_local_experts": 8, "num_experts_per_tok": 4}
    wrong = {**config, "num_local_experts": 8}
    assert probe_grown_block(config, right, 2).equivalent
    probe = probe_grown_block(config, wrong, 2)
    assert not probe.equivalent and probe.relative_difference > 1e-2


@pytest.mark.parametrize(
    ("case", "overrides", "reason"),
    [
        ("deepseek_v3", dict(n_group=2, topk_group=1), "keeps 1 of 2 expert groups"),
        ("glm4_moe", dict(norm_topk_prob=False), "norm_topk_prob is false"),
    ],
)
def test_routers_that_copies_would_change_are_refused_and_nothing_is_written(case, overrides, reason, tmp_path):
    original = make_moe(case, tmp_path / "original", **overrides)
    with pytest.raises(UnsupportedModelError, match=reason):
        grow(original, tmp_path / "grown", 2)
    assert not (tmp_path / "grown").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["original"]


def test_a_dense_model_and_a_factor_of_one_are_refused(dense_dir, tmp_path):
    with pytest.raises(UnsupportedModelError, match="no rule for model_type 'llama'"):
        grow(dense_dir("llama"), tmp_path / "grown", 2)
    with pytest.raises(OptionError, match="--factor 1 grows nothing"):
        grow(make_moe("mixtral", tmp_path / "original"), tmp_path / "grown", 1)


def test_the_command_line_grows_reports_and_refuses(cli, tmp_path):
    original = make_moe("mixtral", tmp_path / "original")
    dry = cli("grow", original, tmp_path / "grown", "--factor", "2", "--dry-run")
    assert dry.exit_code == 0 and "dry run" in dry.stdout and not (tmp_path / "grown").exists()
    done = cli("grow", original, tmp_path / "grown", "--json")
    assert done.exit_code == 0
    record = json.loads(done.stdout)
    growth = {"factor": 2, "experts": [4, 8], "top_k": [2, 4], "scoring": "softmax", "tied_groups": 0}
    assert record["plan"]["growth"] == growth
    assert record["plan"]["config_check"]["block"]["class"] == "MixtralSparseMoeBlock"
    again = cli("grow", original, tmp_path / "grown")
    assert again.exit_code != 0 and "--force" in again.stderr
    streamed = cli("verify", original, tmp_path / "grown", "--streaming")
    assert streamed.exit_code == 2 and "checked whole" in streamed.stderr
    checked = cli("verify", original, tmp_path / "grown", "--json")
    assert checked.exit_code == 0 and json.loads(checked.stdout)["equivalent"]
    card = (tmp_path / "grown" / "README.md").read_text()
    assert "8 = 4 x 2" in card and "upcycle verify ORIGINAL THIS_FOLDER" in card


@pytest.mark.slow
def test_smollm2_upcycled_then_grown_passes_verify(tmp_path):
    from upcycle import assets

    smollm2 = assets.smollm2_folder()
    convert(smollm2, tmp_path / "moe", UpcycleOptions(experts=2, top_k=1, layers="26-29"))
    grow(tmp_path / "moe", tmp_path / "grown", 4)
    report = verify(tmp_path / "moe", tmp_path / "grown", min_tokens=128, mode="full")
    assert report.equivalent, report.verdict
    assert report.function.top1_agreement == 1.0
