"""The proof covers the folder a user loads: cases where it once said yes and the answer was no.

Each case builds the folder as a user would meet it (a bf16 checkpoint with one huge weight, an fp16 source cast to
bf16, a stray weight file, an edited tokenizer or generation config, a LongRoPE Phi-3, tied embeddings beside a
distinct stored LM head) and checks that convert refuses or labels it truthfully and that `verify` exits non-zero in
every mode where the folder is not what the dense model is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from family_configs import family_config
from hub_models import (
    greedy,
    logits,
    relative_difference,
    save_header_only,
    save_hub_style,
    save_tiny_tokenizer,
    store_as,
)
from safetensors.torch import load_file, save_file
from tiny_models import COMMON

from upcycle.convert import UpcycleOptions
from upcycle.convert import plan as plan_module
from upcycle.convert.families import phi3
from upcycle.convert.source import DenseSource
from upcycle.errors import OptionError, SourceError, UnsupportedModelError
from upcycle.hf.config_check import check_config_equivalence
from upcycle.upcycling import convert

MODES = ["--full", "--streaming", "--weights-only"]


def hub_llama(folder: Path, **config) -> Path:
    return save_hub_style({"model_type": "llama", **COMMON, **config}, folder)


def edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def verify_json(cli, dense: Path, moe: Path, *args: str) -> tuple[int, dict]:
    result = cli("verify", dense, moe, "--json", *args)
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {"stderr": result.stderr}


# ---- case 1: non-finite numbers -------------------------------------------------------------------------------


def test_a_down_cast_that_overflows_is_refused_naming_the_tensor(cli, tmp_path):
    dense = hub_llama(tmp_path / "dense")
    store_as(dense, "bfloat16")
    edit_weights(dense, lambda t: t["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), 1e6))
    result = cli("convert", dense, tmp_path / "moe", "--dtype", "float16")
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "model.layers.1.mlp.down_proj.weight" in message and "65504" in message
    assert "--dtype auto" in message and not (tmp_path / "moe").exists()
    assert convert(dense, tmp_path / "moe", UpcycleOptions()).plan.exactness.exact  # bf16 holds it: exact


def test_a_nan_in_the_source_is_named_at_convert_time(tmp_path):
    dense = hub_llama(tmp_path / "dense")
    edit_weights(dense, lambda t: t["model.layers.0.self_attn.q_proj.weight"].__setitem__((1, 2), float("nan")))
    with pytest.raises(SourceError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight \(1 NaN/inf\)"):
        convert(dense, tmp_path / "moe", UpcycleOptions())
    assert not (tmp_path / "moe").exists()


def test_values_whose_sum_overflows_are_still_finite(tmp_path):
    """The quick test of a made tensor is its sum: a sum beyond the dtype's range (finite values) is counted value
    by value and passes; one infinite value among values whose sum is finite is caught."""
    from upcycle.convert.finite import check_finite
    from upcycle.convert.tensor_recipe import TensorRecipe

    dense = hub_llama(tmp_path / "dense")
    source = DenseSource.open(dense)
    name = "model.layers.0.mlp.up_proj.weight"
    recipe = TensorRecipe(name=name, op="copy", shape=(4,), dtype="F16", source=name)
    huge = torch.full((4,), 60000.0, dtype=torch.float16)
    assert not torch.isfinite(huge.sum()) and check_finite(recipe, huge, [recipe], source) is None
    with pytest.raises(OptionError, match="came out non-finite"):
        check_finite(recipe, torch.tensor([1.0, float("inf"), -float("inf"), 2.0], dtype=torch.float16), [recipe],
                     source)  # fmt: skip


@pytest.fixture(scope="module")
def nan_pair(tmp_path_factory):
    """A source holding a NaN and its conversion, written past the convert-time refusal (as an older upcycle did)."""
    root = tmp_path_factory.mktemp("nan")
    dense = hub_llama(root / "dense")
    edit_weights(dense, lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__((0, 0), float("nan")))
    with pytest.MonkeyPatch.context() as patch:
        from upcycle.convert import writer

        patch.setattr(writer, "check_finite", lambda *args: None, raising=False)
        convert(dense, root / "moe", UpcycleOptions())
    return dense, root / "moe"


@pytest.mark.parametrize("mode", MODES)
def test_nan_is_never_equivalent(cli, nan_pair, mode):
    code, report = verify_json(cli, *nan_pair, mode)
    assert code == 1 and not report["equivalent"] and "hold NaN/inf, bit-identical" in report["verdict"]
    problems = [m["problem"] for m in report["weights"]["mismatches"]]
    assert problems and all("NaN/inf" in p and "bit-identical" in p for p in problems)  # the copies are exact
    assert not any("is not the recorded copy" in p for p in problems)


def test_the_function_check_calls_nan_logits_infinitely_far(nan_pair):
    from upcycle.verify.function import Probe, check_function

    report = check_function(*nan_pair, Probe(tokens=32))
    assert report.logits_rel_diff == float("inf") and report.non_finite.get("moe logits")


# ---- case 2: a change of dtype is exact only up to rounding --------------------------------------------------


@pytest.fixture(scope="module")
def rounded(tmp_path_factory):
    """An fp16 Llama converted to bf16, and an fp32 OLMo 2 converted to bf16."""
    root = tmp_path_factory.mktemp("rounded")
    fp16 = hub_llama(root / "fp16")
    store_as(fp16, "float16")
    olmo = save_hub_style(family_config("olmo2"), root / "olmo2")
    for dense in (fp16, olmo):
        convert(dense, root / f"{dense.name}-bf16", UpcycleOptions(dtype="bfloat16"))
    return {"fp16": (fp16, root / "fp16-bf16"), "olmo2": (olmo, root / "olmo2-bf16")}


@pytest.mark.parametrize("source", ["fp16", "olmo2"])
def test_a_rounding_conversion_is_labelled_and_measured(rounded, source):
    dense, moe = rounded[source]
    exactness = json.loads((moe / "upcycle.json").read_text())["exactness"]
    assert not exactness["exact"] and exactness["exact_up_to_rounding"] and exactness["rounded_to"] == "bfloat16"
    measured = exactness["rounding_deviation"]["relative"]
    real = relative_difference(dense, moe, 64, COMMON["vocab_size"])  # stored dtypes, fp32 compute
    assert real > 1e-3 and measured > 1e-3  # a real, measured deviation, not rounding noise of an exact copy
    card = (moe / "README.md").read_text()
    assert "Exact up to rounding to bfloat16" in card and "Exact by design" not in card


@pytest.mark.parametrize("source", ["fp16", "olmo2"])
def test_the_rounding_measured_on_the_cast_dense_model_is_the_written_moes(rounded, source):
    """convert measures a plain cast on the dense model with its weights cast as written (one model, not both):
    the written MoE, run whole by transformers on the same tokens, deviates by the same amount."""
    from upcycle.verify.function import Probe, check_function

    dense, moe = rounded[source]
    measured = json.loads((moe / "upcycle.json").read_text())["exactness"]["rounding_deviation"]
    assert measured["measured_on"] == "the dense model, its weights cast to bfloat16 as written"
    written = check_function(dense, moe, Probe(tokens=measured["tokens"])).logits_rel_diff
    assert written > 1e-3 and measured["relative"] == pytest.approx(written, rel=1e-2)


def test_an_approximate_method_that_rounds_is_measured_on_the_written_moe(tmp_path):
    """Re-drawn neurons cast to bf16: the recorded deviation is the written MoE's (the method's own deviation and
    the rounding), never the cast alone, since `verify --weights-only --tol` judges by it."""
    from upcycle.verify.function import Probe, check_function

    dense = hub_llama(tmp_path / "dense")
    convert(dense, tmp_path / "moe", UpcycleOptions(drop_upcycling=0.5, dtype="bfloat16"))
    measured = json.loads((tmp_path / "moe" / "upcycle.json").read_text())["exactness"]["rounding_deviation"]
    assert measured["measured_on"] == "the written MoE"
    written = check_function(dense, tmp_path / "moe", Probe(tokens=measured["tokens"])).logits_rel_diff
    assert measured["relative"] == pytest.approx(written, rel=1e-6)


@pytest.mark.parametrize("source", ["fp16", "olmo2"])
@pytest.mark.parametrize("mode", MODES)
def test_verify_compares_with_the_dense_model_as_stored_in_every_mode(cli, rounded, source, mode):
    dense, moe = rounded[source]
    code, report = verify_json(cli, dense, moe, mode)
    assert code == 1 and "exact up to rounding to bfloat16" in report["verdict"]
    if mode == "--full":
        assert report["function"]["logits_rel_diff"] > 1e-3
    if mode == "--streaming":
        assert max(layer["rel_diff"] for layer in report["streaming"]["layers"]) > 1e-4
    code, report = verify_json(cli, dense, moe, mode, "--tol", "0.2")
    assert code == 0 and "exact up to rounding" in report["verdict"]


@pytest.fixture(scope="module")
def rounded_outside_the_layers(tmp_path_factory):
    """Declared bf16, every layer tensor bf16, the embedding and a distinct LM head fp32: --dtype bfloat16 rounds
    only what lies outside the decoder layers."""
    root = tmp_path_factory.mktemp("outer")
    dense = hub_llama(root / "dense", tie_word_embeddings=False)
    outer = ("model.embed_tokens.weight", "lm_head.weight")
    edit_weights(dense, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items() if k not in outer}))
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    result = convert(dense, root / "moe", UpcycleOptions(dtype="bfloat16"))
    assert result.plan.exactness.exact_up_to_rounding
    assert any("model.embed_tokens.weight" in note for note in result.plan.exactness.notes)
    return dense, root / "moe"


@pytest.mark.parametrize("mode", ["--full", "--streaming"])
def test_a_rounded_embedding_and_head_count_in_every_mode(cli, rounded_outside_the_layers, mode):
    """The streaming check runs the MoE's own embedding rows and LM head, so it measures what the full check sees."""
    dense, moe = rounded_outside_the_layers
    code, report = verify_json(cli, dense, moe, mode, "--tol", "1e-6")
    assert code == 1 and "above the tolerance" in report["verdict"], report["verdict"]
    if mode == "--streaming":
        streamed = report["streaming"]
        assert max(layer["rel_diff"] for layer in streamed["layers"]) <= 1e-6  # the layers hold the same bf16 values
        assert streamed["embedding_rel_diff"] > 1e-4 and streamed["lm_head_rel_diff"] > 1e-4
    code, report = verify_json(cli, dense, moe, mode, "--tol", "0.2")
    assert code == 0 and "within the explicit tolerance" in report["verdict"]


