"""The planning functions one at a time, without weights: layer lists, expert weight factors, the choice of target
class, and the JSON form of tensor recipes. Sources are configs built with transformers' own config classes, their
tensors named by a model built on the meta device (no weight is ever made)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from hypothesis import given
from hypothesis import strategies as st

from upcycle.convert.exactness import expert_scales
from upcycle.convert.families import DenseModel, describe_dense
from upcycle.convert.options import UpcycleOptions, parse_layers
from upcycle.convert.plan import UpcyclePlan, build_plan
from upcycle.convert.source import DenseSource, TensorInfo
from upcycle.convert.targets import TARGETS, Layout, candidate_targets, check_options
from upcycle.convert.tensor_recipe import Op, TensorRecipe
from upcycle.errors import OptionError, UnsupportedModelError

# ------------------------------------------------------------------------------------------------- parse_layers


@pytest.mark.parametrize(
    ("spec", "num_layers", "layers"),
    [
        ("all", 4, (0, 1, 2, 3)),
        (" ALL ", 4, (0, 1, 2, 3)),
        ("*", 3, (0, 1, 2)),
        ("", 2, (0, 1)),
        ("0-3", 12, (0, 1, 2, 3)),
        ("5", 12, (5,)),
        ("0,2,4-6", 12, (0, 2, 4, 5, 6)),
        ("6-6", 12, (6,)),
        ("-1", 12, (11,)),
        ("-4--1", 12, (8, 9, 10, 11)),
        ("-3-10", 12, (9, 10)),  # a negative start, a positive end
        ("9--2", 12, (9, 10)),  # a positive start, a negative end
        (" 1 , 3 - 4 ", 12, (1, 3, 4)),  # spaces around items and inside ranges
        ("  7 ,\t2  ", 12, (2, 7)),
        ("2,2,1-3,3", 12, (1, 2, 3)),  # duplicates and overlaps count once
        ("4-5,0", 12, (0, 4, 5)),  # sorted, whatever the order written
        ("1,", 12, (1,)),  # an empty item between commas is ignored
    ],
)
def test_parse_layers_accepts_ranges_lists_and_negative_indices(spec: str, num_layers: int, layers: tuple) -> None:
    assert parse_layers(spec, num_layers) == layers


@pytest.mark.parametrize(
    "spec",
    ["12", "-13", "0-12", "-20--1", "3-1", "-1--4", "a", "1.5", "1-", "-", "--1", "0-2-4", "1;2", "one", "0x1"],
)
def test_parse_layers_refuses_invalid_out_of_range_and_reversed_specs(spec: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_layers(spec, 12)
    assert f"--layers {spec!r} is not a valid layer list for a model with 12 layers" in str(info.value)
    assert "'0-11'" in str(info.value)  # the fix names the model's own range


@pytest.mark.parametrize("spec", [",", " , ,", ",,,"])
def test_parse_layers_refuses_a_spec_that_selects_no_layer(spec: str) -> None:
    with pytest.raises(OptionError, match="selects no layer"):
        parse_layers(spec, 12)


@st.composite
def written_layer_lists(draw: st.DrawFn) -> tuple[int, set[int], str]:
    """A model size, a non-empty set of its layers, and that set written as a user might: in any order, as single
    indices or ranges, each index from the start or (negative) from the end, with stray spaces and repeats."""
    num_layers = draw(st.integers(1, 64))
    chosen = draw(st.sets(st.integers(0, num_layers - 1), min_size=1))
    runs: list[list[int]] = []
    for i in sorted(chosen):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    items = []
    for lo, hi in runs:
        if hi > lo and draw(st.booleans()):
            cut = draw(st.integers(lo, hi - 1))  # a run may also be written as two ranges
            pieces = [(lo, cut), (cut + 1, hi)] if draw(st.booleans()) else [(lo, hi)]
        else:
            pieces = [(i, i) for i in range(lo, hi + 1)]
        for a, b in pieces:
            a_text, b_text = (str(v - num_layers) if draw(st.booleans()) else str(v) for v in (a, b))
            items.append(a_text if a == b and draw(st.booleans()) else f"{a_text}-{b_text}")
    items += draw(st.lists(st.sampled_from(items), max_size=3))  # repeats
    items = draw(st.permutations(items))
    text = ",".join(draw(st.sampled_from(["", " ", "  "])) + item + draw(st.sampled_from(["", " "])) for item in items)
    return num_layers, chosen, text


@given(written_layer_lists())
def test_parse_layers_reads_back_any_written_layer_set(case: tuple[int, set[int], str]) -> None:
    num_layers, chosen, text = case
    assert parse_layers(text, num_layers) == tuple(sorted(chosen)), text


# ------------------------------------------------------------------------------------------------ expert_scales
#
# Checked against the MoE output computed here from its definition: a token's output is the sum, over the experts it
# selects, of the router weight times that expert's SwiGLU MLP, down(silu(gate x) * up x). Expert e = n*G + g holds
# shard g (of G, along the intermediate dimension) of copy n of the dense MLP, its gate/up/down multiplied by the
# factors under test. What each router gives the selected experts is computed here too.

H, F_DIM = 12, 24


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


@functools.cache
def dense_mlp() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, H, generator=g)
    gate, up = torch.randn(F_DIM, H, generator=g), torch.randn(F_DIM, H, generator=g)
    down = torch.randn(H, F_DIM, generator=g)
    return x, gate, up, down


def moe_output(scales: tuple[float, float, float], granularity: int, chosen: dict[int, float]) -> torch.Tensor:
    """The summed output for `chosen` = {expert: router weight}."""
    x, gate, up, down = dense_mlp()
    s_gate, s_up, s_down = scales
    width = F_DIM // granularity
    out = torch.zeros(x.shape[0], H)
    for expert, weight in chosen.items():
        cut = slice(expert % granularity * width, (expert % granularity + 1) * width)
        out += weight * swiglu(x, gate[cut] * s_gate, up[cut] * s_up, down[:, cut] * s_down)
    return out


def dense_output() -> torch.Tensor:
    return swiglu(*dense_mlp())


def top_k(probs: torch.Tensor, k: int) -> dict[int, float]:
    weights, index = probs.topk(k)
    return dict(zip(index.tolist(), weights.tolist(), strict=True))


@pytest.mark.parametrize(("experts", "top_k_", "seed"), [(8, 2, 0), (4, 1, 1), (6, 3, 2)])
def test_renormalised_router_copies_unscaled_and_is_exact(experts: int, top_k_: int, seed: int) -> None:
    scales, exactness = expert_scales(UpcycleOptions(experts=experts, top_k=top_k_))
    assert scales == (1.0, 1.0, 1.0) and exactness.exact and exactness.notes == []
    logits = torch.randn(experts, generator=torch.Generator().manual_seed(seed))
    chosen = top_k(logits.softmax(-1), top_k_)
    total = sum(chosen.values())
    renormalised = {e: w / total for e, w in chosen.items()}  # whatever the router's logits, weights sum to 1
    torch.testing.assert_close(moe_output(scales, 1, renormalised), dense_output())


def test_renormalised_router_in_virtual_groups_takes_whole_copies_and_is_exact() -> None:
    """E=4 copies in G=3 shards, k=6: a token takes 2 whole copies (group-limited routing, tied router rows); the
    renormalised weights then give each copy 1/G of its share, which the target's routed_scaling_factor G restores."""
    opts = UpcycleOptions(experts=4, granularity=3, top_k=6)
    scales, exactness = expert_scales(opts)
    assert scales == (1.0, 1.0, 1.0) and exactness.exact and "virtual groups" in exactness.method
    copy_logits = torch.tensor([0.3, -1.0, 2.0, 0.1])
    probs = copy_logits.repeat_interleave(3).softmax(-1)  # tied rows: the G shards of a copy score alike
    chosen = {e: float(probs[e]) for e in range(12) if e // 3 in (2, 0)}  # the two best copies, every shard
    total = sum(chosen.values())
    renormalised = {e: w / total for e, w in chosen.items()}
    routed_scaling = TARGETS["glm4_moe"].output_scale(opts)
    assert routed_scaling == 3.0
    torch.testing.assert_close(routed_scaling * moe_output(scales, 3, renormalised), dense_output())


@pytest.mark.parametrize("factor", [2.25, 0.5, 3.0])
def test_an_explicit_weight_scale_multiplies_every_expert_on_the_linear_path(factor: float) -> None:
    scales, exactness = expert_scales(UpcycleOptions(weight_scale=str(factor)))
    assert not exactness.exact and f"{factor:g}" in exactness.method
    assert scales[0] == 1.0 and math.isclose(scales[1] * scales[2], factor, rel_tol=1e-12)
    # sqrt(3) is not a float: fp32 rounds it, so the products agree to a few ulp, not bit for bit
    torch.testing.assert_close(moe_output(scales, 1, {3: 1.0}), factor * dense_output(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("experts", "top_k_", "bit_exact"), [(8, 2, True), (4, 4, True), (6, 3, False), (16, 8, False)]
)
def test_softmax_topk_zero_router_scales_down_by_e_over_k_and_is_exact(
    experts: int, top_k_: int, bit_exact: bool
) -> None:
    """A zero router gives every expert 1/E; k of them sum to k/E, and a factor E/k on down_proj restores the dense.
    Bit for bit when every term is a power-of-two multiple of the dense output (E, k powers of two, k <= 4)."""
    scales, exactness = expert_scales(UpcycleOptions(experts=experts, top_k=top_k_, router="softmax-topk",
                                                     router_init="zero"))  # fmt: skip
    assert scales == (1.0, 1.0, experts / top_k_) and exactness.exact
    assert exactness.notes[0].startswith("bit-exact" if bit_exact else "equal up to float rounding")
    uniform = top_k(torch.zeros(experts).softmax(-1), top_k_)  # no renormalisation: each weight stays 1/E
    assert all(w == pytest.approx(1 / experts) for w in uniform.values())
    out = moe_output(scales, 1, uniform)
    if bit_exact:
        assert torch.equal(out, dense_output())
    torch.testing.assert_close(out, dense_output())


@pytest.mark.parametrize(("experts", "granularity", "top_k_"), [(8, 1, 2), (8, 1, 1), (6, 1, 4), (4, 2, 4), (8, 4, 8)])
def test_softmax_topk_random_router_uses_the_papers_factor(experts: int, granularity: int, top_k_: int) -> None:
    """The paper's s = E*G^2/k. A freshly initialised router is near-uniform: each of the E*G experts gets about
    1/(E*G), and a token's k experts are k/G whole copies, whose G shards sum to the dense MLP. The output is then
    k/(E*G^2) of the dense, which s restores (on the linear path: sqrt(s) on up and on down). Not exact, since a
    random router is only near-uniform. (The options refuse G > 1 with softmax-topk, for want of a native class.)"""
    opts = UpcycleOptions(experts=experts, granularity=granularity, top_k=top_k_, router="softmax-topk")
    scales, exactness = expert_scales(opts)
    s = experts * granularity**2 / top_k_
    assert scales[0] == 1.0 and scales[1] == scales[2] and math.isclose(scales[1] ** 2, s, rel_tol=1e-12)
    assert not exactness.exact and f"s = {s:g}" in exactness.method
    num = experts * granularity
    copies = range(top_k_ // granularity)
    uniform = {n * granularity + g: 1 / num for n in copies for g in range(granularity)}
    torch.testing.assert_close(moe_output(scales, granularity, uniform), dense_output())


def test_softmax_topk_without_weight_scaling_shrinks_the_output_by_k_over_e() -> None:
    scales, exactness = expert_scales(UpcycleOptions(router="softmax-topk", router_init="zero", weight_scale="none"))
    assert scales == (1.0, 1.0, 1.0) and not exactness.exact
    uniform = top_k(torch.zeros(8).softmax(-1), 2)
    torch.testing.assert_close(moe_output(scales, 1, uniform), 2 / 8 * dense_output())


@pytest.mark.parametrize(("factor", "exact", "ratio"), [(4.0, True, 1.0), (2.0, False, 0.5), (8.0, False, 2.0)])
def test_softmax_topk_zero_router_with_an_explicit_factor_is_exact_only_at_e_over_k(
    factor: float, exact: bool, ratio: float
) -> None:
    opts = UpcycleOptions(experts=8, top_k=2, router="softmax-topk", router_init="zero", weight_scale=str(factor))
    scales, exactness = expert_scales(opts)
    assert exactness.exact is exact
    if not exact:
        assert f"the output is {ratio:g} x the dense" in exactness.notes[-1]
    uniform = top_k(torch.zeros(8).softmax(-1), 2)
    torch.testing.assert_close(moe_output(scales, 1, uniform), ratio * dense_output())


# ------------------------------------------------------------------------------------------------ target choice

DIMS = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)  # fmt: skip
CONFIGS: dict[str, typing.Callable[[], tf.PretrainedConfig]] = {
    "llama": lambda: tf.LlamaConfig(**DIMS),
    "qwen2": lambda: tf.Qwen2Config(**DIMS),
    "qwen3": lambda: tf.Qwen3Config(**DIMS, head_dim=16),
    "mistral": lambda: tf.MistralConfig(**DIMS, sliding_window=8),  # one window on every layer
    "olmo2": lambda: tf.Olmo2Config(**DIMS),
    "phi3": lambda: tf.Phi3Config(**DIMS),  # fused qkv_proj and gate_up_proj
    "granite": lambda: tf.GraniteConfig(**DIMS, residual_multiplier=0.5),
}


@functools.cache
def meta_source(family: str) -> DenseSource:
    """A source whose index names every tensor the family's class saves, with its shape (no data, no file)."""
    config = CONFIGS[family]()
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    tensors = {
        name: TensorInfo(name, Path("model.safetensors"), torch.float32, tuple(tensor.shape), 0)
        for name, tensor in model.state_dict().items()
    }
    return DenseSource(Path("meta"), config.to_dict(), tensors)


@functools.cache
def dense(family: str) -> DenseModel:
    source = meta_source(family)
    return describe_dense(source.config, source.tensors)


def chosen(family: str, **options: typing.Any) -> list[str]:
    """The candidate classes, the one the plan tries first in front."""
    opts = UpcycleOptions(**options)
    check_options(opts)
    model = dense(family)
    layout = Layout(parse_layers(opts.layers, model.num_layers), model.num_layers)
    return [target.name for target in candidate_targets(model, opts, layout)]


G1 = dict(experts=8, top_k=2)
G2 = dict(experts=4, granularity=2, top_k=2)
SOFTMAX = dict(experts=8, top_k=2, router="softmax-topk", router_init="zero")


@pytest.mark.parametrize(
    ("family", "options", "first"),
    [
        ("llama", G1, "mixtral"),  # the simplest class that holds it
        ("llama", G2, "glm4_moe"),  # virtual groups need group-limited routing
        ("llama", SOFTMAX, "qwen2_moe"),  # Mixtral always renormalises
        ("llama", {**G1, "layers": "2-3"}, "qwen2_moe"),  # Mixtral has no dense layers
        ("llama", {**G1, "layers": "0,2"}, "qwen2_moe"),
        ("llama", {**G2, "layers": "1-3"}, "glm4_moe"),  # dense layers first: first_k_dense_replace
        ("qwen2", G1, "qwen2_moe"),  # q/k/v biases, which Mixtral lacks
        ("qwen2", G2, "glm4_moe"),
        ("qwen3", G1, "qwen3_moe"),  # per-head q/k norms
        ("qwen3", G2, "dots1"),
        ("qwen3", SOFTMAX, "qwen3_moe"),
        ("qwen3", {**G1, "layers": "-2--1"}, "qwen3_moe"),
        ("mistral", G1, "mixtral"),  # one window on every layer: Mixtral's own
        ("olmo2", G1, "flex_olmo"),
        ("olmo2", SOFTMAX, "flex_olmo"),
        ("granite", G1, "granitemoe"),
    ],
)
def test_auto_target_is_the_familys_first_class_that_holds_the_options(family: str, options: dict, first: str) -> None:
    names = chosen(family, **options)
    assert names[0] == first and first in dense(family).spec.targets


def test_an_explicit_target_is_the_only_candidate() -> None:
    assert chosen("llama", **G1)[:2] == ["mixtral", "qwen2_moe"]  # auto: a fallback after the preferred class
    assert chosen("llama", **G1, target="qwen2_moe") == ["qwen2_moe"]
    assert chosen("llama", **G1, target="mixtral") == ["mixtral"]


@pytest.mark.parametrize(
    ("family", "options", "reasons"),
    [
        ("mistral", G2, ["Mixtral has no group-limited routing", "Glm4MoeForCausalLM has no sliding-window attention"]),
        ("mistral", SOFTMAX, ["Mixtral always renormalises", "under flash-attention it would attend to every key"]),
        ("mistral", {**G1, "layers": "2-3"}, ["no layer can stay dense", "Qwen2-MoE's attention windows only"]),
        ("olmo2", G2, ["FlexOlmoForCausalLM has no group-limited routing"]),
        ("olmo2", {**G1, "layers": "0"}, ["every FlexOlmo layer is sparse"]),
        ("llama", {**G2, "layers": "0,2"}, ["can keep only the first layers dense (first_k_dense_replace)"]),
        ("granite", SOFTMAX, ["softmaxes over the top k logits only"]),
    ],
)
def test_no_class_holding_the_options_is_refused_with_each_classes_reason(
    family: str, options: dict, reasons: list[str]
) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        chosen(family, **options)
    message = str(info.value)
    assert message.startswith(f"no native MoE class holds this {dense(family).title} model with these options exactly")
    for reason in reasons:
        assert reason in message


@pytest.mark.parametrize(
    ("family", "options", "reason", "fix"),
    [
        ("llama", {**G1, "layers": "2-3", "target": "mixtral"}, "every Mixtral layer is sparse", "--target qwen2_moe"),
        ("llama", {**G1, "target": "glm4_moe"}, "needs at least two experts", "--target mixtral or qwen2_moe"),
        ("olmo2", {**G1, "target": "mixtral"}, "decoder layers are not OLMo 2's", "--target flex_olmo"),
        ("mistral", {**G1, "target": "qwen2_moe"}, "windows only through its mask", "--target mixtral"),
        ("mistral", {**G2, "target": "glm4_moe"}, "no sliding-window attention", "change the options"),
    ],
)
def test_an_explicit_target_that_cannot_hold_the_model_names_why_and_what_fits(
    family: str, options: dict, reason: str, fix: str
) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        chosen(family, **options)
    problem, _, remedy = str(info.value).partition(" Fix: ")
    assert f"target {options['target']} cannot hold this {dense(family).title} model exactly" in problem
    assert reason in problem and fix in remedy


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({**G2, "router": "softmax-topk"}, "score with a sigmoid, not a softmax"),
        ({"experts": 4, "granularity": 2, "top_k": 3}, "is not a multiple of --granularity 2"),
        ({"experts": 2, "top_k": 3}, "exceeds the number of experts 2"),
        ({**G1, "target": "switch"}, "unknown --target 'switch'"),
        ({**G1, "router_init": "tied"}, "needs --granularity > 1"),
    ],
)
def test_options_no_class_could_hold_are_refused_before_any_target_is_asked(options: dict, reason: str) -> None:
    with pytest.raises(OptionError, match=re.escape(reason)):
        chosen("llama", **options)


