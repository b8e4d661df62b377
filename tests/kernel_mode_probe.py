"""A pytest plugin (`-p kernel_mode_probe`) that runs tests/test_kernels_gpu.py's fixtures on a machine without a GPU.

tests/test_kernel_modes.py runs the interpreter tests and the GPU tests in one pytest process with it. It changes two
things and nothing else:

- while tests/test_kernels_gpu.py is imported, torch reports a CUDA device of compute capability 9.0, so the module's
  `gpu_ok` holds and its tests are collected to run, as they are on a GPU host;
- each GPU test's body (which needs the device) is replaced by a probe of what it would launch: after the module's
  own fixtures have run, the kernel modules it imports must hold compiled kernels (triton's JITFunction), not the
  interpreter's.

The GPU tests' fixtures run for real, so a fixture that skips them (or leaves interpreted kernels) shows here.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

GPU_MODULE = "test_kernels_gpu.py"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    if isinstance(collector, pytest.Module) and collector.path.name == GPU_MODULE:
        with (
            mock.patch.object(torch.cuda, "is_available", return_value=True),
            mock.patch.object(torch.cuda, "get_device_capability", return_value=(9, 0)),
        ):
            return (yield)
    return (yield)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name == GPU_MODULE:
            item.runtest = probe_gpu_kernels


def probe_gpu_kernels() -> None:
    """The kernels a GPU test's body would launch are built for the compiler."""
    from triton.runtime.jit import JITFunction

    from upcycle.kernels import triton_bwd

    kernels = triton_bwd.LAUNCHED_KERNELS
    wrong = {type(k).__name__ for k in kernels if not isinstance(k, JITFunction)}
    assert not wrong, f"the GPU tests would launch {wrong} kernels, not compiled ones"
