"""The models a merge reads: the base and each expert's, each opened once (a folder or a Hub id)."""

from __future__ import annotations

from upcycle.convert.merge.spec import MergeSpec
from upcycle.convert.source import DenseSource


def open_merge_sources(spec: MergeSpec) -> tuple[DenseSource, list[DenseSource], list[DenseSource], dict[str, str]]:
    """The base, expert and shared-expert models (each opened once, folder or Hub id), and what each is called."""
    from upcycle.hub import resolve_model
    from upcycle.model_files import check_source_path

    opened: dict[str, DenseSource] = {}

    def open_model(name: str) -> DenseSource:
        if name not in opened:
            folder = resolve_model(name).folder
            check_source_path(folder)
            opened[name] = DenseSource.open(folder)
        return opened[name]

    names = {"base_model": spec.base_model}
    names |= {f"experts[{i}]": e.source_model for i, e in enumerate(spec.experts)}
    names |= {f"shared_experts[{i}]": e.source_model for i, e in enumerate(spec.shared_experts)}
    base = open_model(spec.base_model)
    experts = [open_model(e.source_model) for e in spec.experts]
    shared = [open_model(e.source_model) for e in spec.shared_experts]
    return base, experts, shared, names