# ----------------------------------------------------------------------------------------- TensorRecipe as JSON

PLANS = {  # one plan per kind of recipe, each kind's fields away from their defaults somewhere
    # Phi-3's fused projections (source_rows); Drop-Upcycling and noise; an explicit scale; a seed; Mixtral.
    "phi3-drop-noise": ("phi3", dict(experts=4, top_k=2, drop_upcycling=0.5, noise=0.01, weight_scale="2", seed=7)),
    # Virtual groups (rows / cols shards, tied router groups, fp32 router, zero tensors), dense layers, zero router.
    "llama-groups-layers": ("llama", dict(experts=4, granularity=2, top_k=2, layers="1-3", router_init="zero")),
    # Stacked experts (op "stack" with nested parts).
    "granite-stacked": ("granite", dict(experts=4, top_k=2)),
}
TARGET_OF_PLAN = {
    "phi3-drop-noise": "mixtral",
    "llama-groups-layers": "glm4_moe",
    "granite-stacked": "granitemoe",
    "qwen3-calibrated": "dots1",
}


@pytest.fixture(scope="module")
def plans(dense_dir) -> dict[str, UpcyclePlan]:
    built = {name: build_plan(meta_source(family), UpcycleOptions(**opts)) for name, (family, opts) in PLANS.items()}
    # Routers and shards made from data (calibration keys): the dense files are hashed, so a real folder.
    data_made = UpcycleOptions(experts=2, granularity=2, top_k=2, router_init="cluster", split="activation")
    built["qwen3-calibrated"] = build_plan(DenseSource.open(dense_dir("qwen3")), data_made)
    return built