@pytest.mark.parametrize("mode", MODES)
def test_verify_derives_the_rounding_itself_not_from_the_label(cli, rounded, tmp_path, mode):
    dense, moe = rounded["fp16"]
    relabelled = tmp_path / "relabelled"
    shutil.copytree(moe, relabelled)
    record = json.loads((relabelled / "upcycle.json").read_text())
    record["exactness"].update(exact=True, exact_up_to_rounding=False, rounded_to=None, rounding_deviation=None)
    (relabelled / "upcycle.json").write_text(json.dumps(record))
    code, report = verify_json(cli, dense, relabelled, mode)
    assert code == 1 and "exact up to rounding to bfloat16" in report["verdict"], report["verdict"]
    assert any("labels this conversion exact" in note for note in report["notes"])


def test_weights_only_judges_a_tolerance_only_from_a_measured_deviation(cli, rounded, tmp_path):
    dense, moe = rounded["fp16"]
    recorded = json.loads((moe / "upcycle.json").read_text())["exactness"]["rounding_deviation"]["relative"]
    code, report = verify_json(cli, dense, moe, "--weights-only", "--tol", f"{recorded / 2:g}")
    assert code == 1 and "recorded at conversion" in report["verdict"]
    drop = tmp_path / "drop"
    convert(dense, drop, UpcycleOptions(drop_upcycling=0.5))
    code, report = verify_json(cli, dense, drop, "--weights-only", "--tol", "0.9")
    assert code == 1 and "no deviation was measured" in report["verdict"], report["verdict"]
    code, report = verify_json(cli, dense, drop, "--tol", "0.9")
    assert code == 0, report["verdict"]


