"""The Triton experts' first-contact check, on the CPU under the interpreter: real kernels pass it (and its cost is
measured); a faulty kernel (a wrong result, a kernel that does not compile, NaN in the backward) fails it, the
experts fall back to transformers' grouped_mm with one line saying why, and training computes exactly what a
grouped_mm run computes. Asked for by name, a failing kernel is an error instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
from kernel_modes import build_kernels_for_current_mode

from upcycle.kernels import registry, self_check

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _interpreted_kernels(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("UPCYCLE_KERNELS_BACKEND", raising=False)
    monkeypatch.setenv("UPCYCLE_KERNELS_AUTOTUNE", "0")
    build_kernels_for_current_mode()
    self_check.forget()
    registry.calls.clear()
    yield
    self_check.forget()
    self_check.policy["on_failure"] = "fall_back"


def tiny_mixtral(implementation: str) -> torch.nn.Module:
    registry.register()
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).float()
    model.set_experts_implementation(implementation)
    return model.train()


def two_steps(implementation: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Two AdamW steps on one batch: the losses and the weights after them."""
    model = tiny_mixtral(implementation)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_the_real_kernels_pass_and_the_check_is_timed():
    said = []
    self_check.listeners.append(said.append)
    try:
        losses, _ = two_steps("upcycle")
    finally:
        self_check.listeners.remove(said.append)
    (verdict,) = self_check.verdicts()
    assert verdict.ok, verdict.describe()
    assert said == [verdict]  # once per process and shape, not per call
    assert verdict.seconds > 0 and set(verdict.errors) == set(self_check.OUTPUTS)
    assert all(verdict.errors[name] <= verdict.allowed[name] for name in self_check.OUTPUTS)
    assert registry.calls[("triton", 4)] >= 2 and not registry.calls[("grouped_mm", 4)]


def wrong_forward(real):
    def forward(*args, **kwargs):
        out_TH, gu = real(*args, **kwargs)
        return out_TH * 1.01, gu

    return forward


def broken_kernel(*args, **kwargs):
    """Launches a Triton kernel that cannot be built (a dot of mismatched shapes), as a miscompiled kernel would."""
    import triton
    import triton.language as tl

    @triton.jit
    def _mismatched(out_ptr):
        a = tl.zeros((16, 16), dtype=tl.float32)
        b = tl.zeros((8, 8), dtype=tl.float32)
        tl.store(out_ptr + tl.arange(0, 16), tl.sum(tl.dot(a, b), axis=1))

    out = torch.empty(16)
    _mismatched[(1,)](out)
    return out


def nan_backward(real):
    def backward(*args, **kwargs):
        dx, dw_gate_up, dw_down, dweights = real(*args, **kwargs)
        return dx, dw_gate_up.fill_(float("nan")), dw_down, dweights

    return backward


@pytest.mark.parametrize("fault", ["wrong result", "does not compile", "NaN in the backward"])
def test_a_faulty_kernel_falls_back_says_why_and_trains_like_grouped_mm(fault, monkeypatch):
    from upcycle.kernels import triton_bwd, triton_fwd

    if fault == "wrong result":
        monkeypatch.setattr(triton_fwd, "moe_swiglu_forward", wrong_forward(triton_fwd.moe_swiglu_forward))
    elif fault == "does not compile":
        monkeypatch.setattr(triton_fwd, "moe_swiglu_forward", broken_kernel)
    else:
        monkeypatch.setattr(triton_bwd, "moe_swiglu_backward", nan_backward(triton_bwd.moe_swiglu_backward))
    losses, weights = two_steps("upcycle")
    (verdict,) = self_check.verdicts()
    assert not verdict.ok
    expected = {"wrong result": "output off by", "does not compile": "Error", "NaN in the backward": "non-finite"}
    assert expected[fault] in verdict.reason, verdict.reason
    assert "failed their first-contact check" in verdict.describe()
    assert registry.calls[("grouped_mm", 4)] >= 2 and not registry.calls[("triton", 4)]
    reference_losses, reference_weights = two_steps("grouped_mm")
    assert losses == reference_losses
    for name, tensor in reference_weights.items():
        assert torch.equal(weights[name], tensor), name


def test_kernels_asked_for_by_name_that_fail_are_an_error(monkeypatch):
    from upcycle.kernels import triton_fwd

    monkeypatch.setattr(triton_fwd, "moe_swiglu_forward", wrong_forward(triton_fwd.moe_swiglu_forward))
    self_check.policy["on_failure"] = "raise"
    with pytest.raises(self_check.KernelCheckFailed, match="failed their first-contact check.*output off by"):
        two_steps("upcycle")


def test_the_check_runs_in_fp16_against_pytorchs_own_fp16_error():
    model_inputs = torch.Generator().manual_seed(5)
    x = torch.randn(40, 32, generator=model_inputs).half()
    w_gate_up = (torch.randn(4, 96, 32, generator=model_inputs) * 0.1).half()
    w_down = (torch.randn(4, 32, 48, generator=model_inputs) * 0.1).half()
    index = torch.randint(0, 4, (40, 2), generator=model_inputs)
    weights = torch.rand(40, 2, generator=model_inputs).half()
    verdict = self_check.first_contact(x, w_gate_up, w_down, index, weights)
    assert verdict.ok, verdict.describe()
    assert verdict.key[1] == "float16"
    assert all(verdict.allowed[name] >= self_check.FLOOR[torch.float16] for name in self_check.OUTPUTS)


def run_training(tmp_path, texts, tiny_pair, implementation: str):
    from train_helpers import recipe_dict

    from upcycle.train.loop import train
    from upcycle.train.recipe import recipe_from_dict

    _, moe = tiny_pair
    data = recipe_dict(moe, tmp_path / "run", texts, batch={"steps": 2}, run={"eval_interval": 0})
    data["model"]["experts_implementation"] = implementation
    return train(recipe_from_dict(data, tmp_path))


def test_a_training_run_checks_the_kernels_first_records_the_fallback_and_its_card_says_so(
    tmp_path, texts, tiny_pair, monkeypatch
):
    """`auto` picks the Triton experts where they compile (a GPU; the interpreter stands in here); they fail."""
    from upcycle.kernels import triton_fwd
    from upcycle.train import model_setup
    from upcycle.train.metrics import read_metrics

    monkeypatch.setattr(triton_fwd, "moe_swiglu_forward", wrong_forward(triton_fwd.moe_swiglu_forward))
    monkeypatch.setattr(model_setup, "choose_experts_implementation", lambda requested, device: "upcycle")
    summary = run_training(tmp_path, texts, tiny_pair, "auto")
    layout = next(r for r in read_metrics(tmp_path / "run") if r["kind"] == "layout")
    (check,) = layout["kernel_checks"]
    assert not check["ok"] and "output off by" in check["reason"]
    assert any(key.startswith("grouped_mm:") for calls in layout["experts_calls"] for key in calls)
    card = (Path(summary.export_dir) / "README.md").read_text()
    assert "failed their first-contact check" in card


def test_a_run_that_asks_for_the_kernels_by_name_stops_when_they_fail(tmp_path, texts, tiny_pair, monkeypatch):
    from upcycle.errors import UpcycleError
    from upcycle.kernels import triton_fwd

    monkeypatch.setattr(triton_fwd, "moe_swiglu_forward", wrong_forward(triton_fwd.moe_swiglu_forward))
    with pytest.raises(UpcycleError, match="failed their first-contact check.*Fix: use model.experts_implementation"):
        run_training(tmp_path, texts, tiny_pair, "upcycle")
