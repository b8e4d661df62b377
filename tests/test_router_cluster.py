"""`--router-init cluster`: routers from k-means centroids of each layer's MLP input on real text, still exact.

Real tiny checkpoints of three families run real Shakespeare (the default calibration) or a text file; each
conversion must pass verify, its router rows must be the cached centroids at a random row's norm, and the
centroids must be made once per content key.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from upcycle.convert import UpcycleOptions
from upcycle.convert.calibration import cache_path, calibrated, spherical_kmeans
from upcycle.errors import OptionError, SourceError
from upcycle.upcycling import convert
from upcycle.verify import verify


def router_rows(folder, plan, layer: int) -> torch.Tensor:
    recipe = next(r for r in plan.recipes if r.op == "router" and r.layer == layer)
    shard = next(folder.glob("model-*.safetensors"))
    with safe_open(str(shard), "pt") as handle:
        return handle.get_tensor(recipe.name).float()


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("llama", dict(experts=4, top_k=2)),
        ("qwen2", dict(experts=4, top_k=2, layers="1-2")),
        ("qwen3", dict(experts=2, granularity=2, top_k=2)),
    ],
)
def test_a_cluster_router_keeps_the_model_exact(family, options, dense_dir, tmp_path):
    dense = dense_dir(family)
    result = convert(dense, tmp_path / "moe", UpcycleOptions(router_init="cluster", calibration_tokens=512, **options))
    plan = result.plan
    key = next(r.calibration for r in plan.recipes if r.op == "router")
    assert cache_path(key).is_file()
    assert any("k-means centroids" in note and key in note for note in plan.exactness.notes)
    report = verify(dense, tmp_path / "moe", min_tokens=64, mode="full")
    assert report.equivalent, report.verdict
    assert report.weights.ok and not report.weights.not_remade
    hidden, groups = 64, options.get("granularity", 1)
    for layer in plan.moe_layers:
        rows = router_rows(tmp_path / "moe", plan, layer)
        expected = calibrated(key, layer).repeat_interleave(groups, dim=0) * (0.02 * math.sqrt(hidden))
        assert torch.allclose(rows, expected, rtol=1e-6, atol=0)
        assert torch.allclose(rows.norm(dim=1), torch.full((rows.shape[0],), 0.02 * math.sqrt(hidden)), rtol=1e-5)


def test_centroids_are_made_once_per_key_and_verify_goes_on_without_them(dense_dir, tmp_path):
    dense = dense_dir("llama")
    text = tmp_path / "calibration.txt"
    text.write_text("To be, or not to be, that is the question:\n" * 40, encoding="utf-8")
    options = UpcycleOptions(experts=4, router_init="cluster", calibration=str(text), calibration_tokens=256)
    first = convert(dense, tmp_path / "a", options)
    key = next(r.calibration for r in first.plan.recipes if r.op == "router")
    made = cache_path(key).stat().st_mtime_ns
    second = convert(dense, tmp_path / "b", options)
    assert next(r.calibration for r in second.plan.recipes if r.op == "router") == key
    assert cache_path(key).stat().st_mtime_ns >= made  # renewed as used, never re-made: same bytes
    assert torch.equal(router_rows(tmp_path / "a", first.plan, 0), router_rows(tmp_path / "b", second.plan, 0))
    cache_path(key).unlink()  # another machine: the routers cannot be re-made, and need not be
    report = verify(dense, tmp_path / "b", min_tokens=64, mode="full")
    assert report.equivalent and len(report.weights.not_remade) == 3


def test_spherical_kmeans_finds_the_directions_of_the_data():
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(3, 16, generator=generator), dim=-1)
    points = directions.repeat_interleave(200, dim=0) + 0.05 * torch.randn(600, 16, generator=generator)
    found = spherical_kmeans(torch.nn.functional.normalize(points, dim=-1), 3, seed=1)
    assert (found @ directions.T).max(dim=0).values.min() > 0.99


def test_calibration_without_a_cluster_router_is_refused(dense_dir, tmp_path):
    with pytest.raises(OptionError, match="--calibration is read only by --router-init cluster"):
        convert(dense_dir("llama"), tmp_path / "moe", UpcycleOptions(calibration="notes.txt"))
    assert not (tmp_path / "moe").exists()


def test_a_calibration_text_without_words_is_refused(dense_dir, tmp_path):
    """Only whitespace: refused before the dense model runs, with nothing written."""
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n\t\n", encoding="utf-8")
    options = UpcycleOptions(router_init="cluster", calibration=str(blank), calibration_tokens=64)
    with pytest.raises(SourceError, match="the calibration text blank.txt is empty"):
        convert(dense_dir("llama"), tmp_path / "moe", options)
    assert not (tmp_path / "moe").exists()


def test_a_text_a_tokenizer_drops_entirely_is_refused(tmp_path):
    """A word-level tokenizer makes no tokens of whitespace (the bytes fallback would): one clear line."""
    from hub_models import save_tiny_tokenizer

    from upcycle.convert.text_tokens import tokenize_text

    save_tiny_tokenizer(tmp_path, 16)
    with pytest.raises(SourceError, match="has no tokens under"):
        tokenize_text(tmp_path, " \n\n ", 64, 16)
    assert len(tokenize_text(tmp_path, "w3 thee", 64, 16)[0]) == 64


@pytest.mark.slow
def test_smollm2_with_a_hidden_router_passes_verify(tmp_path):
    from upcycle import assets

    smollm2 = assets.smollm2_folder()
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(PROMPTS, encoding="utf-8")
    options = UpcycleOptions(experts=4, layers="26-29", router_init="hidden", router_prompts=str(prompts))
    convert(smollm2, tmp_path / "moe", options)
    report = verify(smollm2, tmp_path / "moe", min_tokens=128, mode="full")
    assert report.equivalent, report.verdict
    assert report.function.top1_agreement == 1.0 and not report.weights.not_remade


@pytest.mark.slow
def test_smollm2_with_a_cluster_router_passes_verify(tmp_path):
    from upcycle import assets

    smollm2 = assets.smollm2_folder()
    options = UpcycleOptions(experts=4, layers="26-29", router_init="cluster", calibration_tokens=1024)
    result = convert(smollm2, tmp_path / "moe", options)
    report = verify(smollm2, tmp_path / "moe", min_tokens=128, mode="full")
    assert report.equivalent, report.verdict
    assert report.function.top1_agreement == 1.0 and not report.weights.not_remade
    assert result.plan.options.calibration_tokens == 1024


def test_the_cache_lists_and_checks_calibrations(dense_dir, tmp_path, monkeypatch):
    from upcycle.cache.checks import verify_entries
    from upcycle.cache.entries import list_entries

    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "calibration.txt"
    text.write_text("Friends, Romans, countrymen, lend me your ears.\n" * 30, encoding="utf-8")
    options = UpcycleOptions(experts=2, top_k=1, router_init="cluster", calibration=str(text), calibration_tokens=128)
    plan = convert(dense_dir("llama"), tmp_path / "moe", options).plan
    key = next(r.calibration for r in plan.recipes if r.op == "router")
    entries = [e for e in list_entries() if e.kind == "calibration"]
    assert [e.name for e in entries] == [f"calibration/{key}.safetensors"]
    cache_path(key).write_bytes(b"not a safetensors file")
    verify_entries(entries)
    assert entries[0].problem is not None


PROMPTS = """experts:
  - positive_prompts: ["def fibonacci(n):", "import numpy as np"]
    negative_prompts: ["Once upon a time"]
  - positive_prompts: ["Once upon a time, there was a little girl who"]
  - positive_prompts: ["The capital of France is", "Water boils at"]
  - positive_prompts: ["ROMEO. But soft, what light through yonder window breaks?"]
