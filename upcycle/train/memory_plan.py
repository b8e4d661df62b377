"""Bytes per rank before the first step: parameters, gradients, optimizer state, gathered weights, activations.

The plan is arithmetic on the model's shape (read on the meta device) and the resolved layout, so it runs for an
8x8B model on a laptop. Weights and optimizer state are exact counts for the layout (fp32 master weights and AdamW's
two moments, sharded as transformers' FSDP2 plan shards them); the activation term is an estimate from the tensors
a decoder layer keeps for its backward, checked against measured peak RSS in ``benchmarks/memory_plan_check.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from upcycle.train.model_shape import LayerShape, ModelShape
from upcycle.train.parallel import Layout

FP32 = 4
GIB = 1024**3


@dataclass(frozen=True)
class Workload:
    """What one rank computes per micro-step."""

    micro_batch_size: int
    seq_len: int
    compute_bytes: int  # 2 for bf16, 4 for fp32
    activation_checkpointing: bool


@dataclass
class MemoryPlan:
    rows: list[tuple[str, int, str]] = field(default_factory=list)  # (what, bytes, how it was counted)
    device_bytes: int | None = None
    device_name: str = ""

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.rows)

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.total <= self.device_bytes


def layer_activation_bytes(layer: LayerShape, tokens: int, compute_bytes: int) -> int:
    """Tensors one decoder layer keeps for its backward (attention with a fused kernel: no S x S scores).

    Counted from what autograd saves in transformers' layers: an RMSNorm keeps its input, the normalised input and
    its output (3h); a SwiGLU keeps gate and up, silu(gate) and their product (4f) besides its input and output.
    """
    h, q, kv, f, k = layer.hidden, layer.q_width, layer.kv_width, layer.mlp_width, layer.top_k
    attention = 3 * h + 3 * q + 3 * kv  # norm, q/k/v, rotated q/k, attention output
    if layer.num_experts:
        # norm; per routed copy: gathered input and weighted output, SwiGLU; router scores in fp32
        mlp = 3 * h + k * (2 * h + 4 * f) + layer.num_experts * FP32 // compute_bytes
    else:
        mlp = 3 * h + 4 * f
    return tokens * (attention + mlp) * compute_bytes


def plan_memory(shape: ModelShape, layout: Layout, work: Workload, device_bytes: int | None = None) -> MemoryPlan:
    """The rows of one rank's memory (every rank of these layouts holds the same amounts)."""
    c = work.compute_bytes
    dense = shape.total_params - shape.expert_params
    if layout.sharded:
        # dense weights shard over fsdp (each replica holds a copy); experts over ep x efsdp = fsdp as well
        local = -(-dense // layout.fsdp) + -(-shape.expert_params // (layout.ep * layout.efsdp))
        how = (
            f"{dense:,} dense / fsdp {layout.fsdp} + {shape.expert_params:,} expert / "
            f"(ep {layout.ep} x efsdp {layout.efsdp})"
        )
    else:
        local = shape.total_params
        how = f"all {shape.total_params:,} parameters"
    plan = MemoryPlan(device_bytes=device_bytes)
    plan.rows.append(("parameters (fp32 master)", local * FP32, how))
    plan.rows.append(("gradients (fp32)", local * FP32, "one per local parameter"))
    plan.rows.append(("optimizer (AdamW, 2 x fp32)", 2 * local * FP32, "exp_avg and exp_avg_sq per local parameter"))
    if layout.sharded:
        unit = max(
            (layer.dense_params + layer.expert_params // layout.ep for layer in shape.layers),
            default=0,
        )
        tail = shape.head_params or shape.embed_params  # final norm and head stay gathered for the whole step
        plan.rows.append(
            (
                "gathered weights and gradients",
                unit * (2 * c + c + FP32) + tail * (c + FP32),
                f"largest layer unit ({unit:,} params incl. 1/{layout.ep} of its experts) gathered twice (prefetch) "
                "plus its unsharded gradient; the output head for the step",
            )
        )
    elif c != FP32:
        unit = max((layer.dense_params + layer.expert_params for layer in shape.layers), default=0)
        plan.rows.append(("autocast weight copies", unit * c, "one layer's weights cast to the compute dtype"))
    tokens = work.micro_batch_size * work.seq_len
    per_layer = [layer_activation_bytes(layer, tokens, c) for layer in shape.layers]
    if work.activation_checkpointing:
        activations = len(shape.layers) * tokens * shape.hidden * c + max(per_layer, default=0)
        how = f"{tokens} tokens: each layer's input, plus one layer recomputed"
    else:
        activations = sum(per_layer)
        how = f"{tokens} tokens x {len(shape.layers)} layers (estimate)"
    plan.rows.append(("activations", activations, how))
    plan.rows.append(
        ("logits and loss", tokens * shape.vocab * (c + 2 * FP32), f"{tokens} tokens x vocab {shape.vocab:,}")
    )
    return plan
