"""The prepared GPU session: its scripts parse, and its summary reads real benchmark output (made here on the CPU)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_session_scripts_parse() -> None:
    for script in ("session.sh", "prepare.sh"):
        path = ROOT / "benchmarks" / "gpu" / script
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_summary_of_a_session_folder(tmp_path: Path) -> None:
    bench = [sys.executable, str(ROOT / "benchmarks" / "bench_moe_layer.py"), "--iters", "1", "--warmup", "0"]
    for name, extra in (("moe-layer.json", ["--check", "--impls", "upcycle,grouped_mm,dense"]),
                        ("moe-layer-group1.json", ["--impls", "upcycle"])):  # fmt: skip
        run = subprocess.run([*bench, *extra, "--json", str(tmp_path / name)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
    (tmp_path / "kernel-tests.txt").write_text("8 passed in 31.0s\nexit 0\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu" / "summarize.py"), str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "8 passed" in out and "### Kernel goals" in out and "### Training goal" in out
    for shape in ("cpu-E8-k2-H128-F256-T512", "cpu-E16-k4-H64-F64-T512"):
        assert f"- {shape}: f+b" in out and f"- {shape}, upcycle[reference]: grouped order" in out
    assert "vs Liger - (goal > 1: not measured)" in out  # no peers file: said, not guessed
    assert "no training benchmark came back" in out
    assert not re.search(r"(?i)\bissues?\b|#\d", out), "the summary names goals by what they measure, not by a number"
