"""Tokenising text files into one cached token stream, shared by every rank and every run of a user.

- Every document is tokenised with the model's own tokenizer and its *default* special tokens (BOS for Llama 3
  or Gemma, nothing for SmolLM2 or Qwen), exactly as the model sees a document at inference, followed by the
  tokenizer's EOS as the separator. Documents are concatenated into one stream (packing cuts it into sequences).
- The token stream is cached as a ``.npy`` (uint16 when the vocabulary fits, else uint32) named by a sha256 over
  the content of the text files, the tokenizer files and the settings, so a second run (any rank, any process)
  memory-maps it at once and an edited file re-tokenises. Builds are atomic and serialised by a file lock.
- The record beside the stream holds the stream's sha256, hashed again on every reuse: a damaged stream (an edited,
  truncated or unreadable entry) is set aside and built again, never trained on.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from filelock import FileLock

from upcycle.errors import OptionError, SourceError
from upcycle.hashing import file_sha256
from upcycle.output_safety import write_json_atomically
from upcycle.train.cache_integrity import set_aside
from upcycle.train.documents import check_text_file, iter_documents
from upcycle.train.launch_checks import checked_in_this_launch, mark_checked

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Bump when the token stream layout, its record or the tokenisation rules change: old cache entries are then
ignored. 2: the record holds the stream's sha256."""


# Files that define tokenisation. Weights and config.json are left out on purpose: the dense model and its
# upcycled MoE share a tokenizer, so the dense control run reuses the MoE run's cache.
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
TOKENIZER_FILE_GLOBS = ("*.tiktoken",)

MAX_PIECE_CHARS = 1_000_000
"""Longer documents are tokenised in pieces (cut at line starts or word starts) to bound tokenizer memory."""
BATCH_CHARS = 4_000_000
"""Characters per tokenizer call: large enough for the fast tokenizer to batch well, small enough for memory."""


def tokenizer_files(tokenizer_dir: Path) -> list[Path]:
    """The files of a model folder that define its tokenizer (what the cache key hashes)."""
    folder = Path(tokenizer_dir)
    found = [folder / name for name in TOKENIZER_FILE_NAMES if (folder / name).is_file()]
    for pattern in TOKENIZER_FILE_GLOBS:
        found.extend(sorted(folder.glob(pattern)))
    if not found:
        raise SourceError(
            f"No tokenizer files in {folder} (looked for {', '.join(TOKENIZER_FILE_NAMES[:3])}, ...).",
            "Point the recipe at a model folder saved with its tokenizer (save_pretrained of both).",
        )
    return found


def token_cache_key(files: Sequence[Path], tokenizer_dir: Path, text_field: str = "text") -> str:
    """sha256 naming a token stream: text content and type, tokenizer content, text field, format, library versions.

    Content hashes rather than paths and times: moving or touching a corpus keeps its cache, editing it does not.
    The transformers/tokenizers versions are included because their defaults (special tokens, normalisation)
    may change between releases; an upgrade then costs one re-tokenisation, never a silently different stream.
    """
    for file in files:
        check_text_file(Path(file))
    spec = {
        "format": FORMAT_VERSION,
        "text_field": text_field,
        "texts": [[Path(f).suffix.lower(), file_sha256(f)] for f in files],
        "tokenizer": [[p.name, file_sha256(p)] for p in tokenizer_files(tokenizer_dir)],
        "transformers": importlib.metadata.version("transformers"),  # metadata: importing would cost a second
        "tokenizers": importlib.metadata.version("tokenizers"),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``<upcycle cache>/tokens`` (``$UPCYCLE_CACHE`` or ``~/.cache/upcycle``), shared by all runs of a user."""
    from upcycle.assets import cache_dir

    return cache_dir() / "tokens"


def _split_long(text: str, max_chars: int) -> list[str]:
    """Cut a long document into pieces at boundaries the pre-tokeniser never crosses, to bound tokenizer memory.

    Preferred cut: just after a single newline between two non-space characters; else just before a space that
    precedes a letter; else a hard cut. For byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM2) the pieces
    tokenise to exactly the tokens of the whole text (tested); SentencePiece tokenizers may differ by a word-start
    marker at a cut, once per ``max_chars`` characters.
    """
    pieces: list[str] = []
    start = 0
    n = len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = -1
        i = text.rfind("\n", start + 1, end)
        while i > start:
            if i + 1 < n and not text[i - 1].isspace() and not text[i + 1].isspace():
                cut = i + 1
                break
            i = text.rfind("\n", start + 1, i)
        if cut < 0:
            i = text.rfind(" ", start + 1, end)
            while i > start:
                if i + 1 < n and not text[i - 1].isspace() and text[i + 1].isalpha():
                    cut = i
                    break
                i = text.rfind(" ", start + 1, i)
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _default_special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids the tokenizer adds to a text by default, e.g. ([bos], []) for Llama 3, ([], []) for Qwen."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain) :])
    return [], []  # pragma: no cover - a post-processor that rewrites the text's own ids; add nothing


def _batch_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """texts -> ids without special tokens; the Rust batch encoder without offsets when it is safe (~1.5x faster).

    Safe means a fast tokenizer whose backend applies no truncation or padding of its own: then it returns what
    ``tokenizer(texts, add_special_tokens=False)`` returns (tested), minus the offsets we do not need.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast") and not backend.truncation and not backend.padding:
        return lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _npy_from_raw(raw_path: Path, npy_path: Path, dtype: np.dtype, count: int) -> None:
    """Wrap a raw little-endian token file in an .npy header (streaming: the stream never sits in memory whole)."""
    with open(npy_path, "wb") as out, open(raw_path, "rb") as src:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)}
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(src, out, 16 << 20)
        out.flush()
        os.fsync(out.fileno())


