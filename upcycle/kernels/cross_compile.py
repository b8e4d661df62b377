"""Compile the MoE kernels for a GPU architecture on any machine, and read what the compiler made of them.

Kernel changes can then be checked without a GPU: registers, spills to local memory, shared memory, whether
`tl.dot` became Hopper's warp-group MMA (HGMMA) and whether the loads were software-pipelined (LDGSTS, i.e.
cp.async), per kernel and tile config, plus how long each compile takes. The launches are the real ones:
the wrappers run on empty CPU tensors of the requested shape under :func:`capture_launches`, so arguments,
strides and specialisations are exactly what a GPU run would pass, and they compile through triton's own JIT
warm-up (the path `precompile.py` takes on a GPU) under a compile-only driver that names the target. Reads
the cubins with the `cuobjdump`/`nvdisasm` shipped in triton's wheel. Touches two triton internals (the active
driver slot and each kernel's in-memory cache), checked on triton 3.9.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .autotune import KernelConfig, candidates, compile_in_parallel
from .launch import Launch, capture_launches

SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}  # bytes per block (opt-in maximum) on sm_90 / sm_80


@dataclass(frozen=True)
class MoEShape:
    name: str
    E: int
    k: int
    H: int
    F: int
    T: int


# The four reference shapes (small and large experts, few and many of them), also benchmarked by
# benchmarks/bench_moe_layer.py.
REFERENCE_SHAPES = (
    MoEShape("E64-k8-H2048-F1024-T16k", 64, 8, 2048, 1024, 16384),
    MoEShape("E8-k2-H4096-F14336-T8k", 8, 2, 4096, 14336, 8192),
    MoEShape("E8-k2-H576-F1536-T16k", 8, 2, 576, 1536, 16384),
    MoEShape("E64-k8-H576-F192-T16k", 64, 8, 576, 192, 16384),
)


@dataclass
class PlannedLaunch:
    """One launch a forward(+backward) makes, with the tuning key and config it was made with (if tuned)."""

    site: str  # autotuner kernel name ("up", "gemm", "down_bwd", "dw") or the kernel function's name
    n: int | None
    k: int | None
    config: KernelConfig | None
    launch: Launch


@dataclass
class CompileReport:
    site: str
    kernel: str
    n: int | None
    k: int | None
    config: KernelConfig | None
    compile_s: float | None  # this kernel alone; None when compiled in a parallel batch
    registers: int
    stack_bytes: int
    spill_stores: int  # STL instructions in the SASS: stores to thread-local memory
    shared_bytes: int
    wgmma: int  # HGMMA instructions (Hopper warp-group MMA)
    mma_sync: int  # HMMA instructions (Ampere-style MMA)
    async_copies: int  # LDGSTS instructions (cp.async: pipelined global->shared loads)
    tma_loads: int  # UTMALDG instructions


def plan_launches(
    shape: MoEShape,
    dtype: torch.dtype = torch.bfloat16,
    training: bool = True,
    all_candidates: bool = True,
    arch: int = 90,
) -> list[PlannedLaunch]:
    """Every launch of one layer's forward (and backward), per candidate config for `sm_<arch>`, none run."""
    from .routing import build_routing
    from .triton_bwd import moe_swiglu_backward
    from .triton_fwd import moe_swiglu_forward

    E, K, H, F, T = shape.E, shape.k, shape.H, shape.F, shape.T
    g = torch.Generator().manual_seed(0)
    top_k_index_TK = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
    x_TH = torch.empty(T, H, dtype=dtype)
    w_gate_up_E2FH = torch.empty(E, 2 * F, H, dtype=dtype)
    w_down_EHF = torch.empty(E, H, F, dtype=dtype)
    weights_TK = torch.empty(T, K, dtype=dtype)
    routing = build_routing(top_k_index_TK, E)
    with capture_launches() as captured:
        _, gu_S2F = moe_swiglu_forward(x_TH, w_gate_up_E2FH, w_down_EHF, routing, weights_TK, store_gu=training)
        if training:
            moe_swiglu_backward(torch.empty_like(x_TH), x_TH, w_gate_up_E2FH, w_down_EHF, routing, weights_TK, gu_S2F)
    planned: list[PlannedLaunch] = []
    for site in captured.tuned:
        configs = candidates(site.kernel, site.n, site.k, site.bucket, arch)
        for cfg in configs if all_candidates else configs[:1]:
            with capture_launches() as one:
                site.launch(cfg)
            (launch,) = one.launches
            planned.append(PlannedLaunch(site.kernel, site.n, site.k, cfg, launch))
    for launch in captured.untuned_launches():
        planned.append(PlannedLaunch(launch.name.strip("_").removesuffix("_kernel"), None, None, None, launch))
    return planned


