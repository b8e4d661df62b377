"""The built wheel, installed alone into a fresh virtual environment, carries the recipes and runs one by name:
from the dense asset through conversion to an export, and a second run reuses the conversion."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from train_helpers import isolated_cache

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(the fresh environment's bin folder, an environment for it, a work folder outside the repository)."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    dist = root / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        REPO,
        env,
    )
    (wheel,) = dist.glob("upcycle-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)], root, env)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], root, env)
    # The dependencies (torch, transformers, ...) come from this interpreter's site folders, listed as plain paths:
    # the .pth files in them (this checkout's editable install among them) are not run, so no checkout is importable.
    purelib = Path(
        run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env
        ).stdout.strip()
    )
    deps = [p for p in [sysconfig.get_paths()["purelib"], *site.getsitepackages()] if Path(p).is_dir()]
    (purelib / "zz_dependencies.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    env["UPCYCLE_CACHE"] = str(isolated_cache(root / "cache"))
    work = root / "work"
    work.mkdir()
    return venv / "bin", env, work


def test_the_wheel_carries_upcycle_and_its_recipes_and_nothing_of_the_checkout(installed) -> None:
    bin_dir, env, work = installed
    where = run([str(bin_dir / "python"), "-c", "import upcycle; print(upcycle.__file__)"], work, env).stdout.strip()
    assert Path(where).is_relative_to(bin_dir.parent) and not Path(where).is_relative_to(REPO)
    listed = run([str(bin_dir / "upcycle"), "recipes"], work, env).stdout
    for recipe in REPO.joinpath("upcycle", "recipes").glob("*.yaml"):
        assert recipe.stem in listed
    shown = run([str(bin_dir / "upcycle"), "recipes", "show", "cpu-quickstart"], work, env).stdout
    assert shown == (REPO / "upcycle" / "recipes" / "cpu-quickstart.yaml").read_text()


def test_train_by_name_converts_exports_and_the_second_run_reuses_the_conversion(installed) -> None:
    bin_dir, env, work = installed
    small = [  # the shipped recipe, made small enough for a test: one MoE layer, one short step
        "--set", "model.upcycle.layers=29", "--set", "data.seq_len=64", "--set", "batch.micro_batch_size=1",
        "--set", "batch.steps=1", "--set", "data.eval_sequences=2", "--set", "run.checkpoints=false",
        "--set", "run.tensorboard=false",
    ]  # fmt: skip
    started = time.perf_counter()
    first = run([str(bin_dir / "upcycle"), "train", "cpu-quickstart", *small], work, env)
    first_seconds = time.perf_counter() - started
    assert "converted in" in first.stdout and "verified in" in first.stdout, first.stdout
    export = work / "runs" / "cpu-quickstart" / "export"
    assert (export / "config.json").is_file() and list(export.glob("*.safetensors"))
    started = time.perf_counter()
    second = run(
        [str(bin_dir / "upcycle"), "train", "cpu-quickstart", *small, "--set", "run.output_dir=runs/again"], work, env
    )
    second_seconds = time.perf_counter() - started
    assert "(reused;" in second.stdout, second.stdout
    assert (work / "runs" / "again" / "export" / "config.json").is_file()
    conversions = [p for p in (Path(env["UPCYCLE_CACHE"]) / "conversions").iterdir() if p.is_dir()]
    assert len(conversions) == 1
    print(f"first run {first_seconds:.1f} s, second run {second_seconds:.1f} s")
