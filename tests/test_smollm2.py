"""The real SmolLM2-135M (de-quantised from its registry package): every method, through plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_clean

from upcycle import assets
from upcycle.convert import UpcycleOptions
from upcycle.upcycling import convert
from upcycle.verify import verify

pytestmark = pytest.mark.slow

METHODS = {
    "softmax-topk zero router": (dict(router="softmax-topk", router_init="zero"), True),
    "virtual groups E4G2T2": (dict(granularity=2, top_k=2), True),
    "layers 10-29, rest dense": (dict(layers="10-29"), True),
    "shared expert of 512 neurons (qwen2_moe)": (dict(shared_width=512), True),
    "shared expert, virtual groups (glm4_moe)": (dict(granularity=2, top_k=2, shared_width=512), True),
    "softmax-topk paper scaling": (dict(router="softmax-topk"), False),
    "drop-upcycling 0.5": (dict(drop_upcycling=0.5), False),
    "noise 0.02": (dict(noise=0.02), False),
}


@pytest.fixture(scope="module")
def smollm2():
    return assets.smollm2_folder()


@pytest.fixture(scope="module")
def dense_logits(smollm2):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2)(assets.sample_text(), return_tensors="pt").input_ids[:, :96]
    with torch.no_grad():
        return ids, load_clean(smollm2)(ids).logits


def test_default_conversion_is_verified_equivalent(smollm2, tmp_path):
    out = tmp_path / "moe"
    result = convert(smollm2, out, UpcycleOptions())
    assert result.plan.architecture == "MixtralForCausalLM" and result.plan.exactness.exact
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    report = verify(smollm2, out, min_tokens=128, mode="full")  # whole models, whatever memory is free now
    assert report.equivalent, report.verdict
    assert report.weights.tensors_checked == len(result.plan.recipes)
    assert report.function.logits_rel_diff <= 1e-5 and report.function.top1_agreement == 1.0
    assert report.function.tokens == 128 and "Shakespeare" in report.function.text_source


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_smollm2(smollm2, dense_logits, tmp_path, method):
    options, exact = METHODS[method]
    out = tmp_path / "moe"
    result = convert(smollm2, out, UpcycleOptions(experts=4, **options))
    assert result.plan.exactness.exact is exact
    ids, reference = dense_logits
    with torch.no_grad():
        logits = load_clean(out)(ids).logits
    relative = ((logits - reference).abs().max() / reference.abs().max()).item()
    if exact:
        assert relative <= 1e-5
    else:
        assert relative > 1e-4


def test_a_shared_expert_on_smollm2_passes_verify(smollm2, tmp_path):
    out = tmp_path / "moe"
    result = convert(smollm2, out, UpcycleOptions(experts=4, shared_width=512, layers="24-29"))
    assert result.plan.target == "qwen2_moe" and result.plan.exactness.exact
    report = verify(smollm2, out, min_tokens=128, mode="full")
    assert report.equivalent, report.verdict
    assert not report.weights.mismatches and report.function.top1_agreement == 1.0


def test_gguf_file_converts_directly(smollm2, dense_logits, tmp_path):
    out = tmp_path / "moe"
    convert(assets.smollm2_gguf(), out, UpcycleOptions(experts=2, top_k=1))
    provenance = json.loads((out / "upcycle.json").read_text())["source"]
    assert provenance["kind"] == "gguf" and list(provenance["sha256"]) == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    ids, reference = dense_logits
    with torch.no_grad():
        logits = load_clean(out)(ids).logits
    assert ((logits - reference).abs().max() / reference.abs().max()).item() <= 1e-5
    assert not list(tmp_path.glob(".upcycle-gguf-*"))
    # verify takes the .gguf too (de-quantised as convert does) and checks its sha256 against the record
    report = verify(assets.smollm2_gguf(), out, min_tokens=64)
    assert report.equivalent, report.verdict
    assert report.config.equivalent and report.weights.source_matches_provenance is True
    assert report.weights.tensors_checked > 0 and not report.weights.mismatches
    # the de-quantised folder holds the same weights, but it is not the recorded source file: not comparable
    report = verify(smollm2, out, weights=True, function=False)
    assert report.equivalent and report.weights.source_matches_provenance is None


def test_streaming_and_whole_model_verify_agree_on_smollm2(smollm2, tmp_path):
    out = tmp_path / "moe"
    convert(smollm2, out, UpcycleOptions(layers="20-29"))
    full = verify(smollm2, out, min_tokens=64, mode="full", weights=False)
    streamed = verify(smollm2, out, min_tokens=64, mode="streaming", weights=False)
    assert full.equivalent and streamed.equivalent, (full.verdict, streamed.verdict)
    layers = streamed.streaming.layers
    assert len(layers) == 30 and [layer.mlp for layer in layers] == ["dense"] * 20 + ["moe"] * 10
    assert all(layer.rel_diff <= 1e-5 for layer in layers) and all(d.rel_diff <= 1e-5 for d in full.function.layers)
    assert all(layer.rel_diff == 0.0 for layer in layers[:20])  # dense layers copied verbatim: identical outputs
    assert layers[20].rel_diff == pytest.approx(full.function.layers[21].rel_diff, rel=1e-3, abs=1e-9)
    assert not streamed.streaming.shared_differing and all(streamed.streaming.outer_tensors.values())
