"""Bad input: one line naming the problem and the fix, exit code 2, and nothing left at OUT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_models import make_dense

SINGLE = "model.safetensors"


def assert_refused(result, out: Path, *phrases: str) -> None:
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert message.startswith("error:") and "Fix:" in message, message
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in " ".join(message.split()), message
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.upcycle-*"))


@pytest.fixture
def llama(dense_dir, tmp_path) -> Path:
    """A private copy of the tiny Llama that a test may damage."""
    return Path(shutil.copytree(dense_dir("llama"), tmp_path / "llama"))


def test_missing_source(cli, tmp_path):
    out = tmp_path / "out"
    assert_refused(cli("convert", tmp_path / "nope", out), out, "does not exist")


def test_folder_without_config(cli, llama, tmp_path):
    (llama / "config.json").unlink()
    out = tmp_path / "out"
    assert_refused(cli("convert", llama, out), out, "no config.json")


def test_unsupported_family_names_the_reason_and_the_supported_ones(cli, tmp_path):
    config = transformers.Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    transformers.Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma2")
    out = tmp_path / "out"
    assert_refused(
        cli("convert", tmp_path / "gemma2", out),
        out,
        "'gemma2'",
        "soft-capping",
        "upcycle families",
        "llama, ministral",
    )


def test_truncated_safetensors(cli, llama, tmp_path):
    path = llama / SINGLE
    os.truncate(path, path.stat().st_size - 100)
    out = tmp_path / "out"
    assert_refused(cli("convert", llama, out), out, "truncated")


def test_corrupt_safetensors_header(cli, llama, tmp_path):
    with (llama / SINGLE).open("r+b") as handle:
        handle.seek(9)
        handle.write(b"\xff\x00garbage")
    out = tmp_path / "out"
    assert_refused(cli("convert", llama, out), out, "corrupt")


def test_tensor_missing_from_source(cli, llama, tmp_path):
    tensors = load_file(llama / SINGLE)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, llama / SINGLE, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(cli("convert", llama, out), out, "lacks tensor 'model.layers.1.self_attn.k_proj.weight'")


def test_unexpected_tensor_in_source(cli, llama, tmp_path):
    tensors = load_file(llama / SINGLE)
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, llama / SINGLE, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_refused(cli("convert", llama, out), out, "'model.layers.0.mlp.extra_proj.weight'")


def test_config_that_does_not_match_the_weights(cli, llama, tmp_path):
    config = json.loads((llama / "config.json").read_text())
    config["intermediate_size"] = 100
    (llama / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_refused(cli("convert", llama, out), out, "config.json implies")


def test_top_k_above_the_number_of_experts(cli, llama, tmp_path):
    out = tmp_path / "out"
    assert_refused(cli("convert", llama, out, "-e", "2", "-k", "3"), out, "exceeds the number of experts")


def test_top_k_not_a_multiple_of_granularity(cli, llama, tmp_path):
    out = tmp_path / "out"
    assert_refused(cli("convert", llama, out, "-g", "4", "-k", "6"), out, "not a multiple of --granularity 4")


def test_unknown_router(cli, llama, tmp_path):
    out = tmp_path / "out"
    assert_refused(cli("convert", llama, out, "--router", "sigmoid"), out, "--router: unknown value 'sigmoid'")


def test_existing_output_is_refused_and_kept(cli, llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = cli("convert", llama, out)
    assert result.exit_code == 2 and "already exists" in result.stderr and "--force" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_force_replaces_an_existing_model_folder(cli, llama, tmp_path):
    out = tmp_path / "out"
    assert cli("convert", llama, out, "-e", "2", "-k", "1").exit_code == 0
    result = cli("convert", llama, out, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "upcycle.json").read_text())["options"]["experts"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "out"]


def test_force_never_replaces_a_folder_of_anything_else(cli, llama, tmp_path):
    out = tmp_path / "thesis"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("years of work")
    (out / "config.json").write_text("{}")  # a model-like file beside them does not make it a model folder
    before = sorted((p.relative_to(out), p.is_file() and p.read_bytes()) for p in out.rglob("*"))
    result = cli("convert", llama, out, "--force")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "holds sub/, thesis.txt" in " ".join(result.stderr.split()) and "never anything else" in result.stderr
    assert sorted((p.relative_to(out), p.is_file() and p.read_bytes()) for p in out.rglob("*")) == before


def test_source_with_remote_code_needs_opt_in(cli, llama, tmp_path):
    config = json.loads((llama / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (llama / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_refused(cli("convert", llama, out), out, "--trust-remote-code")
    assert cli("convert", llama, out, "--trust-remote-code").exit_code == 0


class Payload:
    """A pickle that would run code when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickle_with_code_is_refused_and_never_run(cli, llama, tmp_path):
    state = load_file(llama / SINGLE)
    (llama / SINGLE).unlink()
    marker = tmp_path / "marker"
    torch.save({**state, "evil": Payload(marker)}, llama / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_refused(cli("convert", llama, out), out, "weights only")
    assert not marker.exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real, tiny filesystem (tmpfs) to run out of space on; needs root, as on the CI machines."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def make(options: str) -> Path:
        if (
            os.geteuid() != 0
            or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True
            ).returncode
        ):
            pytest.skip("mounting a tmpfs needs root")
        return mount

    yield make
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_read_only_destination_is_named_as_such(cli, llama, small_tmpfs):
    disk = small_tmpfs("ro,size=64m")  # room enough: only the mode stands in the way
    out = disk / "out"
    assert_refused(cli("convert", llama, out), out, "is not writable (a read-only file system, or no permission)")


