"""`upcycle demo`: the whole story on the real SmolLM2-135M, and its guard against running out of memory."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from train_helpers import local_paths_in

from upcycle import assets, demo
from upcycle.cli.demo import show_demo_step
from upcycle.convert.source import index_weights


def test_training_budget_is_four_fp32_copies_plus_measured_runtime(dense_dir, monkeypatch) -> None:
    folder = dense_dir("llama")
    params = sum(math.prod(info.shape) for info in index_weights(folder).values())
    monkeypatch.setattr(demo, "available_memory", lambda: None)
    budget = demo.training_budget(folder)
    assert budget.needed_bytes == 16 * params + demo.TRAINING_RUNTIME_BYTES and budget.fits  # unknown: try
    monkeypatch.setattr(demo, "available_memory", lambda: budget.needed_bytes - 1)
    assert not demo.training_budget(folder).fits


def test_available_memory_reads_meminfo() -> None:
    """Linux: MemAvailable, a real amount no larger than MemTotal (read here on its own); without /proc: None."""
    available = demo.available_memory()
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        assert available is None  # unknown: the demo tries the training
        return
    fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
    total = int(fields["MemTotal"].split()[0]) * 1024
    assert available is not None and 1 << 20 < available <= total


def test_skipped_training_says_why_and_how(capsys) -> None:
    show_demo_step("train-skipped", demo.TrainingBudget(12_700_000_000, 9_100_000_000))
    line = " ".join(capsys.readouterr().out.split())
    assert "needs about 12.7 GB of free memory" in line and "9.1 GB is available" in line
    assert "--train-steps 0" in line


@pytest.mark.slow
def test_demo_end_to_end(cli, tmp_path) -> None:
    """README command 1's job: convert, verify, identical generations, then one training step (if it fits)."""
    out = tmp_path / "moe"
    result = cli("demo", "--out", out, "--train-steps", "1")
    text = " ".join(result.stdout.split())
    assert result.exit_code == 0, result.stdout[-3000:]
    assert "Greedy continuations" in text and "the MoE model is the dense model, now with experts" in text
    assert (out / "config.json").is_file() and (out / "upcycle.json").is_file()
    assert local_paths_in(out) == {}  # the folder travels; where its source lay stays on this machine
    matter = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert matter["base_model"] == assets.SMOLLM2_HUB_ID and matter["pipeline_tag"] == "text-generation"
    assert matter["license"] == "apache-2.0" and "upcycle" in matter["tags"]
    if demo.training_budget(out).fits:
        assert "Short training run" in text and "upcycled MoE" in text
        assert (tmp_path / "train-moe").is_dir() and (tmp_path / "train-dense").is_dir()
        assert (tmp_path / "train-moe-expert-load.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    else:
        assert "Skipped the training run" in text and not (tmp_path / "train-moe").exists()
        assert not (tmp_path / "train-moe-expert-load.png").exists()
