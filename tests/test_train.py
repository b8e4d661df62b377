"""`upcycle train` end to end on a tiny real MoE (SmolLM2's tokenizer, real Shakespeare text)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import load_clean
from train_helpers import VOCAB, losses, recipe_dict, run_cli, run_ranks, write_recipe

from upcycle.train import moe_losses
from upcycle.train.distributed import Dist
from upcycle.train.loop import TrainingDiverged, train
from upcycle.train.metrics import read_metrics
from upcycle.train.model_setup import load_model
from upcycle.train.parallel import Layout
from upcycle.train.recipe import recipe_from_dict


def test_train_end_to_end(tiny_pair, texts, tmp_path):
    dense, moe = tiny_pair
    summary = train(recipe_from_dict(recipe_dict(moe, tmp_path / "run", texts), tmp_path))
    records = read_metrics(tmp_path / "run")
    train_records = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert all(r["aux_loss"] > 0 and r["tokens_per_s"] > 0 for r in train_records)
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals[0]["step0_matches_dense"] is True
    assert abs(evals[0]["eval_loss"] - evals[0]["dense_eval_loss"]) <= 1e-5 * evals[0]["dense_eval_loss"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learns
    assert len(evals[-1]["expert_load"]) == 2 and len(evals[-1]["expert_load"][0]) == 4
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000004", "step-00000006"]
    export = tmp_path / "run" / "export"
    assert summary.export_dir == str(export)
    model = load_clean(export)
    assert type(model).__name__ == "MixtralForCausalLM"
    index = (
        json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
        if (export / "model.safetensors.index.json").exists()
        else None
    )
    keys = set(index) if index else set(_safetensors_keys(export / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys
    provenance = json.loads((export / "upcycle.json").read_text())
    assert provenance["training"]["steps"] == 6 and provenance["kind"] == "trained"
    assert provenance["exactness"]["exact"] is False and provenance["conversion"]["exactness"]["exact"] is True
    assert (export / "tokenizer.json").is_file()


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        return list(handle.keys())


def test_aux_loss_reaches_the_router(tiny_pair):
    """With identical experts the LM loss gives the router (almost) nothing; the aux loss does."""
    _, moe = tiny_pair
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    grads = {}
    for coef in (0.0, 0.01):
        model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)
        model.config.output_router_logits = False
        taps = moe_losses.RouterTaps(model)
        loss = model(input_ids=ids, labels=ids).loss
        if coef:
            loss = loss + coef * moe_losses.aux_loss(taps.records)
        loss.backward()
        grads[coef] = torch.stack([r.weight.grad.norm() for _, r in taps.routers])
    assert len(grads[0.0]) == 2
    assert (grads[0.01] > 0).all()
    assert (grads[0.01] > 100 * grads[0.0]).all(), grads


def test_capacity_factor_drops_overflowing_assignments():
    index_TK = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    keep_TK = moe_losses.within_capacity(index_TK, num_experts=4, capacity_factor=1.0)  # capacity 2 per expert
    # expert 0 takes tokens 0 and 1 (first choices); token 2's and token 3's expert-0 assignments overflow
    assert keep_TK.tolist() == [[True, True], [True, True], [False, True], [True, False]]


def test_training_with_capacity_dropping_runs(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    data = recipe_dict(
        moe,
        tmp_path / "run",
        texts,
        moe={"capacity_factor": 1.0},
        batch={"steps": 2},
        run={"export": False, "eval_interval": 0, "checkpoint_interval": 0},
    )
    train(recipe_from_dict(data, tmp_path))
    assert len(losses(tmp_path / "run")) == 2


def test_dense_control_trains_the_dense_model(tiny_pair, texts, tmp_path):
    dense, _ = tiny_pair
    data = recipe_dict(dense, tmp_path / "run", texts, batch={"steps": 2}, run={"eval_interval": 0})
    summary = train(recipe_from_dict(data, tmp_path))
    assert all(r["aux_loss"] == 0 for r in read_metrics(tmp_path / "run") if r["kind"] == "train")
    assert type(load_clean(Path(summary.export_dir))).__name__ == "LlamaForCausalLM"


def test_non_finite_steps_are_skipped_then_training_stops(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    data = recipe_dict(
        moe,
        tmp_path / "run",
        texts,
        optim={"lr": 1e20, "min_lr": 1e19, "warmup_steps": 0},
        run={"max_bad_steps": 2, "eval_interval": 0, "checkpoint_interval": 0, "export": False},
    )
    with pytest.raises(TrainingDiverged, match="consecutive non-finite"):
        train(recipe_from_dict(data, tmp_path))
    skipped = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train" and r["skipped"]]
    assert len(skipped) == 2


def test_resume_after_sigkill_reaches_the_same_losses(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    reference = write_recipe(
        tmp_path / "reference.yaml", recipe_dict(moe, tmp_path / "reference", texts, run={"export": False})
    )
    interrupted = write_recipe(
        tmp_path / "interrupted.yaml", recipe_dict(moe, tmp_path / "interrupted", texts, run={"export": False})
    )
    done = run_cli("train", str(reference))
    assert done.returncode == 0, done.stderr
    process = subprocess.Popen(
        [sys.executable, "-m", "upcycle", "train", str(interrupted)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (tmp_path / "interrupted" / "checkpoints" / "step-00000002").is_dir():
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = losses(tmp_path / "interrupted")
    assert 2 <= len(partial) < 6, "the kill must land mid-run"
    resumed = run_cli("train", str(interrupted), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "interrupted") == losses(tmp_path / "reference")  # bit-identical floats


def test_ctrl_c_says_what_the_run_kept_and_how_to_go_on(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    data = recipe_dict(moe, tmp_path / "run", texts, run={"export": False, "checkpoint_interval": 1})
    data["batch"]["steps"] = 500
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    process = subprocess.Popen(
        [sys.executable, "-m", "upcycle", "train", str(recipe), "--set", "optim.lr=0.002"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal, not a background job
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (tmp_path / "run" / "checkpoints" / "step-00000002").is_dir():
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    line = " ".join(stderr.split())
    assert f"the run in {tmp_path / 'run'} has checkpoints up to step" in line, stderr
    assert f"upcycle train {recipe} --set optim.lr=0.002 --resume" in line and "nothing was" not in line


def test_two_gloo_ranks_match_one_rank(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    common = {
        "batch": {"micro_batch_size": 2, "grad_accum": None, "global_batch_tokens": 4 * 2 * 32, "steps": 3},
        "run": {"export": True, "eval_interval": 3, "checkpoint_interval": 0},
    }
    one = write_recipe(tmp_path / "one.yaml", recipe_dict(moe, tmp_path / "one", texts, **common))
    two = write_recipe(tmp_path / "two.yaml", recipe_dict(moe, tmp_path / "two", texts, **common))
    assert run_cli("train", str(one)).returncode == 0
    launched = run_ranks(2, "train", str(two))
    assert launched.returncode == 0, launched.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b, strict=True)), (a, b)
    eval_a = [r["eval_loss"] for r in read_metrics(tmp_path / "one") if r["kind"] == "eval"]
    eval_b = [r["eval_loss"] for r in read_metrics(tmp_path / "two") if r["kind"] == "eval"]
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(eval_a, eval_b, strict=True)), (eval_a, eval_b)
    exported = [load_clean(tmp_path / name / "export").state_dict() for name in ("one", "two")]
    assert exported[0].keys() == exported[1].keys()
    worst = {
        key: (exported[1][key] - value).abs().max().item() / value.abs().max().item()
        for key, value in exported[0].items()
        if value.numel()
    }
    assert max(worst.values()) <= 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:4]


def test_bad_recipe_is_refused_with_the_key(tmp_path, tiny_pair, texts):
    _, moe = tiny_pair
    data = recipe_dict(moe, tmp_path / "run", texts)
    data["optim"]["lr"] = "fast"
    result = run_cli("train", str(write_recipe(tmp_path / "bad.yaml", data)))
    assert result.returncode == 2 and "optim.lr" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_fresh_run_refuses_a_folder_with_checkpoints_and_tensorboard_logs(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    data = recipe_dict(
        moe, tmp_path / "run", texts, batch={"steps": 2}, run={"export": False, "tensorboard": True, "eval_interval": 0}
    )
    train(recipe_from_dict(data, tmp_path))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    result = run_cli("train", str(write_recipe(tmp_path / "again.yaml", data)))
    assert result.returncode == 2 and "--resume" in result.stderr


def test_export_on_demand_from_a_checkpoint(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    data = recipe_dict(moe, tmp_path / "run", texts, batch={"steps": 2}, run={"eval_interval": 0})
    train(recipe_from_dict(data, tmp_path))
    result = run_cli("export", str(tmp_path / "run"), str(tmp_path / "exported"))
    assert result.returncode == 0, result.stderr
    on_demand = load_clean(tmp_path / "exported").state_dict()
    at_end = load_clean(tmp_path / "run" / "export").state_dict()
    assert on_demand.keys() == at_end.keys()
    assert all(torch.equal(on_demand[k], at_end[k]) for k in at_end)
    assert json.loads((tmp_path / "exported" / "upcycle.json").read_text())["training"]["steps"] == 2


def test_activation_checkpointing_gives_the_same_losses(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    runs = {}
    for flag in (False, True):
        data = recipe_dict(
            moe,
            tmp_path / f"run-{flag}",
            texts,
            model={"activation_checkpointing": flag},
            batch={"steps": 2},
            run={"export": False, "checkpoints": False, "eval_interval": 0},
        )
        recipe = recipe_from_dict(data, tmp_path)
        loaded = load_model(recipe, Dist(0, 1, 0, torch.device("cpu")), Layout(1), torch.float32)
        name = (
            "is_activation_checkpointing"
            if hasattr(loaded, "is_activation_checkpointing")
            else ("is_gradient_checkpointing")
        )  # the older name, before transformers 5.2x
        assert getattr(loaded, name) is flag
        train(recipe)
        runs[flag] = losses(tmp_path / f"run-{flag}")
    assert len(runs[True]) == 2
    assert all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(runs[False], runs[True], strict=True)), runs
