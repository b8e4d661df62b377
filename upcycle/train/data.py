"""Training data: text files -> one cached token stream -> fixed-length sequences -> a seed-and-step batch order.

Choices, and why:

- A ``.txt`` file is one document (read with universal newlines, so CRLF becomes LF); a ``.jsonl`` line and a
  ``.parquet`` row are one document each (their ``text_field``, used as is). Empty documents are skipped.
- Every document is tokenised with the model's own tokenizer and its *default* special tokens (BOS for Llama 3
  or Gemma, nothing for SmolLM2 or Qwen), exactly as the model sees a document at inference, followed by the
  tokenizer's EOS as the separator. Documents are concatenated and cut into non-overlapping ``seq_len`` windows
  (the tail is dropped); attention crosses document boundaries, as in standard packed pre-training.
- The token stream is cached as a ``.npy`` (uint16 when the vocabulary fits, else uint32) named by a sha256 over
  the content of the text files, the tokenizer files and the settings, so a second run (any rank, any process)
  memory-maps it at once and an edited file re-tokenises. Builds are atomic and serialised by a file lock.
- The batch order is a pure function of (seed, number of sequences, step, global batch): the data position of a
  run is just its step, which makes resume exact and lets 1 rank and N ranks see the same global batch.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.metadata
import json
import logging
import operator
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from upcycle.errors import OptionError, SourceError
from upcycle.hashing import file_sha256

try:  # POSIX only; without it concurrent builds of one key each write the same file and the last rename wins
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the token stream layout or the tokenisation rules change: old cache entries are then ignored."""

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")

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


# ---------------------------------------------------------------------------------------------------------------
# Finding and reading text
# ---------------------------------------------------------------------------------------------------------------


