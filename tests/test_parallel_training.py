"""Training under every layout gives the run one process gives: FSDP2, expert parallelism, both, and HSDP over two
launchers (two "nodes" on 127.0.0.1), all on real gloo process groups; checkpoints resume across layouts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import load_clean
from train_helpers import (
    free_port,
    losses,
    make_tiny_pair,
    recipe_dict,
    run_cli,
    run_ranks,
    shakespeare_texts,
    write_recipe,
)

from upcycle.train.checkpoint import list_checkpoints
from upcycle.train.metrics import read_metrics
from upcycle.train.parallel import engine_available

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not engine_available(), reason="this transformers has no expert parallelism"),
]

EXPERTS = 4
STEPS = 4


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    return make_tiny_pair(tmp_path_factory.mktemp("parallel"))[1]


def layout_recipe(moe: Path, out: Path, **moe_options) -> dict:
    """One sequence per micro-batch, 4 per step: every layout (1, 2 or 4 data ranks) runs the same micro-batches."""
    data = recipe_dict(
        moe,
        out,
        shakespeare_texts(),
        batch={"micro_batch_size": 1, "grad_accum": None, "global_batch_tokens": 4 * 32, "steps": STEPS},
        run={"export": True, "eval_interval": 2, "checkpoint_interval": 2, "keep_checkpoints": 3},
    )
    data["model"]["experts_implementation"] = "upcycle"  # the project's kernels (reference fallback on the CPU)
    data["moe"].update(moe_options)
    return data


def train_under(ranks: int, recipe: Path, *sets: str, resume: bool = False) -> None:
    args = ["train", str(recipe), *[a for s in sets for a in ("--set", s)], *(["--resume"] if resume else [])]
    result = run_cli(*args) if ranks == 1 else run_ranks(ranks, *args)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])


def close(a: list[float], b: list[float], rel: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(x) for x, y in zip(a, b, strict=True))


def eval_losses(run: Path) -> list[float]:
    return [r["eval_loss"] for r in read_metrics(run) if r["kind"] == "eval"]


def layout_record(run: Path) -> dict:
    return next(r for r in read_metrics(run) if r["kind"] == "layout")


def export_gap(a: Path, b: Path) -> float:
    """How far apart the two exports compute: their logits on a fixed batch, relative to the largest logit.

    Not their raw weights: Adam divides each gradient by its own running size, so a weight whose gradient is
    rounding noise (another reduction order on another layout) moves by a full step either way; such weights change
    the weights' difference, not the function (the losses agree to 1e-5)."""
    import torch

    first, second = (load_clean(run / "export") for run in (a, b))
    assert first.state_dict().keys() == second.state_dict().keys()
    ids = torch.randint(0, first.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x, y = first(ids).logits.double(), second(ids).logits.double()
    return ((x - y).abs().max() / x.abs().max()).item()


@pytest.fixture(scope="module")
def runs(moe, tmp_path_factory) -> dict[str, Path]:
    """One process, FSDP 2, EP 2 (2 ranks), EP 2 x expert-FSDP 2 (4 ranks): the same recipe."""
    root = tmp_path_factory.mktemp("layouts")
    layouts = {"one": (1, []), "fsdp2": (2, []), "ep2": (2, ["parallel.ep=2"]), "ep2-fsdp4": (4, ["parallel.ep=2"])}
    out = {}
    for name, (ranks, sets) in layouts.items():
        recipe = write_recipe(root / f"{name}.yaml", layout_recipe(moe, root / name))
        train_under(ranks, recipe, *sets)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", ["fsdp2", "ep2", "ep2-fsdp4"])
def test_every_layout_trains_as_one_process_does(runs, name):
    reference, run = runs["one"], runs[name]
    assert close(losses(reference), losses(run)), (losses(reference), losses(run))
    assert close(eval_losses(reference), eval_losses(run)), (eval_losses(reference), eval_losses(run))
    assert export_gap(reference, run) <= 1e-4


def stored_tensors(export: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for path in sorted(export.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            shapes |= {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    return shapes


@pytest.mark.parametrize("name", ["fsdp2", "ep2", "ep2-fsdp4"])
def test_the_export_stores_the_same_tensors_under_every_layout(runs, name):
    """A tied LM head is stored once, as one process stores it (sharded layouts gathered it as a second tensor)."""
    one, other = stored_tensors(runs["one"] / "export"), stored_tensors(runs[name] / "export")
    assert other == one and "lm_head.weight" not in one


def test_held_out_expert_load_does_not_depend_on_the_rank_count(moe, tmp_path):
    """5 held-out sequences in micro-batches of 2 over 2 ranks: padding rows, which count nothing."""
    loads = {}
    for ranks in (1, 2):
        data = layout_recipe(moe, tmp_path / f"ranks{ranks}")
        data["batch"].update(micro_batch_size=2, steps=1)
        data["data"]["eval_sequences"] = 5
        data["run"].update(export=False, checkpoints=False, eval_interval=0)
        train_under(ranks, write_recipe(tmp_path / f"ranks{ranks}.yaml", data))
        loads[ranks] = next(r for r in read_metrics(tmp_path / f"ranks{ranks}") if r["kind"] == "eval")["expert_load"]
    assert loads[1] == loads[2]


@pytest.mark.parametrize(("name", "ranks", "ep"), [("one", 1, 1), ("fsdp2", 2, 1), ("ep2", 2, 2), ("ep2-fsdp4", 4, 2)])
def test_each_rank_holds_its_share_of_experts_and_runs_the_project_kernels(runs, name, ranks, ep):
    record = layout_record(runs[name])
    assert record["layout"]["world_size"] == ranks and record["layout"]["ep"] == ep
    assert record["experts_implementation"] == "upcycle"
    per_rank = EXPERTS // ep
    for rank, placement in enumerate(record["placement"]):
        first, last = placement["experts"]
        assert last - first + 1 == per_rank and first == (rank % ep) * per_rank
        assert placement["local_rows"] == (EXPERTS // ranks if ranks > 1 else EXPERTS)  # ep x expert-fsdp split
    for calls in record["experts_calls"]:  # every rank ran its experts through the project's op, on E/ep of them
        assert set(calls) == {f"reference:{per_rank}"}, calls


RUNS = ("one", "ep")


def test_capacity_dropping_under_expert_parallelism_matches_one_process(moe, tmp_path):
    """Capacity is counted per micro-batch on the rank that routes it, before the all-to-all: layout-independent."""
    one = write_recipe(tmp_path / "one.yaml", layout_recipe(moe, tmp_path / "one", capacity_factor=1.0))
    ep = write_recipe(tmp_path / "ep.yaml", layout_recipe(moe, tmp_path / "ep", capacity_factor=1.0))
    train_under(1, one)
    train_under(2, ep, "parallel.ep=2")
    assert close(losses(tmp_path / "one"), losses(tmp_path / "ep"))
    dropped = [[r["dropped_fraction"] for r in read_metrics(tmp_path / n) if r["kind"] == "train"] for n in RUNS]
    assert dropped[0] == pytest.approx(dropped[1], rel=1e-6) and max(dropped[0]) > 0


@pytest.mark.parametrize(("ranks", "sets"), [(1, []), (4, []), (4, ["parallel.ep=4"])])
def test_a_checkpoint_of_ep2_fsdp4_resumes_under_another_layout(moe, runs, tmp_path, ranks, sets):
    """The EP 2 x expert-FSDP 2 run, cut back to its step-2 checkpoint, continues on 1 rank, FSDP 4 or EP 4."""
    run = tmp_path / "run"
    shutil.copytree(runs["ep2-fsdp4"], run)
    for checkpoint in list_checkpoints(run)[1:]:  # as if it had stopped right after step 2
        shutil.rmtree(checkpoint)
    shutil.rmtree(run / "export")
    recipe = write_recipe(tmp_path / "resume.yaml", layout_recipe(moe, run))
    train_under(ranks, recipe, *sets, resume=True)
    assert close(losses(run), losses(runs["one"])), (losses(run), losses(runs["one"]))
    assert export_gap(runs["one"], run) <= 1e-4


def test_two_launchers_on_localhost_train_hsdp_as_one_process(moe, runs, tmp_path):
    """Two `torchrun --nnodes 2` launchers (one process each) meet at a c10d rendezvous: replicate 2 = HSDP."""
    recipe = write_recipe(tmp_path / "nodes.yaml", layout_recipe(moe, tmp_path / "nodes"))
    torchrun = Path(sys.executable).parent / "torchrun"
    endpoint = f"127.0.0.1:{free_port()}"
    launchers = [
        subprocess.Popen(
            [
                str(torchrun),
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "upcycle-test",
                "-m",
                "upcycle",
                "train",
                str(recipe),
                "--set",
                "parallel.replicate=2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ},
        )
        for node in range(2)
    ]
    outputs = [launcher.communicate(timeout=600) for launcher in launchers]
    assert all(launcher.returncode == 0 for launcher in launchers), [err[-3000:] for _, err in outputs]
    record = layout_record(tmp_path / "nodes")
    assert record["layout"] | {"efsdp": 1} == {
        "world_size": 2,
        "replicate": 2,
        "fsdp": 1,
        "tp": 1,
        "ep": 1,
        "efsdp": 1,
    }
    assert close(losses(tmp_path / "nodes"), losses(runs["one"]))
    assert export_gap(runs["one"], tmp_path / "nodes") <= 1e-4
