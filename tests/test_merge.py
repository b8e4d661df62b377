"""`upcycle merge`: experts from several dense models, from mergekit-moe's YAML, and `verify` proving its parts.

The "fine-tunes" are real checkpoints: a tiny random base, re-saved by transformers after every weight moved by
seeded noise (as fine-tuning moves them), so an expert taken from the wrong model, or a tensor taken from an expert
model instead of the base, shows.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import load_clean
from safetensors import safe_open
from test_router_cluster import with_smollm2_tokenizer
from tiny_models import make_dense

from upcycle.convert.merge.gates import gate_rows
from upcycle.errors import OptionError, UnsupportedModelError
from upcycle.merging import merge
from upcycle.verify.merged import verify_merge


def fine_tune_of(base: Path, folder: Path, seed: int, scale: float = 0.02) -> Path:
    """A copy of `base` whose every weight moved by seeded noise, saved by transformers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(folder)
    for path in base.iterdir():  # the tokenizer, as a fine-tune keeps it
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(path, folder / path.name)
    return folder


def write_yaml(
    path: Path, base: Path, experts: list[Path], gate_mode: str, shared: Path | None = None, **extra
) -> Path:
    prompts = [["def fibonacci(n):", "import numpy"], ["Once upon a time"], ["The capital of France is"]]
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}"]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    lines.append("experts:")
    for index, expert in enumerate(experts):
        lines += [f"  - source_model: {expert}", f"    positive_prompts: {prompts[index % 3]!r}"]
    if shared is not None:
        lines += ["shared_experts:", f"  - source_model: {shared}", "    positive_prompts: ['Hello']"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def models(root: Path, family: str, count: int, tokenizer: bool = False) -> tuple[Path, list[Path]]:
    base = root / "base"
    if tokenizer:
        with_smollm2_tokenizer(family, base)
    else:
        make_dense(family, base)
    return base, [fine_tune_of(base, root / f"ft{i}", seed=i + 1) for i in range(count)]


@pytest.mark.parametrize(
    ("family", "gate_mode", "tokenizer", "target", "extra"),
    [
        ("llama", "hidden", True, "mixtral", {}),
        ("llama", "cheap_embed", True, "mixtral", {"dtype": "bfloat16"}),
        ("mistral", "random", False, "mixtral", {}),
        ("qwen3", "uniform_random", False, "qwen3_moe", {"experts_per_token": 1}),
        ("qwen3", "random", True, "qwen3_moe", {"architecture": "qwen3", "dtype": "float16"}),
    ],
)
def test_a_merge_loads_and_verify_proves_its_parts(family, gate_mode, tokenizer, target, extra, tmp_path):
    base, experts = models(tmp_path, family, 3, tokenizer)
    config = write_yaml(tmp_path / "merge.yaml", base, experts, gate_mode, **extra)
    result = merge(config, tmp_path / "moe", seed=3)
    assert result.plan.target == target and not result.plan.exactness.exact
    load_clean(tmp_path / "moe")
    report = verify_merge(config, tmp_path / "moe", tokens=64)
    assert report.parts_proven, report.to_json()
    assert (
        report.routers_checked == len(result.plan.moe_layers)
        and report.tensors_from_base > 0
        and report.base_tensors_replaced > 0
    )
    assert [f.expert for f in report.forced] == ["experts[0]", "experts[1]", "experts[2]"]
    assert all(f.worst_relative <= 1e-6 for f in report.forced)
    assert [d.model for d in report.distances] == ["base_model", "experts[0]", "experts[1]", "experts[2]"]
    assert all(d.logits_relative > 0 for d in report.distances)  # a merge is none of its sources


@pytest.mark.parametrize(("family", "target"), [("olmo2", "flex_olmo"), ("granite", "granitemoe"), ("phi3", "mixtral")])
def test_other_families_merge_into_their_conversion_class(family, target, tmp_path):
    """Phi-3's fused qkv and gate_up, Granite's multipliers and its `block_sparse_moe`, OLMo 2's norms."""
    from family_configs import family_config
    from hub_models import save_hub_style

    base = save_hub_style(family_config(family), tmp_path / "base")
    experts = [fine_tune_of(base, tmp_path / f"ft{i}", seed=i + 1) for i in range(2)]
    config = write_yaml(tmp_path / "merge.yaml", base, experts, "random")
    try:
        assert merge(config, tmp_path / "moe").plan.target == target
    except UnsupportedModelError as refusal:  # as the conversion is refused there (see test_families)
        assert family == "phi3" and "greedy generate() with the cache" in str(refusal), refusal
        assert not (tmp_path / "moe").exists()
        return
    report = verify_merge(config, tmp_path / "moe", tokens=32)
    assert report.parts_proven, report.to_json()
    assert all(f.worst_relative <= 1e-6 for f in report.forced)


def test_a_qwen2_moe_merge_has_the_shared_models_mlp_behind_its_gate(tmp_path):
    base, experts = models(tmp_path, "qwen2", 3)
    config = write_yaml(tmp_path / "merge.yaml", base, experts[:2], "random", shared=experts[2])
    result = merge(config, tmp_path / "moe", seed=5)
    assert result.plan.target == "qwen2_moe"
    assert result.plan.config["shared_expert_intermediate_size"] == result.plan.config["intermediate_size"]
    moe = load_clean(tmp_path / "moe")
    report = verify_merge(config, tmp_path / "moe", tokens=64)
    assert report.parts_proven, report.to_json()
    assert [f.expert for f in report.forced] == ["experts[0]", "experts[1]", "shared_experts[0]"]
    # the shared gate's row is the third row gate_mode random draws, as mergekit gives it
    drawn = torch.randn((3, 3, 64), generator=torch.Generator().manual_seed(5))
    for layer in range(3):
        block = moe.model.layers[layer].mlp
        assert torch.equal(block.gate.weight.data, drawn[layer, :2])
        assert torch.equal(block.shared_expert_gate.weight.data, drawn[layer, 2:])


def test_verify_fails_a_merge_checked_against_experts_in_another_order(tmp_path):
    base, experts = models(tmp_path, "llama", 2)
    merge(write_yaml(tmp_path / "merge.yaml", base, experts, "random"), tmp_path / "moe")
    swapped = write_yaml(tmp_path / "swapped.yaml", base, experts[::-1], "random")
    report = verify_merge(swapped, tmp_path / "moe", tokens=32)
    assert not report.parts_proven
    assert all(f.worst_relative > 1e-3 for f in report.forced)


def test_verify_fails_a_merge_whose_base_tensor_was_swapped(tmp_path):
    base, experts = models(tmp_path, "llama", 2)
    config = write_yaml(tmp_path / "merge.yaml", base, experts, "random")
    merge(config, tmp_path / "moe")
    other = write_yaml(tmp_path / "other-base.yaml", experts[0], experts, "random")
    report = verify_merge(other, tmp_path / "moe", tokens=32)
    assert not report.parts_proven
    assert any("differs from the base's" in problem for problem in report.weight_problems)


def test_random_gates_are_mergekits_draw_from_the_same_seed(tmp_path):
    base = make_dense("llama", tmp_path / "base")
    rows = gate_rows("random", base, [[["a"], []]] * 4, (0, 1, 2), seed=11)
    torch.manual_seed(11)  # mergekit-moe draws torch.randn((layers, experts, hidden)) from the global generator
    expected = torch.randn((3, 4, 64))
    assert all(torch.equal(rows[layer], expected[layer]) for layer in range(3))
    uniform = gate_rows("uniform_random", base, [[["a"], []]] * 4, (0, 1, 2), seed=11)
    assert all(u.abs().max() <= 1 / math.sqrt(64) for u in uniform.values())


def test_cheap_embed_rows_are_the_normalised_prompt_embeddings(tmp_path):
    base = with_smollm2_tokenizer("llama", tmp_path / "base")
    prompts = [[["def f(x):", "import os"], ["Once upon"]], [["The capital of France is"], []]]
    rows = gate_rows("cheap_embed", base, prompts, (0, 1), seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    embed = model.get_input_embeddings().weight.detach()

    def unit_sum(texts):  # mergekit: one-hot tokens times the embedding, summed over tokens and prompts
        ids = [tokenizer(tokenizer.bos_token + t, add_special_tokens=False)["input_ids"] for t in texts]
        onehot = torch.cat([torch.nn.functional.one_hot(torch.tensor(i), embed.shape[0]).float() for i in ids])
        total = (onehot @ embed).sum(0)
        return total / total.norm()

    for index, (positive, negative) in enumerate(prompts):
        row = unit_sum(positive) - (unit_sum(negative) if negative else 0)
        expected = row / row.norm()
        assert torch.allclose(rows[0][index], expected, atol=1e-6)
        assert torch.equal(rows[0][index], rows[1][index])  # the same row in every layer


def test_residual_scale_scales_the_experts_down_projection(tmp_path):
    base, experts = models(tmp_path, "llama", 2)
    config = tmp_path / "merge.yaml"
    write_yaml(config, base, experts, "random")
    entry = "  - source_model: " + str(experts[1])
    config.write_text(config.read_text().replace(entry, "  - residual_scale: 0.5\n" + entry.replace("-", " ", 1)))
    merge(config, tmp_path / "moe")
    report = verify_merge(config, tmp_path / "moe", tokens=32)
    assert report.parts_proven, report.to_json()
    shard = next((tmp_path / "moe").glob("model-*.safetensors"))
    with safe_open(str(shard), "pt") as handle:
        down = handle.get_tensor("model.layers.0.block_sparse_moe.experts.1.w2.weight")
    source = transformers.AutoModelForCausalLM.from_pretrained(experts[1])
    assert torch.equal(down, source.model.layers[0].mlp.down_proj.weight.detach() * 0.5)


def test_models_of_another_shape_are_refused_and_nothing_is_written(tmp_path):
    base, experts = models(tmp_path, "llama", 1)
    other = make_dense("llama", tmp_path / "wide", intermediate_size=128)
    config = write_yaml(tmp_path / "merge.yaml", base, [experts[0], other], "random")
    with pytest.raises(UnsupportedModelError, match=r"experts\[1\].*intermediate 128.*intermediate 96"):
        merge(config, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()


def test_a_shared_expert_on_a_class_without_one_is_refused(tmp_path):
    base, experts = models(tmp_path, "llama", 3)
    config = write_yaml(tmp_path / "merge.yaml", base, experts[:2], "random", shared=experts[2], architecture="mixtral")
    with pytest.raises(UnsupportedModelError, match="MixtralForCausalLM class has no shared expert"):
        merge(config, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("base_model: b\nexperts: []\n", "experts: none listed"),
        ("base_model: b\ngate_mode: hiden\nexperts: [{source_model: a}]\n", "gate_mode: unknown value 'hiden'"),
        (
            "base_model: b\nexperts: [{source_model: a, positive_prompt: [x]}]\n",
            "unknown key experts[0].positive_prompt",
        ),
        ("base_model: b\nexperts_per_token: 1\nexperts: [{source_model: a}]\n", "experts[0] has no positive_prompts"),
        ("base_model: b\ngate_mode: random\nexperts_per_token: 3\nexperts: [{source_model: a}]\n", "exceeds the 1"),
        ("base_model: b\ngate_mode: random\nexperts: [{source_model: a, noise_scale: 0.1}]\n", "noise_scale"),
        ("base_model: b\nbase_model: c\nexperts: []\n", "given twice"),
        (
            "base_model: b\ngate_mode: random\narchitecture: deepseek\nexperts_per_token: 1\n"
            "experts: [{source_model: a}]\n",
            "architecture: unknown value 'deepseek'",
        ),
        (
            "base_model: b\nexperts: [{source_model: a, positive_prompts: [x]}, {source_model: c, "
            "positive_prompts: [x]}]\n",
            "the same prompts",
        ),
    ],
)
def test_a_bad_merge_config_is_one_line_before_any_model_is_read(yaml_text, message, tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(yaml_text, encoding="utf-8")
    with pytest.raises(OptionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        merge(config, tmp_path / "moe")


def test_the_cli_merges_and_verify_proves_the_parts(cli, tmp_path):
    base, experts = models(tmp_path, "llama", 2)
    config = write_yaml(tmp_path / "merge.yaml", base, experts, "random")
    result = cli("merge", config, tmp_path / "moe")
    assert result.exit_code == 0, result.output
    assert "prove its parts with: upcycle verify" in result.output
    result = cli("verify", config, tmp_path / "moe", "--min-tokens", "32")
    assert result.exit_code == 0, result.output
    assert "parts proven" in result.output
    again = cli("merge", config, tmp_path / "moe")
    assert again.exit_code == 2 and "--force" in again.output
    swapped = write_yaml(tmp_path / "swapped.yaml", base, experts[::-1], "random")
    assert cli("verify", swapped, tmp_path / "moe", "--min-tokens", "32").exit_code == 1


@pytest.mark.slow
def test_two_smollm2_fine_tunes_merge_and_verify(tmp_path):
    from upcycle import assets

    smollm2 = assets.smollm2_folder()
    experts = [fine_tune_of(smollm2, tmp_path / f"ft{i}", seed=i + 1, scale=0.002) for i in range(2)]
    config = write_yaml(tmp_path / "merge.yaml", smollm2, experts, "hidden", dtype="bfloat16")
    result = merge(config, tmp_path / "moe")
    assert result.plan.target == "mixtral"
    report = verify_merge(config, tmp_path / "moe", tokens=64)
    assert report.parts_proven, report.to_json()
    assert report.routers_checked == 30 and len(report.forced) == 2


@pytest.mark.parametrize(
    ("architecture", "target"),
    [("qwen3_moe", "qwen3_moe"), ("Qwen3-MoE", "qwen3_moe"), ("qwen3", "qwen3_moe"), ("Qwen MoE", "qwen2_moe"),
     ("qwen2_moe", "qwen2_moe"), ("Mixtral", "mixtral")],
)  # fmt: skip
def test_architecture_names_the_class_in_any_spelling(architecture, target):
    from upcycle.convert.merge.spec import MergeSpec

    spec = MergeSpec(base_model="b", gate_mode="random", experts_per_token=1, experts=[{"source_model": "a"}],
                     architecture=architecture)  # fmt: skip
    assert spec.target == target


def test_verify_remakes_missing_gate_rows_and_refuses_routers_of_another_config(tmp_path, monkeypatch):
    import json

    base, experts = models(tmp_path, "llama", 2, tokenizer=True)
    config = write_yaml(tmp_path / "merge.yaml", base, experts, "cheap_embed")
    merge(config, tmp_path / "moe")
    record = json.loads((tmp_path / "moe" / "upcycle.json").read_text())
    assert set(record["merge"]["sources_sha256"]) == {"experts[0]", "experts[1]"}
    assert all("model.safetensors" in files for files in record["merge"]["sources_sha256"].values())
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "empty-cache"))  # a machine that never made these rows
    report = verify_merge(config, tmp_path / "moe", tokens=32)
    assert report.parts_proven and report.routers_checked == 2, report.to_json()
    other = write_yaml(tmp_path / "other.yaml", base, experts, "random")
    report = verify_merge(other, tmp_path / "moe", tokens=32)
    assert not report.parts_proven
    assert any("routers were not made by this config" in problem for problem in report.weight_problems)
