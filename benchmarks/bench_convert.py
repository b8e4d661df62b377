"""Side-by-side cost of turning a dense checkpoint into an E8 top-2 bf16 MoE checkpoint.

What it measures, per route, in the same run:

- **wall time**: of the whole child process, from spawn to exit, so it *includes* starting Python and
  importing torch/transformers (a user pays that too);
- **peak RSS**: ``ru_maxrss`` of the child as returned by ``os.wait4`` (on Linux this also covers any
  descendants it waited for), measured, never estimated;
- **output bytes/s**: bytes of the output folder divided by the wall time.

Routes, each in its own fresh subprocess so imports and peak memory are per route:

1. ``upcycle``: :func:`upcycle.upcycling.convert` (plans from headers, streams tensor by tensor, the config
   check and the folder checks beside the writing), with a cache that has seen this model once (an untimed
   conversion before the rounds: its config facts are remembered, see docs/cache.md); ``upcycle-cold``, the same
   with an empty cache each round (the first conversion of a model); with ``--baseline REV`` also
   ``upcycle-baseline``, the package as it was at git revision REV on the warm cache (before/after in one run);
2. ``obvious``: the route everyone writes first with transformers: load the dense model in bf16, build a
   ``MixtralForCausalLM`` in memory, copy attention/norms/embeddings and the dense MLP into every expert,
   keep the random router, ``save_pretrained``;
3. ``mergekit-moe`` (PyPI ``mergekit``, ``gate_mode: random``) when an executable is found (``--mergekit``,
   ``PATH`` or ``.cache/mergekit-venv``), otherwise skipped with the reason;
4. ``cp -r`` of upcycle's output folder, the I/O floor for writing that many bytes, and ``import-torch``
   (``python -c "import torch"``): the goal is upcycle within 1.3x the two together.

Each upcycle route also reports, from inside the child, the seconds spent in the config check (the probe) and
in writing the tensors, so the probe's share of the wall time shows.

The routes run interleaved (one of each per round, the order rotated each round, ``cp`` last) and the table
shows the median over ``--repeats`` rounds.
Before the first run the source files are read once so that no route pays a cold page cache, and ``sync``
runs (untimed) between routes so that one route's dirty pages are not flushed on the next one's clock.
No route calls fsync: a route's time ends when its files are in the page cache, as for ``save_pretrained``.

Run: ``nice python benchmarks/bench_convert.py [--repeats 3] [--json] [--keep] [--check-outputs]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MERGEKIT_VENV_EXE = REPO / ".cache" / "mergekit-venv" / "bin" / "mergekit-moe"
ROUTES = ("upcycle", "upcycle-cold", "upcycle-baseline", "obvious", "mergekit-moe", "cp", "import-torch")
UPCYCLE_ROUTES = ("upcycle", "upcycle-cold", "upcycle-baseline")
MERGEKIT_FLAGS = ["--device", "cpu", "--lazy-unpickle", "--allow-crimes",
                  "--i-understand-this-is-not-useful-without-training"]  # fmt: skip
COMPARED = ("obvious", "mergekit-moe")  # the routes the goal is stated against
GOAL_SPEEDUP = 3.0  # upcycle must be at least this much faster ...
GOAL_MEMORY = 4.0  # ... and use at most 1/this of the peak RSS
GOAL_FLOOR = 1.3  # ... and take at most this times cp of its output plus `import torch`
STAGES_ENV = "BENCH_CONVERT_STAGES"  # where an upcycle child writes its stage seconds (JSON)


# --------------------------------------------------------------------------------------------------
# Child side: the conversion routes, each run as `python bench_convert.py --child ROUTE ...`.
# --------------------------------------------------------------------------------------------------


def child_upcycle(src: Path, out: Path, experts: int, top_k: int, dtype: str) -> None:
    from upcycle.convert import UpcycleOptions, writer
    from upcycle.hf import config_check
    from upcycle.upcycling import convert

    seconds = {"probe_s": 0.0, "write_tensors_s": 0.0}

    def timed(module, name: str, key: str) -> None:
        inner = getattr(module, name)

        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[key] += time.perf_counter() - start

        setattr(module, name, run)

    timed(config_check, "check_config_equivalence", "probe_s")  # looked up at call time by the plan
    timed(writer, "_write_tensors", "write_tensors_s")
    convert(src, out, UpcycleOptions(experts=experts, top_k=top_k, dtype=dtype))
    if os.environ.get(STAGES_ENV):
        Path(os.environ[STAGES_ENV]).write_text(json.dumps(seconds))


def child_obvious(src: Path, out: Path, experts: int, top_k: int, dtype: str) -> None:
    """Dense model in, MoE model built in memory, save_pretrained out: the transformers way."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch_dtype = getattr(torch, dtype)
    dense = LlamaForCausalLM.from_pretrained(src, dtype=torch_dtype)
    dc = dense.config
    config = MixtralConfig(
        vocab_size=dc.vocab_size,
        hidden_size=dc.hidden_size,
        intermediate_size=dc.intermediate_size,
        num_hidden_layers=dc.num_hidden_layers,
        num_attention_heads=dc.num_attention_heads,
        num_key_value_heads=dc.num_key_value_heads,
        head_dim=getattr(dc, "head_dim", None) or dc.hidden_size // dc.num_attention_heads,
        hidden_act=dc.hidden_act,
        max_position_embeddings=dc.max_position_embeddings,
        initializer_range=dc.initializer_range,
        rms_norm_eps=dc.rms_norm_eps,
        rope_parameters=dict(dc.rope_parameters),
        tie_word_embeddings=dc.tie_word_embeddings,
        bos_token_id=dc.bos_token_id,
        eos_token_id=dc.eos_token_id,
        pad_token_id=dc.pad_token_id,
        attention_dropout=dc.attention_dropout,
        sliding_window=None,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )
    moe = MixtralForCausalLM._from_config(config, dtype=torch_dtype)  # random init, router included
    with torch.no_grad():
        moe.model.embed_tokens.weight.copy_(dense.model.embed_tokens.weight)
        moe.model.norm.weight.copy_(dense.model.norm.weight)
        if not config.tie_word_embeddings:
            moe.lm_head.weight.copy_(dense.lm_head.weight)
        for d_layer, m_layer in zip(dense.model.layers, moe.model.layers, strict=True):
            m_layer.input_layernorm.weight.copy_(d_layer.input_layernorm.weight)
            m_layer.post_attention_layernorm.weight.copy_(d_layer.post_attention_layernorm.weight)
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(m_layer.self_attn, proj).weight.copy_(getattr(d_layer.self_attn, proj).weight)
            mlp, experts_mod = d_layer.mlp, m_layer.mlp.experts
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)  # [2F, H]
            experts_mod.gate_up_proj.copy_(gate_up.expand_as(experts_mod.gate_up_proj))  # [E, 2F, H]
            experts_mod.down_proj.copy_(mlp.down_proj.weight.expand_as(experts_mod.down_proj))  # [E, H, F]
    moe.generation_config = dense.generation_config
    del dense
    moe.save_pretrained(out)
    if any((src / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        AutoTokenizer.from_pretrained(src).save_pretrained(out)


CHILD_ROUTES = {**dict.fromkeys(UPCYCLE_ROUTES, child_upcycle), "obvious": child_obvious}


def check_output(out: Path) -> dict:
    """Load a converted folder in transformers with loading info; any missing/unexpected key is a failure."""
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if v and k != "error_msgs"}
    return {
        "class": type(model).__name__,
        "rope_parameters": getattr(model.config, "rope_parameters", None),
        "tie_word_embeddings": model.config.tie_word_embeddings,
        "problems": {k: (v[:5] + [f"... {len(v) - 5} more"] if len(v) > 5 else v) for k, v in problems.items()},
        "error_msgs": [str(m)[:300] for m in info.get("error_msgs", [])],
    }


# --------------------------------------------------------------------------------------------------
# Parent side: spawning, measuring, reporting.
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    route: str
    repeat: int
    wall_s: float
    peak_rss_kb: int
    output_bytes: int
    returncode: int
    stages: dict | None = None  # an upcycle child's own seconds: probe_s, write_tensors_s

    @property
    def bytes_per_s(self) -> float:
        return self.output_bytes / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class Summary:
    route: str
    runs: list[Run] = field(default_factory=list)
    skipped: str | None = None
    failed: str | None = None

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


def measure(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """(wall seconds, peak RSS kB, exit status) of one child process, from os.wait4's rusage."""
    with log.open("ab") as handle:
        handle.write(f"$ {shlex.join(cmd)}\n".encode())
        handle.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
    return wall, int(rusage.ru_maxrss), proc.returncode


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def warm_page_cache(folder: Path) -> None:
    """Read every file once through one small buffer (this process must stay small: see measure_floor)."""
    buffer = bytearray(4 << 20)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            with path.open("rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass


def measure_floor(log: Path) -> int:
    """Peak RSS (kB) reported for a child that does nothing: the floor under every route's number.

    On Linux a child spawned with fork/vfork inherits this process's RSS high-water mark in its ``ru_maxrss``
    (it survives exec), so the benchmark keeps itself small (no torch import here) and reports the floor.
    """
    return measure(["true"], log)[1]


def default_source() -> Path:
    """upcycle.assets.smollm2_folder(), resolved in a subprocess so that torch is never imported here."""
    code = "from upcycle.assets import smollm2_folder; print(smollm2_folder())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        sys.exit(f"cannot get the SmolLM2 folder (pass --source):\n{result.stderr.strip()[-2000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def find_mergekit(explicit: str | None) -> tuple[str | None, str]:
    """(executable, how it was found) or (None, why it is skipped)."""
    if explicit:
        path = shutil.which(explicit) or (explicit if os.access(explicit, os.X_OK) else None)
        return (path, f"--mergekit {explicit}") if path else (None, f"--mergekit {explicit} is not executable")
    if found := shutil.which("mergekit-moe"):
        return found, "on PATH"
    if os.access(MERGEKIT_VENV_EXE, os.X_OK):
        return str(MERGEKIT_VENV_EXE), str(MERGEKIT_VENV_EXE.parent.parent)
    return None, (
        "mergekit-moe not found on PATH nor in .cache/mergekit-venv; install PyPI `mergekit` in its own venv "
        "(see benchmarks/README.md) or pass --mergekit PATH"
    )


def mergekit_version(exe: str) -> str:
    python = Path(exe).parent / "python"
    if not python.exists():
        return "unknown"
    result = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('mergekit'), m.version('transformers'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        return "unknown"
    mk, tf = result.stdout.split()
    return f"mergekit {mk} (transformers {tf})"


def mergekit_config(src: Path, experts: int, top_k: int, dtype: str) -> str:
    entries = "".join(
        f'  - source_model: {json.dumps(str(src))}\n    positive_prompts:\n      - "expert {i}"\n'
        for i in range(experts)
    )
    return (
        f"base_model: {json.dumps(str(src))}\n"
        "gate_mode: random\n"
        f"dtype: {dtype}\n"
        f"experts_per_token: {top_k}\n"
        f"experts:\n{entries}"
    )


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(summaries: dict[str, Summary], args: argparse.Namespace, notes: list[str]) -> None:
    measured = {k: s for k, s in summaries.items() if s.runs and not s.failed}
    base = measured.get("upcycle")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency of upcycle
        Console = Table = None  # noqa: N806

    title = (
        f"{args.source.name} -> E{args.experts} top-{args.top_k} {args.dtype}, "
        f"median of {args.repeats} run(s); wall time includes interpreter start and imports"
    )
    header = ["route", "wall s", "wall min-max", "peak RSS GB", "output GB", "output GB/s", "time vs upcycle",
              "RSS vs upcycle"]  # fmt: skip
    rows: list[list[str]] = []
    for name in ROUTES:
        s = summaries.get(name)
        if s is None:
            continue
        if s.skipped or s.failed:
            rows.append([name, "-", "-", "-", "-", "-", "-", "skipped (below)" if s.skipped else "FAILED (below)"])
            continue
        wall, rss, nbytes, bps = (s.median(a) for a in ("wall_s", "peak_rss_kb", "output_bytes", "bytes_per_s"))
        t_ratio = f"{ratio(wall, base.median('wall_s')):.2f}x" if base else "-"
        m_ratio = f"{ratio(rss, base.median('peak_rss_kb')):.2f}x" if base else "-"
        walls = [r.wall_s for r in s.runs]
        rows.append([name, f"{wall:.2f}", f"{min(walls):.2f}-{max(walls):.2f}", f"{rss / 1024**2:.2f}",
                     f"{nbytes / 1e9:.3f}", f"{bps / 1e9:.3f}", t_ratio, m_ratio])  # fmt: skip

    lines: list[str] = []
    if base:
        for name in COMPARED:
            s = measured.get(name)
            if s is None:
                continue
            t = ratio(s.median("wall_s"), base.median("wall_s"))
            m = ratio(s.median("peak_rss_kb"), base.median("peak_rss_kb"))
            ok = t >= GOAL_SPEEDUP and m >= GOAL_MEMORY
            lines.append(
                f"{name} / upcycle: {t:.1f}x time, {m:.1f}x RSS  "
                f"(goal >= {GOAL_SPEEDUP:g}x and >= {GOAL_MEMORY:g}x: {'met' if ok else 'NOT met'})"
            )
        if cp := measured.get("cp"):
            lines.append(
                f"upcycle / cp: {ratio(base.median('wall_s'), cp.median('wall_s')):.1f}x the time of copying its "
                "own output (the I/O floor)"
            )
            if torch_import := measured.get("import-torch"):
                floor = cp.median("wall_s") + torch_import.median("wall_s")
                t = ratio(base.median("wall_s"), floor)
                lines.append(f"upcycle / (cp + import torch): {t:.2f}x (goal <= {GOAL_FLOOR:g}x: "
                             f"{'met' if t <= GOAL_FLOOR else 'NOT met'})")  # fmt: skip
        if cold := measured.get("upcycle-cold"):
            for name in COMPARED:
                if s := measured.get(name):
                    lines.append(f"{name} / upcycle-cold: {ratio(s.median('wall_s'), cold.median('wall_s')):.1f}x "
                                 f"time, {ratio(s.median('peak_rss_kb'), cold.median('peak_rss_kb')):.1f}x RSS "
                                 "(the first conversion of this model)")  # fmt: skip
        if before := measured.get("upcycle-baseline"):
            t = ratio(before.median("wall_s"), base.median("wall_s"))
            m = ratio(before.median("peak_rss_kb"), base.median("peak_rss_kb"))
            lines.append(f"upcycle-baseline / upcycle: {t:.2f}x time, {m:.2f}x RSS")
    lines += stage_lines(summaries)
    lines += [f"{name} skipped: {s.skipped}" for name, s in summaries.items() if s.skipped]
    lines += [f"note: {n}" for n in notes]

    if Console is not None:
        table = Table(title=title)
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console = Console(width=max(120, shutil.get_terminal_size().columns))
        console.print(table)
        for line in lines:
            console.print(line, highlight=False, markup=False)
    else:  # pragma: no cover
        print(title)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            cells = zip(row, widths, strict=True)
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells)))
        print("\n".join(lines))


FLOORS = ("cp", "import-torch")


def round_order(routes: list[str], rep: int) -> list[str]:
    """The conversion routes rotated by one each round (no route always runs first); the floors last (cp after
    upcycle, whose output it copies)."""
    conv = [r for r in routes if r not in FLOORS]
    shift = rep % len(conv) if conv else 0
    return conv[shift:] + conv[:shift] + [r for r in FLOORS if r in routes]


def baseline_package(rev: str, into: Path) -> str:
    """The `upcycle` package as it was at git revision REV, extracted under INTO; returns the short commit."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True,
                            check=False)  # fmt: skip
    if commit.returncode:
        sys.exit(f"--baseline {rev}: not a revision of {REPO} ({commit.stderr.strip()})")
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "upcycle"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return commit.stdout.strip()


def bench_cache(folder: Path) -> Path:
    """A cache folder of the benchmark's own that shares the real one's Shakespeare (the text a rounding is
    measured on) and nothing else: no remembered config facts, no file hashes."""
    real = Path(os.environ.get("UPCYCLE_CACHE") or Path.home() / ".cache" / "upcycle").expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    if (real / "shakespeare").is_dir() and not (folder / "shakespeare").exists():
        (folder / "shakespeare").symlink_to(real / "shakespeare")
    return folder


def stage_lines(summaries: dict[str, Summary]) -> list[str]:
    """The probe's and the tensor writing's seconds inside each upcycle route, beside its wall time."""
    lines = []
    for name in UPCYCLE_ROUTES:
        s = summaries.get(name)
        runs = [r for r in s.runs if r.stages] if s else []
        if not runs:
            continue
        probe = statistics.median(r.stages["probe_s"] for r in runs)
        tensors = statistics.median(r.stages["write_tensors_s"] for r in runs)
        wall = statistics.median(r.wall_s for r in runs)
        lines.append(f"{name}: config probe {probe:.2f} s ({probe / wall:.0%} of the wall {wall:.2f} s), "
                     f"writing the tensors {tensors:.2f} s")  # fmt: skip
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", type=Path, default=None, help="dense HF folder (default: SmolLM2-135M, fp32)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the table shows medians")
    p.add_argument("--routes", default=",".join(ROUTES), help=f"comma list out of {','.join(ROUTES)}")
    p.add_argument("--mergekit", default=None, help="path of a mergekit-moe executable")
    p.add_argument("--json", action="store_true", help="print the raw numbers as JSON instead of the table")
    p.add_argument("--keep", action="store_true", help="keep the output folders (printed at the end)")
    p.add_argument("--check-outputs", action="store_true",
                   help="after timing, load each output in transformers; report missing/unexpected keys")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=None, help="where the temporary output folder is made")
    p.add_argument("--baseline", default=None, metavar="REV",
                   help="also run upcycle as it was at this git revision (route upcycle-baseline)")  # fmt: skip
    p.add_argument("--child", choices=sorted(CHILD_ROUTES) + ["check"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "check":
        print(json.dumps(check_output(args.out)))
        return 0
    if args.child:
        CHILD_ROUTES[args.child](args.source, args.out, args.experts, args.top_k, args.dtype)
        return 0

    if args.source is None:
        args.source = default_source()
    args.source = args.source.resolve()
    if args.repeats < 1:
        sys.exit("--repeats must be at least 1")
    wanted = [r.strip() for r in args.routes.split(",") if r.strip()]
    if unknown := set(wanted) - set(ROUTES):
        sys.exit(f"unknown route(s) {sorted(unknown)}; choose from {','.join(ROUTES)}")
    if "cp" in wanted and "upcycle" not in wanted:
        sys.exit("the cp route copies upcycle's output: include upcycle in --routes")
    if args.baseline is None:
        wanted = [r for r in wanted if r != "upcycle-baseline"]
    elif "upcycle-baseline" not in wanted:
        wanted.append("upcycle-baseline")

    notes: list[str] = []
    summaries = {name: Summary(name) for name in ROUTES if name in wanted}
    mergekit_exe = None
    if "mergekit-moe" in summaries:
        mergekit_exe, how = find_mergekit(args.mergekit)
        if mergekit_exe is None:
            summaries["mergekit-moe"].skipped = how
        else:
            notes.append(f"mergekit-moe: {mergekit_exe} ({mergekit_version(mergekit_exe)}, found {how})")

    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    log = work / "routes.log"
    warm_page_cache(args.source)
    rss_floor_kb = measure_floor(log)
    notes.append(f"peak RSS floor (a child running `true`, inherited from this process): {rss_floor_kb / 1024:.0f} MB")
    child = [sys.executable, str(Path(__file__).resolve())]
    common = ["--source", str(args.source), "--experts", str(args.experts), "--top-k", str(args.top_k),
              "--dtype", args.dtype]  # fmt: skip
    if mergekit_exe:
        (work / "mergekit-moe.yml").write_text(mergekit_config(args.source, args.experts, args.top_k, args.dtype))
    outputs: dict[str, Path] = {}
    warm_cache = bench_cache(work / "cache-warm")
    if any(name in summaries for name in UPCYCLE_ROUTES):  # the warm cache sees the model once, untimed
        env = offline_env() | {"UPCYCLE_CACHE": str(warm_cache)}
        if measure([*child, "--child", "upcycle", "--out", str(work / "warm-up"), *common], log, env=env)[2]:
            sys.exit(f"the untimed warm-up conversion failed:\n{tail(log)}")
        shutil.rmtree(work / "warm-up")
    baseline_env = offline_env()
    if args.baseline is not None:
        commit = baseline_package(args.baseline, work / "baseline")
        baseline_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(work / "baseline"), baseline_env.get("PYTHONPATH")])
        )
        notes.append(f"upcycle-baseline: the upcycle package at {args.baseline} ({commit}), same interpreter")
    try:
        for rep in range(args.repeats):
            last = rep == args.repeats - 1
            for name in round_order(list(summaries), rep):
                summary = summaries[name]
                if summary.skipped or summary.failed:
                    continue
                out = work / f"{name}-{rep}"
                env = baseline_env if name == "upcycle-baseline" else offline_env()
                if name in UPCYCLE_ROUTES:
                    fresh = bench_cache(work / f"cache-cold-{rep}") if name == "upcycle-cold" else warm_cache
                    env["UPCYCLE_CACHE"] = str(fresh)
                stages = work / f"{name}-{rep}.stages.json"
                env[STAGES_ENV] = str(stages)
                if name in CHILD_ROUTES:
                    cmd = [*child, "--child", name, "--out", str(out), *common]
                elif name == "mergekit-moe":
                    cmd = [mergekit_exe, str(work / "mergekit-moe.yml"), str(out), *MERGEKIT_FLAGS]
                elif name == "import-torch":
                    cmd = [sys.executable, "-c", "import torch"]
                else:  # cp of this round's upcycle output
                    cmd = ["cp", "-r", str(work / f"upcycle-{rep}"), str(out)]
                os.sync()
                print(f"[round {rep + 1}/{args.repeats}] {name} ...", file=sys.stderr, flush=True)
                wall, rss, rc = measure(cmd, log, env=env)
                if rc != 0 or (name != "import-torch" and not out.exists()):
                    summary.failed = f"exit status {rc}; log tail:\n{textwrap.indent(tail(log), '  ')}"
                    print(f"{name} failed ({rc}); see below", file=sys.stderr)
                    continue
                seconds = json.loads(stages.read_text()) if stages.is_file() else None
                summary.runs.append(Run(name, rep, wall, rss, folder_bytes(out) if out.exists() else 0, rc, seconds))
                if last:
                    outputs[name] = out
            for name in summaries:  # free the disk and page cache of earlier rounds (cp needs upcycle's first)
                out = work / f"{name}-{rep}"
                if not last and out.exists():
                    shutil.rmtree(out)
        os.sync()

        checks: dict[str, dict] = {}
        if args.check_outputs:
            for name, out in outputs.items():
                if name in FLOORS:
                    continue
                result = subprocess.run([*child, "--child", "check", "--out", str(out)], capture_output=True,
                                        text=True, check=False, env=offline_env())  # fmt: skip
                try:
                    checks[name] = json.loads(result.stdout.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    checks[name] = {"error": (result.stderr or result.stdout).strip()[-1500:]}

        if args.json:
            print(json.dumps({
                "source": str(args.source), "experts": args.experts, "top_k": args.top_k, "dtype": args.dtype,
                "repeats": args.repeats, "wall_includes_imports": True, "cpu_count": os.cpu_count(),
                "routes": {
                    n: {"skipped": s.skipped, "failed": s.failed,
                        "median": {a: s.median(a) for a in ("wall_s", "peak_rss_kb", "output_bytes", "bytes_per_s")}
                        if s.runs else None,
                        "runs": [asdict(r) | {"bytes_per_s": r.bytes_per_s} for r in s.runs]}
                    for n, s in summaries.items()
                },
                "checks": checks, "notes": notes, "rss_floor_kb": rss_floor_kb,
                "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                "kept": {n: str(p) for n, p in outputs.items()} if args.keep else None,
            }, indent=2))  # fmt: skip
        else:
            load_end = os.getloadavg()
            notes.append(
                f"{os.cpu_count()} CPUs, 1-min load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end "
                "(other work on the machine slows every route); peak RSS = ru_maxrss of the child from os.wait4"
            )
            report(summaries, args, notes)
            for name, s in summaries.items():
                if s.failed:
                    print(f"\n{name} FAILED: {s.failed}")
            for name, check in checks.items():
                print(f"check {name}: {json.dumps(check)}")
            if args.keep:
                print(f"kept outputs in {work}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any(s.failed for s in summaries.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
