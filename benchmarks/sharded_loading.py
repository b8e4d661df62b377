"""Peak memory per rank while a Llama-3-8B-shaped upcycled MoE loads under 1, 2 and 4 gloo ranks (FSDP).

The model is a ``MixtralForCausalLM`` with Llama-3-8B's widths (hidden 4096, MLP 14336, vocabulary 128256, 32 query
and 8 key/value heads) but 4 layers, 8 experts top-2, untied head, random bf16 weights: 13.7 GB on disk in the
per-expert layout upcycle's converter and ``save_pretrained`` both write (``block_sparse_moe.experts.E.w1``). It is
written tensor by tensor, one safetensors file per layer plus one for the embeddings and one for norm + head, so the
writer never holds more than one layer; the on-disk names come from transformers' own reverse conversion applied to
a meta-device model, and are checked against upcycle's Mixtral target.

Every case loads that folder through :func:`upcycle.hf.loading.load_causal_lm_strict` in bfloat16 (the stored dtype):

- ``python``: one plain process, no process group;
- ``torchrun 1``: one rank under ``torchrun``, gloo initialised, no ``distributed_config``;
- ``torchrun N``: N ranks, ``distributed_config`` from ``Layout(world_size=N, fsdp=N)`` (FSDP2 over N ranks, the
  shards read at load time by transformers' engine).

What each rank measures, itself:

- **baseline RssAnon**: ``/proc/self/status`` after imports and ``init_process_group``, right before loading;
- **peak RssAnon**: anonymous memory (the process's own tensors), the maximum seen by a thread that reads
  ``/proc/self/status`` every 20 ms during the load (its largest gap between two samples is reported too);
- **peak VmRSS** and **VmHWM** (the kernel's exact high-water mark of VmRSS): these include the pages of the
  memory-mapped safetensors files the rank touched, which are page cache shared between ranks;
- **local shard bytes**: after loading, ``to_local()`` bytes of every DTensor parameter, else its whole bytes, and
  how many of them are still views into the rank's memory maps of the checkpoint files (``/proc/self/maps``): those
  are file pages, not RssAnon, until the first in-place write copies them.

The table shows the maximum over ranks, ``(peak - baseline) / (model bytes / N)``, and ``peak - baseline``
relative to the 1-rank ``torchrun`` case (1/N is the ideal). The page cache cannot be dropped without root, so every
file is read once before each case: all cases see a warm cache. OMP_NUM_THREADS=1 in every case.

Run: ``nice python benchmarks/sharded_loading.py [--ranks 1 2 4] [--folder /tmp/sharded-loading-8b] [--keep]``
(writes the 13.7 GB folder, runs the cases, deletes the folder unless ``--keep``; ``--reuse`` loads an existing
one). ``--tiny`` runs the same on a 64-wide model and also checks that it loads with no missing or unexpected keys
and that every rank's shard holds the values of the plain load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FOLDER = Path("/tmp/sharded-loading-8b")
STATUS_FIELDS = ("RssAnon", "RssFile", "VmRSS", "VmHWM")
GB = 1e9


# --------------------------------------------------------------------------------------------------
# The model and its checkpoint.
# --------------------------------------------------------------------------------------------------


def model_config(tiny: bool):
    import torch
    from transformers import MixtralConfig

    widths = (
        dict(hidden_size=64, intermediate_size=128, vocab_size=512, num_attention_heads=4, num_key_value_heads=2)
        if tiny
        else dict(
            hidden_size=4096, intermediate_size=14336, vocab_size=128256, num_attention_heads=32, num_key_value_heads=8
        )
    )
    config = MixtralConfig(
        **widths,
        num_hidden_layers=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    config.dtype = torch.bfloat16
    config.architectures = ["MixtralForCausalLM"]
    return config


def disk_layout(config) -> dict[str, tuple[int, ...]]:
    """On-disk name -> shape, as ``save_pretrained`` would name them: transformers' reverse conversion on meta."""
    import torch
    from transformers import MixtralForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from upcycle.convert.targets.mixtral import MixtralTarget

    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    layout = {name: tuple(t.shape) for name, t in revert_weight_conversion(model, model.state_dict()).items()}
    target = MixtralTarget()
    expected = {target.router_key(0)} | {
        target.expert_key(0, e, p) for e in range(config.num_local_experts) for p in ("gate", "up", "down")
    }
    if missing := expected - layout.keys():
        raise SystemExit(f"transformers names Mixtral tensors differently from upcycle's converter: {sorted(missing)}")
    return layout