def _tokenize_to_raw(
    files: Sequence[Path],
    tokenizer_dir: Path,
    text_field: str,
    raw_path: Path,
    progress: Callable[[int, int], None] | None,
    max_piece_chars: int,
) -> dict:
    """Tokenise every document into ``raw_path``; return the facts recorded beside the stream."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SourceError(
            f"The tokenizer in {tokenizer_dir} has no EOS token, so documents cannot be separated.",
            "Set eos_token in tokenizer_config.json (the model's end-of-text token) and save it again.",
        )
    vocab = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32).newbyteorder("<")
    prefix, suffix = _default_special_tokens(tokenizer)
    closing = np.asarray(suffix if suffix[-1:] == [eos] else [*suffix, eos], dtype=dtype)
    opening = np.asarray(prefix, dtype=dtype)

    encode = _batch_encoder(tokenizer)
    counts = {"documents": 0, "tokens": 0, "characters": 0}
    pending: list[tuple[int, str]] = []  # (piece index within its document, text); index 0 starts a document
    pending_chars = 0

    def flush(out) -> None:
        nonlocal pending_chars
        if not pending:
            return
        ids = encode([text for _, text in pending])
        parts: list[np.ndarray] = []
        for (index, _), piece in zip(pending, ids, strict=True):
            if index == 0:
                if counts["documents"]:  # close the previous document before opening the next
                    parts.append(closing)
                parts.append(opening)
                counts["documents"] += 1
            parts.append(np.asarray(piece, dtype=np.int64))
        stream = np.concatenate(parts)
        if stream.size and int(stream.max()) >= np.iinfo(dtype).max + 1:  # pragma: no cover - len(tokenizer) lied
            raise SourceError(f"A token id {int(stream.max())} exceeds the tokenizer's size {vocab}.", None)
        out.write(stream.astype(dtype).tobytes())
        counts["tokens"] += int(stream.size)
        pending.clear()
        pending_chars = 0

    with open(raw_path, "wb") as out:
        for done, file in enumerate(files):
            for text in iter_documents([file], text_field):
                counts["characters"] += len(text)
                for index, piece in enumerate(_split_long(text, max_piece_chars)):
                    pending.append((index, piece))
                    pending_chars += len(piece)
                    if pending_chars >= BATCH_CHARS:
                        flush(out)
            if progress is not None:
                progress(done + 1, len(files))
        flush(out)
        if counts["documents"]:
            out.write(closing.tobytes())
            counts["tokens"] += int(closing.size)
        out.flush()
        os.fsync(out.fileno())
    if not counts["documents"]:
        raise SourceError(
            f"The {len(files)} text file(s) hold no text (all empty).",
            "Check the paths and, for .jsonl/.parquet, the text_field.",
        )
    return {
        **counts,
        "dtype": dtype.name,
        "vocab_size": vocab,
        "eos_token_id": eos,
        "prefix_token_ids": prefix,
        "suffix_token_ids": [int(t) for t in closing],
        "tokenizer_dir": str(tokenizer_dir),
        "text_field": text_field,
        "files": [str(f) for f in files],
        "format": FORMAT_VERSION,
    }


def build_token_file(
    files: Sequence[Path],
    tokenizer_dir: Path,
    text_field: str = "text",
    cache_dir: Path | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    max_piece_chars: int = MAX_PIECE_CHARS,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Path of the cached ``.npy`` token stream of ``files``, tokenising them first if no cache entry exists.

    Layout per document: the tokenizer's default prefix (e.g. BOS), the text's tokens, its default suffix, then
    EOS (not doubled when the suffix already ends with it). Beside ``<key>.npy`` lies ``<key>.json`` with the
    counts and settings. Safe to call from every rank at once: one process builds under a lock, the others wait
    and then find the finished file; a killed build leaves only a temporary file that the next build removes.
    ``progress(files_done, files_total)`` is called while tokenising; ``warn`` says that a damaged entry was set
    aside (default: the log).
    """
    files = [Path(f) for f in files]
    if not files:
        raise OptionError("No text files given.", "List .txt, .jsonl or .parquet files (or globs) in the recipe.")
    if max_piece_chars < 1:
        raise OptionError(f"max_piece_chars must be positive, got {max_piece_chars}.", None)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = token_cache_key(files, tokenizer_dir, text_field)
    final = cache_dir / f"{key}.npy"
    entry = [final, final.with_suffix(".json")]
    from upcycle.assets import mark_used

    if final.is_file() and checked_in_this_launch(final, entry):
        mark_used(cache_dir / f".{key}.lock")  # not the stream or its record: their mtimes are the launch's stamp
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_dir / f".{key}.lock"):  # ranks and parallel runs wait for one builder
        if final.is_file():  # another rank or run may have built (or repaired) it while we waited
            problem = stream_problem(final)
            if problem is None:
                mark_checked(final, entry)
                mark_used(cache_dir / f".{key}.lock")
                return final
            aside = set_aside(final)
            if final.with_suffix(".json").is_file():
                set_aside(final.with_suffix(".json"))
            message = f"warning: the cached token stream {final} is damaged ({problem}); set aside as {aside.name}"
            (warn or log.warning)(message + ", tokenising again")
        for stale in cache_dir.glob(f".{key}.tmp-*"):  # left by a killed build; we hold the lock
            stale.unlink(missing_ok=True)
        raw = cache_dir / f".{key}.tmp-{os.getpid()}.bin"
        tmp = cache_dir / f".{key}.tmp-{os.getpid()}.npy"
        try:
            log.info("Tokenising %d file(s) into %s", len(files), final)
            meta = _tokenize_to_raw(files, Path(tokenizer_dir), text_field, raw, progress, max_piece_chars)
            _npy_from_raw(raw, tmp, np.dtype(meta["dtype"]).newbyteorder("<"), meta["tokens"])
            meta["sha256"] = file_sha256(tmp)  # hashed again on every reuse
            write_json_atomically(cache_dir / f"{key}.json", meta)
            os.replace(tmp, final)  # the .npy appearing is the commit point
            mark_checked(final, entry)
        finally:
            raw.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
    return final


