"""Build the checkpoints the transformers 4.x readers must load, with the dense logits they must reproduce.

Run with the main .venv (transformers 5): ``.venv/bin/python tests/legacy_readers/make_references.py OUTDIR``.
For every case it writes ``OUTDIR/<case>/moe`` (the upcycled checkpoint, as ``upcycle convert`` writes it) and
``OUTDIR/<case>/reference.pt`` (token ids and the DENSE source model's fp32 logits on them, computed by
transformers 5), plus ``OUTDIR/cases.json``, which ``check_logits.py`` reads in the legacy venv.

Every tiny dense model rotates with a non-default rope_theta, so a reader that ignores the written theta and
falls back to its class default computes different logits; sequences stay far shorter than any window.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for tiny_models

from family_configs import family_config  # noqa: E402
from hub_models import save_hub_style  # noqa: E402
from tiny_models import make_dense  # noqa: E402

from upcycle import assets  # noqa: E402
from upcycle.convert import UpcycleOptions  # noqa: E402
from upcycle.upcycling import convert  # noqa: E402

ROPE_THETA = 100000.0  # no MoE class defaults to it (Mixtral: 1e6; Qwen2/3-MoE, Glm4-MoE, Dots1: 1e4)
TINY_TOKENS = 32
SMOLLM2_TOKENS = 64

# case name -> (dense family, upcycle options, the class it must become)
TINY_CASES: dict[str, tuple[str, dict, str]] = {
    "mixtral": ("llama", dict(target="mixtral"), "MixtralForCausalLM"),
    "glm4_moe": ("llama", dict(target="glm4_moe", granularity=2, top_k=2), "Glm4MoeForCausalLM"),
    "qwen2_moe": ("qwen2", dict(target="qwen2_moe"), "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("qwen3", dict(target="qwen3_moe"), "Qwen3MoeForCausalLM"),
    "dots1": ("qwen3", dict(target="dots1", granularity=2, top_k=2), "Dots1ForCausalLM"),
}
# Targets of the other families, from their hub-style tiny configs (tests/family_configs.py), theta in legacy form.
FAMILY_CASES: dict[str, tuple[str, str]] = {
    "flex_olmo": ("olmo2", "FlexOlmoForCausalLM"),
    "ernie4_5_moe": ("ernie4_5", "Ernie4_5_MoeForCausalLM"),
    "hunyuan_v1_moe": ("hunyuan_v1_dense", "HunYuanMoEV1ForCausalLM"),
    "granitemoe": ("granite", "GraniteMoeForCausalLM"),
}
SMOLLM2_CASE = "smollm2"
# The Mixtral checkpoint with only transformers 5's rope_parameters (as upcycle wrote it before rope_fields): a 4.x
# reader rotates with its default theta, so this case must MISMATCH, proving the check sees a wrong theta.
CANARY_CASE = "mixtral_no_rope_theta"


def dense_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def build_case(
    out: Path, name: str, dense: Path, options: UpcycleOptions, architecture: str, ids: torch.Tensor
) -> dict:
    start = time.perf_counter()
    case = out / name
    case.mkdir(parents=True, exist_ok=True)
    result = convert(dense, case / "moe", options)
    if result.plan.architecture != architecture or not result.plan.exactness.exact:
        raise SystemExit(f"{name}: upcycle planned {result.plan.architecture} (exact={result.plan.exactness.exact})")
    reference = dense_logits(dense, ids)
    torch.save({"ids": ids, "logits": reference}, case / "reference.pt")
    # The same check in transformers 5, so a legacy failure is never a conversion that was wrong to begin with.
    moe = transformers.AutoModelForCausalLM.from_pretrained(case / "moe", dtype=torch.float32).eval()
    with torch.no_grad():
        current = relative(moe(ids).logits.float(), reference)
    config = json.loads((case / "moe" / "config.json").read_text())
    print(
        f"{name:<10} {architecture:<22} rope_theta {config.get('rope_theta')}  "
        f"transformers {transformers.__version__} MoE vs dense: {current:.2e}  ({time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    return {
        "name": name,
        "architecture": architecture,
        "model_type": config["model_type"],
        "rope_theta": config.get("rope_theta"),
        "folder": f"{name}/moe",
        "reference": f"{name}/reference.pt",
        "tokens": int(ids.shape[1]),
        "reference_transformers": transformers.__version__,
        "current_rel_diff": current,
        "expect": "match",
    }


def build_canary(out: Path, mixtral: dict) -> dict:
    """A copy of the Mixtral case whose config.json lacks the legacy rope fields; 4.x must not reproduce it."""
    case = out / CANARY_CASE
    shutil.copytree(out / mixtral["name"] / "moe", case / "moe")
    shutil.copy(out / mixtral["reference"], case / "reference.pt")
    config = json.loads((case / "moe" / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling"):
        config.pop(key, None)
    (case / "moe" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {
        **mixtral,
        "name": CANARY_CASE,
        "rope_theta": None,
        "folder": f"{CANARY_CASE}/moe",
        "reference": f"{CANARY_CASE}/reference.pt",
        "expect": "mismatch",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    names = [*TINY_CASES, *FAMILY_CASES, SMOLLM2_CASE]
    parser.add_argument("--cases", nargs="*", choices=names, default=names, help="default: all")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
    out: Path = args.outdir
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for name in args.cases:
        if name == SMOLLM2_CASE:
            dense = assets.smollm2_folder()
            tokenizer = transformers.AutoTokenizer.from_pretrained(dense)
            ids = tokenizer(assets.sample_text(), return_tensors="pt").input_ids[:, :SMOLLM2_TOKENS]
            cases.append(build_case(out, name, dense, UpcycleOptions(), "MixtralForCausalLM", ids))
            continue
        if name in FAMILY_CASES:
            family, architecture = FAMILY_CASES[name]
            dense = save_hub_style(family_config(family, rope_theta=ROPE_THETA), out / name / "dense")
            ids = torch.randint(0, 128, (1, TINY_TOKENS), generator=torch.Generator().manual_seed(0))
            cases.append(build_case(out, name, dense, UpcycleOptions(), architecture, ids))
            continue
        family, options, architecture = TINY_CASES[name]
        dense = make_dense(
            family, out / name / "dense", rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}
        )
        vocab = json.loads((dense / "config.json").read_text())["vocab_size"]
        ids = torch.randint(0, vocab, (1, TINY_TOKENS), generator=torch.Generator().manual_seed(0))
        cases.append(build_case(out, name, dense, UpcycleOptions(**options), architecture, ids))
        if name == "mixtral":
            cases.append(build_canary(out, cases[-1]))
    (out / "cases.json").write_text(json.dumps({"cases": cases}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
