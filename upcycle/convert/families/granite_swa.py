"""Granite with sliding windows: Granite's layers with windows, rotary bases and attention sinks per layer."""

from upcycle.convert.families.base import Family, Traits, layer_types_windows

FAMILY = Family(
    model_type="granite_swa",
    title="Granite (sliding window)",
    example="ibm-granite/granite-4.1 (windowed variants)",
    targets=("granitemoe_swa",),
    traits=lambda c: Traits(
        block="granite_swa", qkv_bias=bool(c.get("attention_bias")), o_bias=bool(c.get("attention_bias"))
    ),
    windows=layer_types_windows,
)
