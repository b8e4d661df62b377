"""Reading a dense source checkpoint: validated up front, then read one tensor at a time.

Safetensors files are read with positioned reads rather than memory maps: a map keeps every touched page of
the source resident in the process, which would put the whole model into the converter's peak memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from upcycle.errors import SourceError
from upcycle.model_files import check_source_folder, check_source_path

T = TypeVar("T")

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024**2


@dataclass(frozen=True)
class TensorInfo:
    """Where one source tensor lives and what it is, as declared by its file's header."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file (safetensors) or -1 (pickle)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header against the file size, so truncation is caught before writing."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SourceError(
                    f"{path} is truncated: it is too short to hold a safetensors header.",
                    "re-download or re-save the checkpoint.",
                )
            header_len = int.from_bytes(prefix, "little")
            if header_len <= 0 or header_len > min(MAX_HEADER_BYTES, size - 8):
                raise SourceError(
                    f"{path} is corrupt or truncated: its header length ({header_len} bytes) "
                    f"does not fit in the file ({size} bytes).",
                    "re-download or re-save the checkpoint.",
                )
            header = json.loads(handle.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SourceError(
            f"{path} is corrupt: its safetensors header is not valid JSON.",
            "re-download or re-save the checkpoint.",
        ) from None
    except OSError as error:
        raise SourceError(f"cannot read {path}: {error.strerror}.", "check the path and permissions.") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path} is corrupt: its header is not a JSON object.", "re-download the checkpoint.")
    data_start = 8 + header_len
    data_size = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SourceError(
                f"{path} is corrupt: tensor {name!r} has an unreadable header entry ({entry!r}).",
                "re-download or re-save the checkpoint.",
            ) from None
        info = TensorInfo(name, path, dtype, shape, data_start + begin)
        if end - begin != info.nbytes or not 0 <= begin <= end:
            raise SourceError(
                f"{path} is corrupt: tensor {name!r} declares shape {list(shape)} "
                f"({info.nbytes} bytes) but spans {end - begin} bytes.",
                "re-download or re-save the checkpoint.",
            )
        if end > data_size:
            raise SourceError(
                f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes.",
                "re-download or re-save the checkpoint.",
            )
        infos[name] = info
    return infos


class DenseSource:
    """A local Hugging Face folder: its config.json and an index of every weight tensor, checked on open."""

    def __init__(self, folder: Path, config: dict, tensors: dict[str, TensorInfo]) -> None:
        self.folder = folder
        self.config = config
        self.tensors = tensors
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}

    @property
    def weight_files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})

    @classmethod
    def open(cls, folder: Path, trust_remote_code: bool = False) -> DenseSource:
        folder = Path(folder)
        check_source_folder(folder)
        config_path = folder / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SourceError(f"{config_path} is not valid JSON.", "repair or re-save the config.") from None
        if not isinstance(config, dict):
            raise SourceError(f"{config_path} is not a JSON object.", "repair or re-save the config.")
        if config.get("auto_map") and not trust_remote_code:
            raise SourceError(
                f"{folder} declares custom code (auto_map in config.json); upcycle never runs "
                "remote code unless asked.",
                "pass --trust-remote-code if you trust this model.",
            )
        from upcycle.convert.families import transformers_names

        return cls(folder, config, transformers_names(config, index_weights(folder, config)))

    def read(self, name: str) -> torch.Tensor:
        """One tensor, freshly read into its own memory."""
        info = self.tensors[name]
        if info.offset < 0:
            return self._pickle_dict(info.file)[info.name].clone()
        return self._read_bytes(info, info.offset, info.nbytes).view(info.dtype).reshape(info.shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (its first dimension), reading only their bytes."""
        info = self.tensors[name]
        if info.offset < 0:
            return self._pickle_dict(info.file)[info.name][start:stop].clone()
        rows = info.shape[0] if info.shape else 1
        start, stop = max(0, start), min(rows, stop)
        row_bytes = info.nbytes // rows if rows else 0
        data = self._read_bytes(info, info.offset + start * row_bytes, (stop - start) * row_bytes)
        return data.view(info.dtype).reshape((stop - start, *info.shape[1:]))

    def _read_bytes(self, info: TensorInfo, offset: int, size: int) -> torch.Tensor:
        buffer = torch.empty(size, dtype=torch.uint8)
        with info.file.open("rb", buffering=0) as handle:
            handle.seek(offset)
            view = memoryview(buffer.numpy())
            done = 0
            while done < size:
                got = handle.readinto(view[done:])
                if not got:
                    raise SourceError(
                        f"{info.file} ended early while reading {info.name!r}.",
                        "re-download or re-save the checkpoint.",
                    )
                done += got
        return buffer

    def _pickle_dict(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._pickled:
            self._pickled[path] = _load_pickle(path)
        return self._pickled[path]


SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def weight_files(folder: Path, config: dict | None = None) -> list[Path]:
    """The weight files transformers loads from this folder, by its own rule, so that what upcycle reads, writes
    and verifies is what `from_pretrained` loads.

    transformers takes config.json's `transformers_weights` when set, else model.safetensors, else
    model.safetensors.index.json, else pytorch_model.bin, else pytorch_model.bin.index.json, and ignores every
    other file. A single file beside an index of the same format is two weight sets: transformers would load the
    single file whatever the shards hold, so such a folder is refused with both named.
    """
    explicit = (config or {}).get("transformers_weights")
    if explicit is not None:
        return _explicit_weights(folder, str(explicit))
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (PICKLE_WEIGHTS, PICKLE_INDEX)):
        has_single, has_index = (folder / single).is_file(), (folder / index).is_file()
        if has_single and has_index:
            shards = _index_shards(folder / index)
            raise SourceError(
                f"{folder} holds two weight sets: {single} and {index} ({len(shards)} shard(s): "
                f"{', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''}); transformers loads {single} and "
                "ignores the shards, so which model is meant is unclear.",
                f"remove the stale set: {single}, or {index} with its shards.",
            )
        if has_single:
            return [folder / single]
        if has_index:
            return _listed_shards(folder, folder / index)
    present = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
    hint = f" (it holds {', '.join(present[:3])}, which transformers does not load without an index)" if present else ""
    raise SourceError(
        f"{folder} has no weights transformers would load: no {SAFE_WEIGHTS}, {SAFE_INDEX}, {PICKLE_WEIGHTS} or "
        f"{PICKLE_INDEX}{hint}.",
        "pass a folder written by save_pretrained, or a .gguf file.",
    )


def _explicit_weights(folder: Path, name: str) -> list[Path]:
    """config.json's `transformers_weights`: one safetensors file or index inside the folder."""
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()) or not name.endswith((".safetensors", ".safetensors.index.json")):
        raise SourceError(
            f"config.json names transformers_weights {name!r}, which is not a safetensors file or index inside "
            f"{folder}, so transformers cannot load it.",
            "fix transformers_weights in config.json or remove it.",
        )
    if not path.is_file():
        raise SourceError(f"config.json names transformers_weights {name!r}, which is not in {folder}.", "add it.")
    return _listed_shards(folder, path) if name.endswith(".index.json") else [path]


