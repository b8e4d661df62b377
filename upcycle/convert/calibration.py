"""Calibration: the dense model run once on real text or prompts, so each router can start from data.

`--router-init cluster` sets router row e of a layer to the e-th centroid of a spherical k-means of that layer's
MLP inputs (the router's own input) on real text. `--router-init hidden` sets it from prompts chosen for expert e,
as mergekit-moe's `gate_mode: hidden` does: the last token's hidden state entering the layer, averaged over the
expert's positive prompts, minus the same over its negative ones. Either way the unit rows are scaled to the norm
a random row would have. With copies of the dense MLP and a renormalised top-k, the router does not change the
output, so this costs no exactness; it only decides which copy each kind of token starts with. The rows are cached
under the content hash of everything they are made from (dense weights, text or prompts, token count, layers,
seed), so a conversion and its `verify` re-make the same rows, and a second conversion with the same inputs does
not run the model again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from upcycle.errors import SourceError

if TYPE_CHECKING:
    from upcycle.convert.families import DenseModel
    from upcycle.convert.options import UpcycleOptions
    from upcycle.convert.source import DenseSource

CALIBRATION_FORMAT = 1
DEFAULT_TOKENS = 4096
SEQUENCE = 256  # tokens per calibration sequence
BATCH = 8  # sequences per forward pass
KMEANS_ITERATIONS = 30


class CalibrationMissing(LookupError):
    """The calibrated rows or neuron order a recipe names are not in this machine's cache."""


@dataclass(frozen=True)
class Calibration:
    """What the router rows are made from: its hash names them in the cache."""

    kind: str  # "cluster" (k-means of the MLP inputs on text), "hidden" (prompts per expert), "split" (neurons) or
    # "gates:MODE" (a merge's router rows, mergekit's gate_mode MODE)
    dense_sha256: tuple[tuple[str, str], ...]  # (file, sha256) of the dense weights and config
    data_sha256: str  # of the text, or of the prompts as JSON
    origin: str  # where the text or prompts came from, for people: a file name or the built-in corpus
    tokens: int  # cluster: tokens of text run; hidden: 0
    layers: tuple[int, ...]
    clusters: int  # router rows that differ: the copies E (each repeated over its G shards)
    seed: int

    @property
    def key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "origin"}
        fields["format"] = CALIBRATION_FORMAT
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]

    def describe(self) -> str:
        if self.kind == "split":
            return (
                f"each copy's {self.clusters} shards group neurons that fire together: balanced k-means of each MoE "
                f"layer's neuron activations on {self.tokens:,} tokens of {self.origin} (calibration {self.key})"
            )
        if self.kind.startswith("gates:"):
            return (
                f"router rows from gate_mode {self.kind[6:]} (mergekit-moe's semantics) over the base model's "
                f"prompts per expert, seed {self.seed} (calibration {self.key})"
            )
        if self.kind == "hidden":
            return (
                f"router row e of each MoE layer is the last prompt token's hidden state entering the layer, averaged "
                f"over expert e's positive prompts minus its negative ones, from {self.origin} (calibration {self.key})"
            )
        return (
            f"router rows are spherical k-means centroids ({self.clusters} per layer) of each MoE layer's MLP input "
            f"on {self.tokens:,} tokens of {self.origin} (calibration {self.key})"
        )


def calibration_text(path: str) -> tuple[str, str]:
    """The text to calibrate on, and its origin: the given file, or Shakespeare's training split (never the
    held-out split the verification and evaluation read)."""
    if path:
        file = Path(path).expanduser()
        try:
            text, origin = file.read_text(encoding="utf-8"), file.name
        except (OSError, UnicodeDecodeError) as error:
            raise SourceError(f"cannot read --calibration {path}: {error}.", "pass a UTF-8 text file.") from None
    else:
        from upcycle import assets

        training, _ = assets.shakespeare_split()
        text = "\n".join(file.read_text(encoding="utf-8", errors="replace") for file in training[:4])
        origin = "Shakespeare (training split)"
    if not text.strip():
        raise SourceError(
            f"the calibration text {origin} is empty.", "pass a text with words in it (--calibration FILE)."
        )
    return text, origin


@dataclass(frozen=True)
class CalibrationRun:
    """A planned calibration and what running it needs: the text or prompts, and each MoE layer's MLP module."""

    calibration: Calibration
    data: str | list  # cluster, split: the text; hidden: [(positive prompts, negative prompts)] per expert
    modules: dict[int, str]  # layer -> the dense module whose input is recorded (the MLP; split: its down projection)

    def ensure(self, folder: Path) -> Path:
        return ensure_rows(self, folder)


def plan_calibration(
    kind: str, dense_files: list[Path], modules: dict[int, str], path: str, tokens: int, clusters: int, seed: int
) -> CalibrationRun:
    """The calibration a conversion asks for; hashes the dense files and the text or prompts, runs nothing.

    `modules` names, per MoE layer, the dense module whose input is recorded; `clusters` is the router rows that
    differ (copies) or, for a split, the shards per copy."""
    from upcycle.hashing import file_sha256

    if kind == "hidden":
        from upcycle.convert.router_prompts import read_router_prompts

        data, origin = read_router_prompts(path, clusters)
        tokens = 0
    else:
        data, origin = calibration_text(path)
    digests = tuple(sorted((file.name, file_sha256(file)) for file in dense_files))
    data_sha = hashlib.sha256(json.dumps(data).encode("utf-8")).hexdigest()
    calibration = Calibration(kind, digests, data_sha, origin, tokens, tuple(sorted(modules)), clusters, seed)
    return CalibrationRun(calibration, data, modules)


