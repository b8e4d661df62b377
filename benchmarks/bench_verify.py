"""verify at scale: the streaming check against convert on the same pair, on a Llama-3-8B-shaped model.

A dense checkpoint with Llama-3-8B's shapes (hidden 4096, intermediate 14336, vocab 128256, 32 heads, 8 KV heads,
random bf16 weights) is built with 2 and with 4 decoder layers, then, each in its own fresh process:

1. ``convert``: ``upcycle convert`` to E8 top-2 (Mixtral), bf16;
2. ``verify``: ``upcycle verify --streaming`` of that pair (config check, every tensor re-made from the plan, the
   layer-by-layer function check on 256 tokens, source sha256);
3. ``cp``: ``cp -r`` of the MoE folder, the I/O floor for its bytes.

Reported per process: wall time (spawn to exit, imports included) and peak RSS (``VmHWM`` of the child's own
image, read by the child at exit: ``ru_maxrss`` would carry the parent's peak across exec). The ratios that
matter: verify / convert wall time, and verify's peak with 4 layers against 2 (it must not grow).

Run: ``nice python benchmarks/bench_verify.py [--layers 2 4] [--json OUT] [--keep]`` (about 30 GB of disk).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".cache" / "bench-verify"
SHAPE = dict(
    hidden_size=4096,
    intermediate_size=14336,
    vocab_size=128256,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
PEAK = "int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))) * 1024"
CHILD = {
    "convert": """
        from upcycle.convert import UpcycleOptions
        from upcycle.upcycling import convert
        convert(SRC, OUT, UpcycleOptions(experts=8, top_k=2, dtype="bfloat16"))
    """,
    "verify": """
        from upcycle.verify import verify
        report = verify(SRC, OUT, mode="streaming")
        assert report.equivalent, report.verdict
        print("VERIFY", report.streaming.seconds, max(l.rel_diff for l in report.streaming.layers))
    """,
}


def build_dense(folder: Path, layers: int) -> Path:
    """A random bf16 dense Llama with Llama-3-8B's shapes, saved as transformers saves it."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers

    config = transformers.LlamaConfig(num_hidden_layers=layers, **SHAPE)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(std=0.02)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def run_child(route: str, src: Path, out: Path) -> dict:
    body = textwrap.dedent(CHILD[route]).replace("SRC", repr(str(src))).replace("OUT", repr(str(out)))
    code = f"{body}\nprint('PEAK', {PEAK})\n"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{route} failed:\n{done.stderr[-3000:]}")
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("PEAK", "VERIFY")))
    result = {"seconds": seconds, "peak_bytes": int(lines["PEAK"])}
    if "VERIFY" in lines:
        streaming_s, worst = lines["VERIFY"].split()
        result |= {"streaming_seconds": float(streaming_s), "worst_layer_rel_diff": float(worst)}
    return result


def run_cp(src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(out)], check=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return {"seconds": seconds}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoints in .cache/bench-verify.")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    results = {}
    for layers in args.layers:
        dense = build_dense(WORK / f"dense-{layers}l", layers)
        moe = WORK / f"moe-{layers}l"
        shutil.rmtree(moe, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        row = {"dense_bytes": folder_bytes(dense)}
        row["convert"] = run_child("convert", dense, moe)
        row["moe_bytes"] = folder_bytes(moe)
        subprocess.run(["sync"], check=True)
        row["verify"] = run_child("verify", dense, moe)
        row["cp"] = run_cp(moe, WORK / "cp-floor")
        results[layers] = row
        if not args.keep:
            shutil.rmtree(moe)
    print(f"{'layers':>6} {'dense GB':>9} {'MoE GB':>7} {'convert s':>10} {'verify s':>9} {'(streaming)':>11} "
          f"{'cp s':>6} {'verify/convert':>15} {'convert peak GB':>16} {'verify peak GB':>15}")  # fmt: skip
    for layers, row in results.items():
        c, v = row["convert"], row["verify"]
        print(
            f"{layers:>6} {row['dense_bytes'] / 1e9:>9.2f} {row['moe_bytes'] / 1e9:>7.2f} {c['seconds']:>10.1f} "
            f"{v['seconds']:>9.1f} {v['streaming_seconds']:>11.1f} {row['cp']['seconds']:>6.1f} "
            f"{v['seconds'] / c['seconds']:>15.2f} {c['peak_bytes'] / 1e9:>16.2f} {v['peak_bytes'] / 1e9:>15.2f}"
        )
    if len(results) > 1:
        first, last = min(results), max(results)
        growth = results[last]["verify"]["peak_bytes"] / results[first]["verify"]["peak_bytes"]
        print(f"verify peak RSS, {last} layers / {first} layers: {growth:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
