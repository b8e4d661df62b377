"""What really ran, read off the model rather than the plan: the experts each rank holds, and the experts
implementation's calls (backend, experts per call), for the run's `layout` record."""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from upcycle.hf.moe_modules import moe_blocks
from upcycle.train import moe_losses
from upcycle.train.distributed import Dist, all_gather_objects
from upcycle.train.parallel import Layout


def expert_placement(model: nn.Module) -> dict[str, Any]:
    """Which experts this rank really holds: read off the first experts module's weights, not the plan."""
    for _, block in moe_blocks(model):
        weight = next((p for p in block.experts.parameters(recurse=False) if p.dim() == 3), None)
        if weight is None:
            continue
        total = int(weight.shape[0])
        mesh = getattr(weight, "device_mesh", None)
        names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
        local_rows = int(weight.to_local().shape[0]) if hasattr(weight, "to_local") else total
        if "ep" in names:
            ep = mesh.size(names.index("ep"))
            coordinate = mesh.get_local_rank("ep")
            first, count = coordinate * total // ep, total // ep
        else:
            first, count = 0, total
        return {"experts": [first, first + count - 1], "of": total, "local_rows": local_rows}
    return {}


def checked_placement(model: nn.Module, layout: Layout, num_experts: int, info: Dist) -> list[dict[str, Any]]:
    """Every rank's placement (a collective); a model whose experts landed elsewhere than planned is refused."""
    placement = all_gather_objects(expert_placement(model), info)
    if num_experts:
        planned = [layout.experts_of_rank(r, num_experts) for r in range(info.world_size)]
        held = [range(p["experts"][0], p["experts"][1] + 1) for p in placement]
        if held != planned:
            raise RuntimeError(f"the experts were placed {held}, not as the layout planned {planned}")
    return placement


def parallel_record(model: nn.Module, layout: Layout, placement: list[dict], info: Dist) -> dict[str, Any]:
    """What really ran, from every rank: the layout, the experts each rank holds, and the experts
    implementation's calls (backend, experts per call) up to the end of the first step, step-0 evaluation included."""
    registry = sys.modules.get("upcycle.kernels.registry")
    calls = {f"{backend}:{experts}": n for (backend, experts), n in registry.calls.items()} if registry else {}
    return {
        "kind": "layout",
        "layout": layout.as_dict(),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "placement": placement,
        "experts_calls": all_gather_objects(calls, info),
        "kernel_checks": kernel_checks(),
        # the decoder layer of each per-layer entry in the train records (aux loss, dropped tokens)
        "moe_layers": moe_losses.router_layers(moe_losses.find_routers(model)),
    }


def kernel_checks() -> list[dict[str, Any]]:
    """This rank's first-contact checks of upcycle's Triton experts (none when they never ran)."""
    check = sys.modules.get("upcycle.kernels.self_check")
    if check is None:
        return []
    return [
        {"ok": v.ok, "reason": v.reason, "seconds": round(v.seconds, 3), "shape": list(v.key)} for v in check.verdicts()
    ]


def describe_experts_calls(record: dict[str, Any]) -> str:
    """The line the run prints after its first step: the implementation, and which kernels it really ran."""
    implementation = record["experts_implementation"]
    seen = sorted({key for calls in record["experts_calls"] for key in calls})
    if not seen:
        return f"experts implementation: {implementation}"
    ran = ", ".join(f"{key.split(':')[0]} kernels on {key.split(':')[1]} local experts" for key in seen)
    checks = record.get("kernel_checks") or []
    failed = [c for c in checks if not c["ok"]]
    if failed:
        ran += f"; the Triton kernels failed their first-contact check ({failed[0]['reason']})"
    elif checks:
        ran += f"; first-contact check passed in {sum(c['seconds'] for c in checks):.2f} s"
    return f"experts implementation: {implementation} ({ran})"
