"""Read what a GPU session (`session.sh`) brought back and print the tables and the goals, met or not.

    python benchmarks/gpu/summarize.py FILES_DIR     # the folder holding the files both stages wrote to $OUT

Prints Markdown for `benchmarks/RESULTS.md`: the environment, the kernel tests' verdict, the experts-layer
table (bench_moe_layer's own rendering), the first call again with warm caches, what the grouped tile order
buys, Liger and eager beside upcycle, the training table (bench_train's own rendering), and each kernel and
training goal with the measured figure. Anything missing is said, not guessed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_moe_layer  # noqa: E402  (benchmarks/ is not a package)
import bench_train  # noqa: E402


def load(folder: Path, name: str) -> dict | None:
    path = folder / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def rows_by_impl(report: dict | None) -> dict[str, dict[str, dict]]:
    """{shape name: {impl label: result row}} for the timed rows of one bench_moe_layer report."""
    if not report:
        return {}
    return {
        block["shape"]["name"]: {r["impl"]: r for r in block["results"] if "skipped" not in r}
        for block in report["shapes"]
    }


def upcycle_row(rows: dict[str, dict]) -> dict | None:
    return next((r for impl, r in rows.items() if impl.startswith("upcycle")), None)


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def kernel_goals(main: dict | None, cached: dict | None, peers: dict | None) -> list[str]:
    lines = []
    main_rows, peer_rows = rows_by_impl(main), rows_by_impl(peers)
    cached_rows = rows_by_impl(cached)
    for shape, rows in main_rows.items():
        up, gmm = upcycle_row(rows), rows.get("grouped_mm")
        if up is None:
            lines.append(f"- {shape}: upcycle has no timed row")
            continue
        vs_dense = up.get("fwd_bwd_vs_dense")
        vs_gmm = gmm["fwd_bwd_s"] / up["fwd_bwd_s"] if gmm else None
        need_gmm = 1.5 if shape.startswith("E64") else 1.0
        peer = peer_rows.get(shape, {})
        liger, up_peer = peer.get("liger"), upcycle_row(peer)
        vs_liger = liger["fwd_bwd_s"] / up_peer["fwd_bwd_s"] if liger and up_peer else None
        memory_ok = None
        if gmm and up.get("peak_extra_mib") is not None and gmm.get("peak_extra_mib") is not None:
            memory_ok = up["peak_extra_mib"] <= gmm["peak_extra_mib"]
        lines.append(
            f"- {shape}: f+b {up['fwd_bwd_tflops']:.0f} TFLOP/s; vs dense "
            f"{'-' if vs_dense is None else f'{vs_dense:.2f}'} (goal >= 0.60: "
            f"{verdict(None if vs_dense is None else vs_dense >= 0.6)}); vs grouped_mm "
            f"{'-' if vs_gmm is None else f'{vs_gmm:.2f}x'} (goal >= {need_gmm:g}x: "
            f"{verdict(None if vs_gmm is None else vs_gmm >= need_gmm)}); vs Liger "
            f"{'-' if vs_liger is None else f'{vs_liger:.2f}x'} (goal > 1: "
            f"{verdict(None if vs_liger is None else vs_liger > 1)}); peak MiB {up.get('peak_extra_mib')} vs "
            f"grouped_mm {gmm.get('peak_extra_mib') if gmm else '-'} ({verdict(memory_ok)}); first call "
            f"{up['first_call_s']:.1f} s (goal < 10 s: {verdict(up['first_call_s'] < 10)})"
        )
        errors = next((v for k, v in (reference_errors(main, shape) or {}).items() if k.startswith("upcycle")), None)
        if errors:
            worst = max(v for v in errors.values() if isinstance(v, float))
            dtype = main["environment"]["dtype"] if main else "?"
            lines.append(f"  {dtype} vs the fp32 reference, worst relative error (output, gradients): {worst:.2e}")
        warm = upcycle_row(cached_rows.get(shape, {}))
        if warm:
            lines.append(f"  first call in a new process with tuned configs and compiled kernels cached: "
                         f"{warm['first_call_s']:.1f} s")  # fmt: skip
    return lines or ["- no experts-layer results came back"]


def reference_errors(report: dict | None, shape: str) -> dict | None:
    """Each impl's relative errors against the fp32 reference for one shape (`--check`), if measured."""
    for block in (report or {}).get("shapes", []):
        if block["shape"]["name"] == shape:
            return block.get("rel_err_vs_fp32_reference")
    return None


def group_order(main: dict | None, group1: dict | None) -> list[str]:
    lines = []
    grouped, plain = rows_by_impl(main), rows_by_impl(group1)
    for shape, rows in plain.items():
        a, b = upcycle_row(grouped.get(shape, {})), upcycle_row(rows)
        if a and b:
            lines.append(f"- {shape}, {a['impl']}: grouped order (8) {a['fwd_bwd_s'] * 1e3:.2f} ms vs row-major "
                         f"{b['fwd_bwd_s'] * 1e3:.2f} ms f+b: {b['fwd_bwd_s'] / a['fwd_bwd_s']:.2f}x")  # fmt: skip
    return lines or ["- no A/B of the tile order came back"]


def train_goal(train: dict | None) -> list[str]:
    if not train:
        return ["- no training benchmark came back"]
    summaries = train["summaries"]
    up, base = summaries.get("upcycle", {}), summaries.get(bench_train.BASELINE, {})
    tps, base_tps, first = up.get("tokens_per_s"), base.get("tokens_per_s"), up.get("first_step_s")
    ratio = tps / base_tps if tps and base_tps else None
    return [
        f"- upcycle {tps or 0:,.0f} tokens/s vs {bench_train.BASELINE} {base_tps or 0:,.0f}: "
        f"{'-' if ratio is None else f'{ratio:.2f}x'} (goal >= {bench_train.GOAL_RATIO}x and >= 180k: "
        f"{verdict(None if ratio is None else ratio >= bench_train.GOAL_RATIO and tps >= 180_000)}); first step "
        f"{'-' if first is None else f'{first:.1f} s'} (goal <= {bench_train.GOAL_FIRST_STEP_S:.0f} s: "
        f"{verdict(None if first is None else first <= bench_train.GOAL_FIRST_STEP_S)})"
    ]


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    folder = Path(args[0])
    for name in ("kernels-env.txt", "train-env.txt"):
        if (folder / name).is_file():
            print(f"### {name}\n```\n{(folder / name).read_text().strip()}\n```")
    tests = folder / "kernel-tests.txt"
    if tests.is_file():
        print("### GPU kernel tests\n```\n" + "\n".join(tests.read_text().strip().splitlines()[-4:]) + "\n```")
    main_report, cached, group1, peers = (
        load(folder, n) for n in ("moe-layer.json", "moe-layer-cached.json", "moe-layer-group1.json",
                                  "moe-layer-peers.json")
    )  # fmt: skip
    for title, report in (("experts layer", main_report), ("Liger and eager beside upcycle", peers)):
        if report:
            print(f"### bench_moe_layer: {title}\n```")
            bench_moe_layer.print_table(report)
            print("```")
    print("### Kernel goals\n" + "\n".join(kernel_goals(main_report, cached, peers)))
    print("### Grouped tile order vs row-major (UPCYCLE_KERNELS_GROUP_M=1)")
    print("\n".join(group_order(main_report, group1)))
    train = load(folder, "train.json")
    if train:
        print("### bench_train\n```")
        bench_train.report(train)
        print("```")
    print("### Training goal\n" + "\n".join(train_goal(train)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
