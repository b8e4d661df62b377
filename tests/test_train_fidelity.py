"""Training that cannot drift silently: resume guards, the per-layer aux loss, honest exports, the step-0 check."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_clean
from safetensors import safe_open
from train_helpers import losses, make_tiny_pair, recipe_dict, run_cli, run_ranks, write_recipe

from upcycle.errors import OptionError
from upcycle.train import moe_losses
from upcycle.train.loop import TrainingDiverged, train
from upcycle.train.metrics import read_metrics
from upcycle.train.recipe import recipe_from_dict
from upcycle.train.reporting import SilentReporter


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("kind") == "train"]


def eval_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]


class Messages(SilentReporter):
    """A reporter that keeps what the loop says."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def start(self, info):
        pass

    def step(self, record):
        pass

    def evaluated(self, record):
        pass

    def message(self, text):
        self.lines.append(text)


# ---- resume: the data stream and the recipe -------------------------------------------------------------------


@pytest.fixture
def stopped_run(tiny_pair, texts, tmp_path):
    """A run stopped after step 4 of 6 (its checkpoint at step 4), ready to be resumed."""
    _, moe = tiny_pair
    data = recipe_dict(moe, tmp_path / "run", texts, batch={"steps": 4}, run={"export": False, "eval_interval": 0})
    train(recipe_from_dict(data, tmp_path))
    return data


def resumed(data: dict, tmp_path: Path, allow: set[str] = frozenset(), **changes) -> dict:
    for key, value in changes.items():
        section, name = key.split("__")
        data[section] = {**data[section], name: value}
    data["batch"] = {**data["batch"], "steps": 6}
    return recipe_from_dict(data, tmp_path)


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"batch__micro_batch_size": 4}, "--allow-changes global_batch"),
        ({"data__seq_len": 16}, "resume with data.seq_len=32"),  # never allowed: it re-packs the data
        ({"run__seed": 1}, "--allow-changes seed"),
    ],
    ids=["batch", "seq_len", "seed"],
)
def test_resume_refuses_a_change_of_what_is_trained(stopped_run, tmp_path, change, name):
    with pytest.raises(OptionError, match=name):
        train(resumed(dict(stopped_run), tmp_path, **change), resume=True)
    assert [r["step"] for r in train_records(tmp_path / "run")] == [1, 2, 3, 4]  # nothing ran


def test_resume_with_an_allowed_batch_change_continues_at_the_exact_position(stopped_run, tmp_path):
    saved = train_records(tmp_path / "run")[-1]
    assert saved["data_position"] == 4 * 4 and saved["tokens"] == 4 * 4 * 32  # 4 sequences of 32 tokens per step
    messages = Messages()
    train(
        resumed(dict(stopped_run), tmp_path, batch__micro_batch_size=4),
        messages,
        resume=True,
        allow_changes={"global_batch"},
    )
    records = train_records(tmp_path / "run")
    assert [r["data_position"] for r in records[4:]] == [16 + 8, 16 + 16]  # 8 sequences per step from position 16
    assert [r["tokens"] for r in records[4:]] == [512 + 256, 512 + 512]
    assert any("sequences per step: 4 -> 8" in line for line in messages.lines)


def test_one_to_two_ranks_with_a_global_batch_recipe_equals_the_uninterrupted_run(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    common = {
        "batch": {"micro_batch_size": 2, "grad_accum": None, "global_batch_tokens": 4 * 2 * 32, "steps": 6},
        "run": {"export": False, "eval_interval": 0, "checkpoint_interval": 3},
        "optim": {"warmup_steps": 4},  # the first part's 3 steps warm up: the same rates whatever its batch.steps
    }
    whole = write_recipe(tmp_path / "whole.yaml", recipe_dict(moe, tmp_path / "whole", texts, **common))
    split = recipe_dict(moe, tmp_path / "split", texts, **common)
    assert run_cli("train", str(whole)).returncode == 0
    first = write_recipe(tmp_path / "first.yaml", {**split, "batch": {**split["batch"], "steps": 3}})
    assert run_cli("train", str(first)).returncode == 0
    second = write_recipe(tmp_path / "second.yaml", split)
    launched = run_ranks(2, "train", str(second), "--resume")
    assert launched.returncode == 0, launched.stderr[-3000:]
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert len(a) == len(b) == 6
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b, strict=True)), (a, b)


