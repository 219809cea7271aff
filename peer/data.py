"""Corpora: files, folders or globs, packed once, memory-mapped, split by file path.

The built-in default is the source of the running Python's standard library: real text
that every machine with Python already has, so nothing is downloaded. The corpus is
packed once into two flat arrays of ids (train and held-out) in a cache folder and
memory-mapped from there, so a large corpus never becomes Python objects.

Without a tokenizer the ids are bytes (uint8, vocabulary 256). With one
(:mod:`peer.tokenizer`) text is tokenized while packing, and ids are uint16, or uint32
for vocabularies above 65,536. Files may be plain text, JSON lines, Parquet, or (with a
tokenizer) pre-tokenized ``.bin`` ids: :mod:`peer.formats` reads each kind. Documents
(a text file, a record) each end with a newline; nothing else separates them.

Packing is atomic: the arrays are written to temporary files and renamed into place, and
a small JSON file, written last and atomically too, marks the cache entry complete. A
corrupt file stops packing with a :class:`CorpusError` naming it, and leaves the cache as
it was.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from locod.peer.formats import (
    JSONL,
    PARQUET,
    TEXT,
    TOKEN_DTYPES,
    TOKENS,
    CorpusError,
    NotUTF8Error,
    file_format,
    is_binary_format,
    iter_jsonl,
    iter_parquet,
    iter_text_chunks,
    read_token_file,
    token_dtype_for,
)
from locod.peer.model import VOCAB_SIZE
from locod.peer.tokenizer import TextTokenizer

__all__ = [
    "HELDOUT_PERCENT",
    "BatchSampler",
    "Corpus",
    "CorpusError",
    "ReadSettings",
    "default_cache_dir",
    "default_sources",
    "heldout_batches",
    "is_heldout",
    "load_corpus",
    "resolve_files",
]

HELDOUT_PERCENT = 2
"""Share of files (by a hash of their path) kept out of training for evaluation."""

_BINARY_PROBE_BYTES = 8192
_DEFAULT_SUFFIXES = (".py",)
_FORMAT_VERSION = 2
"""Bumped when the packing of anything but plain byte text changes (part of the cache key)."""
_ENCODE_BATCH = 256
_CHUNKS_PER_CALL = 8
_COPY_CHUNK = 1 << 22


@dataclass(frozen=True, slots=True)
class Corpus:
    """A packed corpus: training ids, held-out ids, and where they came from."""

    train: np.ndarray
    """Training ids (memory-mapped): bytes as uint8, or a tokenizer's ids as uint16/uint32."""
    heldout: np.ndarray
    """Held-out ids for evaluation (memory-mapped, same dtype)."""
    train_files: int
    heldout_files: int
    description: str
    """Human-readable origin, e.g. the stdlib path."""
    vocab_size: int = VOCAB_SIZE
    """Every id is below this: 256 for bytes, else the tokenizer's vocabulary size."""

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the ids: uint8 for bytes, uint16 or uint32 for tokens."""
        return self.train.dtype


@dataclass(frozen=True, slots=True)
class ReadSettings:
    """How files become ids: bytes, or through a tokenizer; where text lives in records."""

    tokenizer: TextTokenizer | None = None
    """None reads bytes (vocabulary 256); else text is encoded by this tokenizer (its
    fingerprint is part of the cache key)."""
    text_field: str = "text"
    """The JSON field / Parquet column that holds a record's text."""
    token_dtype: str = "auto"
    """dtype of pre-tokenized ``.bin`` files: auto, uint16 or uint32 (see peer.formats)."""

    def __post_init__(self) -> None:
        if not self.text_field:
            raise CorpusError("text_field must name a field, got an empty string")
        if self.token_dtype not in TOKEN_DTYPES:
            raise CorpusError(
                f"token_dtype must be one of {', '.join(TOKEN_DTYPES)}, got {self.token_dtype!r}"
            )

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE if self.tokenizer is None else self.tokenizer.vocab_size

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.tokenizer is None else token_dtype_for(self.vocab_size)

    def cache_extra(self, formats: set[str]) -> str:
        """What besides the files' identity keys the packed result; "" for a plain byte
        corpus of text files, so caches packed before tokenizers existed stay valid."""
        if self.tokenizer is None and formats <= {TEXT}:
            return ""
        return json.dumps(
            {
                "format": _FORMAT_VERSION,
                "tokenizer": self.tokenizer.fingerprint if self.tokenizer else "bytes",
                "text_field": self.text_field,
                "token_dtype": self.token_dtype,
            },
            sort_keys=True,
        )


def default_sources() -> list[str]:
    """The standard library of the running Python, without site-packages."""
    return [sysconfig.get_paths()["stdlib"]]