def all_recipes(plans: dict[str, UpcyclePlan]) -> list[TensorRecipe]:
    found = []
    for plan in plans.values():
        for recipe in plan.recipes:
            found += [recipe, *recipe.parts]
    return found


def through_json_text(recipe: TensorRecipe) -> TensorRecipe:
    return TensorRecipe.from_json(json.loads(json.dumps(recipe.to_json())))


def test_plans_pick_the_expected_targets(plans: dict[str, UpcyclePlan]) -> None:
    assert {name: plan.target for name, plan in plans.items()} == TARGET_OF_PLAN


def test_every_recipe_of_real_plans_survives_json_text(plans: dict[str, UpcyclePlan]) -> None:
    for recipe in all_recipes(plans):
        assert through_json_text(recipe) == recipe, recipe.name


def test_the_plans_hold_every_op_and_set_every_recipe_field(plans: dict[str, UpcyclePlan]) -> None:
    """So the round trip above covers each kind of recipe and each field in a non-default value."""
    recipes = all_recipes(plans)
    assert {r.op for r in recipes} == set(typing.get_args(Op))
    defaults = {f.name: f.default for f in dataclasses.fields(TensorRecipe)}
    unset = {name for name, default in defaults.items() if all(getattr(r, name) == default for r in recipes)}
    assert not unset, f"no recipe sets {sorted(unset)}"
    assert {r.router_init for r in recipes if r.op == "router"} == {"zero", "random", "cluster"}
    assert any(r.drop_ratio == 0.5 and r.noise == 0.01 and r.source_rows for r in recipes)


