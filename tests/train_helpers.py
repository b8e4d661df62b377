"""Shared pieces of the training tests: a tiny real MoE with SmolLM2's tokenizer, recipes, runs and their logs."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from tiny_models import make_dense

from upcycle import assets
from upcycle.convert import UpcycleOptions
from upcycle.model_files import COPIED_FILES
from upcycle.train.metrics import read_metrics
from upcycle.upcycling import convert

VOCAB = 49152  # SmolLM2's tokenizer, so the text is real tokens


def make_tiny_pair(root: Path, **options) -> tuple[Path, Path]:
    """A tiny random Llama with SmolLM2's tokenizer, and its upcycle (exact E4 top-2 unless told otherwise)."""
    dense = root / "dense"
    if not dense.is_dir():
        make_dense("llama", dense, vocab_size=VOCAB, num_hidden_layers=2, tie_word_embeddings=True)
        for path in assets.smollm2_folder().iterdir():
            if any(path.match(pattern) for pattern in COPIED_FILES):
                shutil.copy2(path, dense / path.name)
    moe = root / ("moe" + "".join(f"-{k}{v}" for k, v in sorted(options.items())))
    convert(dense, moe, UpcycleOptions(**{"experts": 4, "top_k": 2, **options}))
    return dense, moe


def shakespeare_texts() -> tuple[list[str], list[str]]:
    train_files, heldout = assets.shakespeare_split()
    return [str(p) for p in train_files[:2]], [str(heldout[0])]


def recipe_dict(model_path: Path, out: Path, texts, **sections) -> dict:
    train_files, eval_files = texts
    data = {
        "model": {"path": str(model_path), "experts_implementation": "grouped_mm"},
        "data": {"train": train_files, "eval": eval_files, "seq_len": 32, "eval_sequences": 6},
        "batch": {"micro_batch_size": 2, "grad_accum": 2, "steps": 6},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "moe": {"aux_loss_coef": 0.01},
        "run": {
            "output_dir": str(out),
            "precision": "fp32",
            "eval_interval": 3,
            "checkpoint_interval": 2,
            "keep_checkpoints": 2,
            "tensorboard": False,
        },
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r.get("kind") == "train"]


def run_cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "upcycle", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_ranks(ranks: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`upcycle ARGS` under torchrun with `ranks` local processes (gloo on the CPU)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nproc-per-node", str(ranks), "--master-port", str(free_port()), "-m", "upcycle"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def isolated_cache(root: Path) -> Path:
    """A cache folder of its own (set it as UPCYCLE_CACHE) that shares the real assets instead of fetching them."""
    real = assets.cache_dir()
    model, _ = assets.smollm2_folder(), assets.shakespeare_dir()  # fetched once into the real cache
    root.mkdir(parents=True, exist_ok=True)
    for name in (model.name, "shakespeare", "tokens"):
        if (real / name).exists() and not (root / name).exists():
            (root / name).symlink_to(real / name)
    # where conversions made before met their dense folders: a copy, so the test's own temporary folders are not
    # written into the real index (where they would go stale)
    if (real / "sources").is_dir() and not (root / "sources").exists():
        shutil.copytree(real / "sources", root / "sources")
    return root


def moe_recipe(moe: Path, folder: Path, texts, **sections) -> Path:
    """A recipe training the tiny MoE folder as it is (nothing to convert): the fastest real runs."""
    data = recipe_dict(moe, folder / "unused", texts, **sections)
    return write_recipe(folder / "tiny-moe.yaml", data)


def source_recipe(dense: Path, folder: Path, texts, **sections) -> Path:
    """A recipe upcycling the tiny dense model (E4 top-2, exact) before it trains."""
    data = recipe_dict(dense, folder / "unused", texts, **sections)
    data["model"] = {
        "source": str(dense),
        "upcycle": {"experts": 4, "top_k": 2},
        "experts_implementation": "grouped_mm",
    }
    return write_recipe(folder / "tiny-upcycle.yaml", data)


LOCAL_PATH = re.compile(r"(?<![\w.:])(?:/(?:tmp|root|home|Users|var|private|opt|mnt)/|~/|[A-Za-z]:\\)")


def local_paths_in(folder: Path) -> dict[str, list[str]]:
    """Every text file of an output folder that names a local absolute path, with the lines that do."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # weights
        lines = [line.strip()[:160] for line in text.splitlines() if LOCAL_PATH.search(line)]
        if lines:
            found[str(path.relative_to(folder))] = lines
    return found
