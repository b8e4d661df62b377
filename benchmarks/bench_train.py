"""Training throughput: ``upcycle train`` vs a plain PyTorch loop over the same transformers MoE, and the dense model.

What it measures, per route, in the same run, each route in its own fresh subprocess (its own imports, its own
empty compile and autotune caches unless ``--cache-dir`` is given):

- **time to first step**: from just before the child process is spawned to the end of its first optimiser step
  (GPU synchronised), so it includes starting Python, imports, loading the model, compilation and autotuning;
- **steady tokens/s**: tokens per step (micro-batch x sequence length) / the median step time over the steps
  after ``--warmup``; a step is timed from the end of the previous one to its own end, after a
  ``torch.cuda.synchronize()`` on a GPU, so everything a loop does between steps counts;
- **peak memory**: ``torch.cuda.max_memory_allocated()`` on a GPU; on the CPU the child's own ``ru_maxrss``;
- **TFLOP/s and MFU**: steady tokens/s x FLOPs per token, counted by the rule ``upcycle compare`` uses
  (:func:`upcycle.experiments.flops.model_cost`, :data:`upcycle.experiments.flops.FLOPS_FORMULA`: the PaLM appendix
  convention,
  every matmul forward and backward, attention over the full S x S square, only top-k of the E experts). MFU
  is against the device's dense bf16 peak (a small table keyed on the device name, or ``--peak-tflops``); none
  on the CPU.

Routes (``--routes``, comma list):

1. ``upcycle``: :func:`upcycle.train.loop.train` with a recipe built in code: the same batch, sequence length,
   steps and constant LR, ``experts_implementation: auto`` (upcycle's Triton kernels on a CUDA GPU, else
   transformers' grouped_mm), its defaults otherwise (aux loss 1e-2, gradient clipping at 1.0, fp32 master
   weights with bf16 autocast on a GPU), and the run section compare's runs use
   (:func:`upcycle.experiments.paper_recipe.measurement_run`: no evaluation, export, checkpoint or TensorBoard);
2. ``plain-eager``: the loop everyone writes: ``AutoModelForCausalLM.from_pretrained`` (transformers' default
   ``grouped_mm`` experts), ``torch.optim.AdamW`` with its defaults but the same LR, betas, eps and weight
   decay, then per step ``model(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad()`` on the
   very same batches upcycle's loop draws (same seed, same order, written by the untimed preparation step);
   no aux loss, no clipping; ``loss.item()`` each step, as upcycle's loop does (a device sync either way);
3. ``plain-compile``: the same loop over ``torch.compile(model)``; if it has not finished its first step
   within ``--compile-timeout`` seconds it is stopped and the table says so;
4. ``dense-eager``: the plain eager loop over the dense source model (the same layers), for reference;

and, on request only, ``upcycle-compile`` (the recipe with ``run.compile: true``) and ``dense-compile``.

Before the routes, an untimed preparation child resolves the defaults for the device, makes the truncated copy
(if any), upcycles it with :func:`upcycle.convert.convert` (E8 top-2 by default) into the temporary work folder
(deleted at the end unless ``--keep``), tokenises the Shakespeare training text into upcycle's token cache (so
no route pays for tokenising) and writes the batches of every step for the plain routes.

On a GPU the plain routes load the model in bf16 (pure bf16 weights and AdamW state: the fastest plain set-up,
and the one transformers' grouped_mm runs in bf16 under both eager and torch.compile); ``--plain-precision
autocast`` gives them upcycle's numerics instead (fp32 weights, bf16 autocast; grouped_mm is not autocast-aware,
so transformers then runs the experts in fp32, and under torch.compile through its per-expert fallback). On the
CPU everything runs in fp32 and, by default, on a copy of the dense model cut to its first ``--layers 4``
decoder layers (upcycled the same way), because the full SmolLM2 E8 MoE with AdamW needs 12-16 GB there.

Run: ``nice python benchmarks/bench_train.py [--routes ...] [--steps N] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROUTES = ("upcycle", "plain-eager", "plain-compile", "dense-eager", "upcycle-compile", "dense-compile")
DEFAULT_ROUTES = ROUTES[:4]
BASELINE = "plain-compile"  # the route the goal is stated against
GOAL_RATIO = 1.25  # upcycle tokens/s >= this x the compiled plain loop's ...
GOAL_FIRST_STEP_S = 30.0  # ... with its first step done within this many seconds of process start

# Dense bf16 tensor-core peak per device (no sparsity), matched as a substring of torch.cuda.get_device_name();
# the first match wins, so the more specific names come first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)

GPU_DEFAULTS = {"layers": 0, "batch": 16, "seq": 2048, "steps": 30, "warmup": 10}
CPU_DEFAULTS = {"layers": 4, "batch": 4, "seq": 128, "steps": 8, "warmup": 3}


# --------------------------------------------------------------------------------------------------
# Child side: `python bench_train.py --child ROUTE --spec FILE`; nothing here runs in the parent.
# --------------------------------------------------------------------------------------------------


class Events:
    """JSON lines appended (and flushed) as a child goes, so a killed child still leaves what it did."""

    def __init__(self, path: str, t0: float) -> None:
        self.handle = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the child
        self.t0 = t0

    def emit(self, event: str, **data: Any) -> None:
        self.handle.write(json.dumps({"event": event, "t": time.time() - self.t0, **data}) + "\n")


def _peak_memory(torch: Any, device: Any) -> dict[str, Any]:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "peak_kind": "cuda max_memory_allocated",
                "rss_bytes": rss}  # fmt: skip
    return {"peak_bytes": rss, "peak_kind": "ru_maxrss", "rss_bytes": rss}


class StepClock:
    """Per-step wall times: end of one step to the end of the next, after a device synchronisation."""

    def __init__(self, torch: Any, device: Any, events: Events, steps: int) -> None:
        self.torch, self.device, self.events, self.steps = torch, device, events, steps
        self.previous: float | None = None

    def tick(self, step: int, loss: float, first_seconds: float | None = None, **extra: Any) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        seconds = now - self.previous if self.previous is not None else first_seconds
        self.previous = now
        data = {"step": step, "seconds": seconds, "loss": loss, **extra}
        if step == self.steps:
            data.update(_peak_memory(self.torch, self.device))
        self.events.emit("step", **data)


def child_plain(spec: dict[str, Any], events: Events) -> None:
    """The plain loop: from_pretrained, AdamW, forward with labels, backward, step; optionally torch.compile."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    events.emit("imported")
    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    batches = np.load(spec["batches"])  # [steps, batch, seq] int64: the sequences upcycle's loop draws
    bf16_weights = device.type == "cuda" and spec["plain_precision"] == "bf16"
    use_autocast = device.type == "cuda" and spec["plain_precision"] == "autocast"
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16 if bf16_weights else torch.float32)
    model.config.use_cache = False
    model.to(device).train()
    o = spec["optim"]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"]
    )
    run = torch.compile(model) if spec["compile"] else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
    events.emit(
        "loaded",
        experts_implementation=getattr(model.config, "_experts_implementation", None),
        weights_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        autocast=use_autocast,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    )
    clock = StepClock(torch, device, events, spec["steps"])
    first_start = time.perf_counter()
    for step in range(spec["steps"]):
        batch = torch.from_numpy(batches[step]).to(device)
        with autocast:
            loss = run(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick(step + 1, loss.item(), first_seconds=time.perf_counter() - first_start)


class _BenchReporter:
    """upcycle's Reporter protocol: times each step as it is reported (after a device synchronisation)."""

    def __init__(self, clock_factory: Any, events: Events) -> None:
        self.clock_factory, self.events, self.clock = clock_factory, events, None

    def start(self, info: dict[str, Any]) -> None:
        self.clock = self.clock_factory(info)
        self.events.emit("loaded", **{k: info.get(k) for k in ("experts_implementation", "precision", "device")})

    def step(self, record: dict[str, Any]) -> None:
        assert self.clock is not None
        self.clock.tick(
            record["step"],
            record["loss"],
            first_seconds=record["step_seconds"],
            loop_seconds=record["step_seconds"],
            aux_loss=record.get("aux_loss"),
        )

    def evaluated(self, record: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        self.events.emit("message", text=text)


def child_upcycle(spec: dict[str, Any], events: Events) -> None:
    """upcycle's own loop, driven by a recipe built in code (the training files are already absolute)."""
    import dataclasses

    import torch

    from upcycle.experiments.paper_recipe import measurement_run
    from upcycle.train.loop import train
    from upcycle.train.recipe import TrainRecipe
    from upcycle.train.recipe_sections import BatchSection, DataSection, ModelSection, OptimSection

    events.emit("imported")
    o = spec["optim"]
    recipe = TrainRecipe(
        model=ModelSection(path=spec["model"], experts_implementation="auto"),
        data=DataSection(train=tuple(spec["train_files"]), seq_len=spec["seq"]),
        batch=BatchSection(micro_batch_size=spec["batch"], grad_accum=1, steps=spec["steps"]),
        optim=OptimSection(
            lr=o["lr"],
            min_lr=o["lr"],
            warmup_steps=0,
            schedule="constant",
            betas=tuple(o["betas"]),
            eps=o["eps"],
            weight_decay=o["weight_decay"],
        ),
        run=dataclasses.replace(measurement_run(spec["output_dir"], spec["seed"]), compile=spec["compile"]),
    )

    def clock_factory(info: dict[str, Any]) -> StepClock:
        return StepClock(torch, torch.device(info["device"]), events, spec["steps"])

    summary = train(recipe, _BenchReporter(clock_factory, events))
    events.emit("finished", train_seconds=summary.seconds)


def flops_info(folder: Path, seq: int) -> dict[str, Any]:
    """Parameter counts and FLOPs per token by upcycle's one rule (upcycle.experiments.flops.model_cost)."""
    from upcycle.experiments.flops import FLOPS_FORMULA, model_cost

    cost = model_cost(folder)
    return {
        "class": cost.architecture,
        "params_total": cost.total_params,
        "params_active_matmul": cost.active_params,
        "layers": cost.layers,
        "attention_width": cost.attn_width,
        "flops_per_token": cost.flops_per_token(seq),
        "flops_formula": f"{FLOPS_FORMULA} with N_active = {cost.active_params:,}, seq_len = {seq}",
    }


def truncated_copy(src: Path, dst: Path, layers: int) -> None:
    """A dense HF folder holding only the first ``layers`` decoder layers (weights, config and tokenizer)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((src / "config.json").read_text())
    total = config["num_hidden_layers"]
    if not 1 <= layers <= total:
        raise SystemExit(f"--layers {layers}: the model has {total} layers")
    tensors = {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                m = re.match(r"model\.layers\.(\d+)\.", key)
                if m is None or int(m.group(1)) < layers:
                    tensors[key] = handle.get_tensor(key)
    if not tensors:
        raise SystemExit(f"{src} holds no .safetensors weights (a truncated copy needs them)")
    dst.mkdir(parents=True)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config["num_hidden_layers"] = layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:layers]
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in src.iterdir():
        weights = path.name.endswith((".safetensors", ".index.json", ".bin"))
        if path.is_file() and not weights and path.name != "config.json":
            shutil.copy2(path, dst / path.name)


def child_prepare(spec: dict[str, Any], events: Events) -> None:
    """Resolve defaults for the device, build the models (truncated copy, upcycle), tokenise, write the batches."""
    import numpy as np
    import torch
    import transformers

    from upcycle.assets import shakespeare_split, smollm2_folder
    from upcycle.convert import UpcycleOptions
    from upcycle.train.batch_order import BatchOrder
    from upcycle.train.packing import make_batch, packed_dataset
    from upcycle.upcycling import convert

    cuda = torch.cuda.is_available() and spec["device"] != "cpu"
    settings = dict(GPU_DEFAULTS if cuda else CPU_DEFAULTS)
    settings.update({k: v for k, v in spec["given"].items() if v is not None})
    work = Path(spec["work"])
    source = Path(spec["source"]) if spec["source"] else smollm2_folder()
    full_layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    dense = source
    if settings["layers"] and settings["layers"] < full_layers:
        dense = work / f"dense-{settings['layers']}-layers"
        truncated_copy(source, dense, settings["layers"])
    else:
        settings["layers"] = full_layers
    moe = work / f"moe-e{spec['experts']}-top{spec['top_k']}"
    started = time.perf_counter()
    convert(dense, moe, UpcycleOptions(experts=spec["experts"], top_k=spec["top_k"]))
    convert_s = time.perf_counter() - started

    train_files, _ = shakespeare_split()
    dataset = packed_dataset(train_files, moe, settings["seq"])  # fills the cache upcycle's loop reads
    order = BatchOrder(len(dataset), spec["seed"])
    b = settings["batch"]
    batches = np.stack(
        [make_batch(dataset, order.local_micro_batches(s, b, b)[0]).numpy() for s in range(settings["steps"])]
    )
    np.save(work / "batches.npy", batches)
    events.emit(
        "prepared",
        settings=settings,
        full_layers=full_layers,
        device="cuda" if cuda else "cpu",
        device_name=torch.cuda.get_device_name(0) if cuda else f"CPU x {os.cpu_count()}",
        torch=torch.__version__,
        transformers=transformers.__version__,
        source=str(source),
        dense=str(dense),
        moe=str(moe),
        convert_s=convert_s,
        moe_bytes=sum(p.stat().st_size for p in moe.iterdir()),
        train_files=[str(p.absolute()) for p in train_files],
        train_sequences=len(dataset),
        batches=str(work / "batches.npy"),
        flops={"dense": flops_info(dense, settings["seq"]), "moe": flops_info(moe, settings["seq"])},
    )


def child_main(route: str, spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    events = Events(spec["events"], float(os.environ.get("BENCH_T0", time.time())))
    if route == "prepare":
        child_prepare(spec, events)
    elif route.startswith("upcycle"):
        child_upcycle(spec, events)
    else:
        child_plain(spec, events)
    events.emit("done")
    return 0


# --------------------------------------------------------------------------------------------------
# Parent side: spawning, watching, reporting. It never imports torch (its RSS would be every child's floor).
# --------------------------------------------------------------------------------------------------


@dataclass
class RouteRun:
    route: str
    repeat: int
    wall_s: float = 0.0
    returncode: int | None = None
    rss_bytes_wait4: int = 0
    killed: str | None = None
    error: str | None = None
    imported_s: float | None = None
    loaded_s: float | None = None
    first_step_s: float | None = None
    step_seconds: list[float] = field(default_factory=list)
    loop_step_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    peak_kind: str | None = None
    loaded: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    def steady_seconds(self, warmup: int) -> float | None:
        timed = self.step_seconds[warmup:] if len(self.step_seconds) > warmup else self.step_seconds[1:]
        return statistics.median(timed) if timed else None


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def tail(path: Path, lines: int = 20) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def child_env(cache_root: Path, cpu: bool) -> dict[str, str]:
    """Offline, quiet, and with this route's own compile/autotune caches."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TORCHINDUCTOR_CACHE_DIR=str(cache_root / "inductor"),
        TRITON_CACHE_DIR=str(cache_root / "triton"),
        UPCYCLE_KERNELS_CACHE_DIR=str(cache_root / "upcycle-kernels"),
    )
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["UPCYCLE_DEVICE"] = "cpu"
    return env


def spawn(
    route: str,
    spec: dict[str, Any],
    work: Path,
    env: dict[str, str],
    first_step_timeout: float | None,
    timeout: float | None,
) -> tuple[float, int | None, int, str | None]:
    """Run one child; (wall s, exit code or None if killed, ru_maxrss bytes from wait4, why it was killed)."""
    spec_path = work / f"{spec['name']}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log = work / f"{spec['name']}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", route, "--spec", str(spec_path)]
    killed, kill_at = None, float("inf")
    with log.open("ab") as handle:
        start = time.perf_counter()
        env = dict(env, BENCH_T0=repr(time.time()))
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.perf_counter() - start
            if killed is None:
                stepped = first_step_timeout is not None and any(
                    e.get("event") == "step" for e in read_events(Path(spec["events"]))
                )
                if first_step_timeout is not None and not stepped and elapsed > first_step_timeout:
                    killed = f"no first step within {first_step_timeout:.0f} s (still compiling or loading); stopped"
                elif timeout is not None and elapsed > timeout:
                    killed = f"not finished within {timeout:.0f} s; stopped"
                if killed:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
                    kill_at = time.perf_counter() + 10
            elif time.perf_counter() > kill_at:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.5)
        wall = time.perf_counter() - start
    if killed:  # compile workers share the child's session: make sure none outlives it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
    return wall, (None if killed else proc.returncode), int(rusage.ru_maxrss) * 1024, killed