def shard_groups(layout: dict[str, tuple[int, ...]], layers: int) -> list[tuple[str, list[str]]]:
    """(file name, tensor names): embeddings, one file per layer, then final norm and head."""
    groups: list[list[str]] = [[] for _ in range(layers + 2)]
    for name in layout:
        if name.startswith("model.layers."):
            groups[1 + int(name.split(".")[2])].append(name)
        elif "embed_tokens" in name:
            groups[0].append(name)
        else:
            groups[-1].append(name)
    total = len(groups)
    return [(f"model-{i + 1:05d}-of-{total:05d}.safetensors", names) for i, names in enumerate(groups)]


def write_checkpoint(folder: Path, config, seed: int = 0) -> dict:
    """Random bf16 weights, one group of tensors in memory at a time."""
    import torch
    from safetensors.torch import save_file

    layout = disk_layout(config)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    start = time.perf_counter()
    for file_name, names in shard_groups(layout, config.num_hidden_layers):
        tensors = {}
        for name in names:
            shape = layout[name]
            if len(shape) == 1:  # norms
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = torch.randn(shape, generator=generator, dtype=torch.bfloat16).mul_(0.02)
            weight_map[name] = file_name
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(folder)
    return {
        "bytes": total,
        "files": len(set(weight_map.values())),
        "seconds": time.perf_counter() - start,
        "writer_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def checkpoint_sizes(folder: Path, config) -> dict:
    """Model bytes and the bytes of the largest layer, from the index."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    layout = disk_layout(config)
    per_layer = [0] * config.num_hidden_layers
    for name, shape in layout.items():
        if name.startswith("model.layers."):
            n = 1
            for s in shape:
                n *= s
            per_layer[int(name.split(".")[2])] += 2 * n
    return {"model_bytes": index["metadata"]["total_size"], "layer_bytes": max(per_layer)}


def verify_plain_load(folder: Path) -> None:
    """Loads in plain transformers with nothing missing, unexpected or mismatched, experts fused as written."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    problems = {kind: keys for kind, keys in info.items() if keys}
    if problems:
        raise SystemExit(f"{folder} does not load cleanly: {problems}")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    prefix = "model.layers.1.block_sparse_moe.experts.3."
    tensors = {}
    for part in ("w1", "w2", "w3"):
        key = f"{prefix}{part}.weight"
        with safe_open(str(folder / index[key]), framework="pt") as f:
            tensors[part] = f.get_tensor(key)
    experts = model.model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up_proj[3], torch.cat([tensors["w1"], tensors["w3"]], dim=0))
    assert torch.equal(experts.down_proj[3], tensors["w2"])
    print(f"plain load of {folder}: no missing/unexpected/mismatched keys; expert 3 of layer 1 equals the files")


def warm_page_cache(folder: Path) -> float:
    start = time.perf_counter()
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            while f.read(64 << 20):
                pass
    return time.perf_counter() - start