def test_a_whole_plan_survives_upcycle_json(plans: dict[str, UpcyclePlan]) -> None:
    for plan in plans.values():
        again = UpcyclePlan.from_json(json.loads(json.dumps(plan.to_json())), plan.config)
        assert again.shards == plan.shards and again.options == plan.options
        assert (again.target, again.moe_layers, again.dtype) == (plan.target, plan.moe_layers, plan.dtype)
        assert again.exactness == plan.exactness


def test_a_recipe_with_every_field_set_survives_json_text() -> None:
    part = TensorRecipe("p", (2, 3), "F32", "expert", source="s", rows=(0, 2), projection="gate", expert=1)
    recipe = TensorRecipe(
        name="model.layers.1.mlp.x", shape=(4, 2, 3), dtype="BF16", op="stack", source="model.layers.1.mlp.w",
        source_rows=(8, 16), rows=(2, 4), cols=(1, 3), scale=1.5, drop_ratio=0.25, drop_axis=1, drop_key="1.3",
        noise=0.125, router_init="tied", router_std=0.02, calibration="c0ffee", neuron_order="beef", group_size=4,
        seed=11, layer=1, expert=3,
        projection="down", parts=(part, dataclasses.replace(part, expert=2, rows=None, cols=(0, 1))),
    )  # fmt: skip
    defaults = {f.name: f.default for f in dataclasses.fields(TensorRecipe)}
    assert all(getattr(recipe, name) != default for name, default in defaults.items())
    again = through_json_text(recipe)
    assert again == recipe
    assert isinstance(again.shape, tuple) and isinstance(again.rows, tuple) and isinstance(again.parts[0], TensorRecipe)


def test_recipe_json_leaves_out_defaults() -> None:
    recipe = TensorRecipe("lm_head.weight", (128, 64), "F32", "copy", source="lm_head.weight")
    assert recipe.to_json() == {
        "name": "lm_head.weight", "shape": (128, 64), "dtype": "F32", "op": "copy", "source": "lm_head.weight",
    }  # fmt: skip
    assert through_json_text(recipe) == recipe
