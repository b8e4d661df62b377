"""What a run reuses, resumes, overwrites and records: caches re-checked, resume bound to its data, one run per
folder, and records that tell the truth (each case failed before its fix)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from train_helpers import recipe_dict

from upcycle.errors import OptionError, UpcycleError
from upcycle.train.conversion import conversions_dir, prepare_model
from upcycle.train.loop import train
from upcycle.train.metrics import read_metrics
from upcycle.train.recipe import recipe_from_dict
from upcycle.train.reporting import SilentReporter
from upcycle.train.run_folder import LOCK_NAME
from upcycle.train.schedule import lr_at
from upcycle.train.token_cache import build_token_file, load_tokens


class Messages(SilentReporter):
    """A reporter that keeps what the loop says."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def start(self, info) -> None:
        pass

    def step(self, record) -> None:
        pass

    def evaluated(self, record) -> None:
        pass

    def message(self, text: str) -> None:
        self.lines.append(text)


def short(model: Path, out: Path, texts, steps: int = 4, **sections) -> dict:
    """A short run: `steps` steps, a checkpoint every 2, evaluation at the end only."""
    data = recipe_dict(model, out, texts, **sections)
    data["batch"]["steps"] = steps
    data["run"].update(eval_interval=0, checkpoint_interval=2)
    return data


def run(data: dict, root: Path, **kwargs):
    reporter = Messages()
    summary = train(recipe_from_dict(data, root), reporter, **kwargs)
    return summary, reporter.lines


# ---- the schedule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 2])
def test_the_schedule_has_one_peak_and_ends_at_min_lr(kind, warmup):
    rates = [lr_at(s, peak=1e-3, minimum=1e-4, warmup_steps=warmup, total_steps=6, kind=kind) for s in range(6)]
    assert rates.count(max(rates)) == 1 and max(rates) == pytest.approx(1e-3)
    assert rates[-1] == pytest.approx(1e-4) and min(rates) == rates[-1]
    assert rates.index(max(rates)) == max(warmup - 1, 0)
    assert all(a > b for a, b in zip(rates[max(warmup - 1, 0) :], rates[max(warmup - 1, 0) + 1 :], strict=False))


def test_the_cosine_values_of_six_steps_with_two_of_warmup():
    rates = [lr_at(s, peak=1e-3, minimum=0.0, warmup_steps=2, total_steps=6) for s in range(6)]
    expected = [5e-4, 1e-3] + [0.5e-3 * (1 + math.cos(math.pi * p / 4)) for p in (1, 2, 3, 4)]
    assert rates == pytest.approx(expected, abs=1e-12)


# ---- caches are re-checked on reuse ---------------------------------------------------------------------------


def source_data(dense: Path, out: Path, texts, **upcycle) -> dict:
    data = short(dense, out, texts, steps=2)
    data["model"] = {"source": str(dense), "upcycle": {"experts": 4, "top_k": 2, **upcycle},
                     "experts_implementation": "grouped_mm"}  # fmt: skip
    return data


def damage_an_expert(folder: Path) -> None:
    """+5.0 on one expert weight: the file keeps its size."""
    path = next(folder.glob("*.safetensors"))
    tensors = load_file(path)
    name = next(k for k in tensors if "experts.1" in k)
    tensors[name][0, 0] += 5.0
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("damage", ["an expert weight +5", "a truncated file"])
def test_a_damaged_cached_conversion_is_set_aside_and_converted_again(tiny_pair, texts, tmp_path, module_cache, damage):
    dense, _ = tiny_pair
    data = source_data(dense, tmp_path / "first", texts, seed=hash(damage) % 1000)
    recipe, first = prepare_model(recipe_from_dict(data, tmp_path))
    folder = Path(recipe.model.path)
    assert first is not None and not first.reused and first.record["files"]
    if damage == "a truncated file":
        path = next(folder.glob("*.safetensors"))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        damage_an_expert(folder)
    messages: list[str] = []
    _, again = prepare_model(recipe_from_dict(data, tmp_path), messages.append)
    assert again is not None and not again.reused
    assert any("is damaged" in line and "changed" in line for line in messages), messages
    assert list(conversions_dir().glob(f"{folder.name}.damaged-*"))  # kept aside, never read again
    _, third = prepare_model(recipe_from_dict(data, tmp_path), messages.append)
    assert third is not None and third.reused  # the new entry is intact


