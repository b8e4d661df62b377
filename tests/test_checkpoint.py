"""Training checkpoints: exact resume, SIGKILL at any moment, corruption detected and named, keep-N, N→M ranks."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from upcycle.errors import UpcycleError
from upcycle.train import checkpoint as ckpt
from upcycle.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)

MIXTRAL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=64,
)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and robust when the CI cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mixtral(seed: int, dropout: float = 0.0) -> tuple[nn.Module, torch.optim.Optimizer]:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**MIXTRAL, attention_dropout=dropout)).train()
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


def tiny(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A plain module for the tests where only the checkpoint protocol matters: saves in milliseconds."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> float:
    """Data drawn from all three global RNGs, so a resume is only exact if every one of them is restored."""
    length = random.choice([12, 16])
    ids = (torch.randint(64, (2, length)) + int(np.random.randint(64))) % 64
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return loss.item()


def tiny_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 8)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def assert_same_state(model_a, opt_a, model_b, opt_b) -> None:
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key
    os_a, os_b = opt_a.state_dict(), opt_b.state_dict()
    assert os_a["param_groups"] == os_b["param_groups"]
    assert os_a["state"].keys() == os_b["state"].keys()
    for index, state in os_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, os_b["state"][index][key]), (index, key)


def dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------------------------


def test_save_load_bit_identical_and_rng(tmp_path):
    model, opt = mixtral(0)
    seed_all(1)
    for _ in range(2):
        train_step(model, opt)
    recipe = {"model": {"path": "m"}, "optim": {"lr": 3e-3, "betas": [0.9, 0.95]}}
    path = save_checkpoint(tmp_path, 2, model, opt, {"step": 2, "tokens": 64, "recipe": recipe})
    assert path == tmp_path / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in path.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "manifest.json",
        "rng-rank0.pt",
        "trainer.json",
    ]
    expected_rng = (torch.rand(5), random.random(), np.random.rand(3))

    fresh, fresh_opt = mixtral(7)  # different weights, no optimizer state yet; consumes RNG
    random.random(), np.random.rand()
    state = load_checkpoint(path, fresh, fresh_opt)
    assert state == {"step": 2, "tokens": 64, "recipe": recipe}
    assert_same_state(model, opt, fresh, fresh_opt)
    got_rng = (torch.rand(5), random.random(), np.random.rand(3))
    assert torch.equal(got_rng[0], expected_rng[0]) and got_rng[1] == expected_rng[1]
    assert np.array_equal(got_rng[2], expected_rng[2])
    assert read_trainer_state(path)["recipe"] == recipe
    assert json.loads((path / "trainer.json").read_text())["format_version"] == ckpt.FORMAT_VERSION

    weights_only, _ = mixtral(9)
    load_checkpoint(path, weights_only, None)  # model only: evaluation and export
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights_only.state_dict()[key]), key


def test_exact_continuation_after_resume(tmp_path):
    def run(steps: int, model, opt, sched) -> list[float]:
        return [train_step(model, opt, sched) for _ in range(steps)]

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * 0.5 ** (s / 6))

    seed_all(0)
    model, opt = mixtral(0, dropout=0.2)
    straight = run(6, model, opt, schedule(opt))

    seed_all(0)
    model, opt = mixtral(0, dropout=0.2)
    sched = schedule(opt)
    first = run(3, model, opt, sched)
    save_checkpoint(tmp_path, 3, model, opt, {"step": 3, "scheduler": sched.state_dict()})
    del model, opt, sched
    seed_all(123)  # a new process would start from other RNG states
    model, opt = mixtral(5, dropout=0.2)
    sched = schedule(opt)
    state = load_checkpoint(latest_checkpoint(tmp_path), model, opt)
    sched.load_state_dict(state["scheduler"])
    resumed = first + run(3, model, opt, sched)
    assert resumed == straight  # float equality: bit-identical losses


# ---------------------------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stops a save at a chosen point without running any `except Exception` clean-up, like SIGKILL would."""