def default_cache_dir() -> Path:
    """Where packed corpora are kept unless the caller says otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "locod" / "corpus"


def is_heldout(relative_path: str) -> bool:
    """Deterministic split by file path: the same files are held out on every machine."""
    digest = hashlib.sha256(relative_path.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELDOUT_PERCENT


def _looks_binary(path: Path) -> bool:
    with path.open("rb") as handle:
        return b"\x00" in handle.read(_BINARY_PROBE_BYTES)


def _walk_folder(folder: Path, suffixes: tuple[str, ...] | None) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        # site-packages and caches are never part of a text corpus.
        dirs[:] = sorted(
            d for d in dirs if d not in ("site-packages", "__pycache__") and not d.startswith(".")
        )
        for name in sorted(files):
            path = Path(root) / name
            if suffixes is None or path.suffix in suffixes:
                yield path


def resolve_files(
    sources: Sequence[str],
    *,
    suffixes: tuple[str, ...] | None = None,
    token_files: bool = False,
) -> list[tuple[Path, str]]:
    """Expand files, folders and globs into (path, key) pairs, key being the split key.

    A named file that is binary is an error; binary files met while walking a folder or
    a glob are skipped, since data folders often hold a stray archive or image. Parquet
    files, and ``.bin`` token files when ``token_files`` (a tokenizer reads the corpus),
    are binary by design and kept.
    """
    return _resolve(sources, suffixes=suffixes, token_files=token_files)[0]


def _resolve(
    sources: Sequence[str], *, suffixes: tuple[str, ...] | None, token_files: bool
) -> tuple[list[tuple[Path, str]], frozenset[Path]]:
    """:func:`resolve_files`, and which of the files were named directly (not walked)."""
    named: set[Path] = set()

    def looks_binary(path: Path) -> bool:
        if is_binary_format(file_format(path, token_files=token_files)):
            return False
        return _looks_binary(path)

    found: dict[Path, str] = {}
    for source in sources:
        matches: Iterable[str] = (
            sorted(glob.glob(source, recursive=True)) if glob.has_magic(source) else [source]
        )
        matched_any = False
        for match in matches:
            path = Path(match)
            if path.is_dir():
                for file in _walk_folder(path, suffixes):
                    if file.stat().st_size and not looks_binary(file):
                        found.setdefault(file.resolve(), str(file.relative_to(path)))
                        matched_any = True
            elif path.is_file():
                named_directly = not glob.has_magic(source)
                if looks_binary(path):
                    if named_directly:
                        raise CorpusError(
                            f"{path} looks like a binary file (it contains NUL bytes); "
                            "locod trains on text: pass text files or a folder of them"
                        )
                    continue
                if path.stat().st_size:
                    found.setdefault(path.resolve(), path.name if named_directly else match)
                    if named_directly:
                        named.add(path.resolve())
                    matched_any = True
            elif not glob.has_magic(source):
                raise CorpusError(f"data path {source} does not exist")
        if not matched_any:
            raise CorpusError(f"data source {source} holds no non-empty text files")
    if not found:
        raise CorpusError("the corpus is empty: no non-empty text files were found")
    return sorted(found.items(), key=lambda item: item[1]), frozenset(named)


def _fingerprint(files: Sequence[tuple[Path, str]], extra: str = "") -> str:
    digest = hashlib.sha256()
    for path, key in files:
        stat = path.stat()
        digest.update(f"{path}\0{key}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if extra:
        digest.update(extra.encode())
    return digest.hexdigest()[:20]


class _Writer:
    """Appends one file's documents to a split, as ids of the corpus's dtype."""

    def __init__(self, handle: BinaryIO, read: ReadSettings) -> None:
        self.handle = handle
        self.read = read
        self.ids = 0

    def raw(self, data: bytes) -> None:
        """A byte corpus's text file, exactly as today: its bytes, then a newline if missing."""
        self.handle.write(data)
        if not data.endswith(b"\n"):
            self.handle.write(b"\n")
        self.ids += len(data) + (not data.endswith(b"\n"))

    def texts(self, texts: Sequence[str]) -> None:
        """Whole documents: each ends with a newline (added if missing)."""
        self.encode([t if t.endswith("\n") else t + "\n" for t in texts])

    def encode(self, texts: Sequence[str]) -> None:
        """Text as it is: UTF-8 bytes, or the tokenizer's ids (a batch at a time)."""
        if self.read.tokenizer is None:
            for text in texts:
                data = text.encode("utf-8")
                self.handle.write(data)
                self.ids += len(data)
            return
        for start in range(0, len(texts), _ENCODE_BATCH):
            for ids in self.read.tokenizer.encode_batch(texts[start : start + _ENCODE_BATCH]):
                self.array(np.asarray(ids, dtype=self.read.dtype))

    def array(self, ids: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(ids, dtype=self.read.dtype).tobytes())
        self.ids += len(ids)


