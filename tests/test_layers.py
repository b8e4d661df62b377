"""The floors of the package hold: `lint-imports` passes on the tree, and fails once an upward import is added."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (the test extra has it)")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--no-cache", "--config", str(tree / "pyproject.toml")],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )


def copy_of_the_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "upcycle", tmp_path / "upcycle", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_floors_hold(tmp_path):
    done = lint(copy_of_the_package(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 2 kept, 0 broken." in done.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("upcycle/hf/config.py", "from upcycle.convert.options import UpcycleOptions"),
        ("upcycle/convert/plan.py", "from upcycle.train.recipe import TrainRecipe"),
        ("upcycle/kernels/op.py", "from upcycle.hf.loading import load_causal_lm_strict"),
        ("upcycle/convert/writer.py", "from upcycle.verify.written import inspect_written"),  # no exception left
        ("upcycle/verify/written.py", "from upcycle.upcycling import convert"),
    ],
)
def test_an_upward_import_breaks_them(tmp_path, module, upward):
    tree = copy_of_the_package(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n\ndef _added() -> None:\n    {upward}  # noqa\n")
    done = lint(tree)
    assert done.returncode != 0 and "BROKEN" in done.stdout, done.stdout