def collect(run: RouteRun, events: list[dict[str, Any]]) -> None:
    for e in events:
        kind = e.get("event")
        if kind == "imported":
            run.imported_s = e["t"]
        elif kind == "loaded":
            run.loaded_s = e["t"]
            run.loaded = {k: v for k, v in e.items() if k not in ("event", "t")}
        elif kind == "step":
            if e["step"] == 1:
                run.first_step_s = e["t"]
            run.step_seconds.append(e["seconds"])
            run.losses.append(e["loss"])
            if e.get("loop_seconds") is not None:
                run.loop_step_seconds.append(e["loop_seconds"])
            if "peak_bytes" in e:
                run.peak_bytes, run.peak_kind = e["peak_bytes"], e["peak_kind"]
        elif kind == "message":
            run.messages.append(e["text"])


def route_spec(route: str, prepared: dict[str, Any], args: argparse.Namespace, work: Path, rep: int) -> dict[str, Any]:
    s = prepared["settings"]
    name = f"{route}-{rep}"
    return {
        "name": name,
        "route": route,
        "model": prepared["dense"] if route.startswith("dense") else prepared["moe"],
        "compile": route.endswith("compile"),
        "device": prepared["device"],
        "batches": prepared["batches"],
        "train_files": prepared["train_files"],
        "batch": s["batch"],
        "seq": s["seq"],
        "steps": s["steps"],
        "seed": args.seed,
        "optim": {"lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
        "plain_precision": args.plain_precision,
        "output_dir": str(work / f"{name}-run"),
        "events": str(work / f"{name}.events.jsonl"),
    }


def peak_flops(device_name: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, f"--peak-tflops {override:g}"
    for key, value in PEAK_BF16_FLOPS:
        if key in device_name:
            return value, f"{key} dense bf16 peak {value / 1e12:.0f} TFLOP/s"
    return None, f"no peak known for {device_name!r} (pass --peak-tflops)"


def summarise(runs: list[RouteRun], warmup: int, tokens_per_step: int, flops_per_token: float) -> dict[str, Any]:
    """Medians over the repeats of one route (a repeat that did not step is left out)."""
    ok = [r for r in runs if r.steady_seconds(warmup) is not None]

    def med(values: list[float | None]) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    step_s = med([r.steady_seconds(warmup) for r in ok])
    tps = tokens_per_step / step_s if step_s else None
    loop_tps = med([tokens_per_step / statistics.median(r.loop_step_seconds[warmup:] or r.loop_step_seconds)
                    for r in ok if r.loop_step_seconds])  # fmt: skip
    last = runs[-1] if runs else None
    return {
        "tokens_per_s": tps,
        "step_s": step_s,
        "first_step_s": med([r.first_step_s for r in runs]),
        "loaded_s": med([r.loaded_s for r in runs]),
        "imported_s": med([r.imported_s for r in runs]),
        "wall_s": med([r.wall_s for r in runs]),
        "peak_bytes": med([r.peak_bytes for r in ok]),
        "peak_kind": next((r.peak_kind for r in ok if r.peak_kind), None),
        "tflops": tps * flops_per_token / 1e12 if tps else None,
        "loop_reported_tokens_per_s": loop_tps,
        "first_loss": ok[0].losses[0] if ok and ok[0].losses else None,
        "last_loss": ok[0].losses[-1] if ok and ok[0].losses else None,
        "steps_done": max((len(r.step_seconds) for r in runs), default=0),
        "loaded": last.loaded if last else {},
        "failed": next((r.killed or r.error for r in runs if r.killed or r.error), None),
        "crashed": any(r.error for r in runs),
    }


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{format(value, spec)}{suffix}"


def report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from upcycle.experiments.flops import FLOPS_FORMULA

    p, s = result["prepared"], result["prepared"]["settings"]
    summaries = result["summaries"]
    base, eager = summaries.get(BASELINE, {}), summaries.get("plain-eager", {})
    console = Console(width=max(160, shutil.get_terminal_size().columns))
    truncated = s["layers"] < p["full_layers"]
    model = f"{Path(p['source']).name}" + (f" cut to {s['layers']} of {p['full_layers']} layers" if truncated else "")
    title = (
        f"{model} -> E{result['experts']} top-{result['top_k']}, {p['device_name']}, {result['precision']}, "
        f"batch {s['batch']} x {s['seq']}, {s['steps']} steps (median over steps {s['warmup'] + 1}-{s['steps']})"
    )
    table = Table(title=title)
    columns = ["route", "experts impl", "tokens/s", "step ms", f"vs {BASELINE}", "vs plain-eager",
               "1st step s", "load s", "peak GB", "TFLOP/s", "MFU", "loss 1st -> last"]  # fmt: skip
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i < 2 else "right")
    peak = result["peak_flops"]
    for route in result["routes"]:
        r = summaries[route]
        impl = "- (dense)" if route.startswith("dense") else str(r["loaded"].get("experts_implementation"))
        if r["tokens_per_s"] is None:
            cells = ["-"] * 4 + [fmt(r["first_step_s"], ".1f"), fmt(r["loaded_s"], ".1f")] + ["-"] * 3
            table.add_row(route, impl, *cells, "stopped (below)" if not r["crashed"] else "FAILED (below)")
            continue
        vs_base = r["tokens_per_s"] / base["tokens_per_s"] if base.get("tokens_per_s") else None
        vs_eager = r["tokens_per_s"] / eager["tokens_per_s"] if eager.get("tokens_per_s") else None
        mfu = r["tflops"] * 1e12 / peak if peak and r["tflops"] else None
        table.add_row(
            route,
            impl,
            f"{r['tokens_per_s']:,.0f}",
            fmt(r["step_s"] * 1e3, ".0f"),
            fmt(vs_base, ".2f", "x"),
            fmt(vs_eager, ".2f", "x"),
            fmt(r["first_step_s"], ".1f"),
            fmt(r["loaded_s"], ".1f"),
            fmt(r["peak_bytes"] / 1e9 if r["peak_bytes"] else None, ".2f"),
            fmt(r["tflops"], ".3f"),
            fmt(mfu * 100 if mfu is not None else None, ".1f", "%"),
            f"{fmt(r['first_loss'], '.3f')} -> {fmt(r['last_loss'], '.3f')}",
        )
    console.print(table)
    lines = []
    up = summaries.get("upcycle", {})
    if up.get("tokens_per_s") and base.get("tokens_per_s"):
        ratio = up["tokens_per_s"] / base["tokens_per_s"]
        ok = ratio >= GOAL_RATIO and (up["first_step_s"] or 1e9) <= GOAL_FIRST_STEP_S
        lines.append(
            f"goal (stated for one H200, bf16, 16 x 2048): upcycle >= {GOAL_RATIO}x {BASELINE} and first step within "
            f"{GOAL_FIRST_STEP_S:.0f} s: {ratio:.2f}x, {up['first_step_s']:.1f} s -> {'met' if ok else 'NOT met'}"
            + ("" if p["device"] == "cuda" else " (CPU run: says nothing about the GPU goal)")
        )
    elif "upcycle" in summaries and BASELINE in summaries:
        lines.append(f"goal: not evaluated ({BASELINE} or upcycle has no steady figure; see below)")
    flops = p["flops"]
    lines.append(
        f"{FLOPS_FORMULA}: "
        + "; ".join(
            f"{name} N_active = {flops[key]['params_active_matmul']:,}, {flops[key]['flops_per_token'] / 1e9:.3f} GFLOP"
            for name, key in (("MoE", "moe"), ("dense", "dense"))
        )
        + f" (seq_len = {s['seq']})"
    )
    lines.append(f"MFU: {result['peak_note']}" if p["device"] == "cuda" else "MFU: none on the CPU")
    lines.append(
        "tokens/s = batch x seq / median step time; step = end of the previous step to the end of this one after "
        "a device sync; 1st step s = from spawning the process (imports, load, compile, autotune included); "
        f"peak = {up.get('peak_kind') or next((v['peak_kind'] for v in summaries.values() if v['peak_kind']), '-')}"
    )
    if truncated:
        lines.append(
            f"model: the first {s['layers']} decoder layers of the dense model (a truncated copy, upcycled the same "
            f"way), to fit the CPU's memory and time; --layers 0 runs all {p['full_layers']}"
        )
    lines.append(
        f"plain routes: {result['plain_note']}; upcycle: fp32 master weights"
        + (", bf16 autocast" if p["device"] == "cuda" else "")
        + ", aux loss 1e-2 and grad clipping 1.0 (its defaults); plain: LM loss only, no clipping"
    )
    if up.get("loop_reported_tokens_per_s"):
        loop_tps = up["loop_reported_tokens_per_s"]
        lines.append(f"upcycle's own progress figure (its step_seconds, no device sync): {loop_tps:,.0f} tokens/s")
    first = {k: v["first_loss"] for k, v in summaries.items() if v["first_loss"] is not None}
    moe_first = [v for k, v in first.items() if not k.startswith("dense")]
    dense_first = [v for k, v in first.items() if k.startswith("dense")]
    if len(moe_first) > 1:
        spread = max(moe_first) - min(moe_first)
        lines.append(f"same batches: the first-step LM losses of the MoE routes agree within {spread:.2e}")
    if moe_first and dense_first:
        lines.append(
            f"dense vs MoE first-step LM loss: {dense_first[0]:.6f} vs {moe_first[0]:.6f} (equal when the upcycle is "
            "exact and the precisions match)"
        )
    if p["device"] == "cpu" and any(r.endswith("compile") for r in result["routes"]):
        lines.append(
            "CPU, fp32: under torch.compile transformers' grouped_mm dispatch takes its per-expert fallback "
            "(torch.mm per expert): its grouped_mm is compiled for bf16 weights only"
        )
    lines.append(
        f"prepare (not timed in any route): convert {p['convert_s']:.1f} s, MoE folder {p['moe_bytes'] / 1e9:.2f} GB; "
        f"torch {p['torch']}, transformers {p['transformers']}; 1-min load average {result['loadavg'][0]:.1f} at "
        f"start, {result['loadavg'][1]:.1f} at end on {os.cpu_count()} CPUs"
    )
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=False)
    for route in result["routes"]:
        r = summaries[route]
        if r["failed"]:
            console.print(f"\n{route}: {r['failed']}", highlight=False, markup=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--routes", default=",".join(DEFAULT_ROUTES), help=f"comma list out of {','.join(ROUTES)}")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--source", type=Path, default=None, help="dense HF folder (default: SmolLM2-135M fp32)")
    p.add_argument("--layers", type=int, default=None,
                   help="keep the first N decoder layers (0 = all; default: all on a GPU, 4 on the CPU)")  # fmt: skip
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 16 GPU, 4 CPU)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048 GPU, 128 CPU)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per route (default 30 GPU, 8 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the median (default 10 GPU, 3 CPU)")
    p.add_argument("--lr", type=float, default=3e-4, help="constant learning rate of every route")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain-precision", choices=("bf16", "autocast"), default="bf16",
                   help="GPU only: plain routes in bf16 weights (default) or fp32 weights + bf16 autocast")  # fmt: skip
    p.add_argument("--compile-timeout", type=float, default=900.0,
                   help="stop a compiled route with no first step after this many seconds (default 900)")  # fmt: skip
    p.add_argument("--route-timeout", type=float, default=3600.0, help="stop any route after this many seconds")
    p.add_argument("--repeats", type=int, default=1, help="rounds, route order rotated; medians are shown")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: from the table)")
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="per-route compile/autotune caches kept here (default: fresh)"
    )
    p.add_argument("--json", action="store_true", help="print the raw numbers as JSON instead of the table")
    p.add_argument("--keep", action="store_true", help="keep the work folder (models, logs, events)")
    p.add_argument("--workdir", type=Path, default=None, help="where the work folder is made (MoE: ~2.8 GB fp32)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.spec)
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if unknown := sorted(set(routes) - set(ROUTES)):
        sys.exit(f"unknown route(s) {unknown}; choose from {','.join(ROUTES)}")
    for name in ("batch", "seq", "steps", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            sys.exit(f"--{name} must be at least 1")
    if args.seq is not None and args.seq < 2:
        sys.exit("--seq must be at least 2")

    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-train-", dir=args.workdir))
    cache_base = args.cache_dir.absolute() if args.cache_dir else work / "caches"
    cpu = args.device == "cpu"
    try:
        given = {"layers": args.layers, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                 "warmup": args.warmup}  # fmt: skip
        prep_spec = {"name": "prepare", "device": args.device, "given": given, "work": str(work),
                     "source": str(args.source.absolute()) if args.source else None, "experts": args.experts,
                     "top_k": args.top_k, "seed": args.seed, "events": str(work / "prepare.events.jsonl")}  # fmt: skip
        print("preparing (models, tokens, batches) ...", file=sys.stderr, flush=True)
        _, rc, _, _ = spawn("prepare", prep_spec, work, child_env(cache_base / "prepare", cpu), None, None)
        prepared = next((e for e in read_events(Path(prep_spec["events"])) if e["event"] == "prepared"), None)
        if rc != 0 or prepared is None:
            sys.exit(f"preparation failed (exit {rc}):\n{tail(work / 'prepare.log', 40)}")
        s = prepared["settings"]
        if prepared["device"] == "cpu":
            cpu = True
        runs: dict[str, list[RouteRun]] = {r: [] for r in routes}
        for rep in range(args.repeats):
            order = routes[rep % len(routes) :] + routes[: rep % len(routes)]
            for route in order:
                spec = route_spec(route, prepared, args, work, rep)
                env = child_env(cache_base / route, cpu)
                print(f"[round {rep + 1}/{args.repeats}] {route} ...", file=sys.stderr, flush=True)
                compiled = route.endswith("compile")
                wall, rc, rss, killed = spawn(
                    route, spec, work, env, args.compile_timeout if compiled else None, args.route_timeout
                )
                run = RouteRun(route, rep, wall, rc, rss, killed)
                events = read_events(Path(spec["events"]))
                collect(run, events)
                log = work / f"{spec['name']}.log"
                if killed is None and (rc != 0 or not any(e["event"] == "done" for e in events)):
                    run.error = f"exit status {rc}; log tail:\n{textwrap.indent(tail(log), '  ')}"
                elif killed:
                    run.killed = f"{killed}; log tail:\n{textwrap.indent(tail(log, 8), '  ')}"
                runs[route].append(run)
                shutil.rmtree(spec["output_dir"], ignore_errors=True)  # the final checkpoint upcycle writes
        tokens_per_step = s["batch"] * s["seq"]
        summaries = {
            route: summarise(
                rs,
                s["warmup"],
                tokens_per_step,
                prepared["flops"]["dense" if route.startswith("dense") else "moe"]["flops_per_token"],
            )
            for route, rs in runs.items()
        }
        peak, peak_note = peak_flops(prepared["device_name"], args.peak_tflops)
        on_gpu = prepared["device"] == "cuda"
        result = {
            "prepared": {k: v for k, v in prepared.items() if k not in ("event", "train_files")},
            "routes": routes,
            "experts": args.experts,
            "top_k": args.top_k,
            "precision": ("bf16 (upcycle: fp32 weights + autocast)" if on_gpu else "fp32"),
            "plain_note": (
                ("bf16 weights and AdamW state" if args.plain_precision == "bf16" else "fp32 weights, bf16 autocast")
                if on_gpu
                else "fp32"
            ),
            "peak_flops": peak if on_gpu else None,
            "peak_note": peak_note,
            "tokens_per_step": tokens_per_step,
            "summaries": summaries,
            "runs": {route: [asdict(r) for r in rs] for route, rs in runs.items()},
            "loadavg": [load_start, os.getloadavg()[0]],
            "lr": args.lr,
            "repeats": args.repeats,
            "kept": str(work) if args.keep else None,
        }
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            report(result)
            if args.keep:
                print(f"kept {work}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any(v["crashed"] for v in summaries.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