def _write_file(path: Path, writer: _Writer) -> None:
    """One file's ids into ``writer``; CorpusError naming the file if it is corrupt or empty."""
    read = writer.read
    fmt = file_format(path, token_files=read.tokenizer is not None)
    before = writer.ids
    if fmt == TEXT and read.tokenizer is None:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CorpusError(f"cannot read {path}: {error}") from error
        writer.raw(data)
    elif fmt == TEXT:
        # A text file is one document, tokenized a few chunks per call (the tokenizer
        # spreads a batch over its threads): only the last chunk gets the closing newline.
        pending: list[str] = []
        for chunk in iter_text_chunks(path):
            pending.append(chunk)
            if len(pending) > _CHUNKS_PER_CALL:
                writer.encode(pending[:-1])
                pending = pending[-1:]
        writer.encode(pending[:-1])
        writer.texts(pending[-1:])
    elif fmt == JSONL:
        batch: list[str] = []
        for text in iter_jsonl(path, read.text_field):
            batch.append(text)
            if len(batch) == _ENCODE_BATCH:
                writer.texts(batch)
                batch = []
        writer.texts(batch)
    elif fmt == PARQUET:
        for texts in iter_parquet(path, read.text_field):
            writer.texts(texts)
    elif fmt == TOKENS:
        ids = read_token_file(path, vocab_size=read.vocab_size, token_dtype=read.token_dtype)
        for start in range(0, len(ids), _COPY_CHUNK):
            writer.array(np.asarray(ids[start : start + _COPY_CHUNK]))
    if writer.ids == before:
        what = f"non-empty {read.text_field!r} values" if fmt in (JSONL, PARQUET) else "text"
        raise CorpusError(f"{path} holds no {what}: nothing to train on")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".meta-")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def _pack(
    files: Sequence[tuple[Path, str]],
    destination: Path,
    read: ReadSettings | None = None,
    named: frozenset[Path] = frozenset(),
) -> None:
    """Concatenate files into ``<fp>.train`` / ``<fp>.heldout`` atomically (write, then rename).

    The ``.json`` written last marks the entry complete; a CorpusError from a corrupt file
    leaves no trace but the temporary files, which are removed. A text file that is not
    UTF-8 (read through a tokenizer) is an error if it was ``named``, and skipped if it was
    met in a folder or glob (the standard library holds a few Latin-1 test files), as
    binary files are.
    """
    read = read or ReadSettings()
    destination.parent.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "heldout": 0, "skipped": 0}
    temps: dict[str, Path] = {}
    handles: dict[str, BinaryIO] = {}
    try:
        for split in ("train", "heldout"):
            fd, name = tempfile.mkstemp(dir=destination.parent, prefix=".pack-")
            temps[split] = Path(name)
            handles[split] = os.fdopen(fd, "wb")
        writers = {split: _Writer(handle, read) for split, handle in handles.items()}
        for path, key in files:
            split = "heldout" if is_heldout(key) else "train"
            writer = writers[split]
            position, ids = writer.handle.tell(), writer.ids
            try:
                _write_file(path, writer)
            except NotUTF8Error:
                if path in named:
                    raise
                writer.handle.seek(position)
                writer.handle.truncate()
                writer.ids = ids
                counts["skipped"] += 1
                continue
            counts[split] += 1
        if counts["train"] + counts["heldout"] == 0:
            raise CorpusError(
                f"none of the {len(files)} text files is UTF-8, which a tokenizer reads"
            )
        for handle in handles.values():
            handle.close()
        meta = {
            "train_files": counts["train"],
            "heldout_files": counts["heldout"],
            "skipped_files": counts["skipped"],
            "dtype": read.dtype.name,
            "vocab_size": read.vocab_size,
        }
        for split, temp in temps.items():
            os.replace(temp, destination.with_suffix(f".{split}"))
        _atomic_write_text(destination.with_suffix(".json"), json.dumps(meta))
    finally:
        for handle in handles.values():
            handle.close()
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def load_corpus(
    sources: Sequence[str] | None = None,
    *,
    cache_dir: Path | None = None,
    read: ReadSettings | None = None,
) -> Corpus:
    """Pack (once) and memory-map the corpus named by ``sources`` (default: the stdlib).

    ``read`` says how files become ids (default: bytes). CorpusError names what is wrong:
    a missing path, a corrupt or empty file, a cache that cannot be written.
    """
    read = read or ReadSettings()
    is_default = not sources
    names = default_sources() if is_default else list(sources or [])
    token_files = read.tokenizer is not None
    files, named = _resolve(
        names, suffixes=_DEFAULT_SUFFIXES if is_default else None, token_files=token_files
    )
    formats = {file_format(path, token_files=token_files) for path, _ in files}
    cache = (cache_dir or default_cache_dir()) / _fingerprint(files, read.cache_extra(formats))
    meta_path = cache.with_suffix(".json")
    if not meta_path.exists():
        try:
            _pack(files, cache, read, named)
        except OSError as error:
            raise CorpusError(
                f"cannot write the packed corpus to {cache.parent}: {error}"
            ) from error
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta.get("dtype", "uint8"))
    vocab_size = int(meta.get("vocab_size", VOCAB_SIZE))
    if meta["train_files"] == 0 or meta["heldout_files"] == 0:
        # Tiny corpora (a file or two) have no held-out file by hash: hold out the tail instead.
        # One split file is empty; slice the other one's map rather than concatenating, which
        # would copy a corpus of a few large files into memory.
        only = "train" if meta["train_files"] else "heldout"
        whole = _map(cache.with_suffix(f".{only}"), dtype)
        cut = max(1, len(whole) * (100 - HELDOUT_PERCENT) // 100)
        train, heldout = whole[:cut], whole[cut:]
    else:
        train = _map(cache.with_suffix(".train"), dtype)
        heldout = _map(cache.with_suffix(".heldout"), dtype)
    description = (
        f"Python {sysconfig.get_python_version()} standard library"
        if is_default
        else (", ".join(names))
    )
    unit = "bytes" if read.tokenizer is None else f"tokens of {read.tokenizer.description}"
    used = int(meta["train_files"]) + int(meta["heldout_files"])
    skipped = int(meta.get("skipped_files", 0))
    skipped_note = f", {skipped} not UTF-8 skipped" if skipped else ""
    return Corpus(
        train=train,
        heldout=heldout,
        train_files=int(meta["train_files"]),
        heldout_files=int(meta["heldout_files"]),
        description=(
            f"{description} ({used} files{skipped_note}, {len(train) + len(heldout):,} {unit})"
        ),
        vocab_size=vocab_size,
    )


def _map(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _unit(data: np.ndarray) -> str:
    return "bytes" if data.dtype == np.uint8 else "tokens"


class BatchSampler:
    """Random windows of ``seq_len + 1`` ids from one split; each peer seeds its own stream."""

    def __init__(self, data: np.ndarray, *, batch_size: int, seq_len: int, seed: int) -> None:
        if len(data) < seq_len + 1:
            raise CorpusError(
                f"the corpus split has {len(data)} {_unit(data)}, "
                f"fewer than one sequence of {seq_len + 1}"
            )
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.batches_drawn = 0

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def next(self, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 of shape (batch_size, seq_len).

        ``rows`` reads only those rows of the batch: the ranks of a multi-GPU site each
        take their slice of one site-wide batch, so a site of N ranks sees exactly the
        windows a one-rank site with an N× batch would.
        """
        # One generator per batch, keyed by (seed, batch index): resuming after a restart
        # is O(1) and gives exactly the stream an uninterrupted run would have seen.
        rng = np.random.default_rng([self.seed, self.batches_drawn])
        # The last start position is never drawn (kept so streams stay what they were),
        # except in a split of exactly one window, whose only start is 0.
        high = max(1, len(self.data) - self.seq_len - 1)
        starts = rng.integers(0, high, size=self.batch_size)
        if rows is not None:
            starts = starts[rows]
        windows = np.stack([np.asarray(self.data[s : s + self.seq_len + 1]) for s in starts])
        tensor = torch.from_numpy(windows.astype(np.int64))
        self.batches_drawn += 1
        return tensor[:, :-1], tensor[:, 1:]

    def state_dict(self) -> dict[str, int]:
        """Enough to resume the same stream after a restart."""
        return {"seed": self.seed, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.batches_drawn = int(state["batches_drawn"])


def heldout_batches(
    data: np.ndarray, *, batch_size: int, seq_len: int, num_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches, evenly spaced over the held-out split: same on every peer."""
    count = batch_size * num_batches
    if len(data) < seq_len + 1:
        raise CorpusError(
            f"the held-out split has {len(data)} {_unit(data)}, "
            f"fewer than one sequence of {seq_len + 1}"
        )
    span = max(1, len(data) - seq_len - 1)
    starts = np.linspace(0, span - 1, count).astype(np.int64)
    windows = np.stack([np.asarray(data[s : s + seq_len + 1]) for s in starts]).astype(np.int64)
    tensor = torch.from_numpy(windows).view(num_batches, batch_size, seq_len + 1)
    return [(batch[:, :-1], batch[:, 1:]) for batch in tensor]