def test_auto_keeps_each_tensor_in_its_stored_dtype(tmp_path):
    dense = hub_llama(tmp_path / "dense")
    store_as(dense, "bf16+fp32")  # declared bf16; norms and embeddings stored in fp32
    result = convert(dense, tmp_path / "moe", UpcycleOptions())
    assert result.plan.exactness.exact and result.plan.dtype == "bfloat16"
    dtypes = {r.name: r.dtype for r in result.plan.recipes}
    assert dtypes["model.embed_tokens.weight"] == "F32" and dtypes["model.norm.weight"] == "F32"
    assert dtypes["model.layers.0.block_sparse_moe.experts.0.w1.weight"] == "BF16"
    assert relative_difference(dense, tmp_path / "moe", 64, COMMON["vocab_size"]) <= 1e-5


@pytest.mark.parametrize(("experts", "exact"), [(4, True), (3, False)], ids=["x2", "x3"])
def test_a_bf16_copy_scaled_by_a_non_power_of_two_is_rounded(tmp_path, experts, exact):
    """Softmax-top-k with a zero router scales down_proj by E/k: x 2 keeps every bf16 value a bf16 value, x 3 does
    not (found by the fuzzer: 6.8e-4 apart while labelled exact)."""
    dense = hub_llama(tmp_path / "dense")
    store_as(dense, "bfloat16")
    options = UpcycleOptions(experts=experts, top_k=experts // 2 if exact else 1, router="softmax-topk",
                             router_init="zero")  # fmt: skip
    exactness = convert(dense, tmp_path / "moe", options).plan.exactness
    real = relative_difference(dense, tmp_path / "moe", 32, COMMON["vocab_size"])
    assert exactness.exact is exact and (real <= 1e-5) is exact
    if not exact:
        assert exactness.exact_up_to_rounding and any("not a power of two" in note for note in exactness.notes)