@pytest.mark.parametrize(
    "point, resave, survivor",
    [
        ("tmp-created", False, 2),
        ("dcp-saved", False, 2),
        ("files-written", False, 2),
        ("manifest-written", False, 2),
        ("renamed", False, 3),
        ("pruned-aside", False, 3),
        ("old-moved-aside", True, 1),  # re-saving step 2 after it was moved aside: the step before survives
    ],
)
def test_crash_at_each_point_of_the_save(tmp_path, monkeypatch, point, resave, survivor):
    model, opt = tiny()
    for step in (1, 2):
        tiny_step(model, opt)
        save_checkpoint(tmp_path, step, model, opt, {"step": step}, keep=2)

    def crash(at: str) -> None:
        if at == point:
            raise Killed(at)

    monkeypatch.setattr(ckpt, "_crash_hook", crash)
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, 2 if resave else 3, model, opt, {"step": 2 if resave else 3}, keep=2)
    monkeypatch.setattr(ckpt, "_crash_hook", None)

    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == f"step-{survivor:08d}"
    assert load_checkpoint(latest, *tiny(5))["step"] == survivor
    assert any(name.startswith(".step-") for name in dirs(tmp_path)) or point == "renamed"

    save_checkpoint(tmp_path, 4, model, opt, {"step": 4}, keep=2)
    assert not [name for name in dirs(tmp_path) if name.startswith(".")]  # stale leftovers removed


