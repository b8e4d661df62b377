"""Which function check fits: both whole models in memory, or the layer-by-layer stream."""

from __future__ import annotations

from upcycle.convert.source import DenseSource
from upcycle.hf.loading import TORCH_DTYPES
from upcycle.memory import available_memory
from upcycle.verify.function import load_dtype

MODES = ("auto", "full", "streaming")
FULL_CHECK_OVERHEAD = 1_000_000_000  # bytes beyond the weights: torch, transformers, activations (SmolLM2: 7.3 GB)


def choose_mode(mode: str, dense: DenseSource, moe: DenseSource, dtype: str) -> tuple[str, str]:
    """Whole models when both fit in memory (every stored value loaded exactly, then cast), else layer by layer."""
    if mode != "auto":
        return mode, f"--{mode}"
    compute, loaded = TORCH_DTYPES[dtype], load_dtype(dtype)
    per_value = loaded.itemsize + (compute.itemsize if compute != loaded else 0)  # loaded as stored, then cast
    needed = FULL_CHECK_OVERHEAD + sum(
        info.nbytes // info.dtype.itemsize * per_value for source in (dense, moe) for info in source.tensors.values()
    )
    available = available_memory()
    if available is not None and needed <= available // 2:
        return "full", f"both models fit: about {needed / 1e9:.1f} GB of {available / 1e9:.1f} GB available"
    if available is None and needed <= 8 * 1e9:
        return "full", f"both models need about {needed / 1e9:.1f} GB"
    have = f"{available / 1e9:.1f} GB available" if available is not None else "free memory unknown"
    return "streaming", f"both models would need about {needed / 1e9:.1f} GB ({have}): streamed layer by layer"