def _listed_shards(folder: Path, index: Path) -> list[Path]:
    shard_names = _index_shards(index)
    missing = [name for name in shard_names if not (folder / name).is_file()]
    if missing:
        raise SourceError(
            f"{index.name} lists {missing[0]}, which is not in {folder}.",
            "download every shard of the checkpoint.",
        )
    return [folder / name for name in shard_names]


def index_weights(folder: Path, config: dict | None = None) -> dict[str, TensorInfo]:
    """Every tensor of the weight files transformers loads from the folder (safetensors headers; pickles loaded
    weights-only)."""
    if config is None and (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            config = None
    files = weight_files(folder, config if isinstance(config, dict) else None)
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        if path.suffix == ".safetensors":
            found = read_safetensors_header(path)
        else:
            found = {n: TensorInfo(n, path, t.dtype, tuple(t.shape), -1) for n, t in _load_pickle(path).items()}
        for name, info in found.items():
            if name in tensors:
                raise SourceError(
                    f"tensor {name!r} appears in both {tensors[name].file.name} and {path.name}.",
                    "re-save the checkpoint: each tensor must be stored once.",
                )
            tensors[name] = info
    return tensors


def _index_shards(index_path: Path) -> list[str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise SourceError(f"{index_path} is not a valid weight index.", "re-save the checkpoint.") from None


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Pickled weights are only ever opened weights-only: arbitrary objects in them are refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise SourceError(
            f"{path} cannot be loaded as weights only ({type(error).__name__}); upcycle "
            "refuses pickles that hold anything but tensors.",
            "convert it to safetensors with a tool you trust, or re-save it.",
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{path} is not a flat state dict of tensors.", "re-save it with save_pretrained.")
    return state


@contextmanager
def open_source(path: Path, trust_remote_code: bool = False, scratch: Path | None = None) -> Iterator[DenseSource]:
    """Open SRC as a DenseSource; a .gguf file is first de-quantised into a scratch folder removed afterwards."""
    path = Path(path)
    check_source_path(path)
    if path.suffix.lower() != ".gguf":
        yield DenseSource.open(path, trust_remote_code)
        return
    from upcycle.hf.gguf import dequantize_gguf

    parent = scratch if scratch is not None else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix=".upcycle-gguf-", dir=parent) as tmp:
        folder = dequantize_gguf(path, Path(tmp) / "dense")
        yield DenseSource.open(folder, trust_remote_code)


def hash_files(paths: list[Path], remembered: bool = False) -> dict[str, str]:
    """sha256 of each source file, for provenance (hashlib releases the GIL, so this runs in a thread); with
    `remembered`, a digest computed before for the same unchanged file is reused (`memo_sha256`)."""
    from upcycle.hashing import file_sha256

    digest = memo_sha256 if remembered else file_sha256
    return {os.path.basename(path): digest(path) for path in paths}


def in_background(compute: Callable[[], T]) -> Callable[[], T]:
    """Start compute() on a daemon thread (an interrupted command does not wait for it); the returned function
    waits for its value and raises what it raised, so a failure is never a silently missing result."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = compute()
        except BaseException as error:  # handed to the caller of result()
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result() -> T:
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return result


def memo_sha256(path: Path) -> str:
    """sha256 of a file, remembered in the cache folder while the file is the same file with the same size and
    modification time (device, inode, size, mtime in nanoseconds); anything else hashes it again. One small file
    per digest, written atomically, so concurrent runs never see half a memo. `verify` never uses it."""
    from upcycle.assets import cache_dir, mark_used
    from upcycle.hashing import file_sha256

    stat = path.stat()
    identity = f"{path.resolve()}\0{stat.st_dev}\0{stat.st_ino}\0{stat.st_size}\0{stat.st_mtime_ns}"
    memo = cache_dir() / "sha256" / hashlib.sha256(identity.encode()).hexdigest()
    try:
        digest = memo.read_text().strip()
        if len(digest) == 64:
            mark_used(memo)
            return digest
    except OSError:
        pass
    digest = file_sha256(path)
    tmp = memo.parent / f".{memo.name}.{os.getpid()}-{threading.get_ident()}.tmp"
    try:  # remembering is best-effort: a read-only or full cache still gets the digest
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(digest + "\n")
        os.replace(tmp, memo)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return digest
