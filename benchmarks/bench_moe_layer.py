"""Side-by-side MoE experts layer benchmark: upcycle kernels vs transformers grouped_mm / eager vs Liger vs dense.

For each shape it times the forward (training mode, activations saved) and forward+backward (gradients to
hidden states, both expert weights and the routing weights) of one experts layer, reports TFLOP/s with
FLOPs = 6*T*k*H*F (fwd) and 18*T*k*H*F (fwd+bwd), ratios to the dense SwiGLU of equal FLOPs (intermediate
size k*F) and to grouped_mm, the activation memory one forward keeps for the backward (saved tensors,
measured on any device), peak extra memory of one fwd+bwd (GPU), and the first-call time (compilation and any
autotuning). On a GPU it runs the four reference shapes in bf16; on the CPU small fp32 shapes (there the
upcycle op runs its PyTorch reference unless TRITON_INTERPRET=1, and the table says which backend ran).

    python benchmarks/bench_moe_layer.py                 # all shapes for this machine
    python benchmarks/bench_moe_layer.py --json out.json # also write machine-readable results ('-' = stdout)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from upcycle.kernels.cross_compile import REFERENCE_SHAPES, MoEShape


@dataclass(frozen=True)
class Shape(MoEShape):
    def flops(self, backward: bool) -> float:
        return (18 if backward else 6) * self.T * self.k * self.H * self.F


GPU_SHAPES = [Shape(s.name, s.E, s.k, s.H, s.F, s.T) for s in REFERENCE_SHAPES]
CPU_SHAPES = [
    Shape("cpu-E8-k2-H128-F256-T512", 8, 2, 128, 256, 512),
    Shape("cpu-E16-k4-H64-F64-T512", 16, 4, 64, 64, 512),
]
IMPLS = ("upcycle", "grouped_mm", "eager", "liger", "dense")


@dataclass
class Problem:
    x_TH: torch.Tensor
    w_gate_up_E2FH: torch.Tensor
    w_down_EHF: torch.Tensor
    top_k_index_TK: torch.Tensor
    top_k_weights_TK: torch.Tensor
    grad_TH: torch.Tensor


def make_problem(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    """Random weights and a Mixtral-style router (softmax, top-k, renormalise in fp32)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    logits_TE = torch.randn(shape.T, shape.E, generator=g).to(device)
    weights_TK, index_TK = logits_TE.softmax(-1).topk(shape.k, dim=-1)
    weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    return Problem(
        x_TH=rand(shape.T, shape.H),
        w_gate_up_E2FH=rand(shape.E, 2 * shape.F, shape.H, scale=shape.H**-0.5),
        w_down_EHF=rand(shape.E, shape.H, shape.F, scale=shape.F**-0.5),
        top_k_index_TK=index_TK,
        top_k_weights_TK=weights_TK,
        grad_TH=rand(shape.T, shape.H),
    )