def test_a_grad_accum_recipe_on_more_ranks_must_be_allowed(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    data = recipe_dict(moe, tmp_path / "run", texts, batch={"steps": 2}, run={"export": False, "eval_interval": 0})
    assert run_cli("train", str(write_recipe(tmp_path / "a.yaml", data))).returncode == 0
    more = write_recipe(tmp_path / "b.yaml", {**data, "batch": {**data["batch"], "steps": 4}})
    refused = run_ranks(2, "train", str(more), "--resume")
    assert refused.returncode != 0  # each rank exits 2; torchrun reports 1
    assert "global batch follows the 1 -> 2 ranks" in " ".join(refused.stderr.split())
    allowed = run_ranks(2, "train", str(more), "--resume", "--allow-changes", "global_batch")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert [r["data_position"] for r in train_records(tmp_path / "run")] == [4, 8, 16, 24]


def test_the_bad_step_counter_survives_a_resume(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    blow_up = {"lr": 1e20, "min_lr": 1e19, "warmup_steps": 0}
    data = recipe_dict(
        moe,
        tmp_path / "run",
        texts,
        batch={"steps": 3},
        optim=blow_up,
        run={"max_bad_steps": 3, "eval_interval": 0, "checkpoint_interval": 1, "export": False},
    )
    train(recipe_from_dict(data, tmp_path))  # step 1 blows the weights up; steps 2 and 3 are skipped: under 3
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000003" / "trainer.json").read_text())
    assert state["trainer_state"]["bad_steps"] == 2
    with pytest.raises(TrainingDiverged, match="step 4: 3 consecutive"):
        train(recipe_from_dict({**data, "batch": {**data["batch"], "steps": 5}}, tmp_path), resume=True)


def test_a_checkpoint_before_the_first_real_step_changes_nothing(tiny_pair, texts, tmp_path):
    """DCP would make up optimizer state for a checkpoint taken before any step; later losses must not move."""
    _, moe = tiny_pair
    runs = {}
    for checkpoints in (True, False):
        data = recipe_dict(
            moe,
            tmp_path / f"run-{checkpoints}",
            texts,
            batch={"steps": 3},
            run={"export": False, "eval_interval": 0, "checkpoint_interval": 1, "checkpoints": checkpoints},
        )
        data["optim"] = {**data["optim"], "warmup_steps": 0}
        recipe = recipe_from_dict(data, tmp_path)
        with pytest.MonkeyPatch.context() as patch:  # the first step is skipped as non-finite, as after a bad batch
            import upcycle.train.trainer as trainer

            original = trainer.run_micro_batch
            calls = {"n": 0}

            def first_step_blows_up(model, taps, batch_BS, recipe, scale, autocast, original=original, calls=calls):
                values = original(model, taps, batch_BS, recipe, scale, autocast)
                calls["n"] += 1
                if calls["n"] <= 2:  # the two micro-batches of step 1
                    for p in model.parameters():
                        if p.grad is not None:
                            p.grad.fill_(math.nan)
                return values

            patch.setattr(trainer, "run_micro_batch", first_step_blows_up)
            train(recipe)
        runs[checkpoints] = losses(tmp_path / f"run-{checkpoints}")
    assert runs[True] == runs[False]


# ---- the aux loss: Megatron-Core's per-layer convention --------------------------------------------------------


def test_aux_loss_is_the_per_layer_sum_of_a_hand_computed_case():
    # layer 0: 2 tokens, 4 experts, top-1; layer 1: the same tokens, a sigmoid-scored router
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    index = torch.tensor([[0], [1]])
    softmax = logits.softmax(-1)
    # E * sum_e f_e * P_e with f = (1/2, 1/2, 0, 0) and P = the mean router probability per expert
    layer0 = 4 * (0.5 * softmax[:, 0].mean() + 0.5 * softmax[:, 1].mean())
    scores = logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True)
    layer1 = 4 * (0.5 * scores[:, 0].mean() + 0.5 * scores[:, 1].mean())
    records = [
        moe_losses.RouterRecord(logits, index),
        moe_losses.RouterRecord(logits, index, sigmoid=True),
    ]
    assert torch.allclose(moe_losses.aux_losses(records), torch.stack([layer0, layer1]))
    assert torch.allclose(moe_losses.aux_loss(records), layer0 + layer1)  # a sum, not a mean
    balanced = moe_losses.RouterRecord(torch.zeros(4, 4), torch.tensor([[0], [1], [2], [3]]))
    assert moe_losses.aux_loss([balanced] * 3).item() == pytest.approx(3.0)  # 1.0 per balanced layer


def test_router_terms_are_logged_per_layer_even_without_a_coefficient(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    data = recipe_dict(
        moe,
        tmp_path / "run",
        texts,
        batch={"steps": 2},
        moe={"aux_loss_coef": 0.0, "z_loss_coef": 0.0, "capacity_factor": 1.0},
        run={"export": False, "eval_interval": 0},
    )
    train(recipe_from_dict(data, tmp_path))
    for record in train_records(tmp_path / "run"):
        assert record["aux_loss"] > 0 and record["z_loss"] > 0
        assert len(record["aux_loss_per_layer"]) == 2
        assert record["aux_loss"] == pytest.approx(sum(record["aux_loss_per_layer"]), rel=1e-5)
        assert 0.0 <= record["dropped_fraction"] < 1.0
        per_layer = record["dropped_fraction_per_layer"]
        assert len(per_layer) == 2 and all(0.0 <= d < 1.0 for d in per_layer)
        assert record["dropped_fraction"] == pytest.approx(sum(per_layer) / 2, abs=1e-6)


def test_dropped_tokens_are_counted_per_layer():
    skewed = moe_losses.RouterRecord(torch.zeros(4, 2), torch.tensor([[0], [0], [0], [0]]))
    balanced = moe_losses.RouterRecord(torch.zeros(4, 2), torch.tensor([[0], [1], [0], [1]]))
    for record in (skewed, balanced):  # capacity ceil(1.0 * 4 tokens * 1 / 2 experts) = 2 per expert
        record.kept_TK = moe_losses.within_capacity(record.index_TK, 2, 1.0)
    assert moe_losses.dropped_fractions([skewed, balanced]).tolist() == [0.5, 0.0]
    assert moe_losses.dropped_fraction([skewed, balanced]).item() == 0.25
    assert moe_losses.dropped_fractions([moe_losses.RouterRecord(torch.zeros(4, 2), skewed.index_TK)]) is None


def test_score_biases_move_towards_balance(tmp_path, texts):
    _, moe = make_tiny_pair(tmp_path, granularity=2, top_k=2)  # Glm4-MoE: a sigmoid router with a score bias
    data = recipe_dict(
        moe, tmp_path / "run", texts, batch={"steps": 2}, moe={"bias_update_rate": 1e-3}, run={"eval_interval": 0}
    )
    train(recipe_from_dict(data, tmp_path))
    biases = [
        t
        for name, t in load_clean(tmp_path / "run" / "export").state_dict().items()
        if name.endswith("e_score_correction_bias")
    ]
    assert biases and all(b.abs().max() > 0 for b in biases)  # two steps of +-1e-3 (or 0 for a balanced expert)
    assert all((b.abs() <= 2e-3 + 1e-9).all() for b in biases)


# ---- exports ----------------------------------------------------------------------------------------------------


def test_a_bf16_upcycle_exports_in_bf16_with_its_cache_setting(tmp_path, texts):
    _, moe = make_tiny_pair(tmp_path, dtype="bfloat16")
    data = recipe_dict(moe, tmp_path / "run", texts, batch={"steps": 2}, run={"eval_interval": 0})
    summary = train(recipe_from_dict(data, tmp_path))
    export = Path(summary.export_dir)
    config = json.loads((export / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["use_cache"] is True
    weights = next(export.glob("*.safetensors"))
    with safe_open(weights, "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()}  # noqa: SIM118 (safe_open is not iterable) == {torch.bfloat16}
    round_trip = load_clean(export, torch.bfloat16)
    assert next(round_trip.parameters()).dtype == torch.bfloat16
    provenance = json.loads((export / "upcycle.json").read_text())
    assert provenance["kind"] == "trained" and provenance["exactness"]["exact"] is False
    # training again from the export: not compared with the original dense model, and no false warning
    messages = Messages()
    again = recipe_dict(export, tmp_path / "again", texts, batch={"steps": 1}, run={"export": False})
    train(recipe_from_dict(again, tmp_path), messages)
    assert not any("not exact" in line for line in messages.lines)
    assert any("trained after conversion" in line for line in messages.lines)
    assert "step0_rel_diff" not in eval_records(tmp_path / "again")[0]


# ---- the step-0 check -------------------------------------------------------------------------------------------


def test_step0_check_compares_logits_and_flags_an_approximate_upcycle(tmp_path, texts):
    _, noisy = make_tiny_pair(tmp_path, noise=0.05)
    messages = Messages()
    data = recipe_dict(noisy, tmp_path / "run", texts, batch={"steps": 1}, run={"export": False})
    train(recipe_from_dict(data, tmp_path), messages)
    first = eval_records(tmp_path / "run")[0]
    assert first["step0_matches_dense"] is None and first["step0_rel_diff"] > first["step0_tolerance"]
    assert any("approximate by design" in line for line in messages.lines)


@pytest.mark.slow
@pytest.mark.parametrize("noise", [0.0, 0.05], ids=["exact", "noise-0.05"])
def test_step0_check_under_two_fsdp_ranks_in_bf16(tmp_path, texts, noise):
    _, moe = make_tiny_pair(tmp_path, noise=noise)
    data = recipe_dict(
        moe,
        tmp_path / "run",
        texts,
        batch={"micro_batch_size": 2, "grad_accum": None, "global_batch_tokens": 4 * 2 * 32, "steps": 1},
        run={"precision": "bf16", "export": False, "eval_interval": 0},
    )
    launched = run_ranks(2, "train", str(write_recipe(tmp_path / "r.yaml", data)))
    assert launched.returncode == 0, launched.stderr[-3000:]
    first = eval_records(tmp_path / "run")[0]
    assert first["step0_precision"] == "bfloat16", first
    if noise:  # approximate by design: its deviation is reported, never passed
        assert first["step0_matches_dense"] is None and first["step0_rel_diff"] > first["step0_tolerance"]
    else:  # bf16 rounding flips near-ties of a tiny random model's flat logits: most tokens still agree
        assert first["step0_matches_dense"] is True and first["step0_top1_agreement"] > 0.9


# ---- schedule and logs ------------------------------------------------------------------------------------------


def test_warmup_that_outlasts_the_run_is_warned_about(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    messages = Messages()
    data = recipe_dict(
        moe, tmp_path / "run", texts, batch={"steps": 2}, optim={"warmup_steps": 5}, run={"export": False}
    )
    train(recipe_from_dict(data, tmp_path), messages)
    assert any("never decays" in line for line in messages.lines)


def test_tensorboard_has_each_step_once_after_a_resume(tiny_pair, texts, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, moe = tiny_pair
    data = recipe_dict(
        moe,
        tmp_path / "run",
        texts,
        batch={"steps": 4},
        run={"export": False, "eval_interval": 0, "checkpoint_interval": 2, "tensorboard": True},
    )
    train(recipe_from_dict(data, tmp_path))
    # resume from step 2 (drop the later checkpoint): steps 3 and 4 are trained again
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000004")
    train(recipe_from_dict(data, tmp_path), resume=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    steps = [event.step for event in events.Scalars("train/loss")]
    assert sorted(steps) == [1, 2, 3, 4], steps


@pytest.mark.parametrize(
    ("change", "name", "positions", "tokens"),
    [({"run__seed": 1}, "seed", [16 + 4, 16 + 8], [512 + 128, 512 + 256])],
    ids=["seed"],
)
def test_resume_with_an_allowed_change_keeps_the_tokens_trained(stopped_run, tmp_path, change, name, positions, tokens):
    train(resumed(dict(stopped_run), tmp_path, **change), resume=True, allow_changes={name})
    records = train_records(tmp_path / "run")[4:]
    assert [r["data_position"] for r in records] == positions and [r["tokens"] for r in records] == tokens
