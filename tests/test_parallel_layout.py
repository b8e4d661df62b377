"""The parallel layout and the memory plan: resolved and refused before any weight is read (no process group)."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers
from train_helpers import make_tiny_pair

from upcycle.errors import OptionError
from upcycle.train.memory_plan import Workload, plan_memory
from upcycle.train.model_shape import meta_model, model_shape
from upcycle.train.parallel import Layout, engine_available, resolve_layout
from upcycle.units import format_bytes, parse_size

needs_engine = pytest.mark.skipif(not engine_available(), reason="this transformers has no expert parallelism or HSDP")


def parallel(**values) -> SimpleNamespace:
    return SimpleNamespace(**({"fsdp": None, "ep": 1, "replicate": 1, "tp": 1} | values))


@needs_engine
def test_fsdp_defaults_to_every_rank_the_other_degrees_leave():
    assert resolve_layout(parallel(), 8, 8) == Layout(8, replicate=1, fsdp=8, tp=1, ep=1)
    layout = resolve_layout(parallel(replicate=8, ep=8), 64, 8)
    assert (layout.fsdp, layout.efsdp, layout.data_parallel) == (8, 1, 64)
    layout = resolve_layout(parallel(ep=2), 4, 4)
    assert (layout.fsdp, layout.efsdp) == (4, 2)


@pytest.mark.parametrize(
    ("values", "world", "experts", "names"),
    [
        ({"ep": 3}, 6, 8, "does not divide the model's 8 experts"),
        ({"ep": 4}, 2, 8, "does not divide the 2 rank(s) of one replica"),
        ({"replicate": 3}, 4, 8, "parallel.replicate=3 does not divide the 4 rank(s)"),
        ({"fsdp": 2}, 4, 8, "= 2 rank(s), but 4 were launched"),
        ({"ep": 2}, 2, 0, "no routed experts"),
        ({"tp": 2}, 2, 8, "tensor parallelism is not part"),
    ],
)
def test_impossible_layouts_are_refused_with_the_key_and_a_fix(values, world, experts, names):
    with pytest.raises(OptionError) as caught:
        resolve_layout(parallel(**values), world, experts)
    assert names in caught.value.problem and caught.value.fix


def test_expert_owners_follow_the_expert_mesh_ep_fastest():
    layout = Layout(8, fsdp=8, ep=4)
    assert [list(layout.experts_of_rank(r, 8)) for r in range(8)] == [[0, 1], [2, 3], [4, 5], [6, 7]] * 2
    text = "\n".join(layout.describe(8))
    assert "ep 4 x expert-fsdp 2" in text and "rank 5: E2-E3" in text


@pytest.mark.skipif(engine_available(), reason="this transformers has expert parallelism")
def test_an_engine_without_expert_parallelism_is_named():
    with pytest.raises(OptionError) as caught:
        resolve_layout(parallel(ep=2), 2, 4)
    assert f"transformers {transformers.__version__}" in caught.value.problem


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    return make_tiny_pair(tmp_path_factory.mktemp("tiny"))[1]


def test_model_shape_counts_every_parameter_once(tiny_moe):
    model = meta_model(tiny_moe)
    shape = model_shape(model)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.num_experts == 4 and shape.head_params == 0  # tied head
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert shape.expert_params == experts
    layer = shape.layers[0]
    assert (layer.hidden, layer.mlp_width, layer.top_k, layer.kv_width) == (64, 96, 2, 32)


def test_memory_plan_shards_weights_and_states_by_the_layout(tiny_moe):
    shape = model_shape(meta_model(tiny_moe))
    work = Workload(micro_batch_size=2, seq_len=32, compute_bytes=4, activation_checkpointing=False)
    one = dict((name, size) for name, size, _ in plan_memory(shape, Layout(1), work).rows)
    four = dict((name, size) for name, size, _ in plan_memory(shape, Layout(4, fsdp=4, ep=2), work).rows)
    assert one["parameters (fp32 master)"] == 4 * shape.total_params
    assert one["optimizer (AdamW, 2 x fp32)"] == 2 * one["gradients (fp32)"] == 2 * one["parameters (fp32 master)"]
    dense = shape.total_params - shape.expert_params
    assert four["parameters (fp32 master)"] == 4 * (dense // 4 + shape.expert_params // 4)
    assert four["activations"] == one["activations"]  # the same tokens per rank
    assert "gathered weights and gradients" in four and "gathered weights and gradients" not in one
    checkpointed = Workload(2, 32, 4, activation_checkpointing=True)
    rows = dict((n, s) for n, s, _ in plan_memory(shape, Layout(1), checkpointed).rows)
    assert rows["activations"] < one["activations"]


def test_device_memory_sizes_parse_and_refuse():
    assert parse_size("80GiB", "--device-memory") == 80 * 1024**3 == parse_size("80gib", "--device-memory")
    assert parse_size("80GB", "--device-memory") == 80 * 1000**3  # one rule for every size: GB = 1e9
    assert format_bytes(3 * 1024**3) == "3.00 GiB"
    with pytest.raises(OptionError, match="is not a size"):
        parse_size("lots", "--device-memory")


@needs_engine
def test_dry_run_plans_an_8x8b_upcycle_on_64_ranks_without_weights(tmp_path):
    """Llama-3-8B shapes upcycled to E8 top-2, ep 8 within each of 8 nodes: only config.json exists."""
    from train_helpers import recipe_dict, run_cli, shakespeare_texts, write_recipe

    folder = tmp_path / "mixtral-8x8b"
    config = transformers.MixtralConfig(
        hidden_size=4096,
        intermediate_size=14336,
        vocab_size=128256,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    config.save_pretrained(folder)
    data = recipe_dict(folder, tmp_path / "run", shakespeare_texts(), batch={"micro_batch_size": 1})
    data["data"]["seq_len"] = 4096
    data["model"]["activation_checkpointing"] = True
    recipe = write_recipe(tmp_path / "r.yaml", data)
    args = ["train", str(recipe), "--dry-run", "--world-size", "64", "--device-memory", "80GiB"]
    args += ["--set", "run.precision=bf16", "--set", "parallel.ep=8"]
    per_node = run_cli(*args, "--set", "parallel.replicate=8")  # HSDP: each node holds a whole copy
    assert per_node.returncode == 0, per_node.stderr
    out = per_node.stdout
    assert "model: 47,491,321,856 parameters (45,097,156,608 in experts), 32 layers" in out
    assert "replicate 8 x fsdp 8" in out and "ep 8 x expert-fsdp 1 x replicate 8 -> 1 whole expert(s) per rank" in out
    assert "does NOT fit the given --device-memory (80.00 GiB per rank)" in out, out
    across = run_cli(*args)  # one FSDP group of 64: experts sharded 8 ways again, dense weights 64 ways
    assert across.returncode == 0, across.stderr
    assert "replicate 1 x fsdp 64" in across.stdout and "ep 8 x expert-fsdp 8" in across.stdout
    assert "\nfits the given --device-memory" in across.stdout, across.stdout
    assert not (tmp_path / "run").exists()  # nothing written, nothing launched
    refused = run_cli(*args, "--set", "parallel.ep=3")
    assert refused.returncode == 2 and "parallel.ep=3" in refused.stderr


@needs_engine
def test_the_shipped_multi_node_recipe_plans_two_nodes_of_eight(tmp_path):
    """The multi-node recipe as shipped (SmolLM2 upcycled to E8) on 16 ranks: one replica per node, each GPU of a
    node owning 1 of the 8 experts; planned from the conversion plan, nothing converted."""
    from train_helpers import isolated_cache, run_cli

    cache = isolated_cache(tmp_path / "cache")
    args = ["train", "multi-node", "--dry-run", "--world-size", "16", "--device-memory", "80GiB"]
    result = run_cli(*args, "--set", f"run.output_dir={tmp_path / 'run'}", env={"UPCYCLE_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    assert "not converted yet; shapes from the conversion plan" in result.stdout
    assert not (cache / "conversions").exists()
    assert "replicate 2 x fsdp 8" in result.stdout and "ep 8 x expert-fsdp 1 x replicate 2" in result.stdout
    assert "rank 9: E1" in result.stdout and "16 data rank(s)" in result.stdout
    assert "\nfits the given --device-memory" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GB", 2 * 1000**3), ("2GiB", 2 * 1024**3), ("500mb", 500 * 1000**2), ("1.5TB", 1_500_000_000_000),
     ("4096", 4096), (" 20 MiB ", 20 * 1024**2)],
)  # fmt: skip
def test_every_size_option_reads_a_size_the_same_way(text, expected):
    """--shard-size, --device-memory and the options' default: one parser, GB = 1e9 and GiB = 2^30."""
    assert parse_size(text, "--shard-size") == expected == parse_size(text, "--device-memory")


def test_the_shard_size_default_is_the_command_lines():
    from upcycle.cli.convert import convert_cmd
    from upcycle.convert.options import UpcycleOptions

    default = inspect.signature(convert_cmd).parameters["shard_size"].default
    assert parse_size(default, "--shard-size") == UpcycleOptions().shard_size == 2 * 1000**3


@pytest.mark.parametrize("text", ["2 GB GB", "lots", "-1GB", "0", "2XB", "inf"])
def test_a_size_that_is_not_one_is_refused_naming_its_option(text):
    with pytest.raises(OptionError, match="--shard-size"):
        parse_size(text, "--shard-size")
