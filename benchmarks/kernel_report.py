"""What the compiler makes of upcycle's MoE kernels on Hopper (sm_90), measured on any machine, no GPU needed.

For each shape it plans every launch one training step of an experts layer makes (forward and backward), for
every config the autotuner would try, compiles each for the target architecture with triton's own compiler
(on this machine's CPU) and reads the cubin: registers, local-memory spills, shared memory, whether `tl.dot`
became warp-group MMA (HGMMA) and whether the loads were pipelined (LDGSTS). It also times compiling the whole
set of one shape one kernel at a time against compiling it on a thread pool the way `upcycle.kernels.precompile`
does before a shape's first launch (the same code), in fresh triton caches, and prints the ratio: the compile
part of the kernels' first-call cost. Compiling goes through triton's JIT warm-up under a compile-only driver
that names the target, so the specialisations are the ones a GPU run gets.

    python benchmarks/kernel_report.py                      # the four reference shapes, table
    python benchmarks/kernel_report.py --check              # exit 1 if any candidate spills, misses wgmma, ...
    python benchmarks/kernel_report.py --json out.json --compare-serial

Run it without TRITON_INTERPRET (the interpreter replaces the kernels). It never launches anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict

import torch

from upcycle.kernels.cross_compile import (
    REFERENCE_SHAPES,
    CompileReport,
    PlannedLaunch,
    compile_all,
    plan_launches,
    problems,
)


def identity(p: PlannedLaunch) -> tuple:
    """Launches that compile to the same binary (same kernel, integer arguments, dtypes and options)."""
    ints = tuple(a for a in p.launch.args if isinstance(a, int))
    dtypes = tuple(str(a.dtype) for a in p.launch.args if isinstance(a, torch.Tensor))
    return (p.launch.name, ints, dtypes, tuple(sorted(p.launch.kwargs.items())))


def timed_compile(planned: list[PlannedLaunch], arch: int, parallel: bool) -> tuple[list[CompileReport], float]:
    """Compile in a fresh, empty triton cache so nothing is reused from an earlier run."""
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:
        previous = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            start = time.perf_counter()
            reports = compile_all(planned, arch, parallel)
            return reports, time.perf_counter() - start
        finally:
            if previous is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = previous


def row(r: CompileReport, arch: int) -> dict:
    cfg = r.config
    return {
        **{k: v for k, v in asdict(r).items() if k != "config"},
        "config": None if cfg is None else [cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages],
        "problems": problems(r, arch),
    }


def print_rows(rows: list[dict]) -> None:
    print(
        f"{'site':<10}{'kernel':<22}{'N':>7}{'K':>7}  {'bm,bn,bk,warps,stages':<22}{'compile s':>10}{'regs':>6}"
        f"{'stack':>7}{'STL':>5}{'smem KB':>9}{'HGMMA':>7}{'LDGSTS':>8}  problems"
    )

    def fmt(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds:.2f}"

    for r in rows:
        cfg = "-" if r["config"] is None else ",".join(map(str, r["config"]))
        print(
            f"{r['site']:<10}{r['kernel']:<22}{r['n'] or '-':>7}{r['k'] or '-':>7}  {cfg:<22}{fmt(r['compile_s']):>10}"
            f"{r['registers']:>6}{r['stack_bytes']:>7}{r['spill_stores']:>5}{r['shared_bytes'] / 1024:>9.1f}"
            f"{r['wgmma']:>7}{r['async_copies']:>8}  {'; '.join(r['problems']) or 'ok'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [s.name for s in REFERENCE_SHAPES]
    parser.add_argument("--shapes", nargs="*", default=names, choices=names, metavar="SHAPE", help=", ".join(names))
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper, 80 = Ampere)")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--inference", action="store_true", help="forward launches only (default: forward+backward)")
    parser.add_argument(
        "--compare-serial", action="store_true", help="also compile the first shape's set one kernel at a time"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if any config has a problem")
    parser.add_argument("--json", dest="json_path", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernel_report: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    report: dict = {
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (compiling only; no GPU used)",
            "target": f"sm_{args.arch}",
            "dtype": args.dtype,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "compile_threads": min(os.cpu_count() or 1, 32),
        },
        "shapes": [],
    }
    seen: set[tuple] = set()
    failed = 0
    for index, shape in enumerate(s for s in REFERENCE_SHAPES if s.name in args.shapes):
        planned = plan_launches(shape, dtype, training=not args.inference, arch=args.arch)
        unique = list({identity(p): p for p in planned}.values())
        block: dict = {"shape": asdict(shape), "launches": len(unique)}
        reports, parallel_s = timed_compile(unique, args.arch, parallel=True)
        block["compile_parallel_s"] = parallel_s
        if args.compare_serial and index == 0:
            serial_reports, serial_s = timed_compile(unique, args.arch, parallel=False)
            reports = serial_reports  # per-kernel compile times, each measured alone
            block["compile_serial_s"] = serial_s
        rows = [row(r, args.arch) for r, p in zip(reports, unique, strict=True) if identity(p) not in seen]
        seen.update(identity(p) for p in unique)
        block["results"] = rows
        failed += sum(bool(r["problems"]) for r in rows)
        report["shapes"].append(block)
        threads = report["environment"]["compile_threads"]
        head = f"\n## {shape.name}: {len(unique)} distinct compiles, {parallel_s:.1f} s on {threads} threads"
        print(head, end="")
        if "compile_serial_s" in block:
            print(f"; one at a time {block['compile_serial_s']:.1f} s ({block['compile_serial_s'] / parallel_s:.2f}x)")
        else:
            print()
        print_rows(rows)  # configs already shown for an earlier shape are not repeated
    env = report["environment"]
    print(f"\n# {env['date']}  {env['machine']}  target {env['target']}  torch {env['torch']}  triton {env['triton']}")
    print(f"# configs with a problem: {failed}")
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(report, handle, indent=1)
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