KILL_HARNESS = textwrap.dedent(
    """
    # Imports torch once, then forks one saver per run folder and SIGKILLs it at a random moment.
    import os, random, signal, sys, time
    import torch
    from torch import nn
    from upcycle.train.checkpoint import save_checkpoint

    torch.set_num_threads(1)  # no intra-op thread pool: forking after computing stays safe

    def saver(run, ready):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(2, 32)).sum().backward()
        opt.step()
        step = 0
        while True:
            step += 1
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(step)  # every checkpoint's content is a function of its step
            save_checkpoint(run, step, model, opt, {"step": step}, keep=2)
            if ready is not None:
                os.write(ready, b"x")
                os.close(ready)
                ready = None

    warm, *runs = sys.argv[2:]
    model = nn.Linear(2, 2)  # a first save here warms the lazy imports and caches of every fork below
    save_checkpoint(warm, 0, model, torch.optim.AdamW(model.parameters()), {})

    rng = random.Random(int(sys.argv[1]))
    for index, run in enumerate(runs):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            saver(run, write_end)
        os.close(write_end)
        if index > 0:  # the first run is killed around its very first save
            os.read(read_end, 1)
        os.close(read_end)
        time.sleep(rng.uniform(0.0, 0.15))  # a save takes tens of milliseconds: lands anywhere in one
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        print("killed", run, flush=True)
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the harness forks its savers")
def test_sigkill_at_random_moments(tmp_path):
    script = tmp_path / "harness.py"
    script.write_text(KILL_HARNESS)
    runs = [tmp_path / f"run{i}" for i in range(8)]
    done = subprocess.run(
        [sys.executable, str(script), "1234", str(tmp_path / "warm"), *map(str, runs)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0 and done.stdout.count("killed") == len(runs), done.stdout + done.stderr
    for run in runs:
        latest = latest_checkpoint(run)
        model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if latest is None:  # killed during its first save
            assert not list_checkpoints(run) and run == runs[0]
            continue
        step = load_checkpoint(latest, model, opt)["step"]
        assert latest.name == f"step-{step:08d}"
        assert all(bool((p == step).all()) for p in model.parameters())
        save_checkpoint(run, step + 1, model, opt, {"step": step + 1}, keep=2)
        assert not [name for name in dirs(run) if name.startswith(".")]


# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def two_checkpoints(tmp_path) -> tuple[Path, Path]:
    model, opt = tiny()
    paths = []
    for step in (10, 20):
        tiny_step(model, opt)
        paths.append(save_checkpoint(tmp_path, step, model, opt, {"step": step}))
    return paths[0], paths[1]


def test_flipped_byte_in_data_file_is_named(tmp_path, two_checkpoints):
    older, newest = two_checkpoints
    data = newest / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    assert latest_checkpoint(tmp_path) == newest  # same size: only the sha256 check on load can tell
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(newest, *tiny(1))
    message = str(info.value)
    assert "__0_0.distcp" in message and "sha256" in message and str(newest) in message
    assert str(older) in message  # the fix names the checkpoint to fall back to
    assert info.value.exit_code == 3 and isinstance(info.value, UpcycleError)
    assert load_checkpoint(older, *tiny(1))["step"] == 10


def test_missing_manifest_is_reported_not_skipped(tmp_path, two_checkpoints):
    _, newest = two_checkpoints
    (newest / "manifest.json").unlink()
    for call in (lambda: latest_checkpoint(tmp_path), lambda: load_checkpoint(newest, *tiny(1))):
        with pytest.raises(CheckpointError, match="incomplete") as info:
            call()
        assert str(newest) in str(info.value)


@pytest.mark.parametrize("damage", ["truncate trainer.json", "delete rng-rank0.pt", "garble manifest.json"])
def test_damaged_files_are_named(tmp_path, two_checkpoints, damage):
    _, newest = two_checkpoints
    verb, name = damage.split()
    file = newest / name
    if verb == "truncate":
        file.write_bytes(file.read_bytes()[:20])
    elif verb == "delete":
        file.unlink()
    else:
        file.write_text('{"format": "upcycle-checkpoint", "files": ')
    calls = [lambda: latest_checkpoint(tmp_path), lambda: load_checkpoint(newest, *tiny(1))]
    if name != "rng-rank0.pt":  # read_trainer_state checks only the manifest and trainer.json
        calls.append(lambda: read_trainer_state(newest))
    for call in calls:
        with pytest.raises(CheckpointError, match="corrupt") as info:
            call()
        assert name in str(info.value)


def test_checkpoint_of_another_model_does_not_fit(tmp_path, two_checkpoints):
    _, newest = two_checkpoints
    other = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(newest, other, torch.optim.AdamW(other.parameters()))


def test_unserialisable_trainer_state_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, 1, *tiny(), {"when": object()})
    assert not (tmp_path / "checkpoints").exists()


def test_ctrl_c_while_dcp_writes_is_an_interruption_not_a_write_failure(tmp_path, monkeypatch):
    """DCP catches every exception of a save, a KeyboardInterrupt too, and reports a CheckpointException; the
    user pressed Ctrl-C, so the run must stop as interrupted (exit 130, resume from the last checkpoint), not as a
    checkpoint that could not be written (exit 3)."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    def pressed_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    model, opt = tiny()
    save_checkpoint(tmp_path, 1, model, opt, {"step": 1})
    monkeypatch.setattr(FileSystemWriter, "write_data", pressed_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, opt, {"step": 2})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001"]  # its partial files: the next save's


def test_keep_last_n_and_replace_same_step(tmp_path):
    model, opt = tiny()
    assert latest_checkpoint(tmp_path) is None and list_checkpoints(tmp_path) == []
    for step in range(1, 6):
        tiny_step(model, opt)
        save_checkpoint(tmp_path, step, model, opt, {"step": step}, keep=2)
    assert dirs(tmp_path) == ["step-00000004", "step-00000005"]
    tiny_step(model, opt)
    save_checkpoint(tmp_path, 5, model, opt, {"step": 5, "again": True}, keep=2)
    assert dirs(tmp_path) == ["step-00000004", "step-00000005"]
    assert read_trainer_state(latest_checkpoint(tmp_path))["again"] is True
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, 6, model, opt, {}, keep=0)
    with pytest.warns(UserWarning, match="step-00000005"):  # resumed from an older one into the same folder
        save_checkpoint(tmp_path, 3, model, opt, {"step": 3}, keep=2)
    assert dirs(tmp_path) == ["step-00000003", "step-00000004", "step-00000005"]
    with pytest.raises(CheckpointError, match="run folder"):
        load_checkpoint(tmp_path, model, opt)


