"""Every command that writes refuses to write into or over its own input, and replaces only what it was told to.

Each refusal: exit code 2, one `error: ... Fix: ...` message, and the inputs and the user's files byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from test_data import CORPUS, make_tokenizer
from tiny_models import make_dense

from upcycle import output_safety
from upcycle.errors import OutputError
from upcycle.experiments.output import check_compare_out
from upcycle.output_safety import publish_atomically, sweep_stale
from upcycle.train.checkpoint import save_checkpoint
from upcycle.train.export import check_replaceable_export
from upcycle.train.loop import train
from upcycle.train.recipe import recipe_from_dict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def snapshot(path: Path) -> dict[str, str]:
    """Every file and folder under PATH (or PATH itself) with its sha256: equal snapshots, byte-identical trees."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    tree = {}
    for item in sorted(path.rglob("*")):
        key = str(item.relative_to(path))
        tree[key] = "link:" + os.readlink(item) if item.is_symlink() else "dir"
        if item.is_file() and not item.is_symlink():
            tree[key] = hashlib.sha256(item.read_bytes()).hexdigest()
    return tree


def assert_refused(result, *phrases: str) -> None:
    """Exit code 2 and one error naming the problem and the fix (rich may wrap it; the words are checked)."""
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert message.startswith("error:") and message.count("error:") == 1, message
    assert message.count(" Fix: ") == 1 and "Traceback" not in result.output, message
    for phrase in phrases:
        assert phrase in message, message


def no_leftovers(out: Path) -> bool:
    return not list(out.parent.glob(f".{out.name}.upcycle-*"))


@pytest.fixture
def llama(dense_dir, tmp_path) -> Path:
    """A private copy of the tiny Llama (a refusal that failed could damage it)."""
    return Path(shutil.copytree(dense_dir("llama"), tmp_path / "models" / "llama"))


# ------------------------------------------------------------------------------------------------------ convert


@pytest.mark.parametrize(
    ("out_of", "flags", "relation"),
    [
        (lambda src: src, ["--force"], "is the source"),
        (lambda src: src / "sub", [], "is inside the source"),
        (lambda src: src.parent, ["--force"], "contains the source"),
        (lambda src: src / "sub", ["--dry-run"], "is inside the source"),
    ],
    ids=["SRC-SRC-force", "SRC-SRC/sub", "OUT-contains-SRC", "dry-run"],
)
def test_convert_never_writes_into_or_over_its_source(cli, llama, out_of, flags, relation):
    before = snapshot(llama.parent)
    assert_refused(cli("convert", llama, out_of(llama), *flags), relation)
    assert snapshot(llama.parent) == before