def _transformers_experts(p: Problem, implementation: str) -> Callable[..., torch.Tensor]:
    """A real transformers experts module (MixtralExperts) dispatching through `implementation`."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    E, F2, H = p.w_gate_up_E2FH.shape
    config = MixtralConfig(hidden_size=H, intermediate_size=F2 // 2, num_local_experts=E, hidden_act="silu")
    with torch.device("meta"):
        module = MixtralExperts(config)
    config._experts_implementation = implementation

    def run(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK):
        module.gate_up_proj, module.down_proj = w_gate_up_E2FH, w_down_EHF
        return module(x_TH, top_k_index_TK, top_k_weights_TK)

    module.__dict__["_parameters"] = {}  # plain tensor attributes, so autograd sees the benchmark's leaves
    return run


def implementation(name: str, p: Problem) -> tuple[Callable[..., torch.Tensor], str] | None:
    """(callable, label) for one implementation, or None when it cannot run here."""
    if name == "upcycle":
        import upcycle.kernels as K

        backend = K.select_backend(p.x_TH.device)
        return K.moe_swiglu, f"upcycle[{backend}]"
    if name in ("grouped_mm", "eager"):
        return _transformers_experts(p, name), name
    if name == "liger":
        try:
            from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
        except Exception:
            return None
        if p.x_TH.device.type != "cuda":
            return None

        def liger(x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK, top_k_weights_TK):
            return LigerFusedMoEFunction.apply(
                x_TH, w_gate_up_E2FH, w_down_EHF, top_k_index_TK.int(), top_k_weights_TK.to(x_TH.dtype)
            )

        return liger, "liger"
    if name == "dense":
        return None  # built separately: it has its own weights
    raise ValueError(name)


def dense_problem(shape: Shape, p: Problem) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """Dense SwiGLU with intermediate size k*F: the same FLOPs as the MoE layer, no routing."""
    g = torch.Generator(device="cpu").manual_seed(1)
    Fd, dt, dev = shape.k * shape.F, p.x_TH.dtype, p.x_TH.device
    w_gate_up = (torch.randn(2 * Fd, shape.H, generator=g) * shape.H**-0.5).to(dev, dt)
    w_down = (torch.randn(shape.H, Fd, generator=g) * Fd**-0.5).to(dev, dt)

    def dense(x_TH, w_gate_up, w_down):
        gate, up = F.linear(x_TH, w_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w_down)

    return dense, (p.x_TH, w_gate_up, w_down)


class Timer:
    """Wall time per call: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], None], iters: int, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters


def measure(
    fn: Callable[..., torch.Tensor],
    inputs: tuple,
    grad_TH: torch.Tensor,
    differentiable: tuple[int, ...],
    timer: Timer,
    iters: int,
    warmup: int,
) -> dict:
    """First-call, forward and forward+backward times and peak extra memory of one implementation."""
    leaves = [t.detach().requires_grad_(i in differentiable) for i, t in enumerate(inputs)]

    def fwd() -> torch.Tensor:
        return fn(*leaves)

    def fwd_bwd() -> None:
        for t in leaves:
            t.grad = None
        fwd().backward(grad_TH)

    t0 = time.perf_counter()
    fwd_bwd()
    timer.sync()
    first_call_s = time.perf_counter() - t0
    peak_mib = None
    if timer.cuda:
        torch.cuda.synchronize()
        for t in leaves:
            t.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    out = fwd().detach()
    return {
        "first_call_s": first_call_s,
        "saved_mib": saved_for_backward_bytes(fwd, leaves) / 2**20,
        "fwd_s": timer(lambda: fwd(), iters, warmup),
        "fwd_bwd_s": timer(fwd_bwd, iters, warmup),
        "peak_extra_mib": peak_mib,
        "_out": out,
    }


