"""The one place the MoE kernels are launched, compiled ahead (warm-up), or captured for inspection.

Every wrapper calls :func:`launch_kernel` instead of ``kernel[grid](...)``, so the autotuner can compile all its
candidates without running them (``warmup=True``, in parallel), and :func:`capture_launches` can record the
exact arguments the real code passes: the cross-compiler (``cross_compile.py``) builds those launches for a GPU
architecture on a machine that has none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Launch:
    """One kernel launch as the wrapper would make it."""

    kernel: Any  # a triton JITFunction
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__


@dataclass
class TunedSite:
    """A call of the autotuner: which kernel, its tuning key, its candidates and how to launch each."""

    kernel: str
    n: int
    k: int
    bucket: int
    candidates: list[Any]  # KernelConfig
    launch: Callable[..., None]
    launch_index: int  # where the launch this site then makes lands in Capture.launches


@dataclass
class Capture:
    launches: list[Launch] = field(default_factory=list)
    tuned: list[TunedSite] = field(default_factory=list)

    def untuned_launches(self) -> list[Launch]:
        """The launches no autotuner site made (fixed-config kernels such as the combine)."""
        made_by_sites = {site.launch_index for site in self.tuned}
        return [launch for i, launch in enumerate(self.launches) if i not in made_by_sites]


_active: Capture | None = None


def active_capture() -> Capture | None:
    return _active


@contextlib.contextmanager
def capture_launches() -> Iterator[Capture]:
    """Record launches (and autotuner calls) instead of running them; tensors may live on any device."""
    global _active
    if _active is not None:
        raise RuntimeError("capture_launches() is already active")
    _active = Capture()
    try:
        yield _active
    finally:
        _active = None


def launch_kernel(kernel: Any, grid: tuple[int, ...], *args: Any, warmup: bool = False, **kwargs: Any) -> None:
    """Run `kernel` on `grid`, or only compile it (`warmup`), or record it under :func:`capture_launches`."""
    if _active is not None:
        _active.launches.append(Launch(kernel, tuple(grid), args, kwargs))
    elif warmup:
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)
