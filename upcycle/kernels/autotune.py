"""Block-size choice for the MoE kernels: heuristics, optional on-device tuning, and a cache across runs.

The tuning key is (kernel, N, K, tokens-per-expert bucket, dtype, GPU), never T: a new batch size only re-tunes
when its average tokens per expert crosses a power of two. Tuned choices persist in a JSON file so later runs
pay nothing. `UPCYCLE_KERNELS_AUTOTUNE=0` turns tuning off (heuristic configs only);
`UPCYCLE_KERNELS_CACHE_DIR` moves the cache (default `~/.cache/upcycle/kernels`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .launch import TunedSite, active_capture

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# Small tiles keep the numpy interpreter cheap and make CPU tests cross several tile boundaries.
INTERPRETER_CONFIG = KernelConfig(16, 16, 16, 1, 1)


def _configs(*tiles: tuple[int, int, int, int, int]) -> list[KernelConfig]:
    """Configs from (block_m, block_n, block_k, num_warps, num_stages) rows."""
    return [KernelConfig(*tile) for tile in tiles]


# Candidates per kernel on GPU, first entry = default. "up" carries two accumulators (gate and up), so its tiles
# are smaller; "dw" tiles are (N, K) of the weight gradient with block_m rows reduced per step. Every entry
# compiles for sm_90 to warp-group MMA with pipelined loads and no register spills (benchmarks/kernel_report.py,
# checked in CI): the spilling ones it found, down_bwd at 128x128 / 64x128 with 4 warps (~180 spill stores) and
# up at 64x128 with 4 warps, were dropped.
_CANDIDATES: dict[str, list[KernelConfig]] = {
    "up": _configs((128, 64, 64, 8, 3), (128, 64, 64, 8, 4), (128, 128, 64, 8, 3), (64, 64, 64, 4, 3)),
    "gemm": _configs((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)),
    "down_bwd": _configs((128, 64, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 8, 3), (64, 64, 64, 4, 3)),
    "dw": _configs((64, 128, 128, 8, 3), (32, 128, 128, 8, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)),
}


def tokens_per_expert_bucket(num_rows: int, num_experts: int) -> int:
    """Power-of-two bucket of the mean rows per expert, clamped to [16, 4096]."""
    mean = max(1, -(-num_rows // max(num_experts, 1)))
    return min(4096, max(16, 1 << (mean - 1).bit_length()))


def autotune_enabled() -> bool:
    return os.environ.get("UPCYCLE_KERNELS_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_path() -> Path:
    root = os.environ.get("UPCYCLE_KERNELS_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "upcycle", "kernels"
    )
    try:
        import triton

        version = triton.__version__
    except ImportError:  # pragma: no cover - only reached on the tuning path, which needs triton
        version = "none"
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    safe = "".join(c if c.isalnum() else "-" for c in f"{name}-triton{version}")
    return Path(root) / f"autotune-{safe}.json"


class _Cache:
    """Process-wide memo of chosen configs, backed by one JSON file per (GPU, triton version)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._mem: dict[str, KernelConfig] = {}
        self._loaded_from: Path | None = None

    def _load(self, path: Path) -> None:
        if self._loaded_from == path:
            return
        self._loaded_from = path
        try:
            data = json.loads(path.read_text())
            self._mem.update({k: KernelConfig(**v) for k, v in data.items()})
        except (OSError, ValueError, TypeError):
            pass

    def get(self, key: str) -> KernelConfig | None:
        with self._lock:
            self._load(_cache_path())
            return self._mem.get(key)

    def put(self, key: str, cfg: KernelConfig) -> None:
        with self._lock:
            self._mem[key] = cfg
            path = _cache_path()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                data = {k: asdict(v) for k, v in self._mem.items()}
                fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except OSError as err:  # a read-only home must not break training
                logger.debug("upcycle.kernels: cannot write autotune cache %s: %s", path, err)


_CACHE = _Cache()


def _heuristic(kernel: str, n: int, k: int, bucket: int) -> KernelConfig:
    """Default when not tuning: shrink the row tile for sparse experts, the column tile for narrow outputs."""
    cfg = _CANDIDATES[kernel][0]
    block_m = cfg.block_m if kernel == "dw" else min(cfg.block_m, max(16, bucket))
    block_n = min(cfg.block_n, _pow2_at_least_16(n))
    block_k = min(cfg.block_k, _pow2_at_least_16(k))
    return KernelConfig(block_m, block_n, block_k, cfg.num_warps, cfg.num_stages)