def meminfo() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("MemTotal", "MemAvailable", "Cached"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


# --------------------------------------------------------------------------------------------------
# Rank side: `python sharded_loading.py --rank-worker FOLDER --out DIR`, under torchrun or alone.
# --------------------------------------------------------------------------------------------------


def read_status() -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            values[key] = int(value.split()[0]) * 1024
    return values


class Sampler(threading.Thread):
    """Maximum of each /proc/self/status field over the samples, and the largest gap between two samples."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = read_status()
        self.samples = 1
        self.max_gap = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        last = time.perf_counter()
        while not self._halt.is_set():
            self._take()
            now = time.perf_counter()
            self.max_gap = max(self.max_gap, now - last)
            last = now
            self._halt.wait(self.interval)

    def _take(self) -> None:
        for key, value in read_status().items():
            self.peak[key] = max(self.peak[key], value)
        self.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self._take()


def safetensors_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of .safetensors files, from /proc/self/maps."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith(".safetensors"):
            low, high = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((low, high))
    return ranges


def local_bytes(model) -> tuple[int, int, int]:
    """Over the parameters: (bytes this rank holds, of which still views of the mapped files, bytes of the model)."""
    from torch.distributed.tensor import DTensor

    mapped_ranges = safetensors_mappings()
    held = mapped = whole = 0
    for p in model.parameters():
        whole += p.numel() * p.element_size()
        local = p.to_local() if isinstance(p, DTensor) else p
        size = local.numel() * local.element_size()
        held += size
        if any(low <= local.data_ptr() < high for low, high in mapped_ranges):
            mapped += size
    return held, mapped, whole


def check_against_plain(model, folder: Path) -> int:
    """Every parameter, gathered from the ranks, equals the plain single-process load (tiny model only)."""
    import torch
    from torch.distributed.tensor import DTensor

    from upcycle.hf.loading import load_causal_lm_strict

    plain = dict(load_causal_lm_strict(folder, torch.bfloat16).named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        if not torch.equal(full, plain[name]):
            raise SystemExit(f"{name}: the sharded load differs from the plain load")
        checked += 1
    return checked


def rank_worker(folder: Path, out: Path, check: bool) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.fsdp  # noqa: F401  (imported by the load otherwise, inside the measured span)
    from transformers import AutoModelForCausalLM, MixtralForCausalLM  # noqa: F401
    from transformers.distributed import DistributedConfig  # noqa: F401

    from upcycle.hf.loading import load_causal_lm_strict
    from upcycle.train.parallel import Layout

    under_torchrun = "LOCAL_RANK" in os.environ
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if under_torchrun:
        dist.init_process_group("gloo")
    options = {}
    if world > 1:
        options["distributed_config"] = Layout(world_size=world, fsdp=world).distributed_config(mixed_precision=False)

    baseline = read_status()
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    model = load_causal_lm_strict(folder, torch.bfloat16, **options)
    seconds = time.perf_counter() - start
    sampler.stop()
    after = read_status()
    held, mapped, whole = local_bytes(model)
    record = {
        "rank": rank,
        "world": world,
        "torchrun": under_torchrun,
        "baseline": baseline,
        "peak": sampler.peak,
        "after": after,
        "samples": sampler.samples,
        "max_gap_s": sampler.max_gap,
        "load_s": seconds,
        "local_bytes": held,
        "mapped_bytes": mapped,
        "param_bytes": whole,
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
    }
    if check:
        record["checked_params"] = check_against_plain(model, folder)
    (out / f"rank{rank}.json").write_text(json.dumps(record) + "\n")
    if under_torchrun:
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Parent side: write, warm, launch each case, print the table.
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_exe() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def case_command(launcher: str, ranks: int, folder: Path, out: Path, check: bool) -> list[str]:
    worker = [str(Path(__file__).resolve()), "--rank-worker", str(folder), "--out", str(out)]
    worker += ["--check"] if check else []
    if launcher == "python":
        return [sys.executable, *worker]
    return [*torchrun_exe(), "--nproc-per-node", str(ranks), "--master-port", str(free_port()), *worker]


def run_case(launcher: str, ranks: int, folder: Path, check: bool, log_dir: Path) -> dict:
    warm_s = warm_page_cache(folder)
    before = meminfo()
    label = "python" if launcher == "python" else f"torchrun {ranks}"
    out = log_dir / label.replace(" ", "-")
    out.mkdir(parents=True, exist_ok=True)
    cmd = case_command(launcher, ranks, folder, out, check)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    log = out / "log.txt"
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{tail}")
    records = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if len(records) != ranks:
        raise SystemExit(f"{label}: {len(records)} of {ranks} ranks reported")
    return {"case": label, "ranks": ranks, "wall_s": wall, "warm_s": warm_s, "meminfo_before": before,
            "records": records}  # fmt: skip


def summarise(case: dict, sizes: dict) -> dict:
    """The worst rank of each column (each is a maximum over ranks, taken separately)."""
    records = case["records"]
    n = case["ranks"]

    def most(key: str, field: str) -> int:
        return max(r[key][field] for r in records)

    grown = max(r["peak"]["RssAnon"] - r["baseline"]["RssAnon"] for r in records)
    return {
        "case": case["case"],
        "ranks": n,
        "baseline_anon": most("baseline", "RssAnon"),
        "peak_anon": most("peak", "RssAnon"),
        "grown": grown,
        "transient": max(r["peak"]["RssAnon"] - r["after"]["RssAnon"] for r in records),
        "local": max(r["local_bytes"] for r in records),
        "mapped": max(r["mapped_bytes"] for r in records),
        "ratio_ideal": grown / (sizes["model_bytes"] / n),
        "hwm": max(r["peak"]["VmHWM"] for r in records),
        "peak_file": most("peak", "RssFile"),
        "sum_peak_anon": sum(r["peak"]["RssAnon"] for r in records),
        "load_s": max(r["load_s"] for r in records),
        "max_gap_s": max(r["max_gap_s"] for r in records),
        "samples": min(r["samples"] for r in records),
    }


COLUMNS = (
    ("case", lambda r, ref, gb: r["case"]),
    ("ranks", lambda r, ref, gb: str(r["ranks"])),
    ("baseline RssAnon GB", lambda r, ref, gb: gb(r["baseline_anon"])),
    ("peak RssAnon GB", lambda r, ref, gb: gb(r["peak_anon"])),
    ("peak - base GB", lambda r, ref, gb: gb(r["grown"])),
    ("(peak - base) / (model/N)", lambda r, ref, gb: f"{r['ratio_ideal']:.2f}"),
    ("peak - base vs 1 rank", lambda r, ref, gb: f"{r['grown'] / ref['grown']:.2f}"),
    ("1/N", lambda r, ref, gb: f"{1 / r['ranks']:.2f}"),
    ("local shard GB", lambda r, ref, gb: gb(r["local"])),
    ("of which file views GB", lambda r, ref, gb: gb(r["mapped"])),
    ("peak - end RssAnon GB", lambda r, ref, gb: gb(r["transient"])),
    ("peak RssFile GB", lambda r, ref, gb: gb(r["peak_file"])),
    ("VmHWM GB", lambda r, ref, gb: gb(r["hwm"])),
    ("sum of ranks' peak RssAnon GB", lambda r, ref, gb: gb(r["sum_peak_anon"])),
    ("load s", lambda r, ref, gb: f"{r['load_s']:.1f}"),
)


def report(rows: list[dict], sizes: dict) -> None:
    ref = next((r for r in rows if r["case"] == "torchrun 1"), rows[0])

    def gb(b: float) -> str:
        return f"{b / GB:.2f}"

    header = [name for name, _ in COLUMNS]
    lines = [[cell(r, ref, gb) for _, cell in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    print(f"model {gb(sizes['model_bytes'])} GB bf16, largest layer {gb(sizes['layer_bytes'])} GB")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for line in lines:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) + " |")
    gaps = max(r["max_gap_s"] for r in rows)
    print(f"largest gap between two /proc/self/status samples in any rank: {gaps * 1000:.0f} ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="64-wide model in a temporary folder, values checked")
    p.add_argument("--folder", type=Path, default=None, help=f"checkpoint folder (default {DEFAULT_FOLDER})")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="torchrun world sizes")
    p.add_argument("--no-python", action="store_true", help="skip the plain-python 1-process case")
    p.add_argument("--reuse", action="store_true", help="load an existing folder instead of writing one")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
    p.add_argument("--json", type=Path, default=None, help="also write the raw per-rank numbers here")
    p.add_argument("--write-only", action="store_true", help="write the checkpoint and stop")
    p.add_argument("--rank-worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rank_worker is not None:
        rank_worker(args.rank_worker, args.out, args.check)
        return 0

    import torch
    import transformers

    config = model_config(args.tiny)
    folder = args.folder or (Path(tempfile.mkdtemp(prefix="sharded-loading-tiny-")) if args.tiny else DEFAULT_FOLDER)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
    try:
        if args.reuse and (folder / "model.safetensors.index.json").is_file():
            print(f"reusing {folder}")
        else:
            if folder.exists() and any(folder.iterdir()):
                raise SystemExit(f"{folder} is not empty; pass --reuse to load it or remove it first")
            written = write_checkpoint(folder, config)
            print(f"wrote {written['bytes'] / GB:.2f} GB in {written['files']} files to {folder} in "
                  f"{written['seconds']:.0f} s; writer peak RSS {written['writer_peak_rss'] / GB:.2f} GB")  # fmt: skip
        if args.tiny:
            verify_plain_load(folder)
        if args.write_only:
            return 0
        sizes = checkpoint_sizes(folder, config)
        cases = ([] if args.no_python else [("python", 1)]) + [("torchrun", n) for n in args.ranks]
        results = []
        with tempfile.TemporaryDirectory(prefix="sharded-loading-logs-") as logs:
            for launcher, n in cases:
                case = run_case(launcher, n, folder, args.tiny, Path(logs))
                row = summarise(case, sizes)
                print(f"{row['case']}: peak RssAnon {row['peak_anon'] / GB:.2f} GB per rank (max), "
                      f"{row['grown'] / GB:.2f} GB over baseline, local {row['local'] / GB:.2f} GB, "
                      f"MemAvailable before {case['meminfo_before']['MemAvailable'] / GB:.1f} GB, "
                      f"cache warmed in {case['warm_s']:.0f} s", flush=True)  # fmt: skip
                if args.tiny:
                    checked = {r.get("checked_params") for r in case["records"]}
                    print(f"  every rank: {checked.pop()} parameters equal to the plain load")
                results.append((case, row))
        report([row for _, row in results], sizes)
        if args.json:
            args.json.write_text(json.dumps({"sizes": sizes, "cases": [c for c, _ in results]}, indent=1) + "\n")
    finally:
        if not args.keep and not args.reuse:
            shutil.rmtree(folder, ignore_errors=True)
        elif args.keep:
            print(f"kept {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
