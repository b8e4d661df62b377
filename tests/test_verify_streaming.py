"""The layer-streaming function check: the same verdict as the whole-model check, failures caught, memory flat."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from upcycle.convert import UpcycleOptions
from upcycle.upcycling import convert
from upcycle.verify import verify

SHARD = "model-00001-of-00001.safetensors"
CASES = {
    "mixtral": ("llama", {}),
    "qwen2_moe": ("qwen2", {}),
    "qwen3_moe": ("qwen3", {}),
    "glm4_moe (virtual groups)": ("llama", {"experts": 4, "granularity": 2, "top_k": 4}),
    "dots1 (virtual groups)": ("qwen3", {"experts": 4, "granularity": 2, "top_k": 2}),
    "some layers dense": ("llama", {"layers": "1-2"}),
    "mistral window": ("mistral", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_and_whole_model_checks_agree(dense_dir, tmp_path, case):
    family, options = CASES[case]
    src = dense_dir(family)
    convert(src, tmp_path / "moe", UpcycleOptions(**options))
    full = verify(src, tmp_path / "moe", mode="full", min_tokens=64)
    streamed = verify(src, tmp_path / "moe", mode="streaming", min_tokens=64)
    assert full.equivalent and streamed.equivalent, (full.verdict, streamed.verdict)
    assert streamed.function_mode == "streaming" and "function (every layer, streamed)" in streamed.proof
    layers = streamed.streaming.layers
    assert len(layers) == len(full.function.layers) - 1 and all(layer.rel_diff <= 1e-5 for layer in layers)
    assert not streamed.streaming.shared_differing and all(streamed.streaming.outer_tensors.values())
    assert [layer.mlp for layer in layers] == [
        "dense" if i not in streamed.config.moe_layers else "moe" for i in range(3)
    ]


def test_approximate_methods_report_their_per_layer_deviation(dense_dir, tmp_path):
    src = dense_dir("llama")
    convert(src, tmp_path / "moe", UpcycleOptions(router="softmax-topk"))
    report = verify(src, tmp_path / "moe", mode="streaming", min_tokens=32)
    assert not report.equivalent and "approximate by design" in report.verdict
    assert min(layer.rel_diff for layer in report.streaming.layers) > 1e-3
    # layer 0 sees the same input (the embeddings) in both checks: the same deviation, far above rounding noise
    # (an exact conversion's figures are rounding noise, which differs between CPU kernels: never compared)
    full = verify(src, tmp_path / "moe", mode="full", min_tokens=32)
    assert report.streaming.layers[0].rel_diff == pytest.approx(full.function.layers[1].rel_diff, rel=1e-3)
    accepted = verify(src, tmp_path / "moe", mode="streaming", min_tokens=32, tol=1.0)
    assert accepted.equivalent and "explicit tolerance" in accepted.verdict


def test_streaming_catches_a_single_perturbed_expert_weight(cli, dense_dir, tmp_path):
    src = dense_dir("llama")
    out = tmp_path / "moe"
    convert(src, out, UpcycleOptions(experts=2, top_k=1))  # every expert gets tokens
    tensors = load_file(out / SHARD)
    tensors["model.layers.1.block_sparse_moe.experts.0.w2.weight"][5, 7] += 0.5
    save_file(tensors, out / SHARD, metadata={"format": "pt"})
    report = verify(src, out, mode="streaming", weights=False)
    assert not report.equivalent and report.streaming.first_divergent_layer(1e-5) == 1
    assert report.streaming.layers[0].rel_diff <= 1e-5 and "decoder layer 1" in report.verdict
    result = cli("verify", src, out, "--streaming", "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["weights"]["mismatches"]


def test_streaming_catches_a_wrong_config(dense_dir, tmp_path):
    src = dense_dir("llama")
    out = tmp_path / "moe"
    convert(src, out, UpcycleOptions())
    config = json.loads((out / "config.json").read_text())
    config["rms_norm_eps"] = 1e-2
    (out / "config.json").write_text(json.dumps(config))
    report = verify(src, out, mode="streaming", weights=False)
    assert not report.equivalent and not report.config.equivalent and report.config_matches_plan is False
    assert all(layer.rel_diff > 1e-5 for layer in report.streaming.layers)


def test_streaming_catches_a_shared_tensor_that_differs(dense_dir, tmp_path):
    src = dense_dir("qwen2")
    out = tmp_path / "moe"
    convert(src, out, UpcycleOptions())
    tensors = load_file(out / SHARD)
    tensors["model.layers.2.self_attn.k_proj.bias"][0] += 1e-3
    save_file(tensors, out / SHARD, metadata={"format": "pt"})
    report = verify(src, out, mode="streaming", weights=False)
    assert not report.equivalent and report.streaming.shared_differing == ["layer 2 self_attn.k_proj.bias"]
    assert "a tensor both models share differs" in report.verdict


def test_auto_mode_says_which_check_it_chose(dense_dir, tmp_path, monkeypatch):
    import upcycle.verify.modes as modes

    src = dense_dir("llama")
    convert(src, tmp_path / "moe", UpcycleOptions())
    report = verify(src, tmp_path / "moe", min_tokens=16)
    assert report.function_mode == "full" and "fit" in report.function_mode_reason
    monkeypatch.setattr(modes, "available_memory", lambda: 10_000_000)
    report = verify(src, tmp_path / "moe", min_tokens=16)
    assert report.function_mode == "streaming" and "layer by layer" in report.function_mode_reason


# VmHWM, the peak RSS of this process image: ru_maxrss would carry over the (larger) parent's peak across exec.
PEAK_SCRIPT = textwrap.dedent(
    """
    import sys
    from upcycle.verify import verify
    report = verify(sys.argv[1], sys.argv[2], mode=sys.argv[3], min_tokens=64)
    assert report.equivalent, report.verdict
    status = open("/proc/self/status").read()
    print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024)
    """
)


def peak_bytes(dense: Path, moe: Path, mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(dense), str(moe), mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streaming_peak_memory_does_not_grow_with_the_layer_count(tmp_path):
    from tiny_models import make_dense

    # One process's peak RSS varies by about half a layer from run to run (allocator, import order), whatever the
    # layer count: four more layers and the least of three runs keep the signal (400 MB if streaming loaded every
    # layer) far from that noise.
    dims = dict(hidden_size=512, intermediate_size=2048, vocab_size=256, max_position_embeddings=512)
    peaks = {}
    for layers in (2, 6):
        dense = make_dense("llama", tmp_path / f"dense{layers}", num_hidden_layers=layers, **dims)
        moe = tmp_path / f"moe{layers}"
        convert(dense, moe, UpcycleOptions(experts=8, top_k=2))  # one MoE layer: 25 M parameters, 100 MB in fp32
        peaks[layers] = {
            "streaming": min(peak_bytes(dense, moe, "streaming") for _ in range(3)),
            "full": peak_bytes(dense, moe, "full"),
        }
    layer_bytes = 8 * 3 * 512 * 2048 * 4
    streaming_growth = peaks[6]["streaming"] - peaks[2]["streaming"]
    full_growth = peaks[6]["full"] - peaks[2]["full"]
    assert full_growth > 3 * layer_bytes, peaks  # the measurement sees four more layers when they are loaded ...
    assert streaming_growth < layer_bytes, peaks  # ... and the streaming check holds at most one at a time


def test_streaming_feeds_the_weight_check_every_tensor(dense_dir, tmp_path):
    src = dense_dir("qwen3")
    result = convert(src, tmp_path / "moe", UpcycleOptions(experts=16, top_k=1))  # some experts see no token
    full = verify(src, tmp_path / "moe", mode="full", min_tokens=8)
    streamed = verify(src, tmp_path / "moe", mode="streaming", min_tokens=8)
    assert streamed.weights.tensors_checked == full.weights.tensors_checked == len(result.plan.recipes)
    assert streamed.weights.ok and streamed.weights.source_matches_provenance is True
