"""Turn a GGUF checkpoint into a plain Hugging Face folder, so the rest of upcycle only reads safetensors.

The only real pretrained model reachable from the registries ships as a GGUF (see ``upcycle.assets``);
transformers de-quantises it on load, and we save the result as an ordinary fp32/bf16 HF folder.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from upcycle.errors import OutputError, SourceError
from upcycle.output_safety import staged

GGUF_FIX = "pip install 'upcycle[gguf]'  (installs the gguf and accelerate packages)"


def _require_gguf_support() -> None:
    """Fail early with an actionable message: transformers needs both packages to read a GGUF."""
    missing = []
    for name in ("gguf", "accelerate"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        needs = " and ".join(missing)
        raise SourceError(f"Reading a GGUF checkpoint needs the {needs} package(s).", GGUF_FIX)


def _normalize_permissions(folder: Path) -> None:
    """model.safetensors is written via a private temp file (mode 0600); give all files config.json's mode."""
    mode = (folder / "config.json").stat().st_mode & 0o777
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode)


def dequantize_gguf(
    gguf_file: Path, dest: Path, dtype: torch.dtype = torch.float32, *, overwrite: bool = False
) -> Path:
    """De-quantise ``gguf_file`` into an HF folder at ``dest`` (config, model.safetensors, tokenizer).

    The folder appears all at once or not at all: it is written beside ``dest`` and renamed into place,
    and the partial folder is removed on any failure, including Ctrl-C. An existing ``dest`` is an
    error unless ``overwrite`` is set. Returns ``dest``.
    """
    gguf_file = Path(gguf_file).expanduser().resolve()
    dest = Path(dest).expanduser().absolute()
    if not gguf_file.is_file():
        raise SourceError(f"GGUF file not found: {gguf_file}.", "Pass the path of an existing .gguf file.")
    if dest.exists() and not overwrite:
        raise OutputError(f"Output folder already exists: {dest}.", "Choose another path or remove it.")
    _require_gguf_support()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    folder, name = str(gguf_file.parent), gguf_file.name
    with staged(dest, force=overwrite) as tmp:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=dtype, local_files_only=True, trust_remote_code=False
            )
            # No local_files_only here: transformers would persist it into tokenizer_config.json.
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        except Exception as e:  # gguf's reader fails in many ways (ValueError, struct.error, ...)
            raise SourceError(
                f"Could not read GGUF file {gguf_file}: {type(e).__name__}: {e}",
                "Check it is a complete GGUF of a supported architecture (re-download it if truncated).",
            ) from e

        # The weights are now plain tensors; without this, save_pretrained would record a GGUF quantizer
        # that a later plain from_pretrained cannot honour.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(dtype)
        # A GGUF carries no tokenizer length limit; use the model's context instead of transformers' 1e30.
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos and getattr(tokenizer, "model_max_length", 0) > 1e29:
            tokenizer.model_max_length = int(max_pos)

        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _normalize_permissions(tmp)
    return dest
