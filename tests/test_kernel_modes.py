"""The interpreter kernel tests and the GPU kernel tests share one pytest process without skipping each other.

triton.jit decides when a kernel is *defined* whether it is interpreted (TRITON_INTERPRET set) or compiled, so the
kernel modules carry the mode of whichever test imported them first; each module's fixture rebuilds them for its own
mode (tests/kernel_modes.py). Checked on this CPU with a real pytest run of both modules in the suite's order, the
GPU tests' fixtures running for real (tests/kernel_mode_probe.py stands in only for the device).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_FIRST = "tests/test_kernels.py::test_triton_forward_and_grads_match_reference[T_below_one_tile]"
GPU = "tests/test_kernels_gpu.py::test_fp32_without_tf32_matches_reference"
CPU_AFTER = "tests/test_kernels.py::test_triton_forward_and_grads_match_reference[sentinel_ids]"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gpu_kernel_tests_run_after_the_interpreter_tests_and_back(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "UPCYCLE_KERNELS_BACKEND")}
    env.update(PYTHONPATH=str(ROOT / "tests"), UPCYCLE_KERNELS_CACHE_DIR=str(tmp_path / "tuned"))
    report = tmp_path / "report.xml"
    command = [sys.executable, "-m", "pytest", "-p", "kernel_mode_probe", "-p", "no:cacheprovider", "-q",
               f"--junitxml={report}", CPU_FIRST, GPU, CPU_AFTER]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        problems = [child.tag + ": " + (child.get("message") or "") for child in case]
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = problems or ["passed"]
    assert list(outcomes.values()) == [["passed"]] * 3, (outcomes, run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-3000:]