def saved_for_backward_bytes(fwd: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> int:
    """Bytes autograd keeps from one forward for the backward, counting each storage once and not the inputs.

    This is the activation memory a training step holds per layer, measured on any device: the same tensors
    are saved whatever the hardware (the figure is exact on the CPU for the code path that ran).
    """
    inputs = {t.untyped_storage().data_ptr() for t in leaves}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in inputs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fwd()
    del out
    return sum(saved.values())


def contender(name: str, shape: Shape, p: Problem) -> tuple[Callable[..., torch.Tensor], str, tuple, tuple] | None:
    """(function, label, inputs, indices of the differentiable inputs), or None when it cannot run here."""
    if name == "dense":
        fn, inputs = dense_problem(shape, p)
        return fn, "dense-swiglu", inputs, (0, 1, 2)
    made = implementation(name, p)
    if made is None:
        return None
    inputs = (p.x_TH, p.w_gate_up_E2FH, p.w_down_EHF, p.top_k_index_TK, p.top_k_weights_TK)
    return made[0], made[1], inputs, (0, 1, 2, 4)


def run_shape(shape: Shape, impls: list[str], dtype: torch.dtype, device: torch.device, iters: int, warmup: int):
    p = make_problem(shape, dtype, device)
    timer = Timer(device)
    rows, reference_out = [], None
    for name in impls:
        made = contender(name, shape, p)
        if made is None:
            rows.append({"impl": name, "skipped": "not installed or not supported on this device"})
            continue
        fn, label, inputs, differentiable = made
        try:
            result = measure(fn, inputs, p.grad_TH, differentiable, timer, iters, warmup)
        except Exception as err:  # one failing implementation must not hide the others
            rows.append({"impl": label, "skipped": f"{type(err).__name__}: {err}"[:200]})
            continue
        out = result.pop("_out")
        if name != "dense":
            if reference_out is None:
                reference_out = out.float()
            result["max_abs_diff_vs_first"] = float((out.float() - reference_out).abs().max())
        result["impl"] = label
        result["fwd_tflops"] = shape.flops(False) / result["fwd_s"] / 1e12
        result["fwd_bwd_tflops"] = shape.flops(True) / result["fwd_bwd_s"] / 1e12
        rows.append(result)
        del out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timed = [r for r in rows if "skipped" not in r]
    dense = next((r for r in timed if r["impl"] == "dense-swiglu"), None)
    grouped = next((r for r in timed if r["impl"] == "grouped_mm"), None)
    for r in timed:
        r["fwd_bwd_vs_dense"] = r["fwd_bwd_tflops"] / dense["fwd_bwd_tflops"] if dense else None
        r["fwd_bwd_vs_grouped_mm"] = grouped["fwd_bwd_s"] / r["fwd_bwd_s"] if grouped else None
    return {"shape": asdict(shape), "results": rows}


def check_against_fp32(shape: Shape, impls: list[str], dtype: torch.dtype, device: torch.device) -> dict:
    """Relative error (max|diff| / max|ref|) of output and every gradient vs the fp32 reference, per impl."""
    import upcycle.kernels as K

    p32 = make_problem(shape, torch.float32, device)
    inputs32 = (p32.x_TH, p32.w_gate_up_E2FH, p32.w_down_EHF, p32.top_k_index_TK, p32.top_k_weights_TK)

    def outputs(fn: Callable[..., torch.Tensor], inputs: tuple, grad_TH: torch.Tensor) -> list[torch.Tensor]:
        leaves = [t.detach().clone().requires_grad_(i in (0, 1, 2, 4)) for i, t in enumerate(inputs)]
        out = fn(*leaves)
        out.backward(grad_TH)
        return [out.detach().float()] + [leaves[i].grad.float() for i in (0, 1, 2, 4)]

    ref = outputs(K.moe_swiglu_reference, inputs32, p32.grad_TH)
    cast = tuple(t.to(dtype) if i in (0, 1, 2) else t for i, t in enumerate(inputs32))
    names = ("out", "d_hidden", "d_gate_up_proj", "d_down_proj", "d_top_k_weights")
    errors = {}
    for name in impls:
        made = implementation(name, p32) if name != "dense" else None
        if made is None:
            continue
        try:
            got = outputs(made[0], cast, p32.grad_TH.to(dtype))
        except Exception as err:
            errors[made[1]] = {"error": f"{type(err).__name__}: {err}"[:200]}
            continue
        errors[made[1]] = {
            n: float((g - r).abs().max() / r.abs().max().clamp_min(1e-30))
            for n, g, r in zip(names, got, ref, strict=True)
        }
    return errors


def print_table(report: dict, header: bool = True) -> None:
    env = report["environment"]
    if header:
        print(f"# MoE experts layer benchmark  {env['date']}  {env['device']}  {env['dtype']}")
        print(f"# torch {env['torch']}  triton {env['triton']}  transformers {env['transformers']}")
    head = (
        f"{'impl':<22}{'fwd ms':>10}{'fwd TF/s':>10}{'f+b ms':>10}{'f+b TF/s':>10}"
        f"{'vs dense':>10}{'vs gmm':>9}{'saved MiB':>10}{'peak MiB':>10}{'1st call s':>11}{'max|diff|':>11}"
    )
    for block in report["shapes"]:
        print(f"\n## {block['shape']['name']}")
        for impl, errs in block.get("rel_err_vs_fp32_reference", {}).items():
            print(f"rel. error vs fp32 reference, {impl}: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float)
                  else f"{k} {v}" for k, v in errs.items()))  # fmt: skip
        print(head)
        for r in block["results"]:
            if "skipped" in r:
                print(f"{r['impl']:<22}skipped: {r['skipped']}")
                continue

            def fmt(v, spec: str) -> str:
                return format(v, spec) if v is not None else "-"

            print(
                f"{r['impl']:<22}{r['fwd_s'] * 1e3:>10.3f}{r['fwd_tflops']:>10.3f}{r['fwd_bwd_s'] * 1e3:>10.3f}"
                f"{r['fwd_bwd_tflops']:>10.3f}{fmt(r['fwd_bwd_vs_dense'], '.2f'):>10}"
                f"{fmt(r['fwd_bwd_vs_grouped_mm'], '.2f'):>9}{r['saved_mib']:>10.1f}"
                f"{fmt(r['peak_extra_mib'], '.0f'):>10}"
                f"{r['first_call_s']:>11.2f}{fmt(r.get('max_abs_diff_vs_first'), '.2e'):>11}"
            )


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }


