"""Load upcycled checkpoints with the transformers 4.x installed here and compare with the dense logits.

Runs in .venv-legacy, where upcycle is NOT installed: it imports only torch and transformers, and uses the
4.x API (``torch_dtype=``). Usage: ``python check_logits.py REFDIR CASE...`` where REFDIR was written by
make_references.py. Prints one line per case and exits 1 when any case fails to load cleanly, loads into another
class, or differs from the dense model by more than TOLERANCE (max|a-b| / max|b|, fp32); a case marked
``"expect": "mismatch"`` (the canary, a config without the legacy rope fields) fails when it does NOT differ.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")  # old releases warn about newer torch APIs; the verdict is in the numbers

import torch  # noqa: E402
import transformers  # noqa: E402

TOLERANCE = 1e-5


def check(refdir: Path, case: dict) -> tuple[bool, str]:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        refdir / case["folder"], torch_dtype=torch.float32, output_loading_info=True
    )
    problems = {key: value for key, value in info.items() if value}
    if problems:
        return False, f"loading reported {problems}"
    if type(model).__name__ != case["architecture"]:
        return False, f"loaded as {type(model).__name__}, not {case['architecture']}"
    reference = torch.load(refdir / case["reference"])
    with torch.no_grad():
        logits = model.eval()(reference["ids"]).logits.float()
    dense = reference["logits"]
    rel = ((logits - dense).abs().max() / dense.abs().max()).item()
    theta = getattr(model.config, "rope_theta", None)
    detail = f"rel max diff {rel:.2e} (rope_theta read: {theta}, written: {case['rope_theta']})"
    if case.get("expect") == "mismatch":  # the canary: a config a 4.x reader cannot read right must be caught
        return rel > TOLERANCE, detail + ", expected a mismatch"
    return rel <= TOLERANCE, detail


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    refdir, names = Path(argv[0]), argv[1:]
    cases = {case["name"]: case for case in json.loads((refdir / "cases.json").read_text())["cases"]}
    unknown = [name for name in names if name not in cases]
    if unknown:
        print(f"unknown cases {unknown}; {refdir / 'cases.json'} has {sorted(cases)}", file=sys.stderr)
        return 2
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    failed = 0
    for name in names:
        case = cases[name]
        try:
            ok, detail = check(refdir, case)
        except Exception as e:  # one broken case must not hide the others
            ok, detail = False, f"{type(e).__name__}: {e}"
        failed += not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} {name:<21} {case['architecture']:<20} "
            f"transformers {transformers.__version__:<7} {detail}",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
