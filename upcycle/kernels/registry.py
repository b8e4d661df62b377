"""Plugs the fused kernels into transformers' experts dispatch under the name "upcycle".

transformers (5.x) decorates every MoE experts class with `@use_experts_implementation`; its forward then looks
up `config._experts_implementation` in `ExpertsInterface` and calls `fn(self, hidden_states, top_k_index,
top_k_weights)`. Registering here makes `model.set_experts_implementation("upcycle")` and
`from_pretrained(..., experts_implementation="upcycle")` work for Mixtral, Qwen2/3-MoE, Glm4-MoE, Dots1 and any
other class with plain SwiGLU experts. Variants whose math differs (biases, other activations, custom gating,
interleaved gate/up, post-expert norms) are refused with a clear error rather than mis-computed.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UpcycleError
from .backend import select_backend
from .op import moe_swiglu
from .self_check import trusted

try:  # transformers >= 5 has the experts seam; without it `register()` reports False
    from transformers.activations import SiLUActivation
    from transformers.integrations.moe import ExpertsInterface, _default_apply_gate, grouped_mm_experts_forward
except ImportError:  # pragma: no cover - depends on the installed transformers
    SiLUActivation = ExpertsInterface = _default_apply_gate = grouped_mm_experts_forward = None

IMPLEMENTATION_NAME = "upcycle"

# (backend, experts the call saw) -> calls in this process: what really ran, e.g. 2 local experts of 8 under
# expert parallelism, on "triton", the "reference" fallback, or transformers' "grouped_mm" when the kernels failed
# their first-contact check (upcycle.kernels.self_check)
calls: Counter[tuple[str, int]] = Counter()


class UnsupportedExpertsError(UpcycleError, ValueError):
    """The experts module computes something other than bias-free SwiGLU with [gate; up] weights."""


def _is_silu(act_fn: object) -> bool:
    if act_fn is F.silu or isinstance(act_fn, nn.SiLU):
        return True
    return SiLUActivation is not None and isinstance(act_fn, SiLUActivation)


def _uses_default_gate(module: nn.Module) -> bool:
    gate = getattr(type(module), "_apply_gate", _default_apply_gate)
    return gate is _default_apply_gate


def check_experts_module(module: nn.Module) -> None:
    """Raise UnsupportedExpertsError naming the first unsupported feature of `module`."""
    name = type(module).__name__
    problems = []
    if not getattr(module, "has_gate", True) or not hasattr(module, "gate_up_proj"):
        problems.append("ungated experts (no gate_up_proj)")
    if getattr(module, "has_bias", False):
        problems.append("expert biases")
    if getattr(module, "has_post_expert_norm", False):
        problems.append("a post-expert norm")
    if not getattr(module, "is_concatenated", True):
        problems.append("interleaved gate/up rows")
    if not _is_silu(getattr(module, "act_fn", None)):
        problems.append(f"activation {type(getattr(module, 'act_fn', None)).__name__} (only SiLU/SwiGLU)")
    if not _uses_default_gate(module):
        problems.append("a custom _apply_gate")
    if problems:
        raise UnsupportedExpertsError(
            f"experts_implementation='{IMPLEMENTATION_NAME}' does not support {name}: it has {', '.join(problems)}.",
            "use experts_implementation='grouped_mm' (or 'eager') for this model.",
        )


def experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers experts-implementation entry point: same contract as `grouped_mm_experts_forward`."""
    check_experts_module(self)
    w_gate_up_E2FH = self.gate_up_proj
    w_down_EHF = self.down_proj
    if getattr(self, "is_transposed", False):  # stored [E, H, 2F] / [E, F, H]: the kernels take strided views
        w_gate_up_E2FH = w_gate_up_E2FH.transpose(1, 2)
        w_down_EHF = w_down_EHF.transpose(1, 2)
    device_type = hidden_states.device.type
    if torch.is_autocast_enabled(device_type):
        # autocast does not reach a custom op: cast as it would for a linear layer, so fp32 master weights still
        # compute in bf16 on the tensor cores; gradients flow back through the casts to the fp32 weights
        dtype = torch.get_autocast_dtype(device_type)
        w_gate_up_E2FH, w_down_EHF = w_gate_up_E2FH.to(dtype), w_down_EHF.to(dtype)
        x_TH = hidden_states.to(dtype)
    else:
        x_TH = hidden_states.to(w_gate_up_E2FH.dtype)  # as grouped_mm does
    backend = select_backend(x_TH.device)
    if backend == "triton" and not trusted(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index, top_k_weights):
        calls[("grouped_mm", int(w_gate_up_E2FH.shape[0]))] += 1  # the kernels failed their check: transformers'
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    calls[(backend, int(w_gate_up_E2FH.shape[0]))] += 1
    out_TH = moe_swiglu(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index, top_k_weights)
    return out_TH if torch.is_autocast_enabled(device_type) else out_TH.to(hidden_states.dtype)


def register() -> bool:
    """Register "upcycle" in transformers' ExpertsInterface; False when this transformers has no such seam."""
    if ExpertsInterface is None:
        return False
    ExpertsInterface.register(IMPLEMENTATION_NAME, experts_forward)
    return True
