"""The fuzzer: random hub-style dense configs and conversion options; every case is exact or refused.

"Exact" is judged here, independently of upcycle's own checks: both checkpoints load in plain transformers and
their fp32 logits agree within 1e-5 relative on a sequence longer than twice every attention window either
config declares. "Refused" is an UpcycleError (exit code 2 on the command line) that leaves no output behind.
Anything else (a crash, a checkpoint that does not load, a model labelled exact that is not) fails the test.

CI runs the `ci` profile (a few hundred cases); `pytest tests/test_fuzz_exactness.py --hypothesis-profile=long`
runs thousands; UPCYCLE_FUZZ_STRICT=1 is stricter still (see STRICT).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from config_strategies import dense_configs, upcycle_options
from family_configs import FAMILY_OPTIONS
from hub_models import logits, save_hub_style
from hypothesis import event, given
from hypothesis import strategies as st

from upcycle.convert import UpcycleOptions, convert
from upcycle.errors import UpcycleError
from upcycle.hf_config import load_config

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5
# UPCYCLE_FUZZ_STRICT=1: also fail when a case is refused by the config-equivalence check alone, i.e. an adapter
# accepted a config it cannot hold (safe, as nothing is written, but its refusal reason is then less precise).
STRICT = os.environ.get("UPCYCLE_FUZZ_STRICT") == "1"


def probe_length(*configs: dict) -> int:
    """Longer than twice every window- or chunk-like length either config declares (defaults included)."""
    lengths = [24]
    for config in configs:
        for key, value in load_config(config).to_dict().items():
            if ("window" in key or "chunk" in key) and isinstance(value, int) and not isinstance(value, bool):
                lengths.append(2 * value + 2)
    return max(lengths)


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict, dict]:
    config = draw(dense_configs())
    layers = config.get("num_hidden_layers", config.get("num_layers"))  # EXAONE configs may say num_layers
    options = draw(upcycle_options(layers, config["intermediate_size"]))
    if draw(st.booleans()):  # half the time, what the family's only home needs to be exact (LFM2: a zero router)
        options.update(FAMILY_OPTIONS.get(config["model_type"], {}))
    return config, options


@pytest.mark.filterwarnings("ignore")
@given(cases())
def test_every_case_is_exact_or_refused(case):
    config, options = case
    event(f"family: {config['model_type']}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            dense = save_hub_style(config, root / "dense")
        except Exception:  # transformers itself rejects this dense config: nothing to upcycle
            event("dense config rejected by transformers")
            return
        out = root / "moe"
        try:
            result = convert(dense, out, UpcycleOptions(**options))
        except UpcycleError as error:
            assert not out.exists() and sorted(p.name for p in root.iterdir()) == ["dense"]
            unforeseen = "would write does not compute" in error.problem
            assert not (unforeseen and STRICT), f"only the config check refused this case: {error.line()}"
            event(f"refused: {error.problem.split(':')[0][:70]}")
            return
        length = probe_length(config, result.plan.config)
        ids = torch.randint(0, config["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0))
        try:
            a = logits(dense, ids)
        except Exception as error:  # upcycle must refuse what transformers cannot run
            message = f"converted a dense model transformers cannot run ({type(error).__name__}: {error})"
            raise AssertionError(message) from None
        b = logits(out, ids)
        relative = ((a - b).abs().max() / a.abs().max()).item()
        if result.plan.exactness.exact:
            assert relative <= TOLERANCE, (
                f"labelled exact but differs by {relative:.3g} at {length} tokens "
                f"({result.plan.target}, {config}, {options})"
            )
            event(f"exact: {config['model_type']} via {result.plan.target}")
        else:
            event("approximate by design (labelled so)")
