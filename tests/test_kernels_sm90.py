"""The kernels as the compiler builds them for Hopper (sm_90) and Ampere (sm_80), checked on this CPU: no GPU.

Every autotune candidate of every launch of a training step must become tensor-core MMA (warp-group HGMMA on
Hopper) with pipelined loads (LDGSTS), without register spills and within the shared-memory limit. Runs
`benchmarks/kernel_report.py --check` as a script, in its own process with TRITON_INTERPRET unset, as it is run by
hand.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_tools_present() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return False
    bin_dir = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin"
    return (bin_dir / "cuobjdump").is_file() and (bin_dir / "nvdisasm").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_tools_present(), reason="triton with its NVIDIA backend tools is not installed")
@pytest.mark.parametrize("arch", [90, 80], ids=["hopper-sm90", "ampere-sm80"])
def test_every_candidate_compiles_cleanly(tmp_path: Path, arch: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    out = tmp_path / "report.json"
    shape = "E64-k8-H576-F192-T16k"
    script = str(ROOT / "benchmarks" / "kernel_report.py")
    result = subprocess.run(
        [sys.executable, script, "--check", "--arch", str(arch), "--shapes", shape, "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    (block,) = json.loads(out.read_text())["shapes"]
    rows = block["results"]
    tuned = [r for r in rows if r["config"] is not None]
    assert {r["site"] for r in tuned} == {"up", "gemm", "down_bwd", "dw"}
    assert len(rows) == block["launches"] >= 20
    for r in tuned:
        mma = r["wgmma"] if arch >= 90 else r["mma_sync"]
        assert mma > 0 and r["async_copies"] > 0 and r["spill_stores"] == 0, r


PRECOMPILE_SCRIPT = """
import json

import torch
from upcycle.kernels import triton_bwd
from upcycle.kernels.autotune import compile_in_parallel
from upcycle.kernels.cross_compile import compile_only
from upcycle.kernels.precompile import plan, warmups
from upcycle.kernels.routing import build_routing

E, K, H, F, T = 16, 4, 256, 128, 1024
dt = torch.bfloat16
x, w_gate_up, w_down = torch.empty(T, H, dtype=dt), torch.empty(E, 2 * F, H, dtype=dt), torch.empty(E, H, F, dtype=dt)
weights = torch.empty(T, K, dtype=dt)
routing = build_routing(torch.rand(T, E, generator=torch.Generator().manual_seed(0)).topk(K, dim=-1).indices, E)
kernels = triton_bwd.LAUNCHED_KERNELS

def compiled():
    return {k.fn.__name__: sum(type(v).__name__ == "CompiledKernel" for v in k.device_caches[0][0].values())
            for k in kernels}

with compile_only(90, kernels):
    assert compile_in_parallel(warmups(plan(x, w_gate_up, w_down, routing, weights, True), dt))
    after_precompile = compiled()
    for launch in plan(x, w_gate_up, w_down, routing, weights, True).launches:  # what a real step launches
        launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)
    assert compiled() == after_precompile, (after_precompile, compiled())
print(json.dumps(after_precompile))
"""


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_tools_present(), reason="triton with its NVIDIA backend tools is not installed")
def test_precompile_builds_every_variant_a_step_launches(tmp_path: Path) -> None:
    """The GPU-only ahead-of-time compile, through triton's real warm-up path, for sm_90 on the CPU.

    Every candidate of every tuned site lands in the kernels' JIT caches, and the launches a real training step
    then makes find theirs there (compiling nothing more).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1",
               UPCYCLE_KERNELS_CACHE_DIR=str(tmp_path / "tuned"))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", PRECOMPILE_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts == {"_up_swiglu_kernel": 4, "_grouped_gemm_kernel": 12, "_combine_kernel": 2,
                      "_grouped_dw_kernel": 8}  # fmt: skip