def test_one_launch_re_checks_a_cached_conversion_once_per_host(tiny_pair, texts, tmp_path, module_cache, monkeypatch):
    dense, _ = tiny_pair
    data = source_data(dense, tmp_path / "run", texts, seed=4242)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-a")
    recipe, _ = prepare_model(recipe_from_dict(data, tmp_path))
    messages: list[str] = []
    for _ in range(2):  # two more ranks of the launch: the first hashes, the second finds its stamp
        prepare_model(recipe_from_dict(data, tmp_path), messages.append)
    assert "re-checked in" in messages[0] and "re-checked by another rank of this launch" in messages[1], messages
    damage_an_expert(Path(recipe.model.path))  # after the stamp: the file's state differs, so it is hashed
    _, again = prepare_model(recipe_from_dict(data, tmp_path), messages.append)
    assert again is not None and not again.reused and "is damaged" in messages[2]


def test_a_damaged_token_stream_is_set_aside_and_built_again(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    files = [Path(f) for f in texts[0]]
    built = build_token_file(files, moe, cache_dir=tmp_path)
    original = np.array(load_tokens(built))
    edited = original.copy()
    edited[100:898] = (edited[100:898] + 1) % 1000  # 798 tokens replaced, same size
    with open(built, "r+b") as handle:  # in place, header kept
        handle.seek(built.stat().st_size - edited.nbytes)
        handle.write(edited.tobytes())
    assert not np.array_equal(np.array(load_tokens(built)), original)
    warnings: list[str] = []
    again = build_token_file(files, moe, cache_dir=tmp_path, warn=warnings.append)
    assert again == built and np.array_equal(np.array(load_tokens(again)), original)
    assert len(warnings) == 1 and "damaged" in warnings[0]
    assert list(tmp_path.glob(f"{built.name}.damaged-*"))


def test_one_launch_hashes_a_token_stream_once_per_host(tiny_pair, texts, tmp_path, monkeypatch):
    import upcycle.train.token_cache as token_cache

    _, moe = tiny_pair
    files = [Path(f) for f in texts[0]]
    hashed: list[Path] = []
    real = token_cache.file_sha256
    monkeypatch.setattr(token_cache, "file_sha256", lambda path: hashed.append(path) or real(path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-a")  # the key hashes the text and tokenizer: counted apart
    built = build_token_file(files, moe, cache_dir=tmp_path)  # hashed as it is written
    hashed.clear()
    assert build_token_file(files, moe, cache_dir=tmp_path) == built
    assert built not in hashed  # another rank of the launch: its stamp holds
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-b")
    build_token_file(files, moe, cache_dir=tmp_path)
    assert hashed.count(built) == 1  # another launch hashes it again
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    build_token_file(files, moe, cache_dir=tmp_path)
    assert hashed.count(built) == 2  # outside torchrun, every reuse hashes
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-b")
    with open(built, "r+b") as handle:  # changed after launch-b checked it: its stamp no longer holds
        handle.seek(-2, 2)
        handle.write(b"\x07\x00")
    warnings: list[str] = []
    build_token_file(files, moe, cache_dir=tmp_path, warn=warnings.append)
    assert len(warnings) == 1 and "damaged" in warnings[0]


def test_a_rounded_upcycle_is_recorded_as_such_and_step_0_says_so(tiny_pair, texts, tmp_path, module_cache):
    dense, _ = tiny_pair
    data = source_data(dense, tmp_path / "run", texts, dtype="bfloat16")
    summary, lines = run(data, tmp_path)
    record = summary.conversion.record
    assert record["exact"] is False and record["exactness"] == "exact up to rounding to bfloat16"
    assert any("step-0 check: exact up to rounding to bfloat16" in line for line in lines), lines


def test_an_exact_upcycle_that_differs_at_step_0_is_not_trained(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    damaged = tmp_path / "moe"
    shutil.copytree(moe, damaged)
    damage_an_expert(damaged)
    with pytest.raises(UpcycleError, match=r"at step 0 .* nothing was trained"):
        run(short(damaged, tmp_path / "run", texts), tmp_path)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("precision", "deviation", "stops"),
    [("float32", 2e-5, True), ("bfloat16", 4e-2, False), ("bfloat16", 0.1, True)],
)
def test_step_0_stops_beyond_the_precisions_margin_and_warns_within_it(
    tiny_pair, texts, tmp_path, precision, deviation, stops
):
    from upcycle.train.step0 import STEP0_TOLERANCE, Step0Result, beyond_tolerance

    _, moe = tiny_pair
    result = Step0Result(3.0, deviation, 0.99, precision, STEP0_TOLERANCE[precision], True, False)
    recipe = recipe_from_dict(short(moe, tmp_path / "run", texts), tmp_path)
    if stops:
        with pytest.raises(UpcycleError, match="nothing was trained"):
            beyond_tolerance(result, moe, recipe)
    else:
        assert beyond_tolerance(result, moe, recipe).startswith("warning: at step 0")


# ---- resume is bound to its data, its packing and its steps ---------------------------------------------------


@pytest.fixture
def finished_run(tiny_pair, texts, tmp_path):
    """A finished 4-step run on a copy of the training text (so the test may edit it)."""
    _, moe = tiny_pair
    text = tmp_path / "train.txt"
    text.write_text("".join(Path(f).read_text() for f in texts[0]))
    data = short(moe, tmp_path / "run", ([str(text)], texts[1]), data={"cache_dir": str(tmp_path / "tokens")})
    summary, _ = run(data, tmp_path)
    return data, text, summary


def test_resume_refuses_changed_data_content(finished_run, tmp_path):
    data, text, _ = finished_run
    text.write_text(text.read_text() + "And one more line of verse appended after the kill.\n" * 400)
    data["batch"]["steps"] = 6
    with pytest.raises(OptionError, match="training data changed since the checkpoint"):
        run(data, tmp_path, resume=True)
    _, lines = run(data, tmp_path, resume=True, allow_changes={"data"})
    assert any("changed (allowed): the training tokens differ" in line for line in lines)


def test_resume_compares_the_tokens_not_the_versions_that_made_them(finished_run, tmp_path, monkeypatch):
    """A newer tokenizers release that tokenises the same text alike: a new cache entry, the same stream, resumed."""
    import upcycle.train.token_cache as token_cache

    data, _, _ = finished_run
    tokens = tmp_path / "tokens"
    before = {p.name for p in tokens.glob("*.npy")}
    real = token_cache.importlib.metadata.version
    monkeypatch.setattr(token_cache.importlib.metadata, "version", lambda name: real(name) + ".post9")
    data["batch"]["steps"] = 6
    resumed, lines = run(data, tmp_path, resume=True)
    assert resumed.resumed_from == 4 and not any("data" in line or "tokens" in line for line in lines), lines
    assert {p.name for p in tokens.glob("*.npy")} > before  # tokenised again, under a new key


def test_resume_refuses_a_new_seq_len(finished_run, tmp_path):
    data, _, _ = finished_run
    data["data"]["seq_len"] = 16
    data["batch"]["steps"] = 6
    with pytest.raises(OptionError, match="packed its data in sequences of 32 tokens"):
        run(data, tmp_path, resume=True)
    with pytest.raises(OptionError, match="a new seq_len is never accepted"):
        run(data, tmp_path, resume=True, allow_changes={"seq_len"})


def test_resume_refuses_fewer_steps_and_a_finished_run_re_exports_truthfully(finished_run, tmp_path):
    data, _, summary = finished_run
    card = json.loads((tmp_path / "run" / "export" / "upcycle.json").read_text())["training"]
    data["batch"]["steps"] = 2
    with pytest.raises(OptionError, match="checkpoint is at step 4, beyond this recipe's batch.steps=2"):
        run(data, tmp_path, resume=True)
    data["batch"]["steps"] = 4
    again, _ = run(data, tmp_path, resume=True)
    assert (again.steps, again.tokens, again.final_loss) == (summary.steps, summary.tokens, summary.final_loss)
    assert again.final_loss is not None
    recorded = json.loads((tmp_path / "run" / "export" / "upcycle.json").read_text())["training"]
    assert (recorded["steps"], recorded["tokens"], recorded["final_loss"]) == (
        card["steps"], card["tokens"], card["final_loss"],
    )  # fmt: skip


# ---- one run per folder ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["missing folder", "empty checkpoints"])
def test_resume_with_nothing_to_resume_is_refused_and_touches_nothing(tiny_pair, texts, tmp_path, where):
    _, moe = tiny_pair
    run_dir = tmp_path / "run"
    if where == "empty checkpoints":
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    with pytest.raises(OptionError, match="nothing to resume; nothing was changed"):
        run(short(moe, run_dir, texts), tmp_path, resume=True)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before


def test_a_second_run_into_a_run_folder_is_refused_unless_forced(finished_run, tmp_path):
    data, _, _ = finished_run
    before = read_metrics(tmp_path / "run")
    with pytest.raises(OptionError, match="holds another run"):
        run(data, tmp_path)
    assert read_metrics(tmp_path / "run") == before
    run(data, tmp_path, force=True)
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert steps == sorted(set(steps))  # one run's records, each step once


def test_a_run_folder_in_use_is_refused(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with FileLock(run_dir / LOCK_NAME), pytest.raises(OptionError, match="another upcycle run is training into"):
        run(short(moe, run_dir, texts), tmp_path)


def test_resume_from_picks_a_checkpoint(finished_run, tmp_path):
    data, _, summary = finished_run
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    resumed, _ = run(data, tmp_path, resume_from=checkpoint)
    assert resumed.resumed_from == 2
    assert resumed.final_loss == pytest.approx(summary.final_loss, rel=1e-5)  # the same steps again
    with pytest.raises(OptionError, match="is not a checkpoint"):
        run(data, tmp_path, resume_from=tmp_path / "run")
    elsewhere = tmp_path / "other" / "step-00000002"
    shutil.copytree(checkpoint, elsewhere)
    with pytest.raises(OptionError, match="is not a checkpoint of the run in"):
        run(data, tmp_path, resume_from=elsewhere)


def test_a_run_stopped_before_its_first_checkpoint_is_replaced_with_force_only(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    with pytest.raises(OptionError, match="stopped before its first checkpoint") as refused:
        run(short(moe, run_dir, texts), tmp_path)
    assert "--resume" not in refused.value.fix and "--force" in refused.value.fix


def test_force_never_removes_the_users_files(finished_run, tmp_path):
    data, _, _ = finished_run
    data["run"]["export"] = False
    mine = tmp_path / "run" / "export" / "notes.txt"
    mine.write_text("mine")
    with pytest.raises(UpcycleError, match="holds files an upcycle export does not write"):
        run(data, tmp_path, force=True)
    assert mine.read_text() == "mine" and (tmp_path / "run" / "checkpoints").is_dir()


def test_repeated_data_is_warned_about_and_the_epoch_logged(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    text = tmp_path / "short.txt"
    text.write_text(Path(texts[0][0]).read_text()[:300])  # about three sequences of 32 tokens
    data = short(moe, tmp_path / "run", ([str(text)], texts[1]), batch={"micro_batch_size": 4, "grad_accum": 1},
                 data={"cache_dir": str(tmp_path / "tokens")})  # fmt: skip
    _, lines = run(data, tmp_path)
    assert any("exceeds the" in line and "every batch repeats sequences" in line for line in lines), lines
    epochs = [r["epoch"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert epochs == sorted(epochs) and epochs[-1] > 4


# ---- the routers' precision -----------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["float32", "compute"])
def test_the_router_dtype_decides_the_precision_of_the_router_logits(tiny_pair, setting):
    from conftest import load_clean

    from upcycle.train.moe_losses import find_routers
    from upcycle.train.router_precision import routers_in_fp32, run_routers_in_fp32

    _, moe = tiny_pair
    model = load_clean(moe).eval()
    routers = find_routers(model)
    assert routers_in_fp32(setting, routers) is (setting == "float32")
    assert routers_in_fp32("auto", routers) is False  # Mixtral's own router computes in the compute dtype
    if setting == "float32":
        run_routers_in_fp32(routers, "cpu")
    seen = []
    routers[0][1].register_forward_hook(lambda module, args, output: seen.append((args[0], output[0])))
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    hidden, logits = seen[0]
    weight = routers[0][1].weight
    if setting == "float32":
        assert logits.dtype == torch.float32
        expected = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]).float(), weight.float())
        torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    else:
        assert logits.dtype == torch.bfloat16


def test_a_bf16_run_trains_its_fp32_routers(tiny_pair, texts, tmp_path):
    _, moe = tiny_pair
    data = short(moe, tmp_path / "run", texts, steps=2, moe={"router_dtype": "float32"})
    data["run"]["precision"] = "bf16"
    summary, lines = run(data, tmp_path)
    assert any(line.startswith("routers compute in float32") for line in lines), lines
    assert summary.final_loss is not None and math.isfinite(summary.final_loss)
    before, after = load_file(next(moe.glob("*.safetensors"))), {}
    for path in (tmp_path / "run" / "export").glob("*.safetensors"):
        after |= load_file(path)
    gate = next(k for k in after if k.endswith("block_sparse_moe.gate.weight"))
    assert not torch.equal(before[gate].float(), after[gate].float())  # the gradient reached the router
