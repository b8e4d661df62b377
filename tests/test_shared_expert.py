"""A real shared expert: the first --shared-width neurons of every dense MLP stay always on, the rest become the
routed experts. Exact on Qwen2-MoE (a gate written zero is sigmoid 1/2, cancelled by a doubled down projection)
and on the group-limited classes (added as it is, a whole number of routed experts wide); refused elsewhere."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_clean
from safetensors import safe_open

from upcycle.convert import UpcycleOptions
from upcycle.errors import SourceError, UnsupportedModelError
from upcycle.upcycling import convert
from upcycle.verify import verify

INTER = 96  # the tiny models' intermediate size
CASES = {
    "llama -> qwen2_moe": ("llama", dict(target="qwen2_moe", experts=4, shared_width=32)),
    "qwen2 -> qwen2_moe": ("qwen2", dict(target="qwen2_moe", experts=4, shared_width=32)),
    "llama -> qwen2_moe, softmax-topk zero router": (
        "llama",
        dict(target="qwen2_moe", experts=4, shared_width=48, router="softmax-topk", router_init="zero"),
    ),
    "llama -> glm4_moe": ("llama", dict(target="glm4_moe", experts=4, granularity=2, top_k=2, shared_width=32)),
    "qwen2 -> glm4_moe": ("qwen2", dict(target="glm4_moe", experts=4, granularity=2, top_k=2, shared_width=32)),
    "qwen3 -> dots1": ("qwen3", dict(target="dots1", experts=4, granularity=2, top_k=4, shared_width=32)),
}


def tensor(folder, name: str) -> torch.Tensor:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(folder / index[name], framework="pt") as handle:
        return handle.get_tensor(name)


@pytest.mark.parametrize("case", list(CASES))
def test_a_shared_expert_keeps_the_model_exact(dense_dir, tmp_path, case):
    family, options = CASES[case]
    dense, moe = dense_dir(family), tmp_path / "moe"
    result = convert(dense, moe, UpcycleOptions(**options))
    plan = result.plan
    assert plan.exactness.exact and "shared expert of" in plan.exactness.method
    report = verify(dense, moe)
    assert report.equivalent, report.verdict
    assert report.weights is not None and not report.weights.mismatches
    assert verify(dense, moe, mode="streaming").equivalent  # layer by layer too
    load_clean(moe)  # no missing, unexpected or mismatched key in plain transformers
    config = json.loads((moe / "config.json").read_text())
    width, down = options["shared_width"], "model.layers.0.mlp.down_proj.weight"
    with safe_open(dense / "model.safetensors", framework="pt") as handle:
        dense_down = handle.get_tensor(down)
    if options["target"] == "qwen2_moe":
        assert config["shared_expert_intermediate_size"] == width
        assert config["moe_intermediate_size"] == INTER - width
        assert torch.equal(tensor(moe, "model.layers.0.mlp.shared_expert_gate.weight"), torch.zeros(1, 64))
        shared_down = tensor(moe, "model.layers.0.mlp.shared_expert.down_proj.weight")
        assert torch.equal(shared_down, 2 * dense_down[:, :width])  # times sigmoid(0) = 1/2: the dense neurons
    else:
        routed = (INTER - width) // options["granularity"]
        assert config["moe_intermediate_size"] == routed and config["n_shared_experts"] * routed == width
        assert torch.equal(tensor(moe, "model.layers.0.mlp.shared_experts.down_proj.weight"), dense_down[:, :width])


def test_without_a_shared_width_nothing_changes(dense_dir, tmp_path):
    """The default writes what upcycle always wrote: a zero-wide shared expert, and options JSON without the key."""
    dense = dense_dir("qwen2")
    result = convert(dense, tmp_path / "moe", UpcycleOptions(experts=4))
    assert "shared_width" not in result.plan.options.to_json()
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["shared_expert_intermediate_size"] == 0


@pytest.mark.parametrize(
    ("family", "options", "said"),
    [
        ("llama", dict(target="mixtral", shared_width=32), "MixtralForCausalLM has no shared expert"),
        ("qwen3", dict(target="qwen3_moe", shared_width=32), "Qwen3MoeForCausalLM has no shared expert"),
        ("llama", dict(target="glm4_moe", granularity=2, top_k=2, shared_width=16), "a whole number of routed"),
    ],
)
def test_a_class_that_cannot_hold_the_shared_expert_is_refused_with_its_reason(
    dense_dir, tmp_path, family, options, said
):
    with pytest.raises(UnsupportedModelError, match=said):
        convert(dense_dir(family), tmp_path / "moe", UpcycleOptions(experts=4, **options))
    assert not (tmp_path / "moe").exists()


def test_auto_picks_a_class_with_a_shared_expert_and_a_width_too_wide_is_refused(dense_dir, tmp_path):
    plan = convert(dense_dir("llama"), tmp_path / "moe", UpcycleOptions(experts=4, shared_width=32), dry_run=True)
    assert plan.plan.target == "qwen2_moe"
    with pytest.raises((SourceError, UnsupportedModelError), match="shared"):
        convert(dense_dir("llama"), tmp_path / "wide", UpcycleOptions(experts=4, shared_width=INTER))
    assert not (tmp_path / "wide").exists()


def test_the_command_line_and_a_recipe_take_the_shared_width(cli, dense_dir, tmp_path):
    result = cli("convert", dense_dir("llama"), tmp_path / "moe", "-e", "4", "--shared-width", "32", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["plan"]["options"]["shared_width"] == 32 and report["plan"]["target"] == "qwen2_moe"
    from upcycle.train.recipe import recipe_from_dict

    data = {
        "model": {"source": "d", "upcycle": {"experts": 4, "shared_width": 32}},
        "data": {"train": "asset:shakespeare/train"},
        "batch": {"steps": 1},
        "run": {"output_dir": "o"},
    }
    recipe = recipe_from_dict(data, tmp_path, resolve_assets=False)
    assert recipe.model.upcycle.shared_width == 32


def test_expert_rows_that_grouped_mm_cannot_run_are_refused(dense_dir, tmp_path):
    """Rows of 24 bytes (12 bf16 values) stop transformers' default experts; when torch lifts that, so can we. The
    rule is the stored dtype's; a narrower load is left to the user, with a note."""
    import transformers

    config = transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=12, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        shared_expert_intermediate_size=0,
    )  # fmt: skip
    model = transformers.Qwen2MoeForCausalLM(config).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiple of 16 bytes"):
        model(torch.randint(0, 64, (1, 8)))
    dense = dense_dir("llama", intermediate_size=24)
    bf16 = UpcycleOptions(experts=4, granularity=2, top_k=2, dtype="bfloat16")
    with pytest.raises(UnsupportedModelError, match="a routed expert width of 12 in bfloat16 is 24 bytes"):
        convert(dense, tmp_path / "moe", bf16)
    with pytest.raises(UnsupportedModelError, match="routed expert width of 6 in float32 is 24 bytes"):
        convert(dense_dir("llama"), tmp_path / "moe", UpcycleOptions(experts=4, shared_width=90))
    assert not (tmp_path / "moe").exists()
    fp32 = convert(dense, tmp_path / "fp32", UpcycleOptions(experts=4, granularity=2, top_k=2))  # 48-byte rows run
    assert any("experts_implementation='eager'" in note for note in fp32.plan.exactness.notes)
    assert not (tmp_path / "moe").exists()


def test_training_from_a_recipe_with_a_shared_expert_starts_at_the_dense_loss(tiny_pair, texts, tmp_path, monkeypatch):
    from train_helpers import isolated_cache, recipe_dict

    from upcycle.train.loop import train
    from upcycle.train.metrics import read_metrics
    from upcycle.train.recipe import recipe_from_dict

    monkeypatch.setenv("UPCYCLE_CACHE", str(isolated_cache(tmp_path / "cache")))
    data = recipe_dict(
        tiny_pair[0], tmp_path / "run", texts, batch={"micro_batch_size": 2, "grad_accum": 1, "steps": 2}
    )
    data["model"] = {"source": str(tiny_pair[0]), "upcycle": {"experts": 4, "top_k": 2, "shared_width": 32}}
    summary = train(recipe_from_dict(data, tmp_path))
    assert summary.conversion is not None and summary.conversion.record["options"]["shared_width"] == 32
    first = next(r for r in read_metrics(tmp_path / "run") if r.get("kind") == "eval")
    assert first["step0_matches_dense"] is True
    exported = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert exported["shared_expert_intermediate_size"] == 32
