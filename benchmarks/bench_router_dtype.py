"""The routers' precision under bf16 autocast: how often routing choices differ from fp32's, per setting.

An exact upcycle of SmolLM2 (E8 top-2, layers 24-29) runs real held-out text three ways: everything in fp32 (the
reference), bf16 autocast with the routers in bf16 (`moe.router_dtype: compute`), and bf16 autocast with the
routers in fp32 (`float32`). Printed per setting: the share of top-k choices that differ from the reference, and
the max relative difference of the router logits and of the model's logits, and the router's own rounding: its
logits against an fp32 linear on the very input it was given. (At init an exact upcycle's experts are equal copies,
so a flipped choice does not change the model's output; in training it changes which expert learns from a token.)

    python benchmarks/bench_router_dtype.py [--tokens 512] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from upcycle.assets import sample_text, smollm2_folder
from upcycle.convert import UpcycleOptions
from upcycle.hf.loading import load_causal_lm_strict
from upcycle.train.moe_losses import find_routers
from upcycle.train.router_precision import run_routers_in_fp32
from upcycle.upcycling import convert


def routed(
    model: torch.nn.Module, ids: torch.Tensor, autocast: bool, device: str
) -> tuple[list, list, torch.Tensor, float]:
    """Each router's logits and top-k choices, the model's logits, and the routers' worst own rounding."""
    seen: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def own_rounding(router: torch.nn.Module, hidden: torch.Tensor, logits: torch.Tensor) -> float:
        with torch.autocast(device, enabled=False):
            exact = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]).float(), router.weight.float())
        return relative(exact, logits.float())

    handles = [
        router.register_forward_hook(
            lambda m, a, out: seen.append((out[0].float(), out[2], own_rounding(m, a[0], out[0])))
        )
        for _, router in find_routers(model)
    ]
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids).logits.float()
    for handle in handles:
        handle.remove()
    return [s[0] for s in seen], [s[1].sort(-1).values for s in seen], logits, max(s[2] for s in seen)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        moe = Path(scratch) / "moe"
        convert(smollm2_folder(), moe, UpcycleOptions(experts=8, top_k=2, layers="24-29"))
        model = load_causal_lm_strict(moe, torch.float32).to(args.device).eval()
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(moe)(sample_text(20_000), return_tensors="pt").input_ids
        ids = ids[:, : args.tokens].to(args.device)
        ref_router, ref_choice, ref_logits, _ = routed(model, ids, False, args.device)
        results = {}
        for setting in ("compute", "float32"):
            undo = run_routers_in_fp32(find_routers(model), args.device) if setting == "float32" else None
            router, choice, logits, own = routed(model, ids, True, args.device)
            if undo is not None:
                undo()
            flipped = sum((c != r).any(-1).sum().item() for c, r in zip(choice, ref_choice, strict=True))
            tokens = sum(r.shape[0] for r in ref_choice)
            results[setting] = {
                "tokens_routed_differently": flipped / tokens,
                "router_logits_rel_diff": max(relative(r, x) for r, x in zip(ref_router, router, strict=True)),
                "model_logits_rel_diff": relative(ref_logits, logits),
                "router_own_rounding": own,
            }
    print(json.dumps({"device": args.device, "tokens": int(ids.shape[1]), "routers": len(ref_choice), **results},
                     indent=2))  # fmt: skip
    a, b = results["compute"]["tokens_routed_differently"], results["float32"]["tokens_routed_differently"]
    print(f"routing differs from fp32 for {a:.2%} of token-layers with bf16 routers, {b:.2%} with fp32 routers")


if __name__ == "__main__":
    main()
