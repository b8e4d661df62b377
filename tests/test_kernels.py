"""Fused MoE kernels vs the PyTorch reference (Triton interpreter on the CPU, fp32), and transformers wiring.

TRITON_INTERPRET=1 is set per test (fixture below), not for the whole session, so no other test module runs
differently. The kernel modules are imported lazily at the first kernel call and keep the mode they were built in;
the fixture rebuilds them for the interpreter when tests/test_kernels_gpu.py built them for a GPU earlier in the same
process (tests/kernel_modes.py), and that module's fixture does the reverse.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from kernel_modes import build_kernels_for_current_mode

import upcycle.kernels as K
from upcycle.kernels import autotune, backend
from upcycle.kernels.reference import moe_swiglu_reference_backward
from upcycle.kernels.routing import build_routing

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _interpreted_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("UPCYCLE_KERNELS_BACKEND", raising=False)
    build_kernels_for_current_mode()  # GPU tests earlier in this process leave compiled kernels


def make_inputs(T: int, H: int, Fi: int, E: int, k: int, routing: str = "random", seed: int = 0):
    """Random fp32 problem; `routing` picks the edge case the indices exercise."""
    g = torch.Generator().manual_seed(seed)
    x_TH = torch.randn(T, H, generator=g)
    w_gate_up_E2FH = torch.randn(E, 2 * Fi, H, generator=g) / H**0.5
    w_down_EHF = torch.randn(E, H, Fi, generator=g) / Fi**0.5
    logits_TE = torch.randn(T, E, generator=g)
    if routing == "sparse":  # only experts 1 and E-2 receive tokens
        keep = torch.full((E,), -1e9)
        keep[[1, E - 2]] = 0.0
        logits_TE = logits_TE + keep
    weights_TK, index_TK = logits_TE.softmax(-1).topk(k, dim=-1)
    if routing == "one_expert":  # every choice of every token on expert 2 (duplicates included)
        index_TK = torch.full_like(index_TK, 2)
    if routing == "sentinel":  # expert-parallel style: out-of-range ids contribute nothing
        index_TK[::3, -1] = E
    return x_TH, w_gate_up_E2FH, w_down_EHF, index_TK, weights_TK


def naive_moe(x_TH, w_gate_up_E2FH, w_down_EHF, index_TK, weights_TK):
    """Token-by-token definition, independent of the reference's sorting."""
    E = w_gate_up_E2FH.shape[0]
    out = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for j in range(index_TK.shape[1]):
            e = int(index_TK[t, j])
            if 0 <= e < E:
                gate, up = (w_gate_up_E2FH[e] @ x_TH[t]).chunk(2)
                out[t] += weights_TK[t, j] * (w_down_EHF[e] @ (F.silu(gate) * up))
    return out