def saved_only(report: dict, shapes: list[Shape], impls: list[str], dtype: torch.dtype, device: torch.device) -> int:
    """Activation memory per token of each implementation: bytes saved for the backward by one forward / T."""
    env = report["environment"]
    print(f"# bytes saved for the backward per token  {env['date']}  {env['device']}  {env['dtype']}")
    for shape in shapes:
        p = make_problem(shape, dtype, device)
        row = {}
        for name in impls:
            made = contender(name, shape, p)
            if made is None:
                continue
            fn, label, inputs, differentiable = made
            leaves = [t.detach().requires_grad_(i in differentiable) for i, t in enumerate(inputs)]
            row[label] = saved_for_backward_bytes(lambda fn=fn, leaves=leaves: fn(*leaves), leaves) / shape.T
        report["shapes"].append({"shape": asdict(shape), "saved_bytes_per_token": row})
        print(f"{shape.name} (T={shape.T}): " + ", ".join(f"{k} {v:,.0f} B" for k, v in row.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 GPU, fp32 CPU")
    parser.add_argument("--shapes", nargs="*", help="shape names (default: the device's set); see --list")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list from {','.join(IMPLS)}")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 3 GPU, 1 CPU)")
    parser.add_argument("--json", dest="json_path", help="write results as JSON to this path ('-' = stdout)")
    parser.add_argument("--list", action="store_true", help="list the shapes and exit")
    parser.add_argument(
        "--check", action="store_true", help="also report each impl's output/gradient error vs the fp32 reference"
    )
    parser.add_argument(
        "--saved-only",
        action="store_true",
        help="only measure the bytes each impl saves for the backward, per token (no timing); with --tokens",
    )
    parser.add_argument("--tokens", type=int, help="override T of every shape (e.g. small, with --saved-only)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    all_shapes = {s.name: s for s in GPU_SHAPES + CPU_SHAPES}
    if args.list:
        print("\n".join(all_shapes))
        return 0
    shapes = [all_shapes[n] for n in args.shapes] if args.shapes else (GPU_SHAPES if cuda else CPU_SHAPES)
    if args.tokens:
        shapes = [Shape(s.name, s.E, s.k, s.H, s.F, args.tokens) for s in shapes]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if cuda else "fp32")
    ]
    iters = args.iters or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]

    report = {"environment": environment(device, dtype), "shapes": []}
    if args.saved_only:
        return saved_only(report, shapes, [i.strip() for i in args.impls.split(",") if i.strip()], dtype, device)
    for shape in shapes:
        block = run_shape(shape, impls, dtype, device, iters, warmup)
        if args.check:
            checked = [i for i in impls if i in ("upcycle", "grouped_mm", "liger")]
            block["rel_err_vs_fp32_reference"] = check_against_fp32(shape, checked, dtype, device)
        report["shapes"].append(block)
        if args.json_path != "-":
            print_table({"environment": report["environment"], "shapes": [block]}, header=len(report["shapes"]) == 1)
            sys.stdout.flush()
        if args.json_path and args.json_path != "-":  # after every shape, so a run stopped midway keeps its results
            with open(args.json_path, "w") as f:
                f.write(json.dumps(report, indent=1) + "\n")
    if args.json_path == "-":
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
