"""Capacity dropping removes dropped assignments before the experts compute them, with the gradients of the
zero-weight semantics, in every experts implementation training uses; a module that cannot skip them keeps
computing them (said once) and trains the same.

Real tiny MoE models of three classes (random weights from their transformers configs), real backward passes.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from upcycle.kernels.registry import IMPLEMENTATION_NAME, register
from upcycle.train.moe_losses import RouterTaps, aux_loss

CONFIGS = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(num_local_experts=4)),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(num_experts=4, moe_intermediate_size=48, head_dim=16, norm_topk_prob=True),
    ),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        transformers.Qwen2MoeForCausalLM,
        dict(num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=32),
    ),
}
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)  # fmt: skip


def tiny_moe(kind: str, implementation: str) -> torch.nn.Module:
    config_cls, model_cls, extra = CONFIGS[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**COMMON, **extra)).float()
    model.set_experts_implementation(implementation)
    return model.train()


def eager_skips_sentinels(model: torch.nn.Module) -> bool:
    """Whether this transformers' eager experts loop has a slot for index E (newer releases) or fails on it."""
    experts = next(module for name, module in model.named_modules() if name.endswith(".experts"))
    return "num_classes=self.num_experts + 1" in inspect.getsource(inspect.unwrap(type(experts).forward))


def gradients(model: torch.nn.Module, ids: torch.Tensor, skip_dropped: bool, said: list[str]) -> dict:
    """Loss and every gradient of one step with capacity 0.5, and the expert indices each experts module saw."""
    seen: list[torch.Tensor] = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, args: seen.append(args[1].clone()))
        for name, module in model.named_modules()
        if name.endswith(".experts")
    ]
    taps = RouterTaps(model, capacity_factor=0.5, skip_dropped=skip_dropped, say=said.append)
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    loss = out.loss + 0.01 * aux_loss(taps.records)
    loss.backward()
    taps.remove()
    for hook in hooks:
        hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads, "seen": seen}


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", IMPLEMENTATION_NAME])
def test_dropped_assignments_are_not_computed_and_the_gradients_are_unchanged(kind, implementation):
    assert register()
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    said: list[str] = []
    model = tiny_moe(kind, implementation)
    zero_weight = gradients(model, ids, skip_dropped=False, said=said)
    skipped = gradients(tiny_moe(kind, implementation), ids, skip_dropped=True, said=said)
    num_experts = 4
    assert all((seen < num_experts).all() for seen in zero_weight["seen"])
    dropped = sum(int((seen == num_experts).sum()) for seen in skipped["seen"])
    if implementation == "eager" and not eager_skips_sentinels(model):  # older transformers: computed, said so
        assert any("cannot skip a dropped assignment" in line for line in said), said
    else:  # the experts saw the sentinel (index E) for every dropped assignment
        assert dropped > 0.3 * sum(seen.numel() for seen in skipped["seen"])  # capacity 0.5 drops half or more
        assert any("skip the expert compute" in line for line in said), said
    torch.testing.assert_close(skipped["loss"], zero_weight["loss"], rtol=1e-6, atol=1e-7)
    assert skipped["grads"].keys() == zero_weight["grads"].keys()
    for name, grad in zero_weight["grads"].items():
        torch.testing.assert_close(skipped["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def strict_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """An experts implementation that rejects an index outside [0, E), as older transformers' eager loops do."""
    if (top_k_index >= self.num_experts).any():
        raise IndexError("expert index out of range")
    return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)


def test_experts_that_cannot_skip_keep_computing_dropped_assignments_and_say_so():
    ALL_EXPERTS_FUNCTIONS.register("strict_for_test", strict_experts_forward)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    said: list[str] = []
    strict = gradients(tiny_moe("mixtral", "strict_for_test"), ids, skip_dropped=True, said=said)
    reference = gradients(tiny_moe("mixtral", "grouped_mm"), ids, skip_dropped=False, said=[])
    assert any("cannot skip a dropped assignment" in line for line in said), said
    training = [seen for seen in strict["seen"] if len(seen) > 2]  # the probe's own calls hold two tokens
    assert training and all((seen < 4).all() for seen in training)  # no sentinel reached the training forward
    torch.testing.assert_close(strict["loss"], reference["loss"])
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(strict["grads"][name], grad, msg=name)