def resolve_files(patterns: Sequence[str | Path], base: Path | None = None) -> list[Path]:
    """Expand files, folders (their supported files, recursively) and globs into a sorted, de-duplicated list.

    Each pattern keeps its place (files from the first pattern come first) so a recipe controls the order; within
    a glob or folder the names are sorted so the result never depends on the file system's listing order.
    A pattern that matches nothing is an error: a typo must not silently train on less data.
    """
    base = base or Path.cwd()
    out: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        raw = Path(pattern).expanduser()
        full = raw if raw.is_absolute() else base / raw
        if full.is_dir():
            matches = sorted(p for p in full.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        elif full.is_file():
            matches = [full]
        else:
            matches = sorted(Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
        if not matches:
            raise SourceError(
                f"No text files match {str(pattern)!r} (looked in {full}).",
                f"Give existing {', '.join(TEXT_SUFFIXES)} files, folders or globs.",
            )
        for path in matches:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise SourceError(
            f"{path}: unsupported text file type {path.suffix or '(no extension)'!r}.",
            f"Use {', '.join(TEXT_SUFFIXES)} files (a .txt file is one document; .jsonl/.parquet hold a text field).",
        )
    if not path.is_file():
        raise SourceError(f"{path}: text file not found.", "Check the path in the recipe.")
    return suffix


def _read_txt(path: Path) -> Iterator[str]:
    try:
        # utf-8-sig drops a byte-order mark; universal newlines turn CRLF (Gutenberg texts) into LF
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(
            f"{path}: not UTF-8 text (bad byte at offset {e.start}).",
            f"Re-encode it, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.txt",
        ) from e
    if text:
        yield text


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline, a separator) carry no record
            where = f"{path}:{lineno}"
            try:
                record = json.loads(raw)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both derive from ValueError
                raise SourceError(f"{where}: not a JSON object ({e}).", "Write one JSON object per line.") from e
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
                raise SourceError(
                    f"{where}: the record has no {text_field!r} field (found {keys}).",
                    "Set text_field in the recipe to the field holding the text.",
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise SourceError(
                    f"{where}: field {text_field!r} is {type(text).__name__}, not a string.",
                    "Store the document text as a JSON string.",
                )
            if text:
                yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise SourceError(
            f"{path}: reading .parquet needs the pyarrow package, which is not installed.",
            "Run: pip install pyarrow (or convert the file to .jsonl).",
        ) from e
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants for corrupt files
        raise SourceError(f"{path}: not a readable Parquet file ({e}).", "Check or rewrite the file.") from e
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise SourceError(
            f"{path}: no column {text_field!r} (columns: {names[:12]}).",
            "Set text_field in the recipe to the column holding the text.",
        )
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise SourceError(
                    f"{path}: row {row} of column {text_field!r} is {type(text).__name__}, not a string.",
                    "Drop or fill the empty rows, or store the text as a string column.",
                )
            row += 1
            if text:
                yield text


def iter_documents(files: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """Yield every non-empty document of the files, in order (see the module docstring for what a document is)."""
    if not text_field:
        raise OptionError("text_field is empty.", "Name the JSONL field or Parquet column holding the text.")
    for file in files:
        path = Path(file)
        suffix = _check_suffix(path)
        if suffix == ".txt":
            yield from _read_txt(path)
        elif suffix == ".jsonl":
            yield from _read_jsonl(path, text_field)
        else:
            yield from _read_parquet(path, text_field)


# ---------------------------------------------------------------------------------------------------------------
# Tokenising into a cached token stream
# ---------------------------------------------------------------------------------------------------------------


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
        _check_suffix(Path(file))
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


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so that ranks and parallel runs building the same stream wait for one builder."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


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
) -> Path:
    """Path of the cached ``.npy`` token stream of ``files``, tokenising them first if no cache entry exists.

    Layout per document: the tokenizer's default prefix (e.g. BOS), the text's tokens, its default suffix, then
    EOS (not doubled when the suffix already ends with it). Beside ``<key>.npy`` lies ``<key>.json`` with the
    counts and settings. Safe to call from every rank at once: one process builds under a lock, the others wait
    and then find the finished file; a killed build leaves only a temporary file that the next build removes.
    ``progress(files_done, files_total)`` is called while tokenising.
    """
    files = [Path(f) for f in files]
    if not files:
        raise OptionError("No text files given.", "List .txt, .jsonl or .parquet files (or globs) in the recipe.")
    if max_piece_chars < 1:
        raise OptionError(f"max_piece_chars must be positive, got {max_piece_chars}.", None)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = token_cache_key(files, tokenizer_dir, text_field)
    final = cache_dir / f"{key}.npy"
    if final.is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{key}.lock"):
        if final.is_file():  # another rank or run built it while we waited
            return final
        for stale in cache_dir.glob(f".{key}.tmp-*"):  # left by a killed build; we hold the lock
            stale.unlink(missing_ok=True)
        raw = cache_dir / f".{key}.tmp-{os.getpid()}.bin"
        tmp = cache_dir / f".{key}.tmp-{os.getpid()}.npy"
        try:
            log.info("Tokenising %d file(s) into %s", len(files), final)
            meta = _tokenize_to_raw(files, Path(tokenizer_dir), text_field, raw, progress, max_piece_chars)
            _npy_from_raw(raw, tmp, np.dtype(meta["dtype"]).newbyteorder("<"), meta["tokens"])
            _write_json_atomic(cache_dir / f"{key}.json", meta)
            os.replace(tmp, final)  # the .npy appearing is the commit point
        finally:
            raw.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
    return final


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


# ---------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------


class PackedDataset:
    """Non-overlapping ``seq_len`` windows of a token stream; the remainder after the last window is dropped.

    Inputs are also the labels: HF causal LMs shift them internally, so a window of ``seq_len`` tokens trains
    ``seq_len - 1`` next-token predictions. Rows are read lazily from the (memory-mapped) stream.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise OptionError(f"seq_len must be an integer >= 2, got {seq_len!r}.", "Use e.g. 512 or 2048.")
        if tokens.ndim != 1:
            raise OptionError(f"tokens must be a 1-D stream, got shape {list(tokens.shape)}.", None)
        count = len(tokens) // seq_len
        if count < 1:
            raise SourceError(
                f"The text gives {len(tokens)} tokens, fewer than one sequence of seq_len={seq_len} tokens.",
                "Add more text or lower seq_len.",
            )
        self.seq_len = seq_len
        self.tokens = tokens
        self.rows = tokens[: count * seq_len].reshape(count, seq_len)  # a view: no copy, even of a memmap

    def __len__(self) -> int:
        return self.rows.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens covered by the sequences (the stream minus the dropped tail)."""
        return self.rows.size

    def __getitem__(self, index: int) -> torch.Tensor:
        i = operator.index(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences")
        return torch.from_numpy(self.rows[i].astype(np.int64))


def packed_dataset(
    files: Sequence[Path],
    tokenizer_dir: Path,
    seq_len: int,
    text_field: str = "text",
    cache_dir: Path | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> PackedDataset:
    """Build (or reuse) the token cache of ``files`` and pack it: the one call a training run needs per split."""
    path = build_token_file(files, tokenizer_dir, text_field, cache_dir, progress=progress)
    return PackedDataset(load_tokens(path), seq_len)


def make_batch(dataset: PackedDataset, ids: Sequence[int]) -> torch.Tensor:
    """Stack sequences ``ids`` into a LongTensor [len(ids), seq_len] (use it as both input_ids and labels)."""
    index = np.asarray(ids, dtype=np.int64).reshape(-1)
    if index.size and (index.min() < 0 or index.max() >= len(dataset)):
        bad = int(index.min() if index.min() < 0 else index.max())
        raise IndexError(f"sequence {bad} out of range for {len(dataset)} sequences")
    batch_bt = dataset.rows[index].astype(np.int64)
    return torch.from_numpy(batch_bt)


# ---------------------------------------------------------------------------------------------------------------
# Deterministic, resumable, rank-aware order
# ---------------------------------------------------------------------------------------------------------------


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise OptionError(f"{name} must be a positive integer, got {value!r}.", None)
    return int(value)


def grad_accum_steps(global_batch_sequences: int, micro_batch_size: int, world_size: int = 1) -> int:
    """Micro-batches per rank per step: global batch / (micro-batch x ranks), which must divide exactly.

    An inexact split would make ranks see different numbers of sequences and change the loss average.
    """
    b = _positive_int("global batch (sequences)", global_batch_sequences)
    m = _positive_int("micro_batch_size", micro_batch_size)
    w = _positive_int("world_size", world_size)
    if b % (m * w):
        per = m * w
        lower, upper = max(per, b // per * per), (b // per + 1) * per
        raise OptionError(
            f"The global batch of {b} sequences does not split into micro-batches of {m} on {w} rank(s) "
            f"({b} is not a multiple of {m} x {w} = {per}).",
            f"Use a global batch of {lower} or {upper} sequences, or change micro_batch_size.",
        )
    return b // (m * w)


class BatchOrder:
    """Which sequences each step trains on: a pure function of (seed, num_sequences, step, global batch).

    The sample stream is epoch 0's permutation, then epoch 1's, ... (each ``torch.randperm`` seeded from
    (seed, epoch)); step ``s`` takes stream positions ``[s*B, (s+1)*B)``, running on into the next epoch without
    a gap. Nothing else is stateful, so a resumed run needs only its step. When B exceeds the number of
    sequences a batch spans several epochs and holds repeats.
    """

    def __init__(self, num_sequences: int, seed: int) -> None:
        self.num_sequences = _positive_int("num_sequences", num_sequences)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise OptionError(f"seed must be an integer, got {seed!r}.", None)
        self.seed = int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def epoch_seed(self, epoch: int) -> int:
        """A 63-bit seed from (seed, epoch) by hashing, so nearby seeds and epochs give unrelated orders."""
        digest = hashlib.sha256(f"upcycle.data:{self.seed}:{epoch}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of all sequence ids in ``epoch`` (the two most recent epochs are kept)."""
        perm = self._perms.get(epoch)
        if perm is None:
            generator = torch.Generator().manual_seed(self.epoch_seed(epoch))
            perm = torch.randperm(self.num_sequences, generator=generator).numpy()
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def epochs_done(self, step: int, global_batch_sequences: int) -> float:
        """Passes over the data completed before ``step`` (for logging)."""
        return step * global_batch_sequences / self.num_sequences

    def global_batch(self, step: int, global_batch_sequences: int) -> list[int]:
        """Sequence ids of step ``step``'s global batch, in stream order (a run that never changed its batch)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise OptionError(f"step must be a non-negative integer, got {step!r}.", None)
        b = _positive_int("global batch (sequences)", global_batch_sequences)
        return self.batch_at(int(step) * b, b)

    def batch_at(self, position: int, global_batch_sequences: int) -> list[int]:
        """Sequence ids at stream positions ``[position, position + B)``: where a run stands is its position, so a
        resumed run continues exactly where it stopped even if its batch size changed."""
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or position < 0:
            raise OptionError(f"position must be a non-negative integer, got {position!r}.", None)
        b = _positive_int("global batch (sequences)", global_batch_sequences)
        n = self.num_sequences
        start, stop = int(position), int(position) + b
        ids: list[int] = []
        pos = start
        while pos < stop:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, stop - pos)
            ids.extend(self.permutation(epoch)[offset : offset + take].tolist())
            pos += take
        return ids

    def local_micro_batches(
        self,
        step: int,
        global_batch_sequences: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        position: int | None = None,
    ) -> list[list[int]]:
        """Rank ``rank``'s micro-batches of step ``step``: ``grad_accum_steps`` lists of ``micro_batch_size`` ids.

        The global batch is the one at stream ``position`` (default: ``step`` x the global batch). It is cut into
        ``world_size`` contiguous equal shares (rank r takes share r) and each share into micro-batches, so the
        union over ranks and micro-batches is the global batch and a run on any number of ranks trains on the same
        sequences per step.
        """
        accum = grad_accum_steps(global_batch_sequences, micro_batch_size, world_size)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise OptionError(f"rank must be in [0, {world_size}), got {rank!r}.", None)
        share = global_batch_sequences // world_size
        batch = (
            self.global_batch(step, global_batch_sequences)
            if position is None
            else self.batch_at(position, global_batch_sequences)
        )
        mine = batch[rank * share : (rank + 1) * share]
        return [mine[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(accum)]


# ---------------------------------------------------------------------------------------------------------------
# Held-out evaluation
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPlan:
    """One rank's held-out micro-batches, padded so every rank runs the same number of equal-shape forwards.

    Lockstep matters: under FSDP each forward all-gathers parameters, so a rank that ran fewer forwards would hang
    the others. ``counts[i]`` says how many leading rows of ``batches[i]`` are real; the rest repeat a real
    sequence and must be ignored. Exact mean: sum the per-sequence losses of the real rows, all-reduce the sum,
    divide by ``total`` (every sequence has the same number of tokens, so this is also the per-token mean).
    """

    batches: list[list[int]]
    counts: list[int]
    total: int

    @property
    def local_sequences(self) -> int:
        """Real sequences on this rank."""
        return sum(self.counts)


def eval_batches(
    dataset: PackedDataset | int, num_sequences: int, micro_batch_size: int, rank: int = 0, world_size: int = 1
) -> EvalPlan:
    """The held-out plan: the first ``num_sequences`` sequences (all when 0, at most all), split over ranks.

    Always the same sequences, so evaluations across a run (and across runs and rank counts) are comparable.
    Rank r takes a contiguous share of ceil(total / world_size) (the last ranks may get fewer or none).
    """
    available = dataset if isinstance(dataset, int) else len(dataset)
    if isinstance(num_sequences, bool) or not isinstance(num_sequences, (int, np.integer)) or num_sequences < 0:
        raise OptionError(f"eval sequences must be a non-negative integer, got {num_sequences!r}.", "0 means all.")
    micro = _positive_int("micro_batch_size", micro_batch_size)
    world = _positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world:
        raise OptionError(f"rank must be in [0, {world}), got {rank!r}.", None)
    total = min(int(num_sequences), available) if num_sequences else available
    if total < 1:
        raise SourceError("The held-out text gives no sequence to evaluate.", "Add held-out text or lower seq_len.")
    share = -(-total // world)
    mine = list(range(min(rank * share, total), min((rank + 1) * share, total)))
    num_batches = -(-share // micro)
    batches: list[list[int]] = []
    counts: list[int] = []
    for i in range(num_batches):
        real = mine[i * micro : (i + 1) * micro]
        pad = real[0] if real else 0
        batches.append(real + [pad] * (micro - len(real)))
        counts.append(len(real))
    return EvalPlan(batches=batches, counts=counts, total=total)