# ---------------------------------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import MixtralConfig, MixtralForCausalLM
    from upcycle.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    kwargs, run1, run2 = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = dist.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def build(seed):
        torch.manual_seed(seed)
        model = MixtralForCausalLM(MixtralConfig(**kwargs))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)

    def gathered(model, opt):
        return {"model": get_model_state_dict(model, options=full),
                "optim": get_optimizer_state_dict(model, opt, options=full)}

    # 2 ranks write: each rank trains on its own batch, so the sharded states are real training states
    model, opt = build(0)
    torch.manual_seed(100 + rank)
    for _ in range(2):
        ids = torch.randint(64, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(run2, 2, model, opt, {"step": 2, "world": 2})
    written = gathered(model, opt)

    # 2 ranks read what 1 process wrote
    model, opt = build(1)
    state = load_checkpoint(latest_checkpoint(run1), model, opt)
    loaded = gathered(model, opt)
    draws = [None, None]
    dist.all_gather_object(draws, torch.rand(4))
    if rank == 0:
        torch.save({"written": written, "loaded": loaded, "draws": draws, "state": state}, run2 / "result.pt")
    dist.barrier()
    dist.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_full_equal(plain_model, plain_opt, gathered: dict) -> None:
    model_sd = plain_model.state_dict()
    assert model_sd.keys() == gathered["model"].keys()
    for key, value in model_sd.items():
        assert torch.equal(value, gathered["model"][key]), key
    optim_sd = get_optimizer_state_dict(plain_model, plain_opt)
    assert optim_sd["param_groups"] == gathered["optim"]["param_groups"]
    assert optim_sd["state"].keys() == gathered["optim"]["state"].keys()
    for fqn, state in optim_sd["state"].items():
        for key, value in state.items():
            assert torch.equal(value, gathered["optim"]["state"][fqn][key]), (fqn, key)


@pytest.mark.slow
def test_reshard_between_two_fsdp2_ranks_and_one_process(tmp_path):
    """FSDP2 (fully_shard per decoder layer + root) on gloo: 2 ranks → 1 process and 1 process → 2 ranks."""
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    run2.mkdir()
    model, opt = mixtral(0)
    seed_all(3)
    for _ in range(2):
        train_step(model, opt)
    save_checkpoint(run1, 2, model, opt, {"step": 2, "world": 1})
    expected_draw = torch.rand(4)  # what rank 0 must draw after loading run1

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    base["OMP_NUM_THREADS"] = "1"
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), json.dumps(MIXTRAL), str(run1), str(run2)],
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        outputs = [w.communicate(timeout=240)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert all(w.returncode == 0 for w in workers), "\n".join(outputs)
    result = torch.load(run2 / "result.pt", weights_only=True)

    # 1 process → 2 ranks: the gathered FSDP2 state is the plain model's, bit for bit
    assert_full_equal(model, opt, result["loaded"])
    assert result["state"] == {"step": 2, "world": 1}
    assert torch.equal(result["draws"][0], expected_draw)  # rank 0 restored the writer's RNG
    assert not torch.equal(result["draws"][1], expected_draw)  # the extra rank got its own derived stream

    # 2 ranks → 1 process (no process group, no FSDP)
    written = latest_checkpoint(run2)
    manifest = json.loads((written / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {"rng-rank1.pt", "__1_0.distcp"} <= manifest["files"].keys()
    fresh, fresh_opt = mixtral(4)
    assert load_checkpoint(written, fresh, fresh_opt) == {"step": 2, "world": 2}
    assert_full_equal(fresh, fresh_opt, result["written"])
