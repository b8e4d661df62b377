"""The Triton experts' first contact with a (device, dtype, shape): checked against the reference before they are
trusted, once per process.

On a small slice of the real problem (the first tokens, their routing, the layer's real weights for a few
experts), the kernels run forward and backward in the run's dtype; the reference runs the same in a wider dtype
(the truth: fp64 for fp32, fp32 for bf16 and fp16) and in the run's dtype (what PyTorch's own arithmetic errs
by). The kernels pass when every output (the layer output and the four gradients) is finite and errs at most
FACTOR times the reference's own error in that dtype, or FLOOR, whichever is larger. A compile error, an
exception, a non-finite value or a larger error fails the check: the caller then falls back to transformers'
experts (`registry.experts_forward`), or raises when the kernels were asked for by name (`policy`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

SLICE_TOKENS = 64
SLICE_EXPERTS = 4
FACTOR = 8.0
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
OUTPUTS = ("output", "grad_x", "grad_gate_up", "grad_down", "grad_weights")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # why the kernels were not trusted ("" when they were)
    seconds: float  # what the check cost
    key: tuple  # (device, dtype, H, F, top-k): the expert count changes no code path (only the launch grid)
    errors: dict[str, float] = field(default_factory=dict)  # the kernels' relative error per output, vs fp64
    allowed: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        device, dtype, hidden, ffn, k = self.key
        where = f"{dtype} on {device}, H {hidden}, F {ffn}, top-{k}"
        if self.ok:
            return f"upcycle's Triton experts passed their first-contact check ({where}; {self.seconds:.2f} s)"
        return f"upcycle's Triton experts failed their first-contact check ({where}): {self.reason}"


class KernelCheckFailed(RuntimeError):
    """The kernels were asked for by name and failed their check."""


_verdicts: dict[tuple, Verdict] = {}
policy = {"on_failure": "fall_back"}  # or "raise": set by whoever forced the kernels by name
listeners: list[Callable[[Verdict], None]] = []  # told each new verdict (a training run logs and records it)


def verdicts() -> list[Verdict]:
    return list(_verdicts.values())


def trusted(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK) -> bool:
    """Whether the kernels may run this problem. While torch.compile traces, no check can run inside the graph:
    the verdict already reached for the shape decides. `upcycle train` reaches one before it compiles
    (`check_experts`); a library user who compiles a model before any eager call should call `check_experts` first,
    since without a verdict the compiled graph runs the kernels the user asked for, unchecked."""
    if torch.compiler.is_compiling():
        verdict = _verdicts.get(_key(x_TH, w_down_EHF, top_k_index_TK))
        return verdict is None or verdict.ok
    return first_contact(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK).ok


def check_experts(experts: torch.nn.Module, dtype: torch.dtype, top_k: int) -> Verdict | None:
    """The check for a model's experts before it runs (and before it is compiled): the layer's real weights (this
    rank's experts, when sharded) in the run's dtype, on its device, with tokens and routing drawn at random; None
    when this rank holds no expert of the layer."""
    w_gate_up_E2FH, w_down_EHF = (_local(w.detach()) for w in (experts.gate_up_proj, experts.down_proj))
    if getattr(experts, "is_transposed", False):
        w_gate_up_E2FH, w_down_EHF = w_gate_up_E2FH.transpose(1, 2), w_down_EHF.transpose(1, 2)
    num_experts, hidden = w_down_EHF.shape[0], w_down_EHF.shape[1]
    if num_experts == 0:
        return None
    w_gate_up_E2FH, w_down_EHF = w_gate_up_E2FH[:SLICE_EXPERTS].to(dtype), w_down_EHF[:SLICE_EXPERTS].to(dtype)
    generator = torch.Generator().manual_seed(0)
    device = w_down_EHF.device
    x_TH = torch.randn(SLICE_TOKENS, hidden, generator=generator).to(device, dtype)
    index_TK = torch.randint(0, num_experts, (SLICE_TOKENS, top_k), generator=generator).to(device)
    weights_TK = torch.rand(SLICE_TOKENS, top_k, generator=generator).softmax(dim=1).to(device, dtype)
    return first_contact(x_TH, w_gate_up_E2FH, w_down_EHF, index_TK, weights_TK)


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's experts of a sharded weight (a DTensor under FSDP or expert parallelism); the weight otherwise."""
    return weight.to_local() if hasattr(weight, "to_local") else weight


def _key(x_TH: torch.Tensor, w_down_EHF: torch.Tensor, top_k_index_TK: torch.Tensor) -> tuple:
    return (str(x_TH.device), str(x_TH.dtype).removeprefix("torch."), int(x_TH.shape[1]), int(w_down_EHF.shape[2]),
            int(top_k_index_TK.shape[1]))  # fmt: skip


def first_contact(
    x_TH: torch.Tensor,
    w_gate_up_E2FH: torch.Tensor,
    w_down_EHF: torch.Tensor,
    top_k_index_TK: torch.Tensor,
    top_k_weights_TK: torch.Tensor,
) -> Verdict:
    """The verdict for this problem's (device, dtype, shape), checking it the first time it is seen."""
    key = _key(x_TH, w_down_EHF, top_k_index_TK)
    if key not in _verdicts:
        _verdicts[key] = _check(key, x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK)
        for listener in listeners:
            listener(_verdicts[key])
    verdict = _verdicts[key]
    if not verdict.ok and policy["on_failure"] == "raise":
        raise KernelCheckFailed(verdict.describe())
    return verdict


def forget() -> None:
    """Check again on the next contact (tests)."""
    _verdicts.clear()


@torch.compiler.disable
def _check(key: tuple, x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK) -> Verdict:
    from .op import moe_swiglu
    from .reference import moe_swiglu_reference

    start = time.perf_counter()
    tokens, experts = min(SLICE_TOKENS, x_TH.shape[0]), min(SLICE_EXPERTS, w_down_EHF.shape[0])
    inputs = (
        x_TH[:tokens].detach(),
        w_gate_up_E2FH[:experts].detach(),
        w_down_EHF[:experts].detach(),
        top_k_index_TK[:tokens].remainder(experts),
        top_k_weights_TK[:tokens].detach(),
    )
    generator = torch.Generator().manual_seed(0)
    grad_TH = torch.randn(inputs[0].shape, generator=generator).to(x_TH.device, x_TH.dtype)
    device_type = x_TH.device.type
    with torch.enable_grad(), torch.autocast(device_type, enabled=False):
        try:
            got = _forward_backward(moe_swiglu, inputs, grad_TH)
        except Exception as error:  # a compile error, a launch failure: whatever it is, the kernels are not used
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            return Verdict(False, f"{type(error).__name__}: {first_line}", time.perf_counter() - start, key)
        try:  # the truth in fp64 for an fp32 run, in fp32 (far finer than either) for a half-precision one
            wide = torch.float64 if x_TH.dtype == torch.float32 else torch.float32
            truth = _forward_backward(moe_swiglu_reference, tuple(_wide(t, wide) for t in inputs), grad_TH.to(wide))
            own = _forward_backward(moe_swiglu_reference, inputs, grad_TH)
        except Exception as error:  # e.g. out of memory: nothing proves the kernels right, so they are not used
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            reason = f"the check could not run its reference ({type(error).__name__}: {first_line})"
            return Verdict(False, reason, time.perf_counter() - start, key)
    errors = {name: _relative(g, t) for name, g, t in zip(OUTPUTS, got, truth, strict=True)}
    floor = FLOOR.get(x_TH.dtype, 1e-5)
    allowed = {name: max(FACTOR * _relative(o, t), floor) for name, o, t in zip(OUTPUTS, own, truth, strict=True)}
    seconds = time.perf_counter() - start
    if not all(bool(torch.isfinite(g).all()) for g in got):
        bad = next(name for name, g in zip(OUTPUTS, got, strict=True) if not torch.isfinite(g).all())
        return Verdict(False, f"non-finite values in the {bad}", seconds, key, errors, allowed)
    for name in OUTPUTS:
        if errors[name] > allowed[name]:
            reason = f"{name} off by {errors[name]:.2g} relative (allowed {allowed[name]:.2g})"
            return Verdict(False, reason, seconds, key, errors, allowed)
    return Verdict(True, "", seconds, key, errors, allowed)


def _forward_backward(fn, inputs: tuple, grad_TH: torch.Tensor) -> list[torch.Tensor]:
    x, w_gu, w_d, index, weights = (t.clone().requires_grad_(t.is_floating_point()) for t in inputs)
    out = fn(x, w_gu, w_d, index, weights)
    out.backward(grad_TH.to(out.dtype))
    return [out.detach(), x.grad, w_gu.grad, w_d.grad, weights.grad]


def _wide(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _relative(value: torch.Tensor, truth: torch.Tensor) -> float:
    scale = truth.double().norm().item()
    difference = (value.double() - truth.double()).norm().item()
    return difference / scale if scale else difference
