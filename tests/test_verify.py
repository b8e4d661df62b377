"""verify passes what convert wrote and catches every kind of tampering, with exit code 1."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from upcycle.convert import UpcycleOptions
from upcycle.upcycling import convert

SHARD = "model-00001-of-00001.safetensors"


def tamper(folder, edit) -> None:
    tensors = load_file(folder / SHARD)
    edit(tensors)
    save_file(tensors, folder / SHARD, metadata={"format": "pt"})


@pytest.fixture
def grouped(dense_dir, tmp_path):
    """Llama upcycled with virtual groups: E4 x G2, top-4, so expert shards differ from one another."""
    out = tmp_path / "moe"
    convert(dense_dir("llama"), out, UpcycleOptions(experts=4, granularity=2, top_k=4))
    return dense_dir("llama"), out


def test_untouched_checkpoint_is_equivalent(cli, grouped):
    dense, moe = grouped
    result = cli("verify", dense, moe)
    assert result.exit_code == 0, result.output
    assert "EQUIVALENT" in result.output


def test_json_report(cli, grouped):
    dense, moe = grouped
    result = cli("verify", dense, moe, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["equivalent"] is True
    assert report["weights"]["tensors_checked"] > 0 and not report["weights"]["mismatches"]
    function = report["function"]
    assert function["logits_rel_diff"] <= 1e-5 and function["top1_agreement"] == 1.0
    assert len(function["layers"]) == 4  # embeddings + 3 decoder layers


def test_single_perturbed_expert_weight_is_caught(cli, grouped):
    dense, moe = grouped
    name = "model.layers.1.mlp.experts.5.up_proj.weight"

    def nudge(tensors):
        tensors[name][3, 7] += 1e-3

    tamper(moe, nudge)
    result = cli("verify", dense, moe, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 1
    assert [m["tensor"] for m in report["weights"]["mismatches"]] == [name]
    assert "expert 5 (up)" in report["weights"]["mismatches"][0]["problem"]


def test_two_swapped_experts_are_caught(cli, grouped):
    dense, moe = grouped

    def swap(tensors):
        for projection in ("gate", "up", "down"):
            a = f"model.layers.0.mlp.experts.2.{projection}_proj.weight"
            b = f"model.layers.0.mlp.experts.3.{projection}_proj.weight"  # other shard of the same copy
            tensors[a], tensors[b] = tensors[b], tensors[a]

    tamper(moe, swap)
    result = cli("verify", dense, moe)
    assert result.exit_code == 1
    assert "NOT EQUIVALENT" in result.output and "experts.2" in result.output


def test_router_row_broken_inside_a_virtual_group_is_caught(cli, grouped):
    dense, moe = grouped

    def break_row(tensors):
        tensors["model.layers.2.mlp.gate.weight"][5] += 0.5  # expert 5 = shard 1 of copy 2

    tamper(moe, break_row)
    result = cli("verify", dense, moe, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 1
    assert "breaks virtual group 2" in report["weights"]["mismatches"][0]["problem"]


def test_scaled_experts_show_in_weights_and_function(cli, grouped):
    dense, moe = grouped

    def zero_expert(tensors):
        for e in range(8):
            tensors[f"model.layers.0.mlp.experts.{e}.down_proj.weight"].mul_(0.5)

    tamper(moe, zero_expert)
    result = cli("verify", dense, moe, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 1
    assert report["function"]["logits_rel_diff"] > 1e-3
    assert report["function"]["layers"][0]["rel_diff"] == 0.0 and report["function"]["layers"][1]["rel_diff"] > 0


def test_a_different_dense_model_is_caught(cli, dense_dir, grouped):
    _, moe = grouped
    other = dense_dir("llama", seed=1)  # same config and shapes, other weights
    result = cli("verify", other, moe, "--weights-only")
    assert result.exit_code == 1
    assert "sha256" in result.output


def test_approximate_method_passes_only_with_explicit_tolerance(cli, dense_dir, tmp_path):
    out = tmp_path / "moe"
    convert(dense_dir("qwen3"), out, UpcycleOptions(router="softmax-topk"))
    strict = cli("verify", dense_dir("qwen3"), out, "--json")
    report = json.loads(strict.stdout)
    assert strict.exit_code == 1 and "approximate by design" in report["verdict"]
    assert report["function"]["logits_rel_diff"] > 0 and report["weights"]["mismatches"] == []
    loose = cli("verify", dense_dir("qwen3"), out, "--tol", "10")
    assert loose.exit_code == 0, loose.output


def test_verify_refuses_a_folder_not_written_by_upcycle(cli, dense_dir):
    result = cli("verify", dense_dir("llama"), dense_dir("llama"))
    assert result.exit_code == 2
    assert "upcycle.json" in result.stderr and "Fix:" in result.stderr
