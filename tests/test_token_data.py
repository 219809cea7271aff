"""Corpora through a tokenizer, and every file format: text, jsonl, parquet, token ids."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_helpers import train_tokenizer, write_text_files

from locod.peer import formats
from locod.peer.data import (
    BatchSampler,
    Corpus,
    CorpusError,
    ReadSettings,
    heldout_batches,
    is_heldout,
    load_corpus,
)
from locod.peer.tokenizer import (
    ByteTokenizer,
    FileTokenizer,
    TokenizerError,
    load_tokenizer,
    tokenizer_fingerprint,
)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bpe")
    return train_tokenizer(write_text_files(root / "train"), root / "tokenizer.json")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> FileTokenizer:
    return load_tokenizer(tokenizer_path)


def _read(tokenizer: FileTokenizer | None = None, **kwargs: str) -> ReadSettings:
    if tokenizer is None:
        return ReadSettings(**kwargs)
    return ReadSettings(tokenizer=tokenizer, **kwargs)


def _ids(corpus: Corpus) -> np.ndarray:
    return np.concatenate([np.asarray(corpus.train), np.asarray(corpus.heldout)])


def _encode(tokenizer: FileTokenizer, *texts: str) -> list[int]:
    return [i for ids in tokenizer.encode_batch(list(texts)) for i in ids]


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _parquet(path: Path, columns: dict[str, list[object]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def _load(path: Path, cache: Path, read: ReadSettings) -> Corpus:
    return load_corpus([str(path)], cache_dir=cache, read=read)


# -- the tokenizer --------------------------------------------------------------------------


def test_a_tokenizer_loads_from_its_file_or_its_folder(tokenizer_path: Path) -> None:
    by_file, by_folder = load_tokenizer(tokenizer_path), load_tokenizer(tokenizer_path.parent)
    assert by_file.vocab_size == by_folder.vocab_size == 300
    ids = by_file.encode_batch(["abc def\n"])[0]
    assert by_file.decode(ids) == "abc def\n"
    assert len(ids) < len("abc def\n")  # merges were learnt


def test_the_fingerprint_ignores_layout_and_follows_content(
    tokenizer_path: Path, tmp_path: Path
) -> None:
    reindented = tmp_path / "reindented.json"
    reindented.write_text(json.dumps(json.loads(tokenizer_path.read_text()), indent=7))
    assert tokenizer_fingerprint(reindented) == tokenizer_fingerprint(tokenizer_path)
    other = train_tokenizer(write_text_files(tmp_path / "t"), tmp_path / "other.json", 280)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer_path)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("folder", r"has no tokenizer\.json"),
        ("garbage", "is not a tokenizer.json the tokenizers library can read"),
    ],
)
def test_a_bad_tokenizer_path_says_what_is_wrong(tmp_path: Path, layout: str, message: str) -> None:
    path = tmp_path / "tokenizer.json"
    if layout == "folder":
        path = tmp_path
    elif layout == "garbage":
        path.write_text('{"model": 3}')
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(path)


def test_bytes_are_their_own_tokenizer() -> None:
    byte = ByteTokenizer()
    assert byte.encode_batch(["é\n"]) == [[0xC3, 0xA9, 0x0A]]
    assert byte.decode([0xC3, 0xA9, 0x0A]) == "é\n"
    assert byte.decode([0xC3]) == "\ufffd"  # cut inside a character


# -- text through a tokenizer ---------------------------------------------------------------


def test_text_files_are_tokenized_into_uint16_ids(tokenizer: FileTokenizer, tmp_path: Path) -> None:
    text = "abc def abc\nghi abc def"
    path = tmp_path / "a.txt"
    path.write_text(text)
    corpus = _load(path, tmp_path / "cache", _read(tokenizer))
    assert corpus.dtype == np.uint16 and corpus.vocab_size == 300
    assert isinstance(corpus.train, np.memmap)
    assert _ids(corpus).tolist() == _encode(tokenizer, text + "\n")
    assert "tokens of" in corpus.description


def test_a_large_text_file_is_tokenized_a_chunk_at_a_time_with_the_same_ids(
    tokenizer: FileTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "".join(f"abc def {i} ghi\n" for i in range(200))
    path = tmp_path / "big.txt"
    path.write_text(text)
    monkeypatch.setattr(formats, "_TEXT_CHUNK_BYTES", 100)
    assert len(list(formats.iter_text_chunks(path))) > 10
    corpus = _load(path, tmp_path / "cache", _read(tokenizer))
    assert _ids(corpus).tolist() == _encode(tokenizer, text)


def test_a_chunk_boundary_inside_a_character_is_decoded_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "u.txt"
    path.write_text("ééééé")  # no newline: chunks cut at byte counts, mid-character
    monkeypatch.setattr(formats, "_TEXT_CHUNK_BYTES", 3)
    assert "".join(formats.iter_text_chunks(path)) == "ééééé"


def test_text_that_is_not_utf8_is_refused_with_its_offset(
    tokenizer: FileTokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(CorpusError, match=rf"{re.escape(str(path))} is not UTF-8 text \(byte 3"):
        _load(path, tmp_path / "cache", _read(tokenizer))
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written


def test_text_that_is_not_utf8_is_skipped_in_a_folder_as_binary_files_are(
    tokenizer: FileTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("abc def\n")
    # Valid chunks are written before the bad byte is met: they must be taken back.
    monkeypatch.setattr(formats, "_TEXT_CHUNK_BYTES", 64)
    (folder / "b.txt").write_bytes(b"ghi def\n" * 40 + b"caf\xe9\n")
    (folder / "c.txt").write_text("ghi abc\n")
    corpus = load_corpus([str(folder)], cache_dir=tmp_path / "cache", read=_read(tokenizer))
    assert _ids(corpus).tolist() == _encode(tokenizer, "abc def\n", "ghi abc\n")
    assert "(2 files, 1 not UTF-8 skipped," in corpus.description


def test_a_different_tokenizer_packs_a_different_cache(
    tokenizer: FileTokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "a.txt"
    path.write_text("abc def ghi\n" * 20)
    cache = tmp_path / "cache"
    as_bytes = _load(path, cache, _read())
    as_tokens = _load(path, cache, _read(tokenizer))
    assert as_bytes.dtype == np.uint8 and as_tokens.dtype == np.uint16
    assert _ids(as_bytes).tobytes() == b"abc def ghi\n" * 20
    assert len(_ids(as_tokens)) < len(_ids(as_bytes))
    assert len(list(cache.glob("*.json"))) == 2


def test_the_split_is_by_file_path_for_token_corpora_too(
    tokenizer: FileTokenizer, tmp_path: Path
) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    texts = {f"f{i:03}.txt": f"abc {i} def\n" for i in range(150)}
    for name, text in texts.items():
        (folder / name).write_text(text)
    held = sorted(n for n in texts if is_heldout(n))
    assert held, "the fixture's names must put some files in the held-out split"
    corpus = load_corpus([str(folder)], cache_dir=tmp_path / "cache", read=_read(tokenizer))
    assert corpus.heldout_files == len(held)
    assert corpus.heldout.tolist() == _encode(tokenizer, *(texts[n] for n in held))
    kept = sorted(n for n in texts if not is_heldout(n))
    assert corpus.train.tolist() == _encode(tokenizer, *(texts[n] for n in kept))


def test_batches_of_token_ids_are_int64_windows(tokenizer: FileTokenizer, tmp_path: Path) -> None:
    data = np.arange(1000, dtype=np.uint16) % 300
    inputs, targets = BatchSampler(data, batch_size=3, seq_len=16, seed=0).next()
    assert inputs.dtype == torch.int64 and inputs.shape == (3, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    for row in range(3):
        start = int(inputs[row, 0])  # ids are positions mod 300: a window is consecutive
        assert inputs[row].tolist() == [(start + k) % 300 for k in range(16)]
    [(held, _)] = heldout_batches(data, batch_size=1, seq_len=16, num_batches=1)
    assert held[0].tolist() == list(range(16))
    with pytest.raises(CorpusError, match="has 10 tokens, fewer than one sequence of 17"):
        BatchSampler(data[:10], batch_size=1, seq_len=16, seed=0)


# -- JSON lines -----------------------------------------------------------------------------


def test_jsonl_records_give_their_text_field_as_documents(
    tokenizer: FileTokenizer, tmp_path: Path
) -> None:
    records = [{"text": "abc"}, {"text": ""}, {"text": None}, {"id": 7, "text": "def ghi\n"}]
    path = _jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "d.jsonl").write_text(path.read_text() + "\n   \n")  # blank lines are skipped
    as_bytes = _load(path, tmp_path / "c1", _read())
    assert _ids(as_bytes).tobytes() == b"abc\ndef ghi\n"
    as_tokens = _load(path, tmp_path / "c2", _read(tokenizer))
    assert _ids(as_tokens).tolist() == _encode(tokenizer, "abc\n", "def ghi\n")


def test_the_text_field_is_a_setting(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"content": "one"}, {"content": "two"}])
    corpus = _load(path, tmp_path / "cache", _read(text_field="content"))
    assert _ids(corpus).tobytes() == b"one\ntwo\n"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"text": "ok"}\n{"text": "broken\n', "line 2 is not valid JSON"),
        ('{"text": "ok"}\n[1, 2]\n', "line 2 is a JSON list, not an object"),
        ('{"body": "x", "id": 1}\n', r"line 1 has no field 'text' \(its fields: body, id\)"),
        ('{"text": 12}\n', "line 1: field 'text' is a JSON int, not a string"),
        ('{"text": ""}\n{"text": null}\n', "holds no non-empty 'text' values"),
    ],
)
def test_a_corrupt_jsonl_file_is_named_and_nothing_is_cached(
    tmp_path: Path, lines: str, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(lines)
    good = tmp_path / "good.txt"
    good.write_text("kept\n" * 10)
    cache = tmp_path / "cache"
    _load(good, cache, _read())
    before = sorted(cache.iterdir())
    with pytest.raises(CorpusError, match=f"{re.escape(str(path))}.*{message}"):
        _load(path, cache, _read())
    # The earlier corpus is intact and nothing of the failed one is left, temporary or not.
    assert sorted(cache.iterdir()) == before
    assert _ids(_load(good, cache, _read())).tobytes() == b"kept\n" * 10


def test_jsonl_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match="line 1 is not UTF-8"):
        _load(path, tmp_path / "cache", _read())


# -- Parquet --------------------------------------------------------------------------------


def test_parquet_rows_give_their_text_column_as_documents(
    tokenizer: FileTokenizer, tmp_path: Path
) -> None:
    path = _parquet(tmp_path / "d.parquet", {"text": ["abc", None, "", "def\n"], "n": [1, 2, 3, 4]})
    assert _ids(_load(path, tmp_path / "c1", _read())).tobytes() == b"abc\ndef\n"
    as_tokens = _load(path, tmp_path / "c2", _read(tokenizer))
    assert _ids(as_tokens).tolist() == _encode(tokenizer, "abc\n", "def\n")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is not a readable Parquet file"),
        ({"body": ["x"]}, r"has no column 'text' \(its columns: body\)"),
        ({"text": [1, 2]}, "column 'text' holds int64, not strings"),
        ({"text": [None, ""]}, "holds no non-empty 'text' values"),
    ],
)
def test_a_corrupt_parquet_file_is_named(
    tmp_path: Path, content: dict[str, list[object]] | None, message: str
) -> None:
    path = tmp_path / "bad.parquet"
    if content is None:
        path.write_bytes(b"PAR1 this is not parquet at all PAR1")
    else:
        _parquet(path, content)
    with pytest.raises(CorpusError, match=f"{re.escape(str(path))}.*{message}"):
        _load(path, tmp_path / "cache", _read())
    assert not list((tmp_path / "cache").glob("*"))


# -- pre-tokenized ids ----------------------------------------------------------------------


def _ids_file(path: Path, ids: list[int], dtype: str, header: int | None = None) -> Path:
    body = np.asarray(ids, dtype=dtype).tobytes()
    if header is not None:
        head = np.zeros(256, dtype="<i4")
        head[:3] = [header, 1 if header == 20240520 else 7, len(ids)]
        body = head.tobytes() + body
    path.write_bytes(body)
    return path


def test_uint16_token_files_are_read_as_they_are(tokenizer: FileTokenizer, tmp_path: Path) -> None:
    ids = [(i * 37) % 300 for i in range(500)]
    path = _ids_file(tmp_path / "t.bin", ids, "<u2")
    corpus = _load(path, tmp_path / "cache", _read(tokenizer))
    assert corpus.dtype == np.uint16 and _ids(corpus).tolist() == ids


def test_uint32_token_files_need_the_setting_or_their_zeros_give_them_away(
    tokenizer: FileTokenizer, tmp_path: Path
) -> None:
    ids = [(i * 37) % 299 + 1 for i in range(500)]
    path = _ids_file(tmp_path / "t.bin", ids, "<u4")
    with pytest.raises(CorpusError, match=r"every second id is 0.*--token-dtype uint32"):
        _load(path, tmp_path / "c1", _read(tokenizer))
    corpus = _load(path, tmp_path / "c2", _read(tokenizer, token_dtype="uint32"))
    assert _ids(corpus).tolist() == ids


@pytest.mark.parametrize(("magic", "dtype"), [(20240520, "<u2"), (20240801, "<u4")])
def test_llm_c_token_files_are_read_by_their_header(
    tokenizer: FileTokenizer, tmp_path: Path, magic: int, dtype: str
) -> None:
    ids = [(i * 11) % 300 for i in range(100)]
    path = _ids_file(tmp_path / "t.bin", ids, dtype, header=magic)
    assert _ids(_load(path, tmp_path / "cache", _read(tokenizer))).tolist() == ids


def test_a_wide_vocabulary_packs_uint32(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    wide = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    wide.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wide.save(str(tmp_path / "wide.json"))
    tokenizer = load_tokenizer(tmp_path / "wide.json")
    ids = [69_999, 3, 65_536, 0, 42] * 10
    path = _ids_file(tmp_path / "t.bin", ids, "<u4")  # auto: uint32, the vocabulary needs it
    corpus = _load(path, tmp_path / "cache", _read(tokenizer))
    assert corpus.dtype == np.uint32 and corpus.vocab_size == 70_000
    assert _ids(corpus).tolist() == ids


@pytest.mark.parametrize(
    ("content", "settings", "message"),
    [
        (np.asarray([1, 2, 3], "<u2").tobytes() + b"\x01", {}, "holds 7 bytes, not a whole number"),
        (
            np.asarray([1, 300, 2], "<u2").tobytes(),
            {},
            "id 300 at position 1 is not below the vocabulary size 300",
        ),
        (np.asarray([1, 2], "<u2").tobytes(), {"token_dtype": "uint32"}, "id 131073 at position 0"),
        (
            np.asarray([20240520, 1, 5] + [0] * 253, "<i4").tobytes() + b"\x01\x00",
            {},
            "announces 5 ids",
        ),
        (
            np.asarray([20240520, 3, 1] + [0] * 253, "<i4").tobytes() + b"\x01\x00",
            {},
            "version 3, not 1",
        ),
        (np.asarray([20240520, 1, 0] + [0] * 253, "<i4").tobytes(), {}, "holds no token ids"),
    ],
)
def test_a_corrupt_token_file_is_named(
    tokenizer: FileTokenizer,
    tmp_path: Path,
    content: bytes,
    settings: dict[str, str],
    message: str,
) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=f"{re.escape(str(path))}.*{message}"):
        _load(path, tmp_path / "cache", _read(tokenizer, **settings))
    assert not list((tmp_path / "cache").glob("*"))


def test_an_empty_file_of_any_format_is_named(tokenizer: FileTokenizer, tmp_path: Path) -> None:
    for name in ("e.txt", "e.jsonl", "e.parquet", "e.bin"):
        path = tmp_path / name
        path.write_bytes(b"")
        with pytest.raises(CorpusError, match=f"{re.escape(str(path))} holds no non-empty"):
            _load(path, tmp_path / "cache", _read(tokenizer))


def test_bin_files_are_text_in_a_byte_corpus(tmp_path: Path) -> None:
    """Without a tokenizer a .bin file is a file like any other: text, or binary and refused."""
    path = tmp_path / "notes.bin"
    path.write_text("plain text\n")
    assert _ids(_load(path, tmp_path / "cache", _read())).tobytes() == b"plain text\n"
    path.write_bytes(b"\x01\x00\x02\x00")
    with pytest.raises(CorpusError, match="looks like a binary file"):
        _load(path, tmp_path / "cache", _read())


def test_read_settings_are_checked() -> None:
    with pytest.raises(CorpusError, match="token_dtype must be one of auto, uint16, uint32"):
        ReadSettings(token_dtype="int8")
    with pytest.raises(CorpusError, match="text_field must name a field"):
        ReadSettings(text_field="")
