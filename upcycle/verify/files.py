"""The rest of what a user loads: tokenizer, special tokens, chat template and generation settings.

Two equal models still give a user different results when the tokenizer maps text to other ids, or when
`generate()` samples, stops or caps differently. Every such file the dense folder holds is copied by `convert`
and recorded with its sha256; here the MoE folder's files must be the recorded ones (nothing edited since),
byte-equal to the dense folder's (a folder source), and load as the same tokenizer and generation settings through
transformers (which also catches a class chosen from config.json's model type rather than from the files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upcycle.model_files import copied_files, record_files

# Text that exercises the tokenizer: plain prose, digits, whitespace runs, non-ASCII, and chat markers.
PROBE_TEXT = "Once upon a time, there were 1234 words.\n\n  Ünïcödé — 日本語; <|im_start|>user\nhi<|im_end|></s><s>"
NOT_COMPARED = {"transformers_version"}  # written by whichever transformers saved the file


@dataclass
class FilesReport:
    compared: list[str] = field(default_factory=list)  # what was checked: file names, then "tokenizer", ...
    differences: list[str] = field(default_factory=list)  # one line each, naming what differs

    @property
    def ok(self) -> bool:
        return not self.differences


def check_files(dense: Path, moe: Path, recorded: dict[str, str] | None, byte_equal: bool = True) -> FilesReport:
    """Compare what shapes a user's results beyond the weights; `byte_equal` False for a de-quantised GGUF (its
    files are re-made by the installed transformers, so only their meaning must agree)."""
    report = FilesReport()
    now = record_files(moe)
    if recorded is not None:
        report.compared.append("sha256 recorded in upcycle.json")
        for name in sorted(set(recorded) | set(now)):
            if recorded.get(name) != now.get(name):
                report.differences.append(f"{name} {_change(name in recorded, name in now)}")
    if byte_equal:
        report.compared.append("bytes of the dense folder's files")
        source = record_files(dense)
        for name in sorted(set(source) | set(now)):
            if source.get(name) != now.get(name):
                where = "only in the MoE" if name not in source else "only in the dense" if name not in now else None
                report.differences.append(f"{name} differs from the dense folder's" + (f" ({where})" if where else ""))
    report.compared.append("generation settings")
    report.differences += _differences("generation settings", _generation(dense), _generation(moe))
    if (dense_tok := _tokenizer(dense)) is not None or _has_tokenizer(moe):
        report.compared.append("tokenizer")
        report.differences += _differences("tokenizer", dense_tok, _tokenizer(moe))
    return report


def _change(recorded: bool, present: bool) -> str:
    if not present:
        return "is gone since the conversion (upcycle.json records it)"
    if not recorded:
        return "was added since the conversion (upcycle.json does not record it)"
    return "was edited since the conversion (its sha256 is not the one upcycle.json records)"


def _differences(what: str, dense: dict[str, Any] | None, moe: dict[str, Any] | None) -> list[str]:
    if dense is None or moe is None:
        if dense is moe:
            return []
        return [f"the {what}: only the {'dense model' if moe is None else 'MoE'} has one"]
    keys = sorted(set(dense) | set(moe))
    return [
        f"the {what}: {key} is {_show(dense.get(key))} in the dense model but {_show(moe.get(key))} in the MoE"
        for key in keys
        if dense.get(key) != moe.get(key)
    ]


def _generation(folder: Path) -> dict[str, Any] | None:
    """The generation settings `from_pretrained` gives a model: generation_config.json, else the model config's."""
    from transformers import AutoConfig, GenerationConfig

    try:
        if (folder / "generation_config.json").is_file():
            settings = GenerationConfig.from_pretrained(folder)
        else:
            settings = GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder))
    except (OSError, ValueError, json.JSONDecodeError) as error:
        return {"loads": f"fails ({type(error).__name__})"}
    return {k: v for k, v in settings.to_dict().items() if k not in NOT_COMPARED}


def _has_tokenizer(folder: Path) -> bool:
    return any(p.name.startswith("tokenizer") for p in copied_files(folder))


def _tokenizer(folder: Path) -> dict[str, Any] | None:
    """What a tokenizer does, as AutoTokenizer loads it: class, ids of a probe text, special and added tokens,
    chat template (source and a rendering), limits."""
    if not _has_tokenizer(folder):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # tokenizers fail in many ways; the failure itself is the finding
        return {"loads": f"fails ({type(error).__name__}: {str(error).replace(str(folder), '<folder>')})"}
    described: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "ids of a probe text": tokenizer(PROBE_TEXT).input_ids,
        "ids without special tokens": tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids,
        "special tokens": dict(sorted(tokenizer.special_tokens_map.items())),
        "added tokens": {i: str(t) for i, t in sorted(tokenizer.added_tokens_decoder.items())},
        "chat template": tokenizer.chat_template,
        "padding side": tokenizer.padding_side,
        "model max length": tokenizer.model_max_length,
    }
    if tokenizer.chat_template:
        try:
            messages = [{"role": "user", "content": "hi"}]
            described["chat rendering"] = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as error:
            described["chat rendering"] = f"fails ({type(error).__name__})"
    return described


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
