"""Build the Triton kernels for the mode a test module runs them in: the CPU interpreter, or the compiler for a GPU.

triton.jit reads TRITON_INTERPRET when a kernel is defined, that is when upcycle/kernels/triton_fwd.py and
triton_bwd.py are imported (lazily, at the first kernel call): the interpreter tests (tests/test_kernels.py) set the
variable only for their own tests, but the modules they import keep interpreted kernels for the rest of the process,
and a GPU test would then find no compiled kernel (and the other way round). Nothing else caches the mode: triton
reads the variable afresh, and upcycle imports the two modules inside the functions that launch them.
"""

from __future__ import annotations

import sys

KERNEL_MODULES = ("upcycle.kernels.triton_bwd", "upcycle.kernels.triton_fwd")


def kernels_interpreted() -> bool | None:
    """Whether the loaded kernels are the interpreter's; None when no kernel module is loaded yet."""
    fwd = sys.modules.get("upcycle.kernels.triton_fwd")
    if fwd is None:
        return None
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fwd._up_swiglu_kernel, InterpretedFunction)


def build_kernels_for_current_mode() -> None:
    """Forget kernel modules built for the other mode than TRITON_INTERPRET now asks for; the next import rebuilds
    them. Call it after setting the variable (a test's monkeypatch), before any kernel runs."""
    loaded = kernels_interpreted()
    if loaded is None:
        return
    from triton import knobs  # what triton.jit itself asks

    if loaded == knobs.runtime.interpret:
        return
    package = sys.modules.get("upcycle.kernels")
    for name in KERNEL_MODULES:
        sys.modules.pop(name, None)
        if package is not None and hasattr(package, name.rsplit(".", 1)[1]):
            delattr(package, name.rsplit(".", 1)[1])