# ---- case 3: one weight set per folder, found by transformers' rule -------------------------------------------


def add_stray_single_file(folder: Path) -> None:
    tensors = {}
    for shard in folder.glob("model-*.safetensors"):
        tensors.update(load_file(shard))
    save_file({k: v * 1.5 for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A tiny Llama with a tokenizer, a chat template and generation settings, and its exact upcycle."""
    root = tmp_path_factory.mktemp("plain")
    dense = hub_llama(root / "dense")
    save_tiny_tokenizer(dense, COMMON["vocab_size"], chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    convert(dense, root / "moe", UpcycleOptions())
    return dense, root / "moe"


def tampered(plain, tmp_path: Path, change) -> Path:
    folder = Path(shutil.copytree(plain[1], tmp_path / "tampered"))
    change(folder)
    return folder


@pytest.mark.parametrize("mode", MODES)
def test_a_stray_weight_file_in_the_moe_folder_fails_every_mode(cli, plain, tmp_path, mode):
    folder = tampered(plain, tmp_path, add_stray_single_file)
    result = cli("verify", plain[0], folder, mode)
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "two weight sets" in message and "model.safetensors.index.json" in message


def test_a_stray_weight_file_in_the_source_is_refused(tmp_path):
    dense = hub_llama(tmp_path / "dense")
    shard = dense / "model-00001-of-00001.safetensors"
    shutil.copy2(dense / "model.safetensors", shard)
    (dense / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard.name}}))
    with pytest.raises(SourceError, match="two weight sets: model.safetensors and model.safetensors.index.json"):
        convert(dense, tmp_path / "moe", UpcycleOptions())


def test_shards_without_an_index_are_not_read(tmp_path):
    """transformers loads no shards without their index: neither does upcycle (it once read every file)."""
    dense = hub_llama(tmp_path / "dense")
    (dense / "model.safetensors").rename(dense / "model-00001-of-00002.safetensors")
    with pytest.raises(SourceError, match="has no weights transformers would load"):
        convert(dense, tmp_path / "moe", UpcycleOptions())


# ---- case 4: tokenizer and generation settings ---------------------------------------------------------------


def edit_generation(**changes):
    def change(folder: Path) -> None:
        path = folder / "generation_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return change


TAMPERINGS = {
    "sampling": edit_generation(do_sample=True, temperature=5.0),
    "eos": edit_generation(eos_token_id=7),
    "max_length": edit_generation(max_length=3),
    "another tokenizer": lambda folder: save_tiny_tokenizer(folder, 40),
    "chat template": lambda folder: (folder / "chat_template.jinja").write_text("{{ messages[0].content }}!"),
}


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
@pytest.mark.parametrize("mode", MODES)
def test_an_edited_tokenizer_or_generation_config_fails_every_mode(cli, plain, tmp_path, tampering, mode):
    folder = tampered(plain, tmp_path, TAMPERINGS[tampering])
    code, report = verify_json(cli, plain[0], folder, mode)
    assert code == 1 and not report["equivalent"] and "the files beside the weights" in report["verdict"]
    assert report["files"]["differences"]


def test_the_copied_files_are_recorded_and_proven(cli, plain):
    record = json.loads((plain[1] / "upcycle.json").read_text())["copied_files"]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(record)
    code, report = verify_json(cli, *plain, "--weights-only")
    assert code == 0 and "tokenizer and generation settings" in report["proof"]
    assert report["verdict"].startswith("config and weights proven (no function check ran")


# ---- case 5: the generation path -------------------------------------------------------------------------------


def longrope_phi3(folder: Path) -> Path:
    half = 8  # head_dim 16 / 2
    rope = {"type": "longrope", "short_factor": [1.0 + 0.01 * i for i in range(half)],
            "long_factor": [1.0 + 0.5 * i for i in range(half)]}  # fmt: skip
    config = family_config("phi3", sliding_window=None, original_max_position_embeddings=32, rope_scaling=rope)
    return save_hub_style(config, folder)


def test_a_longrope_phi3_is_refused_for_its_generation(tmp_path):
    dense = longrope_phi3(tmp_path / "dense")
    with pytest.raises(UnsupportedModelError, match="greedy generation differs"):
        convert(dense, tmp_path / "moe", UpcycleOptions())


@pytest.fixture
def without_the_longrope_rule():
    """Phi-3 without its family rule for LongRoPE, so only the independent config check stands in the way."""
    rules = phi3.FAMILY.refusals
    rule = getattr(phi3, "_cache_recompute", None)
    object.__setattr__(phi3.FAMILY, "refusals", tuple(r for r in rules if r is not rule))
    yield
    object.__setattr__(phi3.FAMILY, "refusals", rules)


def test_the_config_check_finds_the_generation_difference_by_itself(tmp_path, without_the_longrope_rule):
    dense = longrope_phi3(tmp_path / "dense")
    with pytest.raises(UnsupportedModelError, match="prepare_inputs_for_generation") as refusal:
        convert(dense, tmp_path / "moe", UpcycleOptions())
    assert "greedy generate() with the cache" in str(refusal.value) and not (tmp_path / "moe").exists()


def test_without_the_generation_check_the_upcycle_generates_differently(
    tmp_path, monkeypatch, without_the_longrope_rule
):
    """What the check prevents, shown: the forward passes agree, greedy generation past the original context not."""
    dense = longrope_phi3(tmp_path / "dense")
    monkeypatch.setattr(plan_module, "_proven_target", _unchecked)
    convert(dense, tmp_path / "moe", UpcycleOptions())
    assert relative_difference(dense, tmp_path / "moe", 64, COMMON["vocab_size"]) <= 1e-5
    prompt = torch.randint(0, COMMON["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(0))
    (_, logits_a), (_, logits_b) = greedy(dense, prompt, 40), greedy(tmp_path / "moe", prompt, 40)
    before, after = slice(0, 22), slice(23, 40)  # new token 23 sits at position 32, the original context
    assert ((logits_a[before] - logits_b[before]).abs().max() / logits_a.abs().max()).item() <= 1e-5
    assert ((logits_a[after] - logits_b[after]).abs().max() / logits_a.abs().max()).item() > 1e-2


def _unchecked(source_config, dense, opts, layout, candidates, dtype):
    target = candidates[0]
    return target, target.config(dense, opts, layout, dtype), {}


def test_the_probe_agrees_with_real_generation_for_a_default_phi3(tmp_path, monkeypatch):
    """Phi-3's own hook drops the cache at the original context even with a default rotary table. Whether that
    changes what generate() gives depends on the transformers release (5.25 recomputes the same keys; 5.17 does
    not): the config check must accept exactly when real greedy generation agrees past that point."""
    dense = save_hub_style(family_config("phi3", original_max_position_embeddings=24), tmp_path / "dense")
    try:
        result = convert(dense, tmp_path / "moe", UpcycleOptions())
        accepted = True
        report = check_config_equivalence(json.loads((dense / "config.json").read_text()), result.plan.config)
        assert report.equivalent and 24 in report.generation_points
    except UnsupportedModelError as refusal:
        accepted = False
        assert "greedy generate() with the cache" in str(refusal)
    monkeypatch.setattr(plan_module, "_proven_target", _unchecked)
    convert(dense, tmp_path / "unchecked", UpcycleOptions())
    prompt = torch.randint(0, COMMON["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(0))
    (_, logits_a), (_, logits_b) = greedy(dense, prompt, 10), greedy(tmp_path / "unchecked", prompt, 10)
    agree = ((logits_a - logits_b).abs().max() / logits_a.abs().max()).item() <= 1e-5
    assert accepted == agree


# ---- case 6: tied embeddings beside a distinct stored LM head -------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_distinct_stored_lm_head_is_kept(cli, tmp_path, mode):
    dense = hub_llama(tmp_path / "dense", tie_word_embeddings=True)
    edit_weights(dense, lambda t: t.__setitem__("lm_head.weight", torch.randn(COMMON["vocab_size"], 64) * 0.08))
    result = convert(dense, tmp_path / "moe", UpcycleOptions())
    assert "lm_head.weight" in {r.name for r in result.plan.recipes}
    ids = torch.randint(0, COMMON["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(0))
    a, b = logits(dense, ids), logits(tmp_path / "moe", ids)
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5
    code, report = verify_json(cli, dense, tmp_path / "moe", mode)
    assert code == 0, report["verdict"]


# ---- case 8: sizes are checked before any work ---------------------------------------------------------------


def test_a_hundred_million_experts_are_refused_before_planning(tmp_path, monkeypatch):
    dense = hub_llama(tmp_path / "dense")
    monkeypatch.setattr(plan_module.RecipeMaker, "all", lambda *args: pytest.fail("the plan was built"))
    with pytest.raises(OptionError, match=r"900,000,024 tensors.*beyond the .* of memory available"):
        convert(dense, tmp_path / "moe", UpcycleOptions(experts=100_000_000), dry_run=True)


LLAMA_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
    "dtype": "bfloat16",
}  # fmt: skip


def test_the_memory_estimate_is_the_writer_s_not_a_stack_it_never_builds(tmp_path):
    """Llama-3.1-8B with 64 experts: per-expert tensors are made one at a time (a few GB), only a stacked target
    makes a layer's [E, 2F, H] whole (tens of GB)."""
    from upcycle.convert import budget
    from upcycle.convert.families import describe_dense
    from upcycle.convert.source import DenseSource

    source = DenseSource.open(save_header_only(LLAMA_8B, tmp_path / "llama-8b"))
    dense, options = describe_dense(source.config, source.tensors), UpcycleOptions(experts=64)
    per_expert = budget.estimate(source, dense, options, 32, "BF16", stacked=False)
    stacked = budget.estimate(source, dense, options, 32, "BF16", stacked=True)
    assert 4e9 < per_expert.peak_bytes < 12e9 and stacked.peak_bytes > 50e9
    assert per_expert.output_bytes > 64 * 32 * 3 * 4096 * 14336 * 2  # every expert is written


def test_a_billion_layers_are_refused_before_transformers_builds_them(tmp_path):
    dense = hub_llama(tmp_path / "dense")
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    with pytest.raises(SourceError, match="declares 1000000000 decoder layers but the weight files hold 3"):
        convert(dense, tmp_path / "moe", UpcycleOptions())


# ---- case 9: each message says what is true -------------------------------------------------------------------


def test_a_partial_rotary_phi3_names_every_target(tmp_path):
    dense = save_hub_style(family_config("phi3", partial_rotary_factor=0.75), tmp_path / "dense")
    with pytest.raises(UnsupportedModelError, match=r"none of its targets \(mixtral, qwen2_moe, glm4_moe\)"):
        convert(dense, tmp_path / "moe", UpcycleOptions(granularity=2, top_k=2, target="glm4_moe"))
