"""Token dropping that saves compute: one MoE layer, forward + backward, at capacity factors 0.5, 1.0, 1.25, 2.0
and none (dropless), in one run.

The layer is transformers' own Mixtral sparse block (E8 top-2 by default, random weights; fp32 on the CPU, or
`--device cuda --dtype bf16` on a GPU, where the route `upcycle` runs the project's Triton experts),
with upcycle's router taps applying the capacity exactly as training does: dropped assignments get the sentinel
index and are skipped by the experts (`--zero-weight` instead computes them with weight zero, the old route, for
comparison). Each (implementation, capacity) runs in its own fresh subprocess, so its peak RSS (`ru_maxrss`) is
its own; the order rotates each round. Reported: the share of assignments kept, tokens/s (median step time over
`--steps` after `--warmup`), peak memory (the child's RSS; on a GPU `torch.cuda.max_memory_allocated`), and both
as ratios to dropless in the same implementation.

    nice .venv/bin/python benchmarks/bench_capacity.py                    # grouped_mm and eager, 1 round
    nice .venv/bin/python benchmarks/bench_capacity.py --repeats 3 --json capacity.json
    python benchmarks/bench_capacity.py --device cuda --dtype bf16 --shapes all --capacities none,1.0 \
        --routes upcycle,grouped_mm                                      # the kernels' four reference shapes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CAPACITIES = ("none", "2.0", "1.25", "1.0", "0.5")


def child(args: argparse.Namespace) -> None:
    import torch
    import transformers

    from upcycle.kernels.registry import calls, register
    from upcycle.train.moe_losses import RouterTaps

    register()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=args.hidden, intermediate_size=args.ffn, num_local_experts=args.experts,
        num_experts_per_tok=args.top_k, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
        vocab_size=128,
    )  # fmt: skip
    config._experts_implementation = args.implementation
    model = transformers.MixtralForCausalLM(config)
    block = model.model.layers[0].mlp.to(device, dtype)
    block.train()
    capacity = None if args.capacity == "none" else float(args.capacity)
    taps = RouterTaps(block, capacity, skip_dropped=not args.zero_weight)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, kept = [], []
    for step in range(args.warmup + args.steps):
        taps.clear()
        sync()
        start = time.perf_counter()
        out = block(x[None])
        out.float().square().mean().backward()
        sync()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
        record = taps.records[0]
        kept.append(1.0 if record.kept_TK is None else float(record.kept_TK.float().mean()))
        block.zero_grad(set_to_none=True)
        x.grad = None
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    ran = ",".join(sorted({f"upcycle[{backend}]" for backend, _ in calls})) or args.implementation
    result = {"step_s": statistics.median(times), "kept": statistics.fmean(kept), "device_peak_mb": peak, "ran": ran}
    print(json.dumps(result))


def run(args: argparse.Namespace, route: str, capacity: str) -> dict:
    """One child: `route` is an implementation, or `implementation/zero-weight` for the old route."""
    implementation, _, zero = route.partition("/")
    cmd = [sys.executable, __file__, "--child", "--implementation", implementation, "--capacity", capacity]
    for key in ("tokens", "hidden", "ffn", "experts", "top_k", "steps", "warmup", "device", "dtype"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--zero-weight"] if zero else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.device == "cpu":
        env["UPCYCLE_KERNELS_BACKEND"] = "reference"  # upcycle's experts on the CPU: the PyTorch reference
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{implementation} at capacity {capacity} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    peak = result.pop("device_peak_mb") or usage.ru_maxrss / 1024  # on a GPU its memory, else the child's RSS
    return {**result, "peak_mb": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--implementation", default="grouped_mm")
    parser.add_argument(
        "--routes",
        default="grouped_mm,eager,grouped_mm/zero-weight",
        help="experts implementations; NAME/zero-weight computes dropped assignments with weight zero (the old route)",
    )
    parser.add_argument("--capacity", default="none")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (peak memory: torch.cuda.max_memory_allocated)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--zero-weight", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--capacities", default=",".join(CAPACITIES), help="a comma list; none is always run")
    parser.add_argument(
        "--shapes",
        default="",
        help="all, or a comma list of the kernels' reference shapes (E64-k8-H2048-F1024-T16k, ...), each in place "
        "of --tokens/--hidden/--ffn/--experts/--top-k",
    )
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    if not args.shapes:
        summary = measure_shape(args)
    else:
        from upcycle.kernels.cross_compile import REFERENCE_SHAPES

        named = {shape.name: shape for shape in REFERENCE_SHAPES}
        wanted = list(named) if args.shapes == "all" else args.shapes.split(",")
        if unknown := set(wanted) - set(named):
            sys.exit(f"unknown shape(s) {sorted(unknown)}; choose from {', '.join(named)}")
        summary = {}
        for name in wanted:
            shape = named[name]
            args.tokens, args.hidden, args.ffn, args.experts, args.top_k = shape.T, shape.H, shape.F, shape.E, shape.k
            summary[name] = measure_shape(args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": summary}, handle, indent=2)
    return 0


def measure_shape(args: argparse.Namespace) -> dict:
    """Every route at every capacity on the shape `args` describes; prints its table and returns the figures."""
    capacities = ["none", *(c for c in args.capacities.split(",") if c != "none")]
    implementations = args.routes.split(",")
    results: dict[str, dict[str, list[dict]]] = {i: {c: [] for c in capacities} for i in implementations}
    for round_ in range(args.repeats):
        order = [(i, c) for i in implementations for c in capacities]
        shift = round_ % len(order)
        for implementation, capacity in order[shift:] + order[:shift]:
            results[implementation][capacity].append(run(args, implementation, capacity))
    shape = f"T={args.tokens} H={args.hidden} F={args.ffn} E{args.experts} top-{args.top_k}"
    print(f"one Mixtral sparse block, {shape}, {args.dtype} on {args.device}, forward+backward; medians of "
          f"{args.repeats} round(s); /zero-weight: dropped assignments computed with weight zero")  # fmt: skip
    header = ["route", "capacity", "kept", "tokens/s", "x none", "peak MB", "x none", "ran"]
    print(f"{header[0]:<22} {header[1]:>8} {header[2]:>6} {header[3]:>10} {header[4]:>7} {header[5]:>8} {header[6]:>7}"
          f"  {header[7]}")  # fmt: skip
    summary: dict = {}
    for implementation in implementations:
        rows = {c: _median(r) for c, r in results[implementation].items()}
        none = rows["none"]
        for capacity, row in rows.items():
            tps = args.tokens / row["step_s"]
            row |= {"tokens_per_s": tps, "speed_vs_none": none["step_s"] / row["step_s"],
                    "memory_vs_none": row["peak_mb"] / none["peak_mb"]}  # fmt: skip
            print(f"{implementation:<22} {capacity:>8} {row['kept']:>6.1%} {tps:>10.0f} {row['speed_vs_none']:>6.2f}x "
                  f"{row['peak_mb']:>8.0f} {row['memory_vs_none']:>6.2f}x  {row['ran']}")  # fmt: skip
        summary[implementation] = rows
    return summary


def _median(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["step_s"])
    return dict(ordered[len(ordered) // 2])


if __name__ == "__main__":
    raise SystemExit(main())
