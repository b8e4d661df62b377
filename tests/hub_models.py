"""Tiny random dense checkpoints whose config.json is written exactly as given (hub style: legacy rope fields,
absent optional fields), with weights shaped by what transformers makes of that config."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tiny_models import randomize

from upcycle.hf.config import load_config

# The rotary settings of every Llama 3.x config on the hub (pre-v5 form), with a tiny original context.
LLAMA3_ROPE = {
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


def save_hub_style(config_json: dict, folder: Path, seed: int = 0) -> Path:
    """Build the model transformers builds from `config_json`, save its weights, keep config.json verbatim."""
    config = load_config(config_json)
    torch.manual_seed(seed)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config))
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    return folder


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"loading {folder} reported {problems}"
    with torch.no_grad():
        return model.eval()(ids).logits


def relative_difference(dense: Path, moe: Path, length: int, vocab: int) -> float:
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    a, b = logits(dense, ids), logits(moe, ids)
    return ((a - b).abs().max() / a.abs().max()).item()


def save_tiny_tokenizer(folder: Path, vocab_size: int, chat_template: str | None = None) -> None:
    """A real fast tokenizer over words w1..w{vocab-1} ([UNK] is 0), saved as transformers saves one."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", bos_token="w1", eos_token="w2")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)


def store_as(folder: Path, storage: str) -> None:
    """Re-store a saved model's weights: "float32", "bfloat16", "float16", or "bf16+fp32" (declared bf16, norms and
    embeddings kept in fp32, as some hub checkpoints are); config.json declares the dtype."""
    from safetensors.torch import load_file, save_file

    wide = ("norm", "embed") if storage == "bf16+fp32" else ()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = dtypes.get(storage, torch.bfloat16)
    path = folder / "model.safetensors"
    tensors = {k: v if any(w in k for w in wide) else v.to(dtype) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16" if storage == "bf16+fp32" else storage
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def greedy(folder: Path, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generate() with the cache, as a user runs it (fp32): the new tokens and each step's logits."""
    from transformers import GenerationConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    settings = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
        use_cache=True, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=settings)
    return out.sequences[0, prompt.shape[1] :], torch.stack([step[0] for step in out.logits])


def save_header_only(config_json: dict, folder: Path, dtype: str = "BF16") -> Path:
    """A checkpoint of a full-size config whose tensor data is a sparse hole: every header is real (names and
    shapes as transformers builds them), the values are zeros that take no disk. For size checks, never for
    values."""
    import struct

    config = load_config(config_json)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    width = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for name, tensor in model.state_dict().items():
        size = tensor.numel() * width
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.safetensors", "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        file.truncate(8 + len(encoded) + offset)
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    return folder