def test_disk_too_small_is_refused_before_writing(cli, llama, small_tmpfs):
    disk = small_tmpfs("size=1m")
    out = disk / "out"
    assert_refused(cli("convert", llama, out), out, "not enough disk space")
    assert list(disk.iterdir()) == []


def test_disk_filling_up_while_writing_leaves_nothing(cli, llama, small_tmpfs):
    # Few inodes: the shard fits, but the files after it cannot be created (ENOSPC mid-write).
    disk = small_tmpfs("size=200m,nr_inodes=4")
    out = disk / "out"
    assert_refused(cli("convert", llama, out), out, "disk filled up")
    assert list(disk.iterdir()) == []


def sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_slow_conversion(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    src = make_dense("llama", tmp_path / "big", hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "upcycle", "convert", str(src), str(out), "-e", "64", "--shard-size", "20MB"]
    # as from a terminal: a shell starts background jobs with SIGINT ignored, which a child would inherit
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_in_a_terminal
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        shards = list(tmp_path.glob(".out.upcycle-tmp-*/model-00002-*"))
        if shards or process.poll() is not None:
            break
        time.sleep(0.005)
    assert process.poll() is None, "conversion finished before it could be interrupted"
    return process, src, out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_while_writing_leaves_nothing(tmp_path, sig):
    process, _, out = _start_slow_conversion(tmp_path)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + sig, stderr  # what a shell reports of a process the signal ended
    assert "interrupted: nothing was left behind. Fix: run the command again." in " ".join(stderr.split())
    assert not out.exists() and not list(tmp_path.glob(".out.upcycle-*"))


def test_killed_run_is_swept_by_the_next(cli, tmp_path):
    process, src, out = _start_slow_conversion(tmp_path)
    process.kill()
    process.wait()
    assert list(tmp_path.glob(".out.upcycle-tmp-*")), "SIGKILL cannot be caught: its folder stays until the next run"
    assert cli("convert", src, out, "-e", "2").exit_code == 0
    assert not list(tmp_path.glob(".out.upcycle-tmp-*")) and (out / "upcycle.json").is_file()


def test_debug_shows_the_traceback(cli, tmp_path):
    result = cli("--debug", "convert", tmp_path / "nope", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" in result.output


def test_an_error_line_keeps_its_square_brackets(cli, tmp_path, monkeypatch) -> None:
    """The one-line message is printed as written: `pip install 'upcycle[gguf]'` must not lose `[gguf]`."""
    from upcycle.errors import SourceError
    from upcycle.train import shipped_recipes

    def missing(name: str):
        raise SourceError("reading a GGUF needs gguf [x].", "pip install 'upcycle[gguf]'")

    monkeypatch.setattr(shipped_recipes, "shipped_recipe", missing)
    result = cli("recipes", "show", "cpu-quickstart")
    assert result.exit_code == 2
    assert "gguf [x]." in result.stderr and "pip install 'upcycle[gguf]'" in " ".join(result.stderr.split())
