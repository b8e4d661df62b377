"""What the training's step-0 check measures for correct and for noisy upcycles, in each training precision.

The step-0 check (``upcycle.train.step0``) compares an upcycle's logits with its dense source's on held-out text:
max |MoE - dense| / max |dense|, and top-1 agreement. Its tolerance per precision must sit above what correct
upcycles measure and below what a real error measures; this script measures both, side by side:

* a tiny random Llama with SmolLM2's tokenizer, upcycled E4 top-2 (Mixtral), exact and with ``--noise 0.05``;
* the real SmolLM2-135M with layers 24-29 upcycled E8 top-2 (Qwen2-MoE), exact and with ``--noise 0.05``;

each in fp32, under bf16 autocast (a single-device bf16 run) and with both models' weights in bf16 (as FSDP's
mixed precision computes). The 2-rank FSDP figure comes from ``tests/test_train_fidelity.py``.

    python benchmarks/step0_precision.py
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from train_helpers import make_tiny_pair, shakespeare_texts  # noqa: E402

from upcycle import assets  # noqa: E402
from upcycle.convert import UpcycleOptions  # noqa: E402
from upcycle.hf.loading import load_causal_lm_strict  # noqa: E402
from upcycle.train.distributed import Dist  # noqa: E402
from upcycle.train.packing import packed_dataset  # noqa: E402
from upcycle.train.step0 import compare_with_dense  # noqa: E402
from upcycle.upcycling import convert  # noqa: E402

SEQUENCES, SEQ_LEN, MICRO_BATCH = 4, 128, 2


def main() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    info = Dist(0, 1, 0, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dense, exact = make_tiny_pair(root)
        _, noisy = make_tiny_pair(root, noise=0.05)
        smollm2 = assets.smollm2_folder()
        for name, options in (("smollm2-exact", {}), ("smollm2-noise", {"noise": 0.05})):
            convert(smollm2, root / name, UpcycleOptions(layers="24-29", **options))
        cases = {
            "tiny E4T2 (exact)": (dense, exact),
            "tiny, --noise 0.05": (dense, noisy),
            "SmolLM2 E8T2, layers 24-29 (exact)": (smollm2, root / "smollm2-exact"),
            "SmolLM2, --noise 0.05": (smollm2, root / "smollm2-noise"),
        }
        heldout = Path(shakespeare_texts()[1][0])
        print(f"{'case':36} {'precision':14} {'rel diff':>9} {'top-1':>7}")
        for name, (dense_dir, moe_dir) in cases.items():
            dataset = packed_dataset([heldout], dense_dir, SEQ_LEN, "text", None)
            plan = json.loads((moe_dir / "upcycle.json").read_text())
            dense_model = load_causal_lm_strict(dense_dir, torch.float32)
            moe_model = load_causal_lm_strict(moe_dir, torch.float32)
            regimes = {
                "fp32": (torch.float32, contextlib.nullcontext(), dense_model, moe_model),
                "bf16 autocast": (torch.bfloat16, torch.autocast("cpu", dtype=torch.bfloat16), dense_model, moe_model),
            }
            for label, (precision, autocast, d, m) in regimes.items():
                result = compare_with_dense(m, d, plan, dataset, SEQUENCES, MICRO_BATCH, info, precision, autocast)
                print(f"{name:36} {label:14} {result.rel_diff:9.3g} {result.top1_agreement:7.1%}")
            d, m = dense_model.to(torch.bfloat16), moe_model.to(torch.bfloat16)
            result = compare_with_dense(
                m, d, plan, dataset, SEQUENCES, MICRO_BATCH, info, torch.bfloat16, contextlib.nullcontext()
            )
            print(f"{name:36} {'bf16 weights':14} {result.rel_diff:9.3g} {result.top1_agreement:7.1%}")


if __name__ == "__main__":
    main()
