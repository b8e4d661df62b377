"""`model.init: random`: the control that trains the same architecture from fresh weights, recorded as such."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import recipe_dict

from upcycle.errors import UpcycleError
from upcycle.hf.loading import load_causal_lm_strict, random_causal_lm
from upcycle.train.loop import train
from upcycle.train.metrics import read_metrics
from upcycle.train.recipe import recipe_from_dict
from upcycle.train.reporting import SilentReporter


class Messages(SilentReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def start(self, info) -> None: ...
    def step(self, record) -> None: ...
    def evaluated(self, record) -> None: ...

    def message(self, text: str) -> None:
        self.lines.append(text)


def test_a_random_model_is_fresh_and_the_same_for_the_same_seed(tiny_pair):
    _, moe = tiny_pair
    loaded = load_causal_lm_strict(moe).state_dict()
    first, again, other = (random_causal_lm(moe, seed).state_dict() for seed in (0, 0, 1))
    state = torch.get_rng_state()
    random_causal_lm(moe, 5)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random stream is untouched
    assert first.keys() == loaded.keys()
    weights = [k for k, v in loaded.items() if v.ndim == 2]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], loaded[k]) for k in weights)
    assert not any(torch.equal(first[k], other[k]) for k in weights)


def test_training_from_random_weights_is_recorded_as_such(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    data = recipe_dict(moe, tmp_path / "run", texts)
    data["model"]["init"] = "random"
    messages = Messages()
    train(recipe_from_dict(data, tmp_path), reporter=messages)
    evals = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert "step0_matches_dense" not in evals[0] and evals[0]["eval_loss"] > 9.0  # fresh weights: ~ln(49152)
    assert any("step-0 check: not run (model.init is random" in line for line in messages.lines)
    export = tmp_path / "run" / "export"
    record = json.loads((export / "upcycle.json").read_text())
    assert record["exactness"]["method"] == "trained from a random initialisation" and record["conversion"] is None
    card = (export / "README.md").read_text()
    assert "trained from a random initialisation" in card and "base_model" not in card
    data["model"]["init"] = "pretrained"
    with pytest.raises(UpcycleError, match="model.init"):  # what is trained changed: a resume refuses it
        train(recipe_from_dict(data, tmp_path), resume=True)


def test_model_init_never_changes_on_resume_and_old_checkpoints_still_resume():
    from upcycle.errors import OptionError
    from upcycle.train.resume import resume_point

    recipe = {"model": {"path": "/m", "init": "pretrained"}, "data": {"seq_len": 32}}
    old = {"step": 2, "recipe": {"model": {"path": "/m"}, "data": {"seq_len": 32}}, "global_batch_sequences": 4}
    assert resume_point(old, recipe, 4, 1, set()).step == 2  # saved before model.init existed: it trained weights
    fresh = {**recipe, "model": {"path": "/m", "init": "random"}}
    for allow in (set(), {"model"}):
        with pytest.raises(OptionError, match="model.init"):
            resume_point(old, fresh, 4, 1, allow)


def test_random_init_refuses_layouts_it_cannot_hold():
    from upcycle.errors import OptionError
    from upcycle.train.model_setup import check_random_init_layout
    from upcycle.train.parallel import Layout

    check_random_init_layout("random", Layout(world_size=2, fsdp=2))  # plain FSDP holds it
    check_random_init_layout("pretrained", Layout(world_size=2, fsdp=2, ep=2))
    for layout in (Layout(world_size=2, fsdp=2, ep=2), Layout(world_size=2, replicate=2)):
        with pytest.raises(OptionError, match="model.init: random"):
            check_random_init_layout("random", layout)


def test_compare_has_the_random_initialisation_control():
    from upcycle.experiments.sizes import SIZES
    from upcycle.experiments.variants import VARIANTS, arm_points
    from upcycle.train.recipe import TrainRecipe

    paper = TrainRecipe(
        model={"path": "/nowhere"}, data={"train": ["/nowhere.txt"]}, batch={"steps": 2}, run={"output_dir": "/out"}
    )
    arms = [VARIANTS["dense"], VARIANTS["e8g1t2-renorm"], VARIANTS["e8g1t2-random"]]
    points = {p.name: p.recipe for p in arm_points(arms, arms[0], SIZES["cpu"], paper)}
    assert points["e8g1t2-random"].model.init == "random" and points["e8g1t2-renorm"].model.init == "pretrained"
    assert points["e8g1t2-random"].model.upcycle == points["e8g1t2-renorm"].model.upcycle  # the same architecture
