"""upcycle merge vs mergekit-moe on the same YAML: the same tensors where the methods coincide, the router
difference measured where they do not, and the wall time and peak memory of both, in one run.

Two real fine-tunes of SmolLM2-135M-Instruct are made first (untimed, cached in the work folder): --steps AdamW
steps of the whole model on Shakespeare's training split, and on Python source code (this interpreter's standard
library). Then, for each gate_mode (random, cheap_embed, hidden), both tools merge the same YAML (base SmolLM2,
the two fine-tunes as experts, top-2, bf16), each in its own fresh subprocess, offline, in alternating order:

- upcycle: `upcycle merge CONFIG OUT --seed S`, with an empty cache each time (so the gate rows are made anew)
- mergekit-moe 0.1.5 (its own venv): `mergekit-moe CONFIG OUT` after `torch.manual_seed(S)` (it draws gate_mode
  random from torch's global generator and has no seed option)

For each pair of outputs a comparison child loads both with transformers and reports: the config keys that
differ; whether each config computes what the base computes outside the MLPs (upcycle's config probe); every
tensor equal or not (bitwise, after loading); the router rows' cosine similarity; and the relative logits
difference between the two merged models on held-out Shakespeare. Peak RSS is each child's ru_maxrss (os.wait4);
the parent never imports torch, so its own memory is no child's floor.

    nice .venv/bin/python benchmarks/merge_parity.py --mergekit .cache/mergekit-venv/bin/mergekit-moe
    nice .venv/bin/python benchmarks/merge_parity.py --json results.json --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_convert import default_source, find_mergekit, measure, measure_floor, mergekit_version, offline_env, tail

MODES = ("random", "cheap_embed", "hidden")
PROMPTS = {
    "shakespeare": ["ROMEO. But soft, what light through yonder window breaks?", "Enter the KING and his train"],
    "python": ["def fibonacci(n):", "import numpy as np\nclass Model:"],
}


# ----------------------------------------------------------------------------------------------- children


def child_finetune(base: Path, out: Path, corpus: str, steps: int, seed: int) -> None:
    """A real fine-tune: every weight of `base` trained for `steps` AdamW steps on `corpus`, saved in fp32."""
    import torch
    import transformers

    from upcycle import assets

    if corpus == "shakespeare":
        training, _ = assets.shakespeare_split()
        text = "\n".join(path.read_text(errors="replace") for path in training[:6])
    else:
        library = Path(os.__file__).parent
        text = "\n".join(path.read_text(errors="replace") for path in sorted(library.glob("*.py"))[:60])
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    ids = torch.tensor(tokenizer(text)["input_ids"][: 4 * 256 * steps])
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - 257, (4,), generator=generator)
        batch = torch.stack([ids[s : s + 256] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"{corpus} step {step}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def child_compare(upcycle_out: Path, mergekit_out: Path, base: Path) -> None:
    """Both merged folders loaded with transformers, compared tensor by tensor and on real text (JSON on stdout)."""
    import torch
    import transformers

    from upcycle.hf.config_check import check_config_equivalence
    from upcycle.verify.function import load_text_tokens

    def config(folder: Path) -> dict:
        return json.loads((folder / "config.json").read_text())

    mine, theirs, dense = config(upcycle_out), config(mergekit_out), config(base)
    skip = {"transformers_version", "dtype", "torch_dtype"}
    keys = sorted((set(mine) | set(theirs)) - skip)
    config_diff = {k: [mine.get(k), theirs.get(k)] for k in keys if mine.get(k) != theirs.get(k)}
    probes = {}
    for name, cfg in (("upcycle", mine), ("mergekit", theirs)):
        report = check_config_equivalence(dense, cfg)
        probes[name] = {"equivalent": report.equivalent, "first_problem": report.first_problem}
    a = transformers.AutoModelForCausalLM.from_pretrained(upcycle_out, dtype=torch.float32).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(mergekit_out, dtype=torch.float32).eval()
    sa, sb = a.state_dict(), b.state_dict()
    equal, different, routers = [], {}, []
    for name in sorted(set(sa) & set(sb)):
        x, y = sa[name], sb[name]
        if x.shape != y.shape:
            different[name] = f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
        elif torch.equal(x, y):
            equal.append(name)
        else:
            different[name] = float((x - y).abs().max())
        if name.endswith(".gate.weight") and x.shape == y.shape:
            cosine = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            routers.append([float(cosine.min()), float(cosine.mean())])
    ids, origin = load_text_tokens(upcycle_out, None, 256, a.config.vocab_size)
    with torch.no_grad():
        la, lb = a(ids[None]).logits[0].double(), b(ids[None]).logits[0].double()
    print(
        json.dumps(
            {
                "config_differences": config_diff,
                "config_probe": probes,
                "tensors_compared": len(set(sa) & set(sb)),
                "only_upcycle": sorted(set(sa) - set(sb)),
                "only_mergekit": sorted(set(sb) - set(sa)),
                "equal": len(equal),
                "different": {k: v for k, v in different.items() if not k.endswith(".gate.weight")},
                "routers_differing": sum(1 for k in different if k.endswith(".gate.weight")),
                "router_cosine_min": min((r[0] for r in routers), default=None),
                "router_cosine_mean": sum(r[1] for r in routers) / len(routers) if routers else None,
                "logits_relative_difference": float((la - lb).norm() / lb.norm()),
                "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).double().mean()),
                "text": f"{len(ids)} tokens of {origin}",
            }
        )
    )


# ------------------------------------------------------------------------------------------------ parent


def merge_yaml(base: Path, experts: dict[str, Path], mode: str) -> str:
    lines = [f"base_model: {json.dumps(str(base))}", f"gate_mode: {mode}", "dtype: bfloat16", "experts_per_token: 2"]
    lines.append("experts:")
    for corpus, folder in experts.items():
        lines.append(f"  - source_model: {json.dumps(str(folder))}")
        lines.append("    positive_prompts:")
        lines += [f"      - {json.dumps(prompt)}" for prompt in PROMPTS[corpus]]
    return "\n".join(lines) + "\n"


def run_tool(tool: str, exe: str, config: Path, out: Path, seed: int, log: Path) -> tuple[float, int]:
    if tool == "upcycle":
        cmd = [sys.executable, "-m", "upcycle", "merge", str(config), str(out), "--seed", str(seed), "--force"]
    else:
        python = str(Path(exe).parent / "python")
        argv = ["mergekit-moe", str(config), str(out), "--device", "cpu", "--lazy-unpickle"]
        code = (
            f"import sys, torch; torch.manual_seed({seed}); sys.argv = {argv!r}; "
            "from mergekit.scripts.moe import main; main()"
        )
        cmd = [python, "-c", code]
    shutil.rmtree(out, ignore_errors=True)
    env = offline_env()
    if tool == "upcycle":  # an empty cache: the gate rows are computed on every run, as mergekit computes them
        env["UPCYCLE_CACHE"] = tempfile.mkdtemp(prefix="upcycle-cache-")
    wall, peak_kb, status = measure(cmd, log, env)
    if tool == "upcycle":
        shutil.rmtree(env["UPCYCLE_CACHE"], ignore_errors=True)
    if status != 0:
        sys.exit(f"{tool} failed on {config.name}:\n{tail(log)}")
    return wall, peak_kb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", choices=["finetune", "compare"])
    parser.add_argument("--base", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--other", type=Path)
    parser.add_argument("--corpus")
    parser.add_argument("--steps", type=int, default=20, help="AdamW steps of each fine-tune")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mergekit", help="a mergekit-moe executable (in its own venv)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds per tool and mode (medians)")
    parser.add_argument("--workdir", type=Path, help="where the fine-tunes and outputs go (kept)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    if args.child == "finetune":
        child_finetune(args.base, args.out, args.corpus, args.steps, args.seed)
        return 0
    if args.child == "compare":
        child_compare(args.out, args.other, args.base)
        return 0
    exe, how = find_mergekit(args.mergekit)
    if exe is None:
        sys.exit(how)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="merge-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    base = default_source()
    experts = {}
    for index, corpus in enumerate(PROMPTS):
        folder = work / f"finetune-{corpus}-{args.steps}"
        if not (folder / "config.json").is_file():
            me = [sys.executable, __file__, "--child", "finetune", "--base", str(base), "--out", str(folder)]
            wall, _, status = measure([*me, "--corpus", corpus, "--steps", str(args.steps), "--seed", str(index)], log)
            if status:
                sys.exit(f"the {corpus} fine-tune failed:\n{tail(log)}")
            print(f"fine-tuned on {corpus}: {args.steps} steps in {wall:.0f} s", flush=True)
        experts[corpus] = folder
    floor = measure_floor(log)
    results: dict = {
        "mergekit": mergekit_version(exe),
        "found": how,
        "floor_rss_kb": floor,
        "steps": args.steps,
        "modes": {},
    }
    for mode in args.modes.split(","):
        config = work / f"merge-{mode}.yaml"
        config.write_text(merge_yaml(base, experts, mode), encoding="utf-8")
        runs: dict[str, list] = {"upcycle": [], "mergekit": []}
        for round_ in range(args.repeats):
            order = ["upcycle", "mergekit"] if round_ % 2 == 0 else ["mergekit", "upcycle"]
            for tool in order:
                runs[tool].append(run_tool(tool, exe, config, work / f"{tool}-{mode}", args.seed, log))
        compared = subprocess.run(
            [sys.executable, __file__, "--child", "compare", "--out", str(work / f"upcycle-{mode}"),
             "--other", str(work / f"mergekit-{mode}"), "--base", str(base)],
            capture_output=True, text=True, env=offline_env(), check=False,
        )  # fmt: skip
        if compared.returncode:
            sys.exit(f"comparing the {mode} outputs failed:\n{compared.stderr[-3000:]}")
        median = {tool: sorted(r)[len(r) // 2] for tool, r in runs.items()}
        results["modes"][mode] = {
            "upcycle": {"wall_s": median["upcycle"][0], "peak_rss_mb": median["upcycle"][1] / 1024},
            "mergekit": {"wall_s": median["mergekit"][0], "peak_rss_mb": median["mergekit"][1] / 1024},
            "comparison": json.loads(compared.stdout.strip().splitlines()[-1]),
        }
        report(mode, results["modes"][mode])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['mergekit']} ({how}); peak RSS floor of an empty child {floor / 1024:.0f} MB; work: {work}")
    return 0


def report(mode: str, figures: dict) -> None:
    up, mk, cmp = figures["upcycle"], figures["mergekit"], figures["comparison"]
    print(f"\n== gate_mode {mode}")
    print(f"  wall      upcycle {up['wall_s']:6.1f} s   mergekit {mk['wall_s']:6.1f} s   "
          f"ratio {mk['wall_s'] / up['wall_s']:.2f}x (mergekit / upcycle)")  # fmt: skip
    print(f"  peak RSS  upcycle {up['peak_rss_mb']:6.0f} MB  mergekit {mk['peak_rss_mb']:6.0f} MB  "
          f"ratio {mk['peak_rss_mb'] / up['peak_rss_mb']:.2f}x")  # fmt: skip
    print(f"  tensors   {cmp['equal']} of {cmp['tensors_compared']} equal bitwise; routers differing: "
          f"{cmp['routers_differing']}; other differing: {len(cmp['different'])}")  # fmt: skip
    if cmp["router_cosine_min"] is not None:
        print(f"  routers   cosine min {cmp['router_cosine_min']:.6f}, mean {cmp['router_cosine_mean']:.6f}")
    print(f"  logits    relative difference {cmp['logits_relative_difference']:.3g}, "
          f"top-1 agreement {cmp['top1_agreement']:.1%} ({cmp['text']})")  # fmt: skip
    print(f"  config    differing keys: {cmp['config_differences']}")
    print(f"  probe     {cmp['config_probe']}")
    for name in list(cmp["different"])[:5]:
        print(f"  differs   {name}: {cmp['different'][name]}")


if __name__ == "__main__":
    raise SystemExit(main())
