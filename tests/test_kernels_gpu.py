"""GPU checks of the fused MoE kernels (bf16 accuracy, fp32 exactness, no host sync, determinism).

Skipped without a CUDA GPU of compute capability >= 8.0. Runs in the same pytest process as tests/test_kernels.py
(the interpreter tests): the fixture below rebuilds kernels those tests built for the interpreter
(tests/kernel_modes.py; tests/test_kernel_modes.py checks it on the CPU).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from kernel_modes import build_kernels_for_current_mode

gpu_ok = (
    torch.cuda.is_available()
    and torch.cuda.get_device_capability() >= (8, 0)
    and importlib.util.find_spec("triton") is not None
)
pytestmark = pytest.mark.skipif(not gpu_ok, reason="needs a CUDA GPU (sm80+) and triton")

SHAPES = {  # T, H, F, E, k
    "mixtral_like": (2048, 1024, 1536, 8, 2),
    "fine_grained": (1024, 576, 192, 64, 8),
    "odd_prime": (333, 200, 136, 13, 4),
    "tiny_T": (5, 256, 128, 64, 8),
}


@pytest.fixture(autouse=True)
def _compiled_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("UPCYCLE_KERNELS_BACKEND", "triton")
    build_kernels_for_current_mode()  # the interpreter tests earlier in this process leave interpreted kernels


def make_inputs(T: int, H: int, Fi: int, E: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_TH = torch.randn(T, H, generator=g)
    w_gate_up_E2FH = torch.randn(E, 2 * Fi, H, generator=g) / H**0.5
    w_down_EHF = torch.randn(E, H, Fi, generator=g) / Fi**0.5
    weights_TK, index_TK = torch.randn(T, E, generator=g).softmax(-1).topk(k, dim=-1)
    grad_TH = torch.randn(T, H, generator=g)
    cast = [t.cuda().to(dtype) for t in (x_TH, w_gate_up_E2FH, w_down_EHF)]
    return (*cast, index_TK.cuda(), weights_TK.cuda()), grad_TH.cuda().to(dtype)


def outputs_and_grads(fn, inputs, grad_TH):
    leaves = [t.detach().clone().requires_grad_(i != 3) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    out.backward(grad_TH)
    return [out.detach().float()] + [leaves[i].grad.float() for i in (0, 1, 2, 4)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_bf16_matches_fp32_reference(shape: str) -> None:
    import upcycle.kernels as K

    inputs, grad_TH = make_inputs(*SHAPES[shape], dtype=torch.float32)
    ref = outputs_and_grads(K.moe_swiglu_reference, inputs, grad_TH)
    bf16 = [t.to(torch.bfloat16) if i < 3 else t for i, t in enumerate(inputs)]
    got = outputs_and_grads(K.moe_swiglu, bf16, grad_TH.to(torch.bfloat16))
    names = ("out", "d_hidden", "d_gate_up_proj", "d_down_proj", "d_top_k_weights")
    errors = {n: rel_err(g, r) for n, g, r in zip(names, got, ref, strict=True)}
    assert all(e < 2e-2 for e in errors.values()), errors


def test_fp32_without_tf32_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    import upcycle.kernels as K

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    inputs, grad_TH = make_inputs(*SHAPES["odd_prime"], dtype=torch.float32)
    for g, r in zip(
        outputs_and_grads(K.moe_swiglu, inputs, grad_TH),
        outputs_and_grads(K.moe_swiglu_reference, inputs, grad_TH),
        strict=True,
    ):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_no_host_sync_and_deterministic() -> None:
    import upcycle.kernels as K

    inputs, grad_TH = make_inputs(*SHAPES["fine_grained"], dtype=torch.bfloat16)
    first = outputs_and_grads(K.moe_swiglu, inputs, grad_TH)  # compiles and tunes (tuning syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = outputs_and_grads(K.moe_swiglu, inputs, grad_TH)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_whole_mixtral_bf16_close_to_grouped_mm() -> None:
    import transformers as tf

    import upcycle.kernels  # noqa: F401  (registers "upcycle")

    config = tf.MixtralConfig(vocab_size=128, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                              num_experts_per_tok=2)  # fmt: skip
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(config).cuda().to(torch.bfloat16)
    input_ids = torch.randint(0, 128, (2, 64), device="cuda")
    with torch.no_grad():
        model.set_experts_implementation("grouped_mm")
        ref = model(input_ids=input_ids).logits.float()
        model.set_experts_implementation("upcycle")
        out = model(input_ids=input_ids).logits.float()
    assert rel_err(out, ref) < 3e-2


def test_first_call_compiles_every_variant_before_launching(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The shape's whole set (every candidate of every tuned site, the combines) is compiled by the first call."""
    import upcycle.kernels as K
    from upcycle.kernels import triton_bwd
    from upcycle.kernels.precompile import plan, warmups
    from upcycle.kernels.routing import build_routing

    monkeypatch.setenv("UPCYCLE_KERNELS_CACHE_DIR", str(tmp_path))  # nothing tuned yet for this shape
    kernels = triton_bwd.LAUNCHED_KERNELS
    device = torch.cuda.current_device()

    def compiled() -> int:
        return sum(len(k.device_caches[device][0]) for k in kernels)

    inputs, grad_TH = make_inputs(1536, 384, 320, 12, 3, dtype=torch.bfloat16)  # a shape no other test uses
    x, w_gate_up, w_down, index, weights = inputs
    expected = len(warmups(plan(x, w_gate_up, w_down, build_routing(index, 12), weights, True), torch.bfloat16))
    before = compiled()
    outputs_and_grads(K.moe_swiglu, inputs, grad_TH)
    assert compiled() - before == expected