"""


def with_smollm2_tokenizer(family: str, folder):
    """A tiny random model of `family` over SmolLM2's vocabulary, with its tokenizer: prompts are real tokens."""
    import shutil

    from tiny_models import make_dense
    from train_helpers import VOCAB

    from upcycle import assets
    from upcycle.model_files import COPIED_FILES

    make_dense(family, folder, vocab_size=VOCAB, num_hidden_layers=2)
    for path in assets.smollm2_folder().iterdir():
        if any(path.match(pattern) for pattern in COPIED_FILES):
            shutil.copy2(path, folder / path.name)
    return folder


# (A Qwen2 folder holding SmolLM2's tokenizer is refused by convert: Qwen2-MoE would load it as another class.)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_a_hidden_router_is_made_from_prompts_per_expert_and_keeps_the_model_exact(family, tmp_path):
    from transformers import AutoTokenizer

    from upcycle.hf.loading import load_causal_lm_strict

    dense = with_smollm2_tokenizer(family, tmp_path / "dense")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(PROMPTS, encoding="utf-8")
    options = UpcycleOptions(experts=4, top_k=2, router_init="hidden", router_prompts=str(prompts))
    plan = convert(dense, tmp_path / "moe", options).plan
    report = verify(dense, tmp_path / "moe", min_tokens=64, mode="full")
    assert report.equivalent, report.verdict
    assert report.weights.ok and not report.weights.not_remade
    # row 1 is, independently recomputed here, the normalised hidden state entering the layer at the last token
    model, tokenizer = load_causal_lm_strict(dense), AutoTokenizer.from_pretrained(dense)
    ids = tokenizer((tokenizer.bos_token or "") + "Once upon a time, there was a little girl who", return_tensors="pt",
                    add_special_tokens=False)  # fmt: skip
    with torch.no_grad():
        hidden = model(**ids, output_hidden_states=True).hidden_states
    for layer in plan.moe_layers:
        expected = torch.nn.functional.normalize(hidden[layer][0, -1], dim=-1) * 0.02 * math.sqrt(64)
        assert torch.allclose(router_rows(tmp_path / "moe", plan, layer)[1], expected, atol=1e-6)


def test_router_prompts_that_do_not_fit_the_experts_are_refused(tiny_pair, tmp_path):
    dense, _ = tiny_pair
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(PROMPTS, encoding="utf-8")
    with pytest.raises(OptionError, match="has 4 experts entries for 8 experts"):
        convert(dense, tmp_path / "moe", UpcycleOptions(router_init="hidden", router_prompts=str(prompts)))
    with pytest.raises(OptionError, match="go together"):
        convert(dense, tmp_path / "moe", UpcycleOptions(experts=4, router_init="hidden"))
    assert not (tmp_path / "moe").exists()