def test_convert_resolves_symlinks_and_guards_a_gguf_file(cli, llama, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(llama)
    before = snapshot(llama)
    assert_refused(cli("convert", llama, link, "--force"), "is the source")
    assert snapshot(llama) == before and link.resolve() == llama
    gguf = tmp_path / "ggufs" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF not really")
    for out in (gguf, gguf.parent):
        assert_refused(cli("convert", gguf, out, "--force"), "the source")
        assert gguf.read_bytes() == b"GGUF not really"


# ------------------------------------------------------------------------------------------------------- export


@pytest.fixture
def run(llama, tmp_path) -> Path:
    """A run folder holding one real checkpoint of the tiny Llama (no data or tokenizer needed)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.arange(8).view(1, 8), labels=torch.arange(8).view(1, 8)).loss.backward()
    optimizer.step()
    state = {"step": 1, "tokens": 8, "eval_history": [], "recipe": {"model": {"path": str(llama)}}}
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, 1, model, optimizer, state)
    return run_dir


def test_export_refuses_an_existing_out_and_force_replaces_it_atomically(cli, run, tmp_path):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    before, run_before = snapshot(out), snapshot(run)
    assert_refused(cli("export", run, out), "already exists", "--force")
    assert_refused(cli("export", run, out, "--force"), "holds notes.txt", "never anything else")
    assert snapshot(out) == before and snapshot(run) == run_before

    (out / "notes.txt").unlink()
    assert cli("export", run, out, "--force").exit_code == 0  # an empty folder is replaced
    old_inode = out.stat().st_ino
    result = cli("export", run, out, "--force")  # and so is an earlier export
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file()
    assert out.stat().st_ino != old_inode and no_leftovers(out)  # a new folder renamed in, the old one gone
    assert snapshot(run) == run_before


@pytest.mark.parametrize(
    ("out_of", "relation"),
    [
        (lambda run, model: run / "checkpoints" / "step-00000001", "is the checkpoint"),
        (lambda run, model: run / "checkpoints" / "step-00000001" / "x", "is inside the checkpoint"),
        (lambda run, model: run, "contains the checkpoint"),
        (lambda run, model: run / "elsewhere", "is inside the run folder"),
        (lambda run, model: model, "is the model folder"),
        (lambda run, model: model / "x", "is inside the model folder"),
        (lambda run, model: model.parent, "contains the model folder"),
    ],
    ids=["checkpoint", "in-checkpoint", "run", "in-run", "model", "in-model", "around-model"],
)
def test_export_never_writes_into_or_over_what_it_reads(cli, run, llama, out_of, relation):
    before = snapshot(run.parent)
    assert_refused(cli("export", run, out_of(run, llama), "--force"), relation)
    assert snapshot(run.parent) == before


def test_export_into_the_runs_own_export_folder_is_allowed(cli, run):
    result = cli("export", run, run / "export")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "export" / "upcycle.json").read_text())["training"]["steps"] == 1


def test_failed_replacement_keeps_the_old_output(tmp_path, monkeypatch):
    out, tmp = tmp_path / "out", tmp_path / ".out.upcycle-tmp-1"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    real, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(output_safety.os, "replace", second_rename_fails)
    with pytest.raises(OSError):
        publish_atomically(tmp, out, force=True)
    assert (out / "old.txt").read_text() == "old"
    with pytest.raises(OutputError, match="--force"):
        publish_atomically(tmp, out, force=False)


def test_a_kill_between_the_renames_is_undone_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    aside = tmp_path / ".out.upcycle-old-999999999"  # a process that no longer exists
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    sweep_stale(out)
    assert (out / "old.txt").read_text() == "old" and not aside.exists()


# -------------------------------------------------------------------------------------------------------- train


def write_recipe(tmp_path: Path, model: Path, output_dir: Path, **run) -> Path:
    data = tmp_path / "data" / "train.txt"
    data.parent.mkdir(exist_ok=True)
    data.write_text(CORPUS * 40)
    recipe = {
        "model": {"path": str(model), "experts_implementation": "grouped_mm"},
        "data": {"train": [str(data)], "seq_len": 16, "cache_dir": str(tmp_path / "cache")},
        "batch": {"micro_batch_size": 2, "grad_accum": 1, "steps": 1},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 0},
        "run": {"output_dir": str(output_dir), "precision": "fp32", "tensorboard": False, **run},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    ("out_of", "relation"),
    [
        (lambda model: model / "run", "is inside model.path"),
        (lambda model: model, "is model.path"),
        (lambda model: model.parent, "contains model.path"),
    ],
    ids=["inside", "equal", "containing"],
)
def test_train_refuses_an_output_dir_over_the_model_folder(cli, llama, tmp_path, out_of, relation):
    recipe = write_recipe(tmp_path, llama, out_of(llama))
    before = snapshot(llama.parent)
    assert_refused(cli("train", recipe), "run.output_dir", relation)
    assert snapshot(llama.parent) == before


def test_train_refuses_a_user_file_in_the_export_folder(cli, llama, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "export" / "notes.txt").write_text("the user's")
    (run_dir / "export" / "config.json").write_text("{}")  # an export's own name is not what stops it
    before = snapshot(run_dir)
    assert_refused(cli("train", write_recipe(tmp_path, llama, run_dir)), "notes.txt", "export")
    assert snapshot(run_dir) == before  # refused before anything was written: no metrics, no recipe copy


def test_train_replaces_its_own_earlier_export(tmp_path):
    model = make_dense("llama", tmp_path / "model", vocab_size=320, num_hidden_layers=1)
    make_tokenizer(model)
    run_dir = tmp_path / "run"
    recipe = recipe_from_dict(yaml.safe_load(write_recipe(tmp_path, model, run_dir).read_text()), tmp_path)
    first = train(recipe)
    assert first.export_dir == str(run_dir / "export")
    check_replaceable_export(run_dir / "export")  # what an export writes counts as the export's own
    inode = (run_dir / "export").stat().st_ino
    again = train(recipe, resume=True)  # nothing left to train: it exports again, over its own export
    assert again.export_dir == str(run_dir / "export") and (run_dir / "export").stat().st_ino != inode
    assert no_leftovers(run_dir / "export")


# ------------------------------------------------------------------------------------------------------ compare


def compare_recipe(tmp_path: Path, model: Path) -> Path:
    return write_recipe(tmp_path, model, tmp_path / "unused-run")


def test_compare_refuses_a_folder_holding_other_files(cli, llama, tmp_path):
    out = tmp_path / "cmp"
    (out / "runs").mkdir(parents=True)
    (out / "notes.txt").write_text("the user's")
    before = snapshot(out)
    assert_refused(cli("compare", compare_recipe(tmp_path, llama), "--out", out), "notes.txt", "--beside-others")
    assert snapshot(out) == before


@pytest.mark.parametrize(
    ("out_of", "relation"),
    [
        (lambda tmp, model: model / "cmp", "is inside the model folder"),
        (lambda tmp, model: model.parent, "contains the model folder"),
        (lambda tmp, model: tmp, "contains the recipe"),
        (lambda tmp, model: tmp / "data", "contains a data file"),
    ],
    ids=["in-model", "around-model", "around-recipe", "around-data"],
)
def test_compare_never_writes_into_or_over_what_it_reads(cli, llama, tmp_path, out_of, relation):
    recipe = compare_recipe(tmp_path, llama)
    before = snapshot(tmp_path)
    assert_refused(cli("compare", recipe, "--out", out_of(tmp_path, llama), "--beside-others"), relation)
    assert snapshot(tmp_path) == before


def test_compare_continues_its_own_folder_and_writes_beside_others_only_when_told(tmp_path):
    out = tmp_path / "cmp"
    for folder in ("runs/dense-s0", "models"):
        (out / folder).mkdir(parents=True)
    for name in ("compare.md", "compare.json", ".compare.png.upcycle-tmp-1"):
        (out / name).write_text("compare's")
    check_compare_out(out)  # only compare's own names: resumed without asking
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(OutputError, match="notes.txt"):
        check_compare_out(out)
    check_compare_out(out, beside_others=True)
    assert (out / "notes.txt").read_text() == "the user's"


# --------------------------------------------------------------------------------------------------------- plot


@pytest.fixture
def plot_runs(tmp_path) -> list[Path]:
    runs = []
    for name in ("a", "b"):
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        records = [
            {"kind": "eval", "step": 0, "eval_loss": 4.0, "eval_ppl": 54.6},
            {"kind": "train", "step": 1, "tokens": 64, "tokens_per_s": 100.0, "loss": 3.9},
            {"kind": "eval", "step": 1, "eval_loss": 3.5, "eval_ppl": 33.1},
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        runs.append(run_dir)
    return runs


def test_plot_refuses_an_existing_file_unless_forced(cli, plot_runs, tmp_path):
    out = tmp_path / "plot.png"
    out.write_bytes(b"the user's picture")
    before = snapshot(plot_runs[0].parent)
    assert_refused(cli("plot", *plot_runs, "--out", out), "already exists", "--force")
    assert out.read_bytes() == b"the user's picture"
    result = cli("plot", *plot_runs, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(PNG_MAGIC) and no_leftovers(out)
    assert snapshot(plot_runs[0].parent) == before


def test_plot_refuses_out_inside_a_run_folder(cli, plot_runs):
    before = snapshot(plot_runs[0].parent)
    assert_refused(cli("plot", *plot_runs, "--out", plot_runs[1] / "plot.png", "--force"), "is inside the run folder")
    assert_refused(cli("plot", *plot_runs, "--out", plot_runs[0], "--force"), "is the run folder")
    assert snapshot(plot_runs[0].parent) == before
