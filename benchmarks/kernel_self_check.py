"""The first-contact check of upcycle's Triton experts on the four reference shapes: its verdict, its errors
against the limits it sets, and what it costs, in a fresh process (so each shape is a first contact).

On a GPU: bf16 (the training dtype) on the four reference shapes; on the CPU (`TRITON_INTERPRET=1`): fp32 on two
small shapes. Prints one JSON object per shape (and writes them all to `--json`).

    python benchmarks/kernel_self_check.py --json self-check.json                    # a GPU host
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/kernel_self_check.py               # the CPU, interpreted
"""

from __future__ import annotations

import argparse
import json

import torch

from upcycle.kernels import self_check
from upcycle.kernels.cross_compile import REFERENCE_SHAPES, MoEShape

CPU_SHAPES = (MoEShape("cpu-E8-k2-H128-F256", 8, 2, 128, 256, 512), MoEShape("cpu-E16-k4-H64-F64", 16, 4, 64, 64, 512))


def check(shape: MoEShape, device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    experts = min(shape.E, self_check.SLICE_EXPERTS)  # the check itself takes at most this many
    w_gate_up = (torch.randn(experts, 2 * shape.F, shape.H, generator=generator) / shape.H**0.5).to(device, dtype)
    w_down = (torch.randn(experts, shape.H, shape.F, generator=generator) / shape.F**0.5).to(device, dtype)
    tokens = self_check.SLICE_TOKENS
    x = torch.randn(tokens, shape.H, generator=generator).to(device, dtype)
    index = torch.rand(tokens, experts, generator=generator).argsort(dim=1)[:, : shape.k].to(device)
    weights = torch.rand(tokens, shape.k, generator=generator).softmax(dim=1).to(device, dtype)
    verdict = self_check.first_contact(x, w_gate_up, w_down, index, weights)
    return {"shape": shape.name, "ok": verdict.ok, "reason": verdict.reason, "seconds": round(verdict.seconds, 3),
            "errors": verdict.errors, "allowed": verdict.allowed}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the verdicts here")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    results = []
    for shape in REFERENCE_SHAPES if on_gpu else CPU_SHAPES:
        results.append(check(shape, device, dtype))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": str(device), "dtype": str(dtype), "checks": results}, handle, indent=2)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
