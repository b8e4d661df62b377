"""Proving that an upcycled checkpoint equals its dense source, or measuring how far an approximate one is.

Three parts, each independent of the others: the config (what transformers computes per layer from both
config.json files, `config_check`), the weights (each MoE tensor re-made from the dense model with the recipe
recorded in upcycle.json, bit for bit, `weights`), and the function (both models through plain transformers on
real text long enough to see every attention window, `function`).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from upcycle.convert.exactness import Exactness, mark_rounding, rounded_sources
from upcycle.convert.grow.plan import GrowPlan
from upcycle.convert.plan import UpcyclePlan
from upcycle.convert.source import DenseSource, hash_files, open_source
from upcycle.convert.targets import TARGETS
from upcycle.errors import SourceError
from upcycle.hf.config_check import ConfigReport, check_config_equivalence
from upcycle.hf.loading import TORCH_DTYPES
from upcycle.hf.skeleton import SkeletonError
from upcycle.hub import resolve_model
from upcycle.model_card.growth import GROWN
from upcycle.model_files import check_converted_folder
from upcycle.verify.files import FilesReport, check_files
from upcycle.verify.function import (
    TOLERANCE,
    FunctionReport,
    check_function,
    probe_for,
    tolerance_for,
)
from upcycle.verify.grown import check_grown_block, whole_or_none
from upcycle.verify.modes import MODES, choose_mode
from upcycle.verify.streaming import StreamingError, StreamingReport, check_streaming
from upcycle.verify.weights import WeightChecker, WeightReport


@dataclass
class VerifyReport:
    dense: str
    moe: str
    method: str
    exact_by_design: bool
    notes: list[str]
    tolerance: float
    tolerance_explicit: bool
    config: ConfigReport
    config_matches_plan: bool | None  # config.json equals the one upcycle.json records (None: not recorded)
    files: FilesReport  # tokenizer and generation settings: what a user gets beyond the weights
    weights: WeightReport | None
    function_mode: str  # "full" (whole models, logits), "streaming" (layer by layer) or "none"
    function_mode_reason: str
    function: FunctionReport | None
    streaming: StreamingReport | None
    equivalent: bool
    verdict: str
    exactness: dict = field(default_factory=dict)  # the conversion's exactness record (label, rounding, notes)

    @property
    def proof(self) -> list[str]:
        """Which parts of the proof ran and held."""
        parts = []
        if self.config.equivalent:
            parts.append("config")
        if self.files.ok:
            parts.append("tokenizer and generation settings")
        if self.weights is not None and self.weights.ok:
            parts.append("weights")
        if self.function is not None and self.function.logits_rel_diff <= self.tolerance:
            parts.append("function (whole model)")
        if self.streaming is not None and self.streaming.rel_diff <= self.tolerance:
            parts.append("function (every layer, streamed)")
        if self.streaming is not None and not self.streaming.shared_differing:
            parts.append("shared tensors identical")
        return parts

    def to_json(self) -> dict:
        data = asdict(self)
        data["config"] = self.config.to_json()
        data["proof"] = self.proof
        return data


def read_plan(moe_folder: Path) -> UpcyclePlan | GrowPlan:
    check_converted_folder(moe_folder)
    plan_path, config_path = moe_folder / "upcycle.json", moe_folder / "config.json"
    try:
        data = json.loads(plan_path.read_text())
        if data.get("kind") == GROWN:
            return GrowPlan.from_json(data, json.loads(config_path.read_text()))
        if data.get("kind") == "trained":
            raise SourceError(
                f"{moe_folder} was trained after conversion, so it no longer equals its dense source; verify proves "
                "conversions.",
                "verify the folder `upcycle convert` wrote; a trained model is measured by its held-out loss.",
            )
        return UpcyclePlan.from_json(data, json.loads(config_path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise SourceError(f"{plan_path} is damaged ({error}).", "convert the model again.") from None


def verify(
    dense_path: Path,
    moe_folder: Path,
    dtype: str = "float32",
    tol: float | None = None,
    text: str | None = None,
    min_tokens: int = 256,
    weights: bool = True,
    function: bool = True,
    trust_remote_code: bool = False,
    mode: str = "auto",
    stage: Callable[[str], None] = lambda _: None,
) -> VerifyReport:
    """All three checks and a verdict; approximate methods pass only against an explicit tolerance.

    DENSE is the folder, .gguf file or Hub id the checkpoint was converted from (MOE may be a Hub id too); the
    config check always runs. The function check runs at least ``min_tokens`` tokens of text (more to cover twice
    a short attention window) and loads both whole models (`mode="full"`) or streams them layer by layer
    (`"streaming"`, memory of about one layer); `"auto"` picks the whole-model check when it fits in memory.
    ``stage`` hears each step as it starts (a command line shows it while the user waits).
    """
    if mode not in MODES:
        raise SourceError(f"unknown function-check mode {mode!r}.", f"choose one of {', '.join(MODES)}.")
    dense_path, moe_folder = resolve_model(dense_path).folder, resolve_model(moe_folder).folder
    if dtype not in TORCH_DTYPES:
        raise SourceError(f"unknown --dtype {dtype!r}.", f"choose one of {', '.join(TORCH_DTYPES)}.")
    plan = read_plan(moe_folder)
    moe = DenseSource.open(moe_folder)
    target = TARGETS.get(plan.target)
    rounds = target.rounds_routing_weights if target is not None else True
    tolerance = tol if tol is not None else tolerance_for(dtype, rounds)
    stage("opening the dense model" + (" (de-quantising the GGUF)" if dense_path.suffix.lower() == ".gguf" else ""))
    with _dense_source(dense_path, moe_folder, trust_remote_code) as (dense, hashes):
        exactness = _exactness(plan, dense)
        stage("config check: what transformers computes from both configs")
        grown = isinstance(plan, GrowPlan)
        config_report = check_config_equivalence(dense.config, moe.config, source_is_moe=grown)
        if grown:
            stage("block check: the grown MoE block against the original's, in transformers")
            check_grown_block(config_report, dense.config, moe.config, plan.growth)
        recorded = json.loads((moe_folder / "upcycle.json").read_text()).get("config")
        config_matches_plan = None if recorded is None else recorded == moe.config
        files_report = check_files(
            dense.folder, moe_folder, plan.copied_files, byte_equal=dense_path.suffix.lower() != ".gguf"
        )
        function_report = streaming_report = streaming_problem = None
        chosen, reason = choose_mode(mode, dense, moe, dtype) if function else ("none", "--weights-only")
        if grown and chosen == "streaming":
            chosen, reason = whole_or_none(mode, reason)
        checker = WeightChecker(dense, moe, plan) if weights else None
        probe = probe_for(config_report.smallest_window, min_tokens, dtype, text)
        if chosen != "none":
            how = "both whole models" if chosen == "full" else "layer by layer, with the weight check"
            stage(f"function check: {probe.tokens} tokens, {how}")
        if chosen == "full":
            function_report = check_function(dense.folder, moe_folder, probe, trust_remote_code)
        elif chosen == "streaming":  # the weight check is fed the tensors the streaming pass reads
            try:
                streaming_report = check_streaming(dense, moe, plan, probe, checker=checker)
            except SkeletonError as error:
                raise SourceError(f"the models cannot be streamed layer by layer: {error}.", "use --full.") from None
            except StreamingError as error:  # a tensor the MoE model needs is missing: not equivalent
                streaming_problem = str(error)
        if checker is not None:
            stage("weight check: every tensor re-made from the dense model")
        weight_report = checker.finish(hashes()) if checker is not None else None
    equivalent, verdict = _verdict(
        exactness,
        config_report,
        config_matches_plan,
        files_report,
        weight_report,
        _function_outcome(function_report, streaming_report, streaming_problem),
        tolerance,
        tol is not None,
    )
    return VerifyReport(
        str(dense_path),
        str(moe_folder),
        exactness.method,
        exactness.exact,
        exactness.notes,
        tolerance,
        tol is not None,
        config_report,
        config_matches_plan,
        files_report,
        weight_report,
        chosen,
        reason,
        function_report,
        streaming_report,
        equivalent,
        verdict,
        exactness.to_json(),
    )


def _exactness(plan: UpcyclePlan, dense: DenseSource) -> Exactness:
    """The conversion's exactness as its recipes and the dense model's headers make it, not only as upcycle.json
    labels it: a conversion that rounds is never taken for exact because its record says so."""
    exactness = copy.deepcopy(plan.exactness)
    if not exactness.exact:
        return exactness
    try:
        rounding = rounded_sources(dense, plan.recipes)
    except KeyError:  # the plan reads a tensor this dense model lacks: the weight check reports it
        return exactness
    mark_rounding(exactness, rounding)
    if rounding:
        exactness.notes.append("upcycle.json labels this conversion exact, but its recipes round the dense weights")
    return exactness


@dataclass
class _FunctionOutcome:
    """What the verdict needs from either function check."""

    rel_diff: float
    first_divergent: Callable[[float], int | None]
    problems: list[str]  # the checkpoint does not load (or stream) cleanly
    shared_differing: list[str]
    what: str  # "logits" or "layer outputs"
    non_finite: dict[str, int]  # NaN/inf counts per model and output: never equivalent


@contextmanager
def _dense_source(
    path: Path, moe_folder: Path, trust_remote_code: bool
) -> Iterator[tuple[DenseSource, Callable[[], dict | None]]]:
    """The dense model (a .gguf de-quantised as convert does) and a function returning its files' sha256 in
    upcycle.json's form, hashed in a background thread meanwhile (hashlib releases the GIL).

    The hashes are None when they cannot be compared with the record: a folder given for a checkpoint that was
    converted from a .gguf file.
    """
    plan_source = json.loads((moe_folder / "upcycle.json").read_text()).get("source") or {}
    recorded = plan_source.get("sha256") or {}
    is_gguf = path.suffix.lower() == ".gguf"
    with open_source(path, trust_remote_code, scratch=None) as dense, ThreadPoolExecutor(1) as pool:

        def digests() -> dict | None:
            if is_gguf:  # compared by content: the file may have been renamed since
                digest = next(iter(hash_files([path]).values()))
                return {name: digest for name in recorded} if plan_source.get("kind") == "gguf" else {path.name: digest}
            if plan_source.get("kind", "folder") == "folder":
                files = [dense.folder / name for name in recorded]
                return hash_files(files) if all(f.is_file() for f in files) else {}
            return None

        future = pool.submit(digests)
        yield dense, future.result


def _verdict(
    exactness: Exactness,
    config: ConfigReport,
    config_matches_plan: bool | None,
    files: FilesReport,
    weights: WeightReport | None,
    function: _FunctionOutcome | None,
    tol: float,
    explicit: bool,
) -> tuple[bool, str]:
    if not config.equivalent:
        return False, f"the configs do not compute the same function: {config.first_problem}"
    if config_matches_plan is False:
        return False, "config.json differs from the config recorded in upcycle.json (edited after conversion)"
    if not files.ok:
        more = f" ({len(files.differences) - 1} more)" if len(files.differences) > 1 else ""
        first = files.differences[0]
        return False, f"the files beside the weights (tokenizer, generation settings, licence) differ: {first}{more}"
    if weights is not None and weights.source_matches_provenance is False:
        return False, "the dense model is not the one this checkpoint was converted from (sha256 differs)"
    if weights is not None and weights.mismatches:
        differing = [m for m in weights.mismatches if not m.non_finite]
        if not differing:
            first = weights.mismatches[0]
            return False, (
                f"{len(weights.mismatches)} tensor(s) hold NaN/inf, bit-identical to their recipes (the dense tensors "
                f"they copy hold them); first: {first.tensor}: non-finite weights are never equivalent"
            )
        first = differing[0]
        return False, f"{len(differing)} tensor(s) differ from the plan; first: {first.tensor} {first.problem}"
    if function is not None and function.problems:
        return False, "the checkpoint does not load cleanly: " + "; ".join(function.problems)
    if function is not None and function.shared_differing:
        return False, f"a tensor both models share differs: {function.shared_differing[0]}"
    if function is not None and function.non_finite:
        where = ", ".join(f"{count} in the {what}" for what, count in function.non_finite.items())
        return False, f"the models compute NaN or inf ({where}): non-finite outputs are never equivalent"
    deviation = f" ({function.what} deviate {function.rel_diff:.3g} relative)" if function is not None else ""
    if exactness.exact_up_to_rounding and not explicit:
        return False, (
            f"exact up to rounding to {exactness.rounded_to}{deviation or _recorded_rounding(exactness)}: the MoE "
            f"holds dense weights rounded to {exactness.rounded_to}; pass --tol to accept the rounding"
        )
    if not exactness.exact and not explicit:
        return False, f"approximate by design{deviation}: {exactness.method}; pass --tol to accept a deviation"
    if function is not None and function.rel_diff > tol:
        return False, (
            f"{function.what} differ by {function.rel_diff:.3g} relative, above the tolerance {tol:g}"
            f"{_where(function.first_divergent(tol), function.what)}"
        )
    if not exactness.exact:
        kind = f"exact up to rounding to {exactness.rounded_to}" if exactness.exact_up_to_rounding else "approximate"
        if function is None:
            return _unmeasured(exactness, tol, kind)
        return True, f"within the explicit tolerance {tol:g}{deviation} ({kind})"
    if function is None:
        return True, "config and weights proven (no function check ran: --weights-only)"
    return True, f"equivalent within {tol:g} relative"


def _unmeasured(exactness: Exactness, tol: float, kind: str) -> tuple[bool, str]:
    """--weights-only with --tol: no deviation was measured now; the weights equal their recipes, so the deviation
    measured on these same weights at conversion still holds, and nothing else can be judged."""
    recorded = (exactness.rounding_deviation or {}).get("relative")
    if recorded is None:
        return False, (
            f"{kind}, and no deviation was measured (--weights-only): a tolerance cannot be judged without the "
            "function check; run verify without --weights-only"
        )
    if recorded > tol:
        return False, f"the deviation recorded at conversion, {recorded:.3g} relative, is above the tolerance {tol:g}"
    return True, (
        f"within the explicit tolerance {tol:g}: {recorded:.3g} relative when converted, and the weights are still "
        f"those weights ({kind}; no function check ran: --weights-only)"
    )


def _recorded_rounding(exactness: Exactness) -> str:
    measured = exactness.rounding_deviation or {}
    if "relative" not in measured:
        return ""
    return f" ({measured['what']} deviated {measured['relative']:.3g} relative when converted)"


def _function_outcome(
    full: FunctionReport | None, streamed: StreamingReport | None, streaming_problem: str | None
) -> _FunctionOutcome | None:
    if full is not None:
        return _FunctionOutcome(
            full.logits_rel_diff, full.first_divergent_layer, full.loading_problems, [], "logits", full.non_finite
        )
    if streaming_problem is not None:
        return _FunctionOutcome(math.inf, lambda tol: None, [streaming_problem], [], "layer outputs", {})
    if streamed is not None:
        return _FunctionOutcome(
            streamed.rel_diff,
            streamed.first_divergent_layer,
            [],
            streamed.shared_differing,
            "layer outputs",
            streamed.non_finite,
        )
    return None


def _where(layer: int | None, what: str) -> str:
    if layer is None:
        return ""
    if what == "logits":  # whole-model hidden states: 0 = embeddings, i = after decoder layer i - 1
        return "; hidden states first diverge " + (
            "in the embeddings" if layer == 0 else f"after decoder layer {layer - 1}"
        )
    return f"; first at decoder layer {layer} (same input to both)"


__all__ = ["MODES", "TOLERANCE", "VerifyReport", "choose_mode", "read_plan", "verify"]
