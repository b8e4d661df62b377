"""Hub-style configs that once converted silently wrong: each is now exact or refused, and verify catches a mapping
broken back on purpose (with the plain check and with --weights-only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from hub_models import LLAMA3_ROPE, relative_difference, save_hub_style

from upcycle.convert import UpcycleOptions
from upcycle.convert import plan as plan_module
from upcycle.convert.targets import base as target_base
from upcycle.convert.targets.group_limited import Glm4MoeTarget
from upcycle.errors import UnsupportedModelError
from upcycle.upcycling import convert

DIMS = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
LINEAR_ROPE = {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}


def hub(tmp_path: Path, name: str, **config) -> Path:
    return save_hub_style({**DIMS, **config}, tmp_path / name)


def loaded_config(folder: Path):
    return transformers.AutoConfig.from_pretrained(folder)


# ---- case 1: Llama 3.x rope in the legacy format, virtual groups (Glm4-MoE) -------------------------------------


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, LINEAR_ROPE], ids=["llama3", "linear"])
def test_legacy_rope_with_virtual_groups_is_exact(tmp_path, rope):
    src = hub(tmp_path, "dense", model_type="llama", **rope)
    result = convert(src, tmp_path / "moe", UpcycleOptions(granularity=2, top_k=2))
    assert result.plan.target == "glm4_moe" and result.plan.exactness.exact
    assert relative_difference(src, tmp_path / "moe", 64, 128) <= 1e-5
    written = json.loads((tmp_path / "moe" / "config.json").read_text())
    parameters = written["rope_parameters"]
    assert written["rope_theta"] == parameters["rope_theta"] and parameters["partial_rotary_factor"] == 1.0
    assert written["rope_scaling"] == {k: v for k, v in parameters.items() if k != "rope_theta"}
    assert loaded_config(tmp_path / "moe").rope_parameters["partial_rotary_factor"] == 1.0


# ---- case 2: Qwen2 windows from max_window_layers, no layer_types -------------------------------------------------


def qwen2_windowed(tmp_path: Path, max_window_layers: int) -> Path:
    return hub(
        tmp_path,
        f"qwen2-mwl{max_window_layers}",
        model_type="qwen2",
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=max_window_layers,
    )


def test_qwen2_that_slides_on_no_layer_stays_unwindowed(tmp_path):
    src = qwen2_windowed(tmp_path, max_window_layers=2)  # layers >= 2 slide: none of the 2
    convert(src, tmp_path / "moe", UpcycleOptions())
    written = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert written["layer_types"] == ["full_attention", "full_attention"]
    assert relative_difference(src, tmp_path / "moe", 40, 128) <= 1e-5


@pytest.mark.parametrize("max_window_layers", [0, 1], ids=["all-sliding", "mixed"])
def test_qwen2_with_windows_is_refused_with_the_reason(cli, tmp_path, max_window_layers):
    src = qwen2_windowed(tmp_path, max_window_layers)
    result = cli("convert", src, tmp_path / "moe")
    assert result.exit_code == 2 and "window" in result.stderr and "Fix:" in result.stderr
    assert not (tmp_path / "moe").exists()


# ---- case 3: absent fields take the source class's defaults -------------------------------------------------------


def test_llama_without_rms_norm_eps_keeps_llamas_default(tmp_path):
    src = hub(tmp_path, "dense", model_type="llama")
    convert(src, tmp_path / "moe", UpcycleOptions())
    assert loaded_config(tmp_path / "moe").rms_norm_eps == 1e-6
    assert relative_difference(src, tmp_path / "moe", 40, 128) <= 1e-5


def test_qwen3_without_head_dim_keeps_qwen3s_default(tmp_path):
    src = hub(tmp_path, "dense", model_type="qwen3")
    convert(src, tmp_path / "moe", UpcycleOptions())
    assert loaded_config(tmp_path / "moe").head_dim == 128
    assert relative_difference(src, tmp_path / "moe", 40, 128) <= 1e-5


@pytest.mark.slow
def test_mistral_without_sliding_window_keeps_the_4096_window(tmp_path):
    src = hub(tmp_path, "dense", model_type="mistral", num_hidden_layers=1, max_position_embeddings=16384)
    convert(src, tmp_path / "moe", UpcycleOptions(experts=2, top_k=1))
    assert loaded_config(tmp_path / "moe").sliding_window == 4096
    assert relative_difference(src, tmp_path / "moe", 2 * 4096 + 2, 128) <= 1e-5


# ---- case 4: the legacy fields agree with rope_parameters on every target ---------------------------------------


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("llama", {}),
        ("llama", {"granularity": 2, "top_k": 2}),
        ("qwen2", {}),
        ("qwen3", {}),
        ("qwen3", {"granularity": 2, "top_k": 2}),
    ],
    ids=["mixtral", "glm4_moe", "qwen2_moe", "qwen3_moe", "dots1"],
)
def test_legacy_rope_fields_never_disagree(tmp_path, family, options):
    src = hub(tmp_path, "dense", model_type=family, **LLAMA3_ROPE)
    convert(src, tmp_path / "moe", UpcycleOptions(**options))
    written = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert written["rope_theta"] == 500000.0 == written["rope_parameters"]["rope_theta"]
    assert written["rope_scaling"] == {k: v for k, v in written["rope_parameters"].items() if k != "rope_theta"}
    assert relative_difference(src, tmp_path / "moe", 40, 128) <= 1e-5


# ---- case 5: verify fails a mapping broken back on purpose, with and without the function check ------------------


def skip_the_convert_check(monkeypatch) -> None:
    """Let convert write what its mapping says, unchecked (as before the config check existed)."""

    def unchecked(source_config, dense, opts, layout, candidates, dtype):
        target = candidates[0]
        return target, target.config(dense, opts, layout, dtype), {}

    monkeypatch.setattr(plan_module, "_proven_target", unchecked)


def break_partial_rotary(monkeypatch) -> None:
    monkeypatch.setattr(Glm4MoeTarget, "rope_parameters", lambda self, dense: dense.rope_parameters())


def break_layer_types(monkeypatch) -> None:
    def every_layer_slides(dense):  # the old mapping: use_sliding_window read as "every layer slides"
        types = ["sliding_attention"] * dense.num_layers
        return {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 0, "layer_types": types}

    from upcycle.convert.targets import qwen_moe

    monkeypatch.setattr(qwen_moe, "window_fields", every_layer_slides)


def break_defaults(monkeypatch) -> None:
    fields = tuple(f for f in target_base.PASSTHROUGH_FIELDS if f != "rms_norm_eps")
    monkeypatch.setattr(target_base, "PASSTHROUGH_FIELDS", fields)


BROKEN = {
    "case 1: Glm4-MoE half-width rotary": (
        dict(model_type="llama", **LLAMA3_ROPE),
        dict(granularity=2, top_k=2),
        break_partial_rotary,
    ),
    "case 2: every layer slides": (
        dict(model_type="qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=2),
        {},
        break_layer_types,
    ),
    "case 3: target's default eps": (dict(model_type="llama"), {}, break_defaults),
}


@pytest.mark.parametrize("case", list(BROKEN))
@pytest.mark.parametrize("weights_only", [False, True], ids=["full", "weights-only"])
def test_verify_catches_a_mapping_broken_on_purpose(cli, tmp_path, monkeypatch, case, weights_only):
    config, options, breaker = BROKEN[case]
    src = hub(tmp_path, "dense", **config)
    with monkeypatch.context() as patch:
        skip_the_convert_check(patch)
        breaker(patch)
        convert(src, tmp_path / "moe", UpcycleOptions(**options))
    assert relative_difference(src, tmp_path / "moe", 40, 128) > 1e-5  # the break is real
    args = ["verify", src, tmp_path / "moe", "--json"] + (["--weights-only"] if weights_only else [])
    result = cli(*args)
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and not report["equivalent"]
    assert not report["config"]["equivalent"] and "configs do not compute the same function" in report["verdict"]
    assert (report["function"] is None) == weights_only


def test_convert_refuses_a_broken_mapping_or_proves_another_target(tmp_path, monkeypatch):
    config, _, breaker = BROKEN["case 3: target's default eps"]
    src = hub(tmp_path, "dense", **config)
    breaker(monkeypatch)  # targets now take their own default eps: Mixtral's is 1e-5, Llama's (and Qwen2-MoE's) 1e-6
    with pytest.raises(UnsupportedModelError, match="epsilon"):
        convert(src, tmp_path / "moe", UpcycleOptions(target="mixtral"))
    assert not (tmp_path / "moe").exists()
    result = convert(src, tmp_path / "moe", UpcycleOptions())  # auto: the next candidate that passes the check
    assert result.plan.target == "qwen2_moe"
    assert relative_difference(src, tmp_path / "moe", 40, 128) <= 1e-5


def test_function_check_runs_beyond_twice_the_window(cli, tmp_path):
    src = hub(tmp_path, "dense", model_type="mistral", sliding_window=40, max_position_embeddings=512)
    convert(src, tmp_path / "moe", UpcycleOptions(experts=2, top_k=1))
    report = json.loads(cli("verify", src, tmp_path / "moe", "--json", "--min-tokens", "16").stdout)
    assert report["equivalent"] and report["config"]["smallest_window"] == 40
    assert (
        report["function"]["tokens"] == 81
        and "2 x the smallest attention window" in report["function"]["window_coverage"]
    )


# ---- cases 6 and 7: weight scaling on the gated MLP's linear path; when bit-exact is true --------------------------


def test_uniform_router_with_the_matching_weight_scale_is_exact(dense_dir, tmp_path):
    src = dense_dir("llama")
    options = UpcycleOptions(router="softmax-topk", router_init="zero", weight_scale="4")  # E/k = 8/2
    result = convert(src, tmp_path / "moe", options)
    assert result.plan.exactness.exact
    expert = [r for r in result.plan.recipes if r.op == "expert" and r.expert == 0 and r.layer == 0]
    assert {r.projection: r.scale for r in expert} == {"gate": 1.0, "up": 2.0, "down": 2.0}
    assert relative_difference(src, tmp_path / "moe", 40, 128) <= 1e-5


def test_paper_scaling_multiplies_the_output_by_s(dense_dir, tmp_path):
    result = convert(dense_dir("llama"), tmp_path / "moe", UpcycleOptions(router="softmax-topk"))
    expert = {r.projection: r.scale for r in result.plan.recipes if r.op == "expert" and r.expert == 0 and r.layer == 0}
    assert expert["gate"] == 1.0 and expert["up"] * expert["down"] == pytest.approx(4.0)  # s = E G^2 / k = 4
    assert not result.plan.exactness.exact


@pytest.mark.parametrize(("experts", "top_k", "bit_exact"), [(8, 2, True), (16, 4, True), (6, 3, False), (8, 8, False)])
def test_bit_exactness_holds_where_the_plan_says_it_does(dense_dir, tmp_path, experts, top_k, bit_exact):
    src = dense_dir("llama")
    options = UpcycleOptions(experts=experts, top_k=top_k, router="softmax-topk", router_init="zero")
    result = convert(src, tmp_path / "moe", options)
    assert result.plan.exactness.exact and result.plan.exactness.notes[0].startswith("bit-exact") is bit_exact
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    dense, moe = (transformers.AutoModelForCausalLM.from_pretrained(f).eval() for f in (src, tmp_path / "moe"))
    with torch.no_grad():
        a, b = dense(ids).logits, moe(ids).logits
    if bit_exact:
        assert torch.equal(a, b)
    else:
        assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-5


# ---- case 5, continued: the bf16 tolerance is what correct bf16 upcycles measure ----------------------------------


def _bf16_attention_problem() -> str | None:
    """torch's bf16 CPU attention packs with AVX512 instructions its build picked from the CPU: forcing an older
    kernel set (ATEN_CPU_CAPABILITY=avx2) on an AVX512 CPU makes it refuse, whatever the model."""
    q_BHSD = torch.zeros(1, 4, 64, 64, dtype=torch.bfloat16)
    try:
        torch.nn.functional.scaled_dot_product_attention(q_BHSD, q_BHSD, q_BHSD, is_causal=True)
    except RuntimeError as error:
        return f"this torch cannot run bf16 attention on this CPU as configured ({error})"
    return None


needs_bf16_attention = pytest.mark.skipif(_bf16_attention_problem() is not None, reason=str(_bf16_attention_problem()))


@needs_bf16_attention
@pytest.mark.parametrize(("family", "tolerance"), [("llama", 4e-3), ("qwen3", 3e-2)], ids=["mixtral", "qwen3_moe"])
def test_bf16_verify_passes_correct_upcycles_at_the_measured_tolerance(cli, dense_dir, tmp_path, family, tolerance):
    src = dense_dir(family, dtype=torch.bfloat16)  # a bf16 model upcycled as it is: exact, computed in bf16
    assert convert(src, tmp_path / "moe", UpcycleOptions()).plan.exactness.exact
    report = json.loads(cli("verify", src, tmp_path / "moe", "--dtype", "bfloat16", "--json").stdout)
    assert report["equivalent"] and report["tolerance"] == tolerance
    assert report["function"]["logits_rel_diff"] <= tolerance


@needs_bf16_attention
def test_bf16_verify_sees_a_small_real_error(dense_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from upcycle.verify.function import TOLERANCE, Probe, check_function

    src = dense_dir("llama")
    out = tmp_path / "moe"
    convert(src, out, UpcycleOptions())
    shard = out / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    for name in tensors:
        if name.endswith("w2.weight"):
            tensors[name] = tensors[name] * 1.003  # every expert's output 0.3 % too large
    save_file(tensors, shard, metadata={"format": "pt"})
    fp32 = check_function(src, out, Probe("float32", tokens=64)).logits_rel_diff
    bf16 = check_function(src, out, Probe("bfloat16", tokens=64)).logits_rel_diff
    assert 1e-4 < fp32 < 1e-2 and bf16 > TOLERANCE["bfloat16"]
