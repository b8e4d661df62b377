"""Shared fixtures: tiny real checkpoints per family, built once per session, and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, settings
from tiny_models import make_dense
from typer.testing import CliRunner

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# Hypothesis profiles: `ci` (the default, a few hundred cases per fuzzer) and `long` (--hypothesis-profile=long).
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=_SLOW_OK)
settings.register_profile("long", max_examples=3000, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory):
    """dense_dir(family, **overrides) -> a saved tiny random model, cached for the session."""
    built: dict[tuple, Path] = {}

    def get(family: str, **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in built:
            folder = tmp_path_factory.mktemp(f"dense-{family}")
            built[key] = make_dense(family, folder, **overrides)
        return built[key]

    return get


@pytest.fixture
def cli():
    """Run the real Typer app in-process; returns the click Result (exit_code, stdout, stderr)."""
    from upcycle.cli import app

    runner = CliRunner()

    def run(*args: str | Path):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return run


def load_clean(folder: Path, dtype: torch.dtype = torch.float32):
    """Load with plain transformers and fail on any missing/unexpected/mismatched key."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"loading {folder} reported {problems}"
    return model.eval()


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, and its exact E4 top-2 upcycle."""
    from train_helpers import make_tiny_pair

    return make_tiny_pair(tmp_path_factory.mktemp("train-models"))


@pytest.fixture(scope="session")
def texts():
    from train_helpers import shakespeare_texts

    return shakespeare_texts()


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """A conversion cache of the test module's own (seen by the runs' processes too), sharing the real assets."""
    from train_helpers import isolated_cache

    root = isolated_cache(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UPCYCLE_CACHE", str(root))
        yield root
