"""`--router-init hidden`: router rows from prompts per expert, with mergekit-moe's `gate_mode: hidden` semantics.

The prompts file is YAML, one entry per expert copy, in mergekit-moe's own spelling:

    experts:
      - positive_prompts: ["Write a Python function that", ...]
        negative_prompts: ["Once upon a time"]        # optional
      - positive_prompts: ["The capital of France is"]

Row e of layer l is the hidden state entering decoder layer l at each prompt's last token, averaged over expert e's
positive prompts, minus the same average over its negative prompts, then normalised. Prompts run one at a time in
fp32 (mergekit left-pads a batch, which shifts a shorter prompt's positions, and runs it in bf16).
"""

from __future__ import annotations

from pathlib import Path

import torch

from upcycle.errors import OptionError


def read_router_prompts(path: str, experts: int) -> tuple[list, str]:
    """[[positive prompts, negative prompts], ...] one pair per expert copy, and the file's name."""
    import yaml

    file = Path(path).expanduser()
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise OptionError(f"cannot read --router-prompts {path}: {error}.", "pass a YAML file.") from None
    entries = data.get("experts") if isinstance(data, dict) else None
    fix = "write `experts:` with one `positive_prompts: [...]` entry per expert copy (--experts)."
    if not isinstance(entries, list) or len(entries) != experts:
        found = len(entries) if isinstance(entries, list) else "no"
        raise OptionError(f"--router-prompts {file.name} has {found} experts entries for {experts} experts.", fix)
    pairs = []
    for index, entry in enumerate(entries):
        positive = entry.get("positive_prompts") if isinstance(entry, dict) else None
        negative = (entry.get("negative_prompts") or []) if isinstance(entry, dict) else []
        if not _strings(positive) or not isinstance(negative, list) or (negative and not _strings(negative)):
            raise OptionError(f"--router-prompts {file.name}: expert {index} needs a list of positive_prompts.", fix)
        pairs.append([list(positive), list(negative)])
    return pairs, file.name


def _strings(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, str) and item for item in value)


def prompt_rows(folder: Path, pairs: list, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Unit router rows [experts, H] for each layer, from the dense model in `folder`."""
    from transformers import AutoTokenizer

    from upcycle.hf.loading import load_causal_lm_strict

    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise OptionError(
            f"--router-init hidden tokenizes the prompts, and {folder.name} holds no tokenizer.",
            "convert a model folder with its tokenizer, or use --router-init cluster.",
        )
    model = load_causal_lm_strict(folder, torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def states(prompts: list[str]) -> torch.Tensor:
        """The last token's hidden state entering each decoder layer, averaged over the prompts: [layers, H]."""
        total = None
        for prompt in prompts:
            ids = tokenizer((tokenizer.bos_token or "") + prompt, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                hidden = model(**ids, output_hidden_states=True).hidden_states
            last = torch.stack([hidden[layer][0, -1].float() for layer in layers])
            total = last if total is None else total + last
        assert total is not None
        return total / len(prompts)

    rows = []
    for positive, negative in pairs:
        vector = states(positive) - (states(negative) if negative else 0)
        rows.append(torch.nn.functional.normalize(vector, dim=-1))
    stacked = torch.stack(rows, dim=1)  # [layers, experts, H]
    return {layer: stacked[i] for i, layer in enumerate(layers)}
