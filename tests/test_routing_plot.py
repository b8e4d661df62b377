"""The expert-load picture, drawn from real tiny training runs' metrics.jsonl (CPU, seconds)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from train_helpers import recipe_dict

from upcycle.errors import OptionError, OutputError
from upcycle.routing_plot import default_output, grid_shape, plot_expert_load, read_expert_load, step_edges
from upcycle.train.loop import train
from upcycle.train.metrics import read_metrics
from upcycle.train.recipe import recipe_from_dict

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUIET = {"export": False, "checkpoints": False}


def trained(model: Path, root: Path, texts, steps: int, eval_interval: int) -> Path:
    run = root / "run"
    data = recipe_dict(model, run, texts, batch={"steps": steps}, run={**QUIET, "eval_interval": eval_interval})
    train(recipe_from_dict(data, root))
    return run


@pytest.fixture(scope="module")
def moe_run(tiny_pair, texts, tmp_path_factory) -> Path:
    """The tiny E4 top-2 MoE (2 layers), 4 steps, evaluated at steps 0, 2 and 4."""
    return trained(tiny_pair[1], tmp_path_factory.mktemp("moe-run"), texts, steps=4, eval_interval=2)


@pytest.fixture(scope="module")
def dense_run(tiny_pair, texts, tmp_path_factory) -> Path:
    return trained(tiny_pair[0], tmp_path_factory.mktemp("dense-run"), texts, steps=1, eval_interval=0)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the signature: a PNG a viewer can open."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_reads_every_evaluation_of_every_layer(moe_run) -> None:
    load = read_expert_load(moe_run)
    assert load.steps == [0, 2, 4] and (load.layers, load.experts) == (2, 4)
    for shares in load.shares:
        assert all(abs(sum(layer) - 1) < 1e-3 for layer in shares)
    assert all(1 <= v <= 4 for layer in range(2) for v in load.imbalance(layer))


def test_draws_a_png_of_a_sane_size(moe_run, tmp_path) -> None:
    out = plot_expert_load(moe_run, tmp_path / "plots" / "load.png", title="tiny E4 top-2")
    assert out == tmp_path / "plots" / "load.png"
    width, height = png_size(out)
    assert 600 <= width <= 3000 and 400 <= height <= 3000
    assert [p.name for p in out.parent.iterdir()] == ["load.png"]  # no temporary file left beside it


def test_default_output_sits_beside_the_run_folder(moe_run, tmp_path) -> None:
    run = tmp_path / "my-run"
    run.mkdir()
    shutil.copy2(moe_run / "metrics.jsonl", run / "metrics.jsonl")
    assert default_output(run) == tmp_path / "my-run-expert-load.png"
    assert plot_expert_load(run) == tmp_path / "my-run-expert-load.png"
    png_size(tmp_path / "my-run-expert-load.png")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]  # the run folder is left as its run wrote it


def test_refuses_a_dense_run(dense_run, tmp_path) -> None:
    assert any(r["kind"] == "eval" for r in read_metrics(dense_run))  # it was evaluated: only the routers lack
    with pytest.raises(OptionError, match="no expert-load records.*dense run") as caught:
        plot_expert_load(dense_run, tmp_path / "load.png")
    assert caught.value.fix and "upcycled MoE" in caught.value.fix
    assert not (tmp_path / "load.png").exists()


def test_refuses_a_missing_folder_and_one_without_metrics(tmp_path) -> None:
    with pytest.raises(OptionError, match="is not a folder"):
        plot_expert_load(tmp_path / "nowhere", tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OptionError, match="holds no metrics.jsonl"):
        plot_expert_load(tmp_path / "empty", tmp_path / "b.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_replaces_an_existing_png_only_with_force(moe_run, tmp_path) -> None:
    out = tmp_path / "load.png"
    out.write_bytes(b"not mine")
    with pytest.raises(OutputError, match="already exists"):
        plot_expert_load(moe_run, out)
    assert out.read_bytes() == b"not mine"
    plot_expert_load(moe_run, out, force=True)
    png_size(out)


def test_never_writes_into_the_run_folder(moe_run) -> None:
    with pytest.raises(OutputError, match="is inside the run folder"):
        plot_expert_load(moe_run, moe_run / "expert_load.png")
    assert not (moe_run / "expert_load.png").exists()


def test_a_redone_step_keeps_its_last_record_and_mixed_shapes_are_refused(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"kind": "eval", "step": 0, "expert_load": [[0.5, 0.5]]},
        {"kind": "eval", "step": 2, "expert_load": [[0.9, 0.1]]},
        {"kind": "train", "step": 2, "loss": 3.0},
        {"kind": "eval", "step": 2, "expert_load": [[0.7, 0.3]]},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    load = read_expert_load(run)
    assert load.steps == [0, 2] and load.shares[1] == [[0.7, 0.3]]
    assert load.imbalance(0) == pytest.approx([1.0, 1.4])
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"kind": "eval", "step": 4, "expert_load": [[0.25] * 4]}) + "\n")
    with pytest.raises(OptionError, match="different shapes"):
        read_expert_load(run)


def test_grid_keeps_small_models_in_one_row_and_many_layers_wide() -> None:
    assert grid_shape(1) == (1, 1) and grid_shape(2) == (1, 2) and grid_shape(4) == (1, 4)
    assert grid_shape(30) == (4, 8)
    for layers in range(1, 100):
        rows, columns = grid_shape(layers)
        assert rows * columns >= layers > (rows - 1) * columns and columns >= rows


def test_columns_are_as_wide_as_the_steps_they_stand_for() -> None:
    assert step_edges([7]) == [6.5, 7.5]
    assert step_edges([0, 2, 4]) == [-1, 1, 3, 5]
    assert step_edges([0, 10, 12]) == [-5, 5, 11, 13]


def test_plot_command_draws_the_heatmap_beside_the_loss_plot(cli, moe_run, dense_run, tmp_path) -> None:
    out = tmp_path / "plots" / "loss.png"
    out.parent.mkdir()
    result = cli("plot", moe_run, "--out", out, "--experts")
    assert result.exit_code == 0, result.stdout
    heatmap = out.with_name(f"loss-{moe_run.name}-expert-load.png")
    assert out.is_file() and heatmap.is_file() and png_size(heatmap)[0] > 400
    assert str(heatmap) in result.stdout.replace("\n", "")
    refused = cli("plot", dense_run, "--out", tmp_path / "dense.png", "--experts")
    assert refused.exit_code == 2  # a dense run has no expert load: said in one line, not drawn
