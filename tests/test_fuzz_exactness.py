"""The fuzzer: random hub-style dense folders and conversion options; every case is exact or refused, and verify
fails every tampered folder.

"Exact" is judged here, independently of upcycle's own checks: both checkpoints load in plain transformers as
stored (every value exact in fp32) and their fp32 logits agree within 1e-5 relative on a sequence longer than twice
every attention window either config declares; and greedy generate() with the cache, from a prompt just short of
every window, chunk and original context, gives the same tokens and logits. A conversion that rounds stored values
to a narrower dtype must say so (exact up to rounding, its deviation measured). "Refused" is an UpcycleError (exit
code 2 on the command line) that leaves no output behind. Anything else (a crash, a checkpoint that does not load,
a model labelled exact that is not, a tampered folder verify passes) fails the test.

The dense folders vary what a user downloads: fp32, bf16 or fp16 weights, bf16 checkpoints holding some fp32
tensors, a tokenizer or none, tied embeddings beside a distinct stored LM head, and a second weight set beside the
first; the options vary `--dtype` too.

CI runs the `ci` profile (a few hundred cases); `pytest tests/test_fuzz_exactness.py --hypothesis-profile=long`
runs thousands; UPCYCLE_FUZZ_STRICT=1 is stricter still (see STRICT).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from config_strategies import dense_configs, upcycle_options
from family_configs import FAMILY_OPTIONS
from hub_models import greedy, logits, save_hub_style, save_tiny_tokenizer, store_as
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from upcycle.convert import UpcycleOptions
from upcycle.errors import SourceError, UpcycleError
from upcycle.hf.config import load_config
from upcycle.upcycling import convert
from upcycle.verify import verify

pytestmark = pytest.mark.slow
TOLERANCE = 1e-5
# UPCYCLE_FUZZ_STRICT=1: also fail when a case is refused by the config-equivalence check alone, i.e. an adapter
# accepted a config it cannot hold (safe, as nothing is written, but its refusal reason is then less precise).
STRICT = os.environ.get("UPCYCLE_FUZZ_STRICT") == "1"
STORAGES = ["float32"] * 4 + ["bfloat16", "float16", "bf16+fp32"]
DTYPES = ["auto"] * 4 + ["float32", "bfloat16", "float16"]
TAMPERING = ["none"] * 5 + [
    "stray dense weights", "untied head", "stray MoE weights", "generation settings edited", "tokenizer edited",
]  # fmt: skip
CHAT_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"
GENERATION_HORIZON = 64  # switch points up to here are generated across (tiny configs put theirs below it)
NEW_TOKENS = 8


def probe_length(*configs: dict) -> int:
    """Longer than twice every window- or chunk-like length either config declares (defaults included)."""
    lengths = [24]
    for config in configs:
        for key, value in load_config(config).to_dict().items():
            if ("window" in key or "chunk" in key) and isinstance(value, int) and not isinstance(value, bool):
                lengths.append(2 * value + 2)
    return max(lengths)


def switch_prompts(*configs: dict) -> list[int]:
    """Prompt lengths just short of every window, chunk and original context (and a short prompt): generation
    with the cache runs across each."""
    points = {8}
    for config in configs:
        resolved = load_config(config).to_dict()
        for key, value in resolved.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                continue
            if ("window" in key and "layers" not in key) or "chunk" in key:
                points.add(value)
        rope = resolved.get("rope_parameters") or {}
        original = rope.get("original_max_position_embeddings") or resolved.get("original_max_position_embeddings")
        if original:
            points.add(int(original))
    return sorted({max(1, p - NEW_TOKENS // 2) for p in points if p <= GENERATION_HORIZON})


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict, dict, str, str, bool]:
    config = draw(dense_configs())
    layers = config.get("num_hidden_layers", config.get("num_layers"))  # EXAONE configs may say num_layers
    options = draw(upcycle_options(layers, config["intermediate_size"]))
    if draw(st.booleans()):  # half the time, what the family's only home needs to be exact (LFM2: a zero router)
        options.update(FAMILY_OPTIONS.get(config["model_type"], {}))
    options["dtype"] = draw(st.sampled_from(DTYPES))
    tampering = draw(st.sampled_from(TAMPERING))
    if tampering == "untied head":
        config["tie_word_embeddings"] = True  # and the file will hold a distinct lm_head.weight
    return config, options, draw(st.sampled_from(STORAGES)), tampering, draw(st.booleans())


def prepare_dense(dense: Path, config: dict, storage: str, tampering: str, tokenizer: bool) -> None:
    """What a downloaded folder may hold beyond the plain save: its weights stored in another dtype, a tokenizer,
    a distinct LM head beside tied embeddings, or a second weight set."""
    if tokenizer:
        save_tiny_tokenizer(dense, config["vocab_size"], chat_template=CHAT_TEMPLATE)
    weights = dense / "model.safetensors"
    if tampering == "untied head":
        tensors = load_file(weights)
        embedding = next(v for v in tensors.values() if v.dim() == 2 and v.shape[0] == config["vocab_size"])
        tensors["lm_head.weight"] = torch.randn_like(embedding, generator=torch.Generator().manual_seed(1)) * 0.08
        save_file(tensors, weights, metadata={"format": "pt"})
    store_as(dense, storage)
    if tampering == "stray dense weights":  # an older sharded save left beside the single file
        tensors = {k: v * 2 for k, v in load_file(weights).items()}
        save_file(tensors, dense / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in tensors}}
        (dense / "model.safetensors.index.json").write_text(json.dumps(index))


def tamper_moe(out: Path, tampering: str, vocab: int) -> None:
    if tampering == "stray MoE weights":
        shard = next(out.glob("model-*.safetensors"))
        save_file({k: v * 2 for k, v in load_file(shard).items()}, out / "model.safetensors", metadata={"format": "pt"})
    elif tampering == "generation settings edited":
        path = out / "generation_config.json"
        settings = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**settings, "do_sample": True, "temperature": 5.0}))
    elif tampering == "tokenizer edited":
        save_tiny_tokenizer(out, max(2, vocab // 2))


def assert_same_generation(dense: Path, moe: Path, configs: tuple[dict, dict], vocab: int) -> None:
    """Greedy generation with the cache across each switch point: the same tokens, and logits within TOLERANCE
    (a token may differ only where the two logits are within tolerance of a tie; the comparison stops there)."""
    for prompt in switch_prompts(*configs):
        ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(prompt))
        tokens_a, logits_a = greedy(dense, ids, NEW_TOKENS)
        tokens_b, logits_b = greedy(moe, ids, NEW_TOKENS)
        scale = logits_a.abs().max().item()
        for step in range(NEW_TOKENS):
            error = (logits_a[step] - logits_b[step]).abs().max().item() / scale
            assert error <= TOLERANCE, (
                f"greedy generation from a {prompt}-token prompt differs at new token {step + 1} "
                f"(logits {error:.3g} apart) though labelled exact"
            )
            if tokens_a[step] != tokens_b[step]:
                break


@pytest.mark.filterwarnings("ignore")
@given(cases())
def test_every_case_is_exact_or_refused(case):
    config, options, storage, tampering, tokenizer = case
    event(f"family: {config['model_type']}")
    event(f"stored {storage}, --dtype {options['dtype']}")
    event(f"tampering: {tampering}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        try:
            dense = save_hub_style(config, root / "dense")
        except Exception:  # transformers itself rejects this dense config: nothing to upcycle
            event("dense config rejected by transformers")
            return
        prepare_dense(dense, config, storage, tampering, tokenizer)
        out = root / "moe"
        try:
            result = convert(dense, out, UpcycleOptions(**options))
        except UpcycleError as error:
            assert not out.exists() and sorted(p.name for p in root.iterdir()) == ["dense"]
            unforeseen = "would write does not compute" in error.problem
            assert not (unforeseen and STRICT), f"only the config check refused this case: {error.line()}"
            event(f"refused: {error.problem.replace(str(root), '').split(':')[0][:70]}")
            return
        assert tampering != "stray dense weights", "converted a folder holding two weight sets"
        length = probe_length(config, result.plan.config)
        ids = torch.randint(0, config["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0))
        try:
            a = logits(dense, ids)
        except Exception as error:  # upcycle must refuse what transformers cannot run
            message = f"converted a dense model transformers cannot run ({type(error).__name__}: {error})"
            raise AssertionError(message) from None
        b = logits(out, ids)
        relative = ((a - b).abs().max() / a.abs().max()).item()
        exactness = result.plan.exactness
        if exactness.exact:
            assert relative <= TOLERANCE, (
                f"labelled exact but its stored-dtype logits differ by {relative:.3g} at {length} tokens "
                f"({result.plan.target}, {config}, {options}, stored {storage})"
            )
            assert_same_generation(dense, out, (config, result.plan.config), config["vocab_size"])
            event(f"exact: {config['model_type']} via {result.plan.target}")
            if options.get("shared_width"):
                event(f"exact with a shared expert, via {result.plan.target}")
        elif exactness.exact_up_to_rounding:
            measured = exactness.rounding_deviation or {}
            assert measured.get("relative") is not None, "a rounding conversion without its measured deviation"
            event(f"exact up to rounding to {exactness.rounded_to} (labelled so)")
        else:
            event("approximate by design (labelled so)")
        if tampering in ("stray MoE weights", "generation settings edited", "tokenizer edited"):
            tamper_moe(out, tampering, config["vocab_size"])
            try:
                report = verify(dense, out, function=False)
            except SourceError:
                assert tampering == "stray MoE weights"
            else:
                assert not report.equivalent, f"verify passed a folder whose {tampering}"
            event(f"tampered folder failed verify: {tampering}")
        shutil.rmtree(out)