def recorded_sha256(path: Path) -> str | None:
    """The sha256 of a cached stream's bytes, as its record wrote it when the stream was built."""
    try:
        recorded = json.loads(path.with_suffix(".json").read_text()).get("sha256")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) else None


def stream_problem(path: Path) -> str | None:
    """Why a cached stream cannot be used (None: its bytes are the ones its record hashed when it was built)."""
    recorded = recorded_sha256(path)
    if recorded is None:
        return f"its record {path.with_suffix('.json').name} is missing, unreadable or holds no sha256"
    try:
        found = file_sha256(path)
    except OSError as e:
        return f"it cannot be read ({e})"
    return None if found == recorded else f"sha256 {found[:12]}, recorded {recorded[:12]}"


def load_tokens(path: Path) -> np.ndarray:
    """Memory-map a token stream written by :func:`build_token_file` (read-only; pages load on demand)."""
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise SourceError(f"Token cache {path} is unreadable ({e}).", f"Delete {path} to rebuild it.") from e
    if tokens.ndim != 1 or tokens.dtype.kind != "u":
        raise SourceError(
            f"Token cache {path} holds {tokens.dtype}{list(tokens.shape)}, not a 1-D unsigned token stream.",
            f"Delete {path} to rebuild it.",
        )
    return tokens
