"""The memory plan of ``upcycle train RECIPE --dry-run`` against the peak RSS of the same run on the CPU.

What it measures, per variant (activation checkpointing off / on, sequence length), on SmolLM2-135M upcycled to
E8 top-2 (692 M parameters, fp32):

- **estimate**: the plan's rows and total, from :func:`upcycle.train.dry_run.dry_run` called in a fresh
  subprocess that first imports what the CLI imports for ``upcycle train --dry-run`` (``upcycle.cli``,
  ``upcycle.train.loop``), so its "runtime (this process, measured)" row is the RSS of a real fresh process, as a
  user's dry run prints it;
- **measured**: ``ru_maxrss`` of ``python -m upcycle train RECIPE`` run to completion in its own subprocess, as
  returned by ``os.wait4`` (KiB on Linux), i.e. the peak resident set of the whole training process;
- **ratios**: estimate / measured, and the same with the runtime row taken off both sides (the part the plan
  computes from the model's shape against the part of the measured peak above the bare process).

The recipe: Shakespeare (``asset:shakespeare/train``), 1 sequence per micro-batch, no accumulation, 3 steps, fp32,
``experts_implementation: grouped_mm``, no evaluation, no checkpoints, no export, no tensorboard, so the process
holds only what a training step needs. The dry-run child also tokenises the training text once (after its plan
is taken), so every measured run maps the token cache rather than building it.

The model is converted once with :func:`upcycle.convert.convert` into ``--work`` and reused on later runs. Before
each training run the script waits (polling every 10 s, up to ``--wait-minutes``) until ``MemAvailable`` exceeds
``--min-available`` GB, so that a run never pushes a shared machine out of memory; a variant still waiting at the
deadline is skipped and reported so. A run ended by SIGKILL (on a shared machine, the OOM killer when another job
grows meanwhile) is rerun after the same wait, up to ``--retries`` times; its peak so far is kept in the JSON.

Run: ``nice python benchmarks/memory_plan_check.py [--variants off-256,on-256] [--json PATH] [--work DIR]``.
The default runs all four variants (off/on x 256/1024 tokens): each needs 15-16 GiB and, on 2 cores, 1.5-10 min.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK = Path(tempfile.gettempdir()) / "upcycle-memory-plan-check"
MODEL_NAME = "smollm2-135m-e8t2"
# name -> (activation checkpointing, sequence length)
VARIANTS = {
    "off-256": (False, 256),
    "on-256": (True, 256),
    "off-1024": (False, 1024),
    "on-1024": (True, 1024),
}
DEFAULT_VARIANTS = "off-256,on-256,off-1024,on-1024"
GB = 1000**3
MIB = 1024**2


# --------------------------------------------------------------------------------------------------
# Child side: the plan, in a fresh process as `upcycle train RECIPE --dry-run` computes it.
# --------------------------------------------------------------------------------------------------


def child_plan(recipe_path: Path) -> None:
    import upcycle.cli  # noqa: F401  (the CLI's own imports, so the runtime row matches a user's dry run)
    import upcycle.train.loop  # noqa: F401  (imported by `upcycle train` before it plans)
    from upcycle.train.dry_run import dry_run
    from upcycle.train.packing import packed_dataset
    from upcycle.train.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    plan = dry_run(recipe).plan
    print(json.dumps({"rows": [[name, count, how] for name, count, how in plan.rows], "total": plan.total}))
    sys.stdout.flush()
    # after the plan (its runtime row is already taken): warm the token cache for the measured runs
    cache = Path(recipe.data.cache_dir) if recipe.data.cache_dir else None
    files = [Path(f) for f in recipe.data.train]
    packed_dataset(files, Path(recipe.model.path), recipe.data.seq_len, recipe.data.text_field, cache)


# --------------------------------------------------------------------------------------------------
# Parent side.
# --------------------------------------------------------------------------------------------------


def converted_model(work: Path) -> Path:
    """SmolLM2-135M upcycled to E8 top-2 (fp32, as the source is stored), converted once and reused."""
    out = work / MODEL_NAME
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        print(f"model: reusing {out}")
        return out
    from upcycle.assets import smollm2_folder
    from upcycle.convert import UpcycleOptions
    from upcycle.upcycling import convert

    work.mkdir(parents=True, exist_ok=True)
    src = smollm2_folder()
    print(f"model: converting {src} -> {out}")
    convert(src, out, UpcycleOptions(experts=8, top_k=2))
    return out


def recipe_text(model: Path, run_dir: Path, checkpointing: bool, seq_len: int, steps: int) -> str:
    import yaml

    data = {
        "model": {
            "path": str(model),
            "experts_implementation": "grouped_mm",
            "activation_checkpointing": checkpointing,
        },
        "data": {"train": ["asset:shakespeare/train"], "seq_len": seq_len},  # no eval: only training steps
        "batch": {"micro_batch_size": 1, "grad_accum": 1, "steps": steps},
        "optim": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 1},
        "run": {
            "output_dir": str(run_dir),
            "precision": "fp32",
            "eval_interval": 0,
            "checkpoint_interval": 0,
            "checkpoints": False,
            "export": False,
            "tensorboard": False,
            "log_interval": 1,
        },
    }
    return yaml.safe_dump(data, sort_keys=False)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def wait_for_memory(need: int, minutes: float) -> bool:
    deadline = time.monotonic() + minutes * 60
    announced = False
    while True:
        free = mem_available()
        if free > need:
            if announced:
                print(f"  memory: {free / GB:.1f} GB available, going on")
            return True
        if time.monotonic() > deadline:
            print(f"  memory: still only {free / GB:.1f} GB available after {minutes:g} min, skipping")
            return False
        if not announced:
            print(f"  memory: {free / GB:.1f} GB available, waiting for more than {need / GB:.0f} GB ...", flush=True)
            announced = True
        time.sleep(10)


def measure(cmd: list[str], log: Path) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit status) of one child process, from os.wait4's rusage."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, rusage.ru_maxrss * 1024, proc.returncode


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def plan_of(recipe: Path, log: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-plan", str(recipe)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"the dry-run child failed ({done.returncode}):\n{tail(log)}")
    return json.loads(done.stdout.splitlines()[0])


def runtime_row(rows: list) -> int:
    return next((count for name, count, _ in rows if name.startswith("runtime")), 0)


def mib(count: int | None) -> str:
    return "-" if count is None else f"{count / MIB:,.0f}"


def ratio(a: int | None, b: int | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def report(results: list[dict]) -> None:
    print()
    print(
        "| variant | tokens | activation checkpointing | estimate (MiB) | measured peak RSS (MiB) | estimate / "
        "measured | estimate − runtime (MiB) | measured − runtime (MiB) | ratio without runtime | wall (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        est, meas, rt = r["estimate_bytes"], r.get("measured_peak_rss_bytes"), r["runtime_row_bytes"]
        est_x, meas_x = est - rt, (meas - rt if meas else None)
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") else "-"
        print(
            f"| {r['variant']} | {r['tokens']} | {'on' if r['activation_checkpointing'] else 'off'} | {mib(est)} | "
            f"{mib(meas)} | {ratio(est, meas)} | {mib(est_x)} | {mib(meas_x)} | {ratio(est_x, meas_x)} | {wall} |"
        )
    print()
    names = [name for name, _, _ in results[0]["rows"]]
    print("| plan row (MiB) | " + " | ".join(r["variant"] for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for i, name in enumerate(names):
        print(f"| {name} | " + " | ".join(mib(r["rows"][i][1]) for r in results) + " |")
    print("| **total** | " + " | ".join(mib(r["estimate_bytes"]) for r in results) + " |")
    notes = [f"{r['variant']}: {r['note']}" for r in results if r.get("note")]
    for note in notes:
        print(f"note: {note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list out of {','.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=3, help="optimiser steps per measured run")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="work folder (the converted model is kept there)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--min-available", type=float, default=15.0, help="GB of MemAvailable needed before each run")
    p.add_argument("--wait-minutes", type=float, default=30.0, help="how long to wait for that memory")
    p.add_argument("--retries", type=int, default=2, help="reruns of a run the OOM killer ended (SIGKILL)")
    p.add_argument("--child-plan", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_plan:
        child_plan(args.child_plan)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    versions = {
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
    }
    print(
        f"python {versions['python']}, torch {versions['torch']}, transformers {versions['transformers']}, "
        f"{os.cpu_count()} CPU(s), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GB:.1f} GB"
    )
    model = converted_model(args.work)
    results = []
    for name in variants:
        checkpointing, seq_len = VARIANTS[name]
        folder = args.work / name
        folder.mkdir(parents=True, exist_ok=True)
        run_dir = folder / "run"
        recipe = folder / "recipe.yaml"
        recipe.write_text(recipe_text(model, run_dir, checkpointing, seq_len, args.steps))
        print(f"{name}: planning (fresh process)", flush=True)
        plan = plan_of(recipe, folder / "dry-run.log")
        result = {
            "variant": name,
            "activation_checkpointing": checkpointing,
            "seq_len": seq_len,
            "tokens": seq_len,  # micro_batch_size 1
            "steps": args.steps,
            "rows": plan["rows"],
            "estimate_bytes": plan["total"],
            "runtime_row_bytes": runtime_row(plan["rows"]),
        }
        results.append(result)
        killed = []
        for _ in range(args.retries + 1):
            if not wait_for_memory(int(args.min_available * GB), args.wait_minutes):
                status = None
                break
            if run_dir.exists():
                shutil.rmtree(run_dir)
            print(f"{name}: training {args.steps} steps of {seq_len} tokens (measured)", flush=True)
            cmd = [sys.executable, "-m", "upcycle", "train", str(recipe)]
            wall, peak, status = measure(cmd, folder / "train.log")
            if status != -signal.SIGKILL:
                break
            # on a shared machine the kernel's OOM killer may pick this run when another job grows: wait, retry
            killed.append(peak)
            print(f"  killed (SIGKILL, most likely the OOM killer) at {mib(peak)} MiB; retrying", flush=True)
        if killed:
            result["killed_runs_peak_rss_bytes"] = killed
        if status is None:
            result["note"] = "skipped: not enough memory available"
            continue
        if status != 0:
            result["note"] = f"training failed with status {status}"
            print(f"  failed ({status}):\n{tail(folder / 'train.log')}")
            continue
        result |= {"measured_peak_rss_bytes": peak, "wall_s": wall}
        print(f"  estimate {mib(plan['total'])} MiB, measured {mib(peak)} MiB, {wall:.0f} s", flush=True)
    report(results)
    if args.json:
        figures = {"versions": versions, "cpus": os.cpu_count(), "model": str(model), "variants": results}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
