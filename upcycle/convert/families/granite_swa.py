"""Granite with sliding windows: Granite's layers with windows, rotary bases and attention sinks per layer."""

from upcycle.convert.families.base import Family, layer_types_windows, llama_traits

FAMILY = Family(
    model_type="granite_swa",
    title="Granite (sliding window)",
    example="ibm-granite/granite-4.1 (windowed variants)",
    targets=("granitemoe_swa",),
    traits=lambda c: llama_traits(c, block="granite_swa"),
    windows=layer_types_windows,
)
