"""What verify adds for a grown model: the MoE block itself, probed from both configs, and whole-model runs only
(the layer-by-layer check pairs dense layers with MoE layers)."""

from __future__ import annotations

from upcycle.errors import SourceError
from upcycle.hf.config_check import ConfigDifference, ConfigReport
from upcycle.hf.moe_block_probe import TOLERANCE, probe_grown_block


def check_grown_block(report: ConfigReport, config: dict, grown: dict, growth: dict) -> None:
    """Add the block probe's verdict to the config report: a block that computes otherwise is a difference."""
    factor = growth["factor"]
    block = probe_grown_block(config, grown, factor, growth.get("tied_groups", 0))
    if block.equivalent:
        return
    difference = f"relative difference {block.relative_difference:.3g}"
    what = block.problem or f"its output with {factor}x the experts ({difference})"
    report.differences.append(ConfigDifference("MoE block", what, "the original's", f"> {TOLERANCE:g} off"))
    report.equivalent = False


def whole_or_none(mode: str, reason: str) -> tuple[str, str]:
    """A grown model is run whole; when it does not fit, the weight check and the block probe carry the proof."""
    if mode == "streaming":
        raise SourceError(
            "the layer-by-layer check pairs a dense layer with its MoE layer; a grown model is checked whole.",
            "use --full (both models in memory) or --weights-only.",
        )
    return "none", f"{reason}; a grown model is checked whole, so the weight check and the block probe carry it"
