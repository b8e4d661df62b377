"""Which implementation runs: the Triton kernels where they can, the PyTorch reference elsewhere (said once).

`UPCYCLE_KERNELS_BACKEND` = `auto` (default) | `triton` (fail loudly if unusable) | `reference`.
Triton is usable on a CUDA GPU of compute capability >= 8.0, or on the CPU under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "reference")
_warned: set[str] = set()


@functools.cache
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as err:  # a broken install must not take the package down
        return f"triton failed to import ({err})"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def triton_unusable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on `device`, else a short reason."""
    err = _triton_import_error()
    if err is not None:
        return err
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 0):
            return f"the GPU has compute capability {major}.{minor} (the kernels need 8.0 or newer)"
        return None
    if device.type == "cpu" and _interpreting():
        return None
    return f"tensors are on {device.type!s} and no usable GPU is present"


def select_backend(device: torch.device) -> str:
    """'triton' or 'reference' for tensors on `device`; warns once per reason when falling back."""
    choice = os.environ.get("UPCYCLE_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"UPCYCLE_KERNELS_BACKEND={choice!r} is not one of {', '.join(BACKENDS)}.")
    if choice == "reference":
        return "reference"
    reason = triton_unusable_reason(device)
    if reason is None:
        return "triton"
    if choice == "triton":
        raise RuntimeError(f"UPCYCLE_KERNELS_BACKEND=triton but {reason}.")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"upcycle.kernels: {reason}; the MoE experts run on the PyTorch reference implementation "
            "(correct, slower). Set UPCYCLE_KERNELS_BACKEND=reference to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"