def _pow2_at_least_16(x: int) -> int:
    return max(16, 1 << (max(x, 1) - 1).bit_length())


# Candidates that spill registers before Hopper, where tl.dot has no warp-group MMA (benchmarks/kernel_report.py
# --arch 80: `up` at 128x128 made 1325 spill stores, `gemm` at 128x256 up to 18); left out below sm_90.
_HOPPER_ONLY = {("up", KernelConfig(128, 128, 64, 8, 3)), ("gemm", KernelConfig(128, 256, 64, 8, 3))}


def device_arch(device: torch.device) -> int:
    """Compute capability as major*10 + minor (90 for Hopper); 90 where there is no GPU (the tools' target)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def candidates(kernel: str, n: int, k: int, bucket: int, arch: int = 90) -> list[KernelConfig]:
    """What the tuner times for one key: the heuristic first, then the fixed list (one source for tuner and tools)."""
    listed = [c for c in _CANDIDATES[kernel] if arch >= 90 or (kernel, c) not in _HOPPER_ONLY]
    return list(dict.fromkeys([_heuristic(kernel, n, k, bucket), *listed]))


def tuning_key(kernel: str, n: int, k: int, bucket: int, dtype: torch.dtype) -> str:
    return f"{kernel}|N={n}|K={k}|tpe={bucket}|{str(dtype).removeprefix('torch.')}"


def configs_to_compile(
    kernel: str, n: int, k: int, bucket: int, dtype: torch.dtype, arch: int = 90
) -> list[KernelConfig]:
    """The configs a GPU launch of this key will need: the cached or heuristic one, else every candidate."""
    if not autotune_enabled():
        return [_heuristic(kernel, n, k, bucket)]
    cached = _CACHE.get(tuning_key(kernel, n, k, bucket, dtype))
    return [cached] if cached is not None else candidates(kernel, n, k, bucket, arch)


def choose_config(
    kernel: str,
    n: int,
    k: int,
    bucket: int,
    dtype: torch.dtype,
    device: torch.device,
    launch: Callable[..., None],
) -> KernelConfig:
    """Pick the config for one launch; tunes on first sight of a key when running on a GPU with tuning on.

    `launch(cfg, warmup=False)` runs the kernel with `cfg` (or only compiles it with `warmup=True`).
    """
    capture = active_capture()
    if capture is not None:
        site = TunedSite(kernel, n, k, bucket, candidates(kernel, n, k, bucket), launch, len(capture.launches))
        capture.tuned.append(site)
        return _heuristic(kernel, n, k, bucket)
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    if not autotune_enabled():
        return _heuristic(kernel, n, k, bucket)
    key = tuning_key(kernel, n, k, bucket, dtype)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    from triton.testing import do_bench

    configs = candidates(kernel, n, k, bucket, device_arch(device))
    compile_in_parallel([lambda cfg=cfg: launch(cfg, warmup=True) for cfg in configs])
    timings: dict[KernelConfig, float] = {}
    for cfg in configs:
        try:
            timings[cfg] = do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20)
        except Exception as err:  # out of shared memory / registers: skip the candidate
            logger.debug("upcycle.kernels: %s config %s failed: %s", kernel, cfg, err)
    best = min(timings, key=timings.get) if timings else _heuristic(kernel, n, k, bucket)
    logger.info("upcycle.kernels: tuned %s -> %s", key, best)
    _CACHE.put(key, best)
    return best


def compile_in_parallel(warmups: list[Callable[[], None]]) -> bool:
    """Run kernel warm-ups (compile only) on a thread pool; False when this triton cannot, and nothing ran.

    Triton's compiler releases the GIL, so N threads compile about N kernels at once (measured:
    `benchmarks/kernel_report.py`); compiled kernels land in each kernel's own cache, where the real launch
    finds them. A failing compile is left for the real launch to report.
    """
    import triton

    async_mode = getattr(triton, "AsyncCompileMode", None)
    workers = min(len(warmups), os.cpu_count() or 1, 32)
    if async_mode is None or workers < 2:
        return False
    from concurrent.futures import ThreadPoolExecutor

    try:
        with ThreadPoolExecutor(workers) as pool, async_mode(pool, ignore_errors=True):
            for warm in warmups:
                warm()
    except Exception as err:  # an older AsyncCompileMode signature, or a compile error surfacing here
        logger.debug("upcycle.kernels: parallel compile failed (%s); launches compile one by one", err)
    return True