def plan_calibrations(
    source: DenseSource, dense: DenseModel, opts: UpcycleOptions, moe_layers: tuple[int, ...]
) -> dict[str, CalibrationRun]:
    """The calibrations a conversion's options ask for, by purpose: "router" (cluster, hidden) and "split"."""
    files = [*source.weight_files, source.folder / "config.json"]
    runs: dict[str, CalibrationRun] = {}
    if opts.router_init in ("cluster", "hidden"):
        mlps = {layer: dense.mlp_sources(layer)["gate"].name.rsplit(".", 2)[0] for layer in moe_layers}
        data = opts.calibration if opts.router_init == "cluster" else opts.router_prompts
        runs["router"] = plan_calibration(
            opts.router_init, files, mlps, data, opts.calibration_tokens, opts.experts, opts.seed
        )
    if opts.split == "activation":
        downs = {layer: dense.mlp_sources(layer)["down"].name.rsplit(".", 1)[0] for layer in moe_layers}
        runs["split"] = plan_calibration(
            "split", files, downs, opts.calibration, opts.calibration_tokens, opts.granularity, opts.seed
        )
    return runs


def cache_path(key: str) -> Path:
    from upcycle.assets import cache_dir

    return cache_dir() / "calibration" / f"{key}.safetensors"


def calibrated(key: str, layer: int) -> torch.Tensor:
    """One layer's cached result: unit router rows [clusters, H], or a split's neuron order [F]; CalibrationMissing
    when this machine lacks them."""
    from safetensors import safe_open

    path = cache_path(key)
    if not path.is_file():
        raise CalibrationMissing(key)
    with safe_open(str(path), "pt") as handle:
        return handle.get_tensor(f"layers.{layer}")


def ensure_rows(run: CalibrationRun, folder: Path) -> Path:
    """Run the dense model (once per key) and cache each layer's result; returns the cache file."""
    from safetensors.torch import save_file

    from upcycle.assets import cache_lock, mark_used
    from upcycle.output_safety import temporary_sibling

    calibration = run.calibration
    path = cache_path(calibration.key)
    with cache_lock("calibration"):
        if path.is_file():
            mark_used(path)
            return path
        found = _calibrate(run, folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(path)
        tensors = {f"layers.{layer}": rows.contiguous() for layer, rows in found.items()}
        save_file(tensors, str(tmp), metadata={"calibration": json.dumps(asdict(calibration))})
        tmp.replace(path)
    return path


def _calibrate(run: CalibrationRun, folder: Path) -> dict[int, torch.Tensor]:
    calibration = run.calibration
    seed, k = calibration.seed, calibration.clusters
    if calibration.kind.startswith("gates:"):
        from upcycle.convert.merge.gates import gate_rows

        return gate_rows(calibration.kind[6:], folder, run.data, calibration.layers, seed)
    if calibration.kind == "hidden":
        from upcycle.convert.router_prompts import prompt_rows

        return prompt_rows(folder, run.data, calibration.layers)
    inputs = module_inputs(folder, run.modules, run.data, calibration.tokens)
    if calibration.kind == "split":  # each neuron by its activation magnitudes over the tokens: [F, N]
        from upcycle.convert.neuron_split import balanced_order

        return {layer: balanced_order(x.abs().T, k, seed + layer) for layer, x in inputs.items()}
    unit = {layer: torch.nn.functional.normalize(x, dim=-1) for layer, x in inputs.items()}
    return {layer: spherical_kmeans(x, k, seed + layer) for layer, x in unit.items()}


def module_inputs(folder: Path, modules: dict[int, str], text: str, tokens: int) -> dict[int, torch.Tensor]:
    """Each layer's module input on `tokens` tokens of the text, in batches of sequences of SEQUENCE, [N, D].
    The whole dense model is loaded (fp32): calibration is for models that fit in memory."""
    from upcycle.convert.text_tokens import tokenize_text
    from upcycle.hf.loading import load_causal_lm_strict

    model = load_causal_lm_strict(folder, torch.float32).eval()
    ids, _ = tokenize_text(folder, text, tokens, model.config.get_text_config().vocab_size)
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in modules}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, layer=layer: seen[layer].append(args[0].reshape(-1, args[0].shape[-1]).float())
        )
        for layer, name in modules.items()
    ]
    length = min(SEQUENCE, len(ids))
    sequences = ids[: len(ids) // length * length].view(-1, length)
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), BATCH):
                model(sequences[start : start + BATCH])
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.cat(rows) for layer, rows in seen.items()}


def spherical_kmeans(x_NH: torch.Tensor, k: int, seed: int, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """k unit-norm centroids of unit-norm rows (cosine k-means, k-means++ seeding); deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    n = x_NH.shape[0]
    if n < k:
        raise SourceError(f"calibration gave {n} tokens for {k} clusters.", f"pass --calibration-tokens {16 * k}.")
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    best = x_NH @ x_NH[first]
    for _ in range(1, k):
        distance = (1 - best).clamp_min(0) ** 2
        pick = int(torch.multinomial(distance + 1e-12, 1, generator=generator))
        chosen.append(pick)
        best = torch.maximum(best, x_NH @ x_NH[pick])
    c_KH = x_NH[chosen].clone()
    for _ in range(iterations):
        assign = (x_NH @ c_KH.T).argmax(dim=1)
        sums = torch.zeros_like(c_KH).index_add_(0, assign, x_NH)
        counts = torch.bincount(assign, minlength=k)
        for empty in (counts == 0).nonzero().flatten().tolist():  # reseed at the worst-fitting row
            worst = int((x_NH @ c_KH.T).max(dim=1).values.argmin())
            sums[empty] = x_NH[worst]
        c_KH = torch.nn.functional.normalize(sums, dim=-1)
    return c_KH
