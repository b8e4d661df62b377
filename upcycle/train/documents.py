"""Reading training text: which files hold text, and the documents in them.

A ``.txt`` file is one document (read with universal newlines, so CRLF becomes LF); a ``.jsonl`` line and a
``.parquet`` row are one document each (their ``text_field``, used as is). Empty documents are skipped.
Which files a recipe names (folders, globs, assets) is decided by :mod:`upcycle.train.recipe_paths`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from upcycle.errors import OptionError, SourceError

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def check_text_file(path: Path) -> str:
    """The lower-case suffix of an existing text file of a supported type, or a SourceError naming the file."""
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
        suffix = check_text_file(path)
        if suffix == ".txt":
            yield from _read_txt(path)
        elif suffix == ".jsonl":
            yield from _read_jsonl(path, text_field)
        else:
            yield from _read_parquet(path, text_field)