def run_with_grads(fn, inputs, grad_TH):
    leaves = [t.clone().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    out.backward(grad_TH)
    return out.detach(), [leaves[i].grad for i in (0, 1, 2, 4)]


def test_reference_matches_token_by_token_definition() -> None:
    inputs = make_inputs(11, 12, 10, 5, 2, routing="sentinel")
    torch.testing.assert_close(K.moe_swiglu_reference(*inputs), naive_moe(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["random", "sentinel", "one_expert"])
def test_reference_backward_matches_autograd(routing: str) -> None:
    """The hand-written backward (the fallback's) equals autograd through the reference forward."""
    inputs = make_inputs(10, 12, 9, 5, 2, routing=routing)
    grad_TH = torch.randn(10, 12, generator=torch.Generator().manual_seed(2))
    _, grads_ref = run_with_grads(K.moe_swiglu_reference, inputs, grad_TH)
    grads = moe_swiglu_reference_backward(grad_TH, *inputs)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


CASES = {
    "T_below_one_tile": (3, 16, 16, 4, 2, "random"),
    "odd_H_F_prime_E": (37, 33, 19, 5, 2, "random"),
    "k1_prime_E7": (20, 24, 40, 7, 1, "random"),
    "k_equals_E": (9, 16, 24, 3, 3, "random"),
    "experts_without_tokens": (24, 16, 16, 8, 2, "sparse"),
    "all_on_one_expert": (18, 16, 17, 4, 2, "one_expert"),
    "sentinel_ids": (15, 16, 16, 4, 2, "sentinel"),
}


@needs_triton
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_forward_and_grads_match_reference(case: str) -> None:
    T, H, Fi, E, k, routing = CASES[case]
    inputs = make_inputs(T, H, Fi, E, k, routing)
    grad_TH = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    assert K.select_backend(torch.device("cpu")) == "triton"
    out, grads = run_with_grads(K.moe_swiglu, inputs, grad_TH)
    out_ref, grads_ref = run_with_grads(K.moe_swiglu_reference, inputs, grad_TH)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(("x", "gate_up_proj", "down_proj", "top_k_weights"), grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")
    if routing == "sentinel":
        assert (grads[3][::3, -1] == 0).all()


@needs_triton
def test_tile_order_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouped tile order (GROUP_M row tiles per pass over the columns, partial last group) is bit-identical."""
    inputs = make_inputs(70, 33, 40, 5, 2)  # 140 rows: up to 14 row tiles of 16, 3 column tiles of 16
    grad_TH = torch.randn(70, 33, generator=torch.Generator().manual_seed(1))
    results = {}
    for group in ("1", "3", "8"):
        monkeypatch.setenv("UPCYCLE_KERNELS_GROUP_M", group)
        results[group] = run_with_grads(K.moe_swiglu, inputs, grad_TH)
    for group in ("3", "8"):
        assert torch.equal(results[group][0], results["1"][0])
        assert all(torch.equal(a, b) for a, b in zip(results[group][1], results["1"][1], strict=True))


def saved_bytes(fn, leaves) -> int:
    """Bytes autograd keeps for the backward (each storage once, inputs excluded)."""
    inputs = {t.untyped_storage().data_ptr() for t in leaves}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves)
    return sum(saved.values())


@needs_triton
def test_activation_memory_is_the_gate_up_preactivations_only() -> None:
    """One forward keeps k*2F values per token for the backward (routing is rebuilt, x is the input itself)."""
    T, H, Fi, E, k = 20, 24, 20, 6, 2
    inputs = make_inputs(T, H, Fi, E, k)
    leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    assert saved_bytes(K.moe_swiglu, leaves) == T * k * 2 * Fi * 4


@needs_triton
def test_transposed_weight_views_and_inference_path() -> None:
    """Transposed storage ([E,H,2F] / [E,F,H], as `is_transposed` classes hold it) reaches the kernels as views."""
    x_TH, w_gu, w_d, index_TK, weights_TK = make_inputs(13, 16, 20, 3, 2)
    w_gu_t = w_gu.transpose(1, 2).contiguous().requires_grad_(True)
    w_d_t = w_d.transpose(1, 2).contiguous().requires_grad_(True)
    out = K.moe_swiglu(x_TH, w_gu_t.transpose(1, 2), w_d_t.transpose(1, 2), index_TK, weights_TK)
    out.square().sum().backward()
    w_gu_r, w_d_r = w_gu.clone().requires_grad_(True), w_d.clone().requires_grad_(True)
    ref = K.moe_swiglu_reference(x_TH, w_gu_r, w_d_r, index_TK, weights_TK)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w_gu_t.grad, w_gu_r.grad.transpose(1, 2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_d_t.grad, w_d_r.grad.transpose(1, 2), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(K.moe_swiglu(x_TH, w_gu, w_d, index_TK, weights_TK), ref.detach())


@needs_triton
def test_torch_compile_fullgraph_through_custom_op() -> None:
    x_TH, w_gu, w_d, index_TK, weights_TK = make_inputs(10, 16, 16, 4, 2)
    w_gu.requires_grad_(True)

    def layer(x_TH, w_gu, w_d, index_TK, weights_TK):
        return (K.moe_swiglu(x_TH * 2.0, w_gu, w_d, index_TK, weights_TK) + 1.0).sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    loss = compiled(x_TH, w_gu, w_d, index_TK, weights_TK)
    (grad,) = torch.autograd.grad(loss, w_gu)
    w_ref = w_gu.detach().clone().requires_grad_(True)
    loss_ref = (K.moe_swiglu_reference(x_TH * 2.0, w_ref, w_d, index_TK, weights_TK) + 1.0).sum()
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, w_ref.grad, rtol=1e-4, atol=1e-5)


@needs_triton
def test_torch_compile_fullgraph_through_transformers_moe_block() -> None:
    """transformers' experts dispatch + our op compile as one graph (dynamo traces the registry's checks)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=16, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "upcycle"
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, 16)
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    out.sum().backward()
    grad = block.experts.gate_up_proj.grad.clone()
    block.zero_grad()
    config._experts_implementation = "eager"
    ref = block(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, block.experts.gate_up_proj.grad, rtol=1e-4, atol=1e-5)


def test_reference_fallback_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(backend, "_warned", set())
    inputs = make_inputs(6, 8, 8, 3, 2)
    grad_TH = torch.randn(6, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1, grads = run_with_grads(K.moe_swiglu, inputs, grad_TH)
        out2 = K.moe_swiglu(*inputs)
    assert len([w for w in caught if "upcycle.kernels" in str(w.message)]) == 1
    out_ref, grads_ref = run_with_grads(K.moe_swiglu_reference, inputs, grad_TH)
    torch.testing.assert_close(out1, out_ref)
    torch.testing.assert_close(out1, out2)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("UPCYCLE_KERNELS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="UPCYCLE_KERNELS_BACKEND=triton"):
        K.moe_swiglu(*inputs)


def test_bad_inputs_are_refused() -> None:
    x_TH, w_gu, w_d, index_TK, weights_TK = make_inputs(4, 8, 8, 3, 2)
    with pytest.raises(ValueError, match="shape mismatch"):
        K.moe_swiglu(x_TH, w_gu[:, :-1], w_d, index_TK, weights_TK)
    with pytest.raises(ValueError, match="share a dtype"):
        K.moe_swiglu(x_TH.double(), w_gu, w_d, index_TK, weights_TK)


def test_routing_tiles_cover_every_row_once() -> None:
    index_TK = torch.tensor([[0, 4], [4, 1], [4, 0], [9, 4], [4, 1]])
    routing = build_routing(index_TK, 5)
    assert routing.offsets_E1.tolist() == [0, 2, 4, 4, 4, 9]
    assert torch.equal(routing.sorted_s_S[routing.pos_S], torch.arange(10))
    tile_expert, tile_start = routing.tiles(2)
    covered = []
    for e, s in zip(tile_expert.tolist(), tile_start.tolist(), strict=True):
        if e >= 0:
            covered += [r for r in range(s, s + 2) if r < routing.offsets_E1[e + 1]]
    assert covered == list(range(9))  # row 9 is the sentinel and is never computed


def test_autotune_bucket_heuristics_and_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert autotune.tokens_per_expert_bucket(16384 * 8, 64) == 2048
    assert autotune.tokens_per_expert_bucket(3, 64) == 16
    assert autotune.tokens_per_expert_bucket(10**9, 8) == 4096
    cpu = torch.device("cpu")
    assert autotune.choose_config("up", 64, 64, 16, torch.float32, cpu, lambda c: None) == autotune.INTERPRETER_CONFIG
    small = autotune._heuristic("gemm", 20, 8, 16)
    assert (small.block_m, small.block_n, small.block_k) == (16, 32, 16)
    monkeypatch.setenv("UPCYCLE_KERNELS_CACHE_DIR", str(tmp_path))
    cache = autotune._Cache()
    cfg = autotune.KernelConfig(64, 128, 64, 4, 3)
    cache.put("up|N=1|K=2|tpe=16|bfloat16", cfg)
    (path,) = tmp_path.glob("autotune-*.json")
    assert json.loads(path.read_text())["up|N=1|K=2|tpe=16|bfloat16"]["block_n"] == 128
    assert autotune._Cache().get("up|N=1|K=2|tpe=16|bfloat16") == cfg
    monkeypatch.setenv("UPCYCLE_KERNELS_AUTOTUNE", "0")
    assert not autotune.autotune_enabled()


def captured_step(T: int = 40, H: int = 24, Fi: int = 20, E: int = 6, k: int = 2):
    from upcycle.kernels.precompile import plan

    x_TH, w_gate_up_E2FH, w_down_EHF, index_TK, weights_TK = make_inputs(T, H, Fi, E, k)
    return plan(x_TH, w_gate_up_E2FH, w_down_EHF, build_routing(index_TK, E), weights_TK, training=True)


def test_capture_plans_a_training_step_without_launching() -> None:
    from upcycle.kernels.launch import active_capture

    captured = captured_step()
    assert active_capture() is None
    assert [(s.kernel, s.n, s.k) for s in captured.tuned] == [
        ("up", 20, 24), ("gemm", 24, 20), ("down_bwd", 20, 24), ("gemm", 24, 40), ("dw", 40, 24), ("dw", 24, 20),
    ]  # fmt: skip
    names = [launch.name for launch in captured.launches]
    assert names.count("_combine_kernel") == 2 and len(names) == 8  # one launch per site, plus the two combines


def test_precompile_warms_every_candidate_until_tuned(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from upcycle.kernels.precompile import warmups

    monkeypatch.setenv("UPCYCLE_KERNELS_CACHE_DIR", str(tmp_path))
    captured = captured_step()
    per_site = [len(autotune.candidates(s.kernel, s.n, s.k, s.bucket)) for s in captured.tuned]
    assert len(warmups(captured, torch.bfloat16)) == sum(per_site) + 2
    first = captured.tuned[0]
    key = autotune.tuning_key(first.kernel, first.n, first.k, first.bucket, torch.bfloat16)
    autotune._CACHE.put(key, autotune.KernelConfig(64, 64, 64, 4, 3))  # a tuned site compiles its choice only
    assert len(warmups(captured, torch.bfloat16)) == sum(per_site) - per_site[0] + 1 + 2
    monkeypatch.setenv("UPCYCLE_KERNELS_AUTOTUNE", "0")
    assert len(warmups(captured, torch.bfloat16)) == len(captured.tuned) + 2


# ---------------------------------------------------------------- whole models through transformers' dispatch


def tiny_model(family: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    if family == "mixtral":
        config = tf.MixtralConfig(**common, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2)
        cls = tf.MixtralForCausalLM
    elif family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, head_dim=8, intermediate_size=48, moe_intermediate_size=20,
                                   num_experts=5, num_experts_per_tok=2, norm_topk_prob=True)  # fmt: skip
        cls = tf.Qwen3MoeForCausalLM
    elif family == "qwen2_moe":
        config = tf.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=20, num_experts=4,
                                   shared_expert_intermediate_size=24, num_experts_per_tok=2)  # fmt: skip
        cls = tf.Qwen2MoeForCausalLM
    elif family == "glm4_moe":
        config = tf.Glm4MoeConfig(**common, head_dim=8, intermediate_size=48, moe_intermediate_size=20,
                                  n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                  first_k_dense_replace=0, partial_rotary_factor=1.0)  # fmt: skip
        cls = tf.Glm4MoeForCausalLM
    elif family == "dots1":
        config = tf.Dots1Config(**common, head_dim=8, intermediate_size=48, moe_intermediate_size=20,
                                n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                n_shared_experts=1, first_k_dense_replace=0)  # fmt: skip
        cls = tf.Dots1ForCausalLM
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():  # transformers leaves some MoE tensors (e.g. routing bias) at zero: make them matter
        for name, p in model.named_parameters():
            if "experts" in name or "gate" in name:
                p.normal_(0.0, 0.2)
    return model


def logits_and_grads(model, implementation: str):
    model = copy.deepcopy(model)
    model.set_experts_implementation(implementation)
    input_ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@needs_triton
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_whole_model_logits_and_grads_match_eager(family: str) -> None:
    model = tiny_model(family)
    logits_e, grads_e = logits_and_grads(model, "eager")
    logits_u, grads_u = logits_and_grads(model, "upcycle")
    torch.testing.assert_close(logits_u, logits_e, rtol=1e-5, atol=1e-5)
    assert grads_u.keys() == grads_e.keys() and any("experts" in n for n in grads_u)
    for name in grads_e:
        msg = lambda m, n=name: f"{n}: {m}"  # noqa: E731
        torch.testing.assert_close(grads_u[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=msg)


@needs_triton
@pytest.mark.parametrize("family", ["qwen2_moe", "glm4_moe", "dots1"])
def test_other_families_forward_matches_eager(family: str) -> None:
    model = tiny_model(family)
    input_ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model.set_experts_implementation("eager")
        ref = model(input_ids=input_ids).logits
        model.set_experts_implementation("upcycle")
        out = model(input_ids=input_ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_from_pretrained_accepts_upcycle_implementation(tmp_path) -> None:
    import transformers as tf

    tiny_model("mixtral").save_pretrained(tmp_path)
    model = tf.MixtralForCausalLM.from_pretrained(tmp_path, experts_implementation="upcycle")
    assert model.config._experts_implementation == "upcycle"
    experts = model.model.layers[0].mlp.experts
    x_TH = torch.randn(5, 32)
    index_TK = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]])
    weights_TK = torch.full((5, 2), 0.5)
    with torch.no_grad():
        out = experts(x_TH, index_TK, weights_TK)
    ref = K.moe_swiglu_reference(x_TH, experts.gate_up_proj, experts.down_proj, index_TK, weights_TK)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_experts_are_refused() -> None:
    model = tiny_model("mixtral", hidden_act="gelu")
    for module in model.modules():
        if hasattr(module, "gate_up_proj"):
            module.act_fn = torch.nn.GELU()
    model.set_experts_implementation("upcycle")
    with pytest.raises(K.UnsupportedExpertsError, match="activation GELU"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    experts = model.model.layers[0].mlp.experts
    experts.act_fn, experts.has_bias = torch.nn.SiLU(), True
    with pytest.raises(K.UnsupportedExpertsError, match="expert biases"):
        K.check_experts_module(experts)


def test_autocast_computes_experts_in_the_autocast_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 master weights under bf16 autocast: the experts compute in bf16 (as linear layers do), not fp32.

    The reference backend runs it: the Triton interpreter mishandles bf16 dots (bf16 kernels are GPU-checked).
    """
    monkeypatch.setenv("UPCYCLE_KERNELS_BACKEND", "reference")
    model = tiny_model("mixtral")
    model.set_experts_implementation("upcycle")
    experts = model.model.layers[0].mlp.experts
    hidden_TH = torch.randn(6, 32)
    index_TK = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3], [3, 1], [2, 0]])
    weights_TK = torch.full((6, 2), 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_TH = experts(hidden_TH, index_TK, weights_TK)
    assert out_TH.dtype == torch.bfloat16
    reference_TH = K.moe_swiglu_reference(
        hidden_TH, experts.gate_up_proj.detach(), experts.down_proj.detach(), index_TK, weights_TK
    )
    torch.testing.assert_close(out_TH.float(), reference_TH, rtol=5e-2, atol=5e-2)
    out_TH.float().sum().backward()
    assert experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.dtype == torch.float32


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return ((value.double() - exact).abs().max() / exact.abs().max()).item()


@needs_triton
def test_fp16_kernels_err_no_more_than_pytorchs_own_fp16() -> None:
    """In fp16 the kernels' forward and four gradients stay as close to fp64 as PyTorch's own fp16 computation does
    (measured on T96 H64 F96 E8 k2: 4.9e-4 to 1.1e-3 relative for the kernels, 5.3e-4 to 1.7e-3 for PyTorch's).
    bf16 needs a GPU: the interpreter computes a bf16 dot wrongly."""
    T, H, Fi, E, k = 96, 64, 96, 8, 2
    inputs = make_inputs(T, H, Fi, E, k)
    grad_TH = torch.randn(T, H, generator=torch.Generator().manual_seed(1))

    def in_dtype(dtype: torch.dtype) -> list[torch.Tensor]:
        return [t.to(dtype) if t.is_floating_point() else t for t in inputs]

    exact, exact_grads = run_with_grads(K.moe_swiglu_reference, in_dtype(torch.float64), grad_TH.double())
    ours, our_grads = run_with_grads(K.moe_swiglu, in_dtype(torch.float16), grad_TH.half())
    torch_fp16, torch_grads = run_with_grads(K.moe_swiglu_reference, in_dtype(torch.float16), grad_TH.half())
    names = ("output", "grad x", "grad gate_up_proj", "grad down_proj", "grad top_k_weights")
    for name, mine, theirs, truth in zip(
        names, (ours, *our_grads), (torch_fp16, *torch_grads), (exact, *exact_grads), strict=True
    ):
        assert mine.dtype == torch.float16
        ours_error, torch_error = relative_error(mine, truth), relative_error(theirs, truth)
        assert ours_error <= 2 * torch_error + 1e-4, f"{name}: {ours_error:.2e} against PyTorch's {torch_error:.2e}"