class _CompileOnlyDriver:
    """A triton driver that reports a GPU target and launches nothing: the JIT compiles, warm-up returns."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls) -> bool:
        return False

    def get_current_target(self):  # noqa: ANN201 - triton's GPUTarget
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(arch: int = 90, kernels: tuple = ()) -> Iterator[None]:
    """Make triton's JIT compile for `sm_<arch>` on this machine (no GPU); `kernel.warmup(...)` then compiles.

    The real warm-up path runs (specialisation, caching, `AsyncCompileMode`), exactly as on a GPU. The given
    kernels' in-memory caches are emptied on entry and exit, so nothing compiled for another target leaks.
    """
    from triton.runtime.driver import driver

    def forget() -> None:
        for kernel in kernels:
            kernel.device_caches.clear()

    previous = driver._active
    forget()
    driver.set_active(_CompileOnlyDriver(arch))
    try:
        yield
    finally:
        driver._active = previous
        forget()


def _tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    path = Path(nvidia.__file__).parent / "bin" / name
    if not path.is_file():
        raise RuntimeError(f"{name} not found at {path}: install a triton wheel that ships the NVIDIA tools")
    return str(path)


def _warmup(planned: PlannedLaunch) -> Any:
    launch = planned.launch
    return launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)


def _read(planned: PlannedLaunch, compiled: Any, seconds: float | None) -> CompileReport:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True)
        sass = subprocess.run([_tool("nvdisasm"), str(cubin)], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout)
    if found is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage: {usage.stdout[:200]} {usage.stderr[:200]}")
    return CompileReport(
        site=planned.site,
        kernel=planned.launch.name,
        n=planned.n,
        k=planned.k,
        config=planned.config,
        compile_s=seconds,
        registers=int(found[1]),
        stack_bytes=int(found[2]),
        spill_stores=len(re.findall(r"\bSTL(\.\w+)*\b", sass)),
        shared_bytes=int(compiled.metadata.shared),
        wgmma=len(re.findall(r"\bHGMMA\b", sass)),
        mma_sync=len(re.findall(r"\bHMMA\b", sass)),
        async_copies=len(re.findall(r"\bLDGSTS\b", sass)),
        tma_loads=len(re.findall(r"\bUTMALDG\b", sass)),
    )


def compile_all(planned: list[PlannedLaunch], arch: int = 90, parallel: bool = False) -> list[CompileReport]:
    """Compile every launch for `sm_<arch>` through triton's JIT warm-up, in input order, and read each cubin.

    `parallel` compiles them all at once with the autotuner's own :func:`compile_in_parallel` (time the call
    for the batch's wall time); otherwise one at a time, each timed alone.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    kernels = tuple(dict.fromkeys(p.launch.kernel for p in planned))
    with compile_only(arch, kernels):
        seconds: list[float | None] = []
        if parallel:
            if not compile_in_parallel([functools.partial(_warmup, p) for p in planned]):
                raise RuntimeError("this triton has no AsyncCompileMode: it cannot compile in parallel")
            seconds = [None] * len(planned)
        compiled = []
        for p in planned:  # after a parallel compile these are cache hits
            start = time.perf_counter()
            compiled.append(_warmup(p))
            if not parallel:
                seconds.append(time.perf_counter() - start)
        return [_read(p, c, s) for p, c, s in zip(planned, compiled, seconds, strict=True)]


def problems(report: CompileReport, arch: int = 90) -> list[str]:
    """What would make this config a bad choice on `sm_<arch>`, judged from the compiled code alone."""
    found = []
    if report.spill_stores or report.stack_bytes:
        found.append(f"spills ({report.spill_stores} STL, {report.stack_bytes} B stack)")
    if report.shared_bytes > SHARED_MEMORY_LIMIT.get(arch, 0):
        found.append(f"needs {report.shared_bytes} B shared memory")
    uses_dot = report.config is not None
    if uses_dot and arch >= 90 and not report.wgmma:
        found.append("tl.dot did not become wgmma")
    if uses_dot and not (report.async_copies or report.tma_loads):
        found.append("loads not pipelined")
    return found
