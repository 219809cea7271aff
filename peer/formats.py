"""Reading one corpus file: plain text, JSON lines, Parquet, or pre-tokenized ids.

Which reader a file gets is decided by its suffix (:func:`file_format`):

* ``.jsonl`` — one JSON object per line; the document is its text field (``text`` unless
  set otherwise). Blank lines and records whose field is null or "" are skipped.
* ``.parquet`` — the document is each row of a string column of that same name; nulls and
  empty strings are skipped. Read one record batch at a time (bounded memory).
* ``.bin`` (only when the corpus is read through a tokenizer) — token ids, nanoGPT style:
  a flat array of little-endian uint16 or uint32, or llm.c's layout (a 1024-byte header
  whose first int32 is 20240520, uint16 ids, or 20240801, uint32 ids, then the ids). The
  dtype is the header's when there is one, else the ``token_dtype`` setting, else (``auto``)
  uint16 when the vocabulary fits in 16 bits and uint32 otherwise; a raw file that reads as
  uint16 but looks like uint32 (every high half zero) is refused rather than guessed. Every
  id must be below the vocabulary size.
* anything else — text, read as bytes (byte corpora) or as UTF-8 (through a tokenizer).

Every problem is a :class:`CorpusError` that names the file, and the line or position
where it can be told, and says what is wrong.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

JSONL = "jsonl"
PARQUET = "parquet"
TOKENS = "tokens"
TEXT = "text"
TOKEN_DTYPES = ("auto", "uint16", "uint32")

_LLMC_HEADER_BYTES = 1024
_LLMC_MAGIC: dict[int, tuple[int, np.dtype]] = {
    20240520: (1, np.dtype("<u2")),
    20240801: (7, np.dtype("<u4")),
}
"""llm.c's token files: magic → (version, dtype of the ids)."""
_TEXT_CHUNK_BYTES = 1 << 18
_PARQUET_BATCH_ROWS = 1024
_TOKEN_CHUNK = 1 << 22
_MIN_IDS_TO_JUDGE = 16
"""Fewer ids than this are too few to tell uint32 from uint16 by their zeros."""


class CorpusError(ValueError):
    """The corpus cannot be used: a path is missing, a file is corrupt, or nothing is left."""


class NotUTF8Error(CorpusError):
    """A text file read through a tokenizer is not UTF-8 (skipped when met in a folder)."""


def file_format(path: Path, *, token_files: bool) -> str:
    """The reader for ``path``: ``jsonl``, ``parquet``, ``tokens`` or ``text``.

    ``.bin`` files are token ids only when the corpus has a tokenizer (``token_files``);
    in a byte corpus they are files like any other (text, or skipped as binary).
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return JSONL
    if suffix == ".parquet":
        return PARQUET
    if suffix == ".bin" and token_files:
        return TOKENS
    return TEXT


def is_binary_format(fmt: str) -> bool:
    """Formats whose files are binary by design (so the NUL-byte probe must not judge them)."""
    return fmt in (PARQUET, TOKENS)


def iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """The non-empty ``text_field`` of each record of a JSON-lines file."""
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    record = json.loads(raw)
                except UnicodeDecodeError as error:
                    raise CorpusError(f"{where} is not UTF-8 ({error.reason})") from error
                except json.JSONDecodeError as error:
                    raise CorpusError(f"{where} is not valid JSON: {error.msg}") from error
                if not isinstance(record, dict):
                    raise CorpusError(
                        f"{where} is a JSON {type(record).__name__}, not an object with a "
                        f"{text_field!r} field"
                    )
                if text_field not in record:
                    fields = ", ".join(sorted(record)[:8]) or "none"
                    raise CorpusError(
                        f"{where} has no field {text_field!r} (its fields: {fields}); "
                        "set text_field (--text-field) to the field that holds the text"
                    )
                text = record[text_field]
                if text is None or text == "":
                    continue
                if not isinstance(text, str):
                    raise CorpusError(
                        f"{where}: field {text_field!r} is a JSON {type(text).__name__}, "
                        "not a string"
                    )
                yield text
    except OSError as error:
        raise CorpusError(f"cannot read {path}: {error}") from error


def iter_parquet(path: Path, text_field: str) -> Iterator[list[str]]:
    """Batches of the non-empty strings of column ``text_field`` of a Parquet file."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise CorpusError(
            f"{path}: reading Parquet needs pyarrow ({error}); "
            "install the optional extra: pip install 'locod[hf]'"
        ) from error
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as error:
        raise CorpusError(f"{path} is not a readable Parquet file: {error}") from error
    if text_field not in schema.names:
        columns = ", ".join(schema.names[:8]) or "none"
        raise CorpusError(
            f"{path} has no column {text_field!r} (its columns: {columns}); "
            "set text_field (--text-field) to the column that holds the text"
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"{path}: column {text_field!r} holds {kind}, not strings")
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
            texts = [t for t in batch.column(0).to_pylist() if t]
            if texts:
                yield texts
    except (pa.ArrowException, OSError, ValueError) as error:
        raise CorpusError(f"{path} is a corrupt Parquet file: {error}") from error


