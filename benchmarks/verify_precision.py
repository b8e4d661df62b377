"""What a correct upcycle measures when verify computes in bf16 or fp16, and what a small real error measures.

verify's function check compares the dense and MoE logits in the compute dtype it is given. In fp32 a correct
upcycle agrees to ~1e-6 relative; in bf16 or fp16 the two models round differently (the MoE adds the weighted
expert outputs), so the tolerance for those dtypes must sit above what correct upcycles show and as far below
real errors as the precision allows. This script measures both, side by side:

* correct upcycles of the real SmolLM2-135M (stored in bf16 and in fp32) and of tiny random models of each family;
* the same SmolLM2 upcycle with a known error injected (every expert's down projection scaled by 1 + eps),
  measured in fp32 and in the low precision.

    python benchmarks/verify_precision.py [--tiny-only] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tiny_models import make_dense  # noqa: E402

from upcycle.convert import UpcycleOptions  # noqa: E402
from upcycle.upcycling import convert  # noqa: E402
from upcycle.verify.function import Probe, check_function  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
TINY = {
    "llama E8T2": ("llama", {}),
    "mistral E8T2": ("mistral", {}),
    "qwen2 E8T2": ("qwen2", {}),
    "qwen3 E8T2": ("qwen3", {}),
    "llama E4G2T4": ("llama", {"experts": 4, "granularity": 2, "top_k": 4}),
    "llama softmax-topk zero router": ("llama", {"router": "softmax-topk", "router_init": "zero"}),
}


def measure(dense: Path, moe: Path, tokens: int) -> dict[str, float]:
    return {dtype: check_function(dense, moe, Probe(dtype, tokens=tokens)).logits_rel_diff for dtype in DTYPES}


def inject_error(moe: Path, factor: float) -> None:
    """Scale every expert's down projection by `factor` (a real, small upcycling error)."""
    for shard in sorted(moe.glob("model-*.safetensors")):
        tensors = load_file(shard)
        for name in tensors:
            if ".experts." in name and (name.endswith("w2.weight") or name.endswith("down_proj.weight")):
                tensors[name] = (tensors[name].float() * factor).to(tensors[name].dtype)
        save_file(tensors, shard, metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-only", action="store_true", help="Skip the real SmolLM2 cases.")
    parser.add_argument("--json", type=Path, help="Write the measurements here.")
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, (family, options) in TINY.items():
            dense = make_dense(family, root / f"{name}-dense".replace(" ", "_"), num_hidden_layers=2)
            moe = root / f"{name}-moe".replace(" ", "_")
            convert(dense, moe, UpcycleOptions(**options))
            rows.append({"case": f"tiny {name}", "storage": "float32", **measure(dense, moe, 256)})
        if not args.tiny_only:
            from upcycle import assets

            smollm2 = assets.smollm2_folder()
            for storage in ("bfloat16", "float32"):
                moe = root / f"smollm2-{storage}"
                convert(smollm2, moe, UpcycleOptions(dtype=storage))
                rows.append({"case": "SmolLM2 E8T2", "storage": storage, **measure(smollm2, moe, 256)})
            for factor in (1.001, 1.003, 1.01):
                moe = root / f"smollm2-error-{factor}"
                convert(smollm2, moe, UpcycleOptions(dtype="float32"))
                inject_error(moe, factor)
                label = f"SmolLM2 E8T2, down x {factor} (an error)"
                rows.append({"case": label, "storage": "float32", **measure(smollm2, moe, 256)})
    print(f"{'case':48} {'storage':9} " + " ".join(f"{d:>10}" for d in DTYPES))
    for row in rows:
        print(f"{row['case']:48} {row['storage']:9} " + " ".join(f"{row[d]:10.3g}" for d in DTYPES))
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
