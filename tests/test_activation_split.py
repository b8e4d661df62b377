"""`--split activation`: each copy's G shards group neurons that fire together; exact by construction, verified.

Tiny checkpoints of three families and the real SmolLM2 run real Shakespeare; every conversion must pass verify,
its shards must be a permutation of the dense neurons (each neuron in exactly one shard of each copy), and that
permutation must group co-firing neurons better than the contiguous split does.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from upcycle.convert import UpcycleOptions
from upcycle.convert.calibration import calibrated
from upcycle.convert.neuron_split import balanced_order
from upcycle.errors import OptionError
from upcycle.upcycling import convert
from upcycle.verify import verify


def tensor(folder, name: str) -> torch.Tensor:
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            if name in handle.keys():  # noqa: SIM118 - a safetensors handle is no dict
                return handle.get_tensor(name)
    raise KeyError(name)


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("llama", dict(experts=2, granularity=2, top_k=2)),
        ("qwen2", dict(experts=2, granularity=3, top_k=3, layers="2")),
        ("qwen3", dict(experts=4, granularity=2, top_k=4, router_init="cluster")),
    ],
)
def test_an_activation_split_keeps_the_model_exact(family, options, dense_dir, tmp_path):
    dense = dense_dir(family)
    result = convert(dense, tmp_path / "moe", UpcycleOptions(split="activation", calibration_tokens=512, **options))
    plan = result.plan
    report = verify(dense, tmp_path / "moe", min_tokens=64, mode="full")
    assert report.equivalent, report.verdict
    assert report.weights.ok and not report.weights.not_remade
    key = next(r.neuron_order for r in plan.recipes if r.op == "expert")
    groups = options["granularity"]
    for layer in plan.moe_layers:
        order = calibrated(key, layer)
        assert sorted(order.tolist()) == list(range(96))  # a permutation: every neuron once
        assert order.tolist() != list(range(96))  # and not the contiguous split
        width = 96 // groups
        for g in range(groups):  # shard g of every copy holds the g-th block of the order, in each projection
            rows = order[g * width : (g + 1) * width]
            gate = next(r for r in plan.recipes if r.layer == layer and r.expert == g and r.projection == "gate")
            down = next(r for r in plan.recipes if r.layer == layer and r.expert == g and r.projection == "down")
            dense_gate, dense_down = tensor(dense, gate.source), tensor(dense, down.source)
            assert torch.equal(tensor(tmp_path / "moe", gate.name), dense_gate[rows])
            assert torch.equal(tensor(tmp_path / "moe", down.name), dense_down[:, rows])


def test_the_balanced_split_groups_neurons_that_fire_together():
    generator = torch.Generator().manual_seed(0)
    tokens, groups = 400, 4
    patterns = (torch.rand(groups, tokens, generator=generator) < 0.2).float()  # four sets of co-firing neurons
    owner = torch.arange(64) % groups  # interleaved: the contiguous split mixes every set into every shard
    features = patterns[owner] * (1 + 0.1 * torch.rand(64, tokens, generator=generator))
    order = balanced_order(features, groups, seed=3)
    shards = order.view(groups, -1)
    assert sorted(order.tolist()) == list(range(64))
    assert all(len(set(owner[shard].tolist())) == 1 for shard in shards)  # each shard: one co-firing set


def test_an_activation_split_needs_virtual_groups(dense_dir, tmp_path):
    with pytest.raises(OptionError, match="needs --granularity > 1"):
        convert(dense_dir("llama"), tmp_path / "moe", UpcycleOptions(split="activation"))
    assert not (tmp_path / "moe").exists()


@pytest.mark.slow
def test_smollm2_with_activation_split_shards_passes_verify(tmp_path):
    from upcycle import assets

    smollm2 = assets.smollm2_folder()
    options = UpcycleOptions(experts=2, granularity=4, top_k=4, layers="27-29", split="activation")
    convert(smollm2, tmp_path / "moe", UpcycleOptions(**{**options.to_json(), "calibration_tokens": 1024}))
    report = verify(smollm2, tmp_path / "moe", min_tokens=128, mode="full")
    assert report.equivalent, report.verdict
    assert report.function.top1_agreement == 1.0 and not report.weights.not_remade