def iter_text_chunks(path: Path) -> Iterator[str]:
    """A text file as UTF-8 strings of about 256 KiB, cut after a newline where there is one.

    Tokenizing a file a chunk at a time bounds memory. Cutting at line ends keeps the ids
    what whole-file tokenizing gives for the usual pre-tokenizers, which split there, except
    where a cut line ends in spaces (GPT-2's pattern joins trailing spaces to the newline at
    the end of a string): at most one place per 256 KiB, the same on every machine.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0
    try:
        with path.open("rb") as handle:
            while True:
                lines, size = [], 0
                while size < _TEXT_CHUNK_BYTES:
                    # Whole lines; only a line longer than a chunk is cut.
                    line = handle.readline(_TEXT_CHUNK_BYTES)
                    if not line:
                        break
                    lines.append(line)
                    size += len(line)
                final = size == 0
                data = b"".join(lines)
                try:
                    text = decoder.decode(data, final=final)
                except UnicodeDecodeError as error:
                    raise NotUTF8Error(
                        f"{path} is not UTF-8 text (byte {offset + error.start}: "
                        f"{error.reason}); a tokenizer reads UTF-8"
                    ) from error
                offset += size
                if text:
                    yield text
                if final:
                    return
    except OSError as error:
        raise CorpusError(f"cannot read {path}: {error}") from error


def token_dtype_for(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id below ``vocab_size``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_token_file(path: Path, *, vocab_size: int, token_dtype: str = "auto") -> np.ndarray:
    """The ids of a pre-tokenized ``.bin`` file, memory-mapped, checked below ``vocab_size``."""
    if token_dtype not in TOKEN_DTYPES:
        raise CorpusError(
            f"token_dtype must be one of {', '.join(TOKEN_DTYPES)}, got {token_dtype!r}"
        )
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(_LLMC_HEADER_BYTES)
    except OSError as error:
        raise CorpusError(f"cannot read {path}: {error}") from error
    if size == 0:
        raise CorpusError(f"{path} is empty: a token file needs at least one id")
    magic = int(np.frombuffer(head[:4], dtype="<i4")[0]) if len(head) >= 4 else None
    offset = 0
    guessed = False
    if magic in _LLMC_MAGIC and len(head) == _LLMC_HEADER_BYTES:
        header = np.frombuffer(head, dtype="<i4")
        version, dtype = _LLMC_MAGIC[magic]
        if int(header[1]) != version:
            raise CorpusError(
                f"{path} has llm.c's magic {magic} but version {int(header[1])}, not {version}"
            )
        if token_dtype != "auto" and np.dtype(token_dtype) != dtype:
            raise CorpusError(
                f"{path}'s llm.c header says its ids are {dtype.name}, "
                f"but token_dtype is {token_dtype}; set --token-dtype auto"
            )
        count = int(header[2])
        offset = _LLMC_HEADER_BYTES
        if count < 0 or offset + count * dtype.itemsize != size:
            raise CorpusError(
                f"{path}: its llm.c header announces {count} ids of {dtype.itemsize} bytes, "
                f"but the file holds {size - offset} bytes after the header (truncated?)"
            )
    else:
        guessed = token_dtype == "auto"
        dtype = token_dtype_for(vocab_size) if guessed else np.dtype(token_dtype)
        dtype = dtype.newbyteorder("<")
        if size % dtype.itemsize:
            raise CorpusError(
                f"{path} holds {size} bytes, not a whole number of {dtype.name} ids "
                f"({dtype.itemsize} bytes each); truncated, or another --token-dtype?"
            )
        count = size // dtype.itemsize
    if count == 0:
        raise CorpusError(f"{path} holds no token ids")
    ids = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))
    _check_ids(path, ids, vocab_size=vocab_size, guessed_uint16=guessed and dtype.itemsize == 2)
    return ids


def _check_ids(path: Path, ids: np.ndarray, *, vocab_size: int, guessed_uint16: bool) -> None:
    """Every id below ``vocab_size``; a guessed uint16 file must not look like uint32."""
    odd_nonzero = even_nonzero = False
    for start in range(0, len(ids), _TOKEN_CHUNK):
        chunk = np.asarray(ids[start : start + _TOKEN_CHUNK])
        too_big = np.flatnonzero(chunk >= vocab_size)
        if too_big.size:
            where = start + int(too_big[0])
            raise CorpusError(
                f"{path}: id {int(chunk[too_big[0]])} at position {where} is not below the "
                f"vocabulary size {vocab_size}; the file was made for another tokenizer, "
                f"or its ids are not {ids.dtype.name} (set --token-dtype)"
            )
        if guessed_uint16:
            # _TOKEN_CHUNK is even, so odd positions of a chunk are odd positions of the file.
            odd_nonzero = odd_nonzero or bool(chunk[1::2].any())
            even_nonzero = even_nonzero or bool(chunk[0::2].any())
    if guessed_uint16 and len(ids) >= _MIN_IDS_TO_JUDGE and even_nonzero and not odd_nonzero:
        raise CorpusError(
            f"{path}: read as uint16 (the vocabulary fits in 16 bits), every second id is 0, "
            "which is what uint32 ids look like; set --token-dtype uint32 (or uint16 if the "
            "file really is so)"
        )
