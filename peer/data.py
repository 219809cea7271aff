"""Byte-level corpora: files, folders or globs, memory-mapped, split by file path.

The built-in default is the source of the running Python's standard library: real text
that every machine with Python already has, so nothing is downloaded. The corpus is
packed once into two flat byte files (train and held-out) in a cache folder and
memory-mapped from there, so a large corpus never becomes Python objects.
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

import numpy as np
import torch

HELDOUT_PERCENT = 2
"""Share of files (by a hash of their path) kept out of training for evaluation."""

_BINARY_PROBE_BYTES = 8192
_DEFAULT_SUFFIXES = (".py",)


class CorpusError(ValueError):
    """The corpus cannot be used: a path is missing, a file is binary, or nothing is left."""


@dataclass(frozen=True, slots=True)
class Corpus:
    """A packed corpus: training bytes, held-out bytes, and where they came from."""

    train: np.ndarray
    """Training bytes (uint8, memory-mapped)."""
    heldout: np.ndarray
    """Held-out bytes for evaluation (uint8, memory-mapped)."""
    train_files: int
    heldout_files: int
    description: str
    """Human-readable origin, e.g. the stdlib path."""


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
    sources: Sequence[str], *, suffixes: tuple[str, ...] | None = None
) -> list[tuple[Path, str]]:
    """Expand files, folders and globs into (path, key) pairs, key being the split key.

    A named file that is binary is an error; binary files met while walking a folder or
    a glob are skipped, since data folders often hold a stray archive or image.
    """
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
                    if file.stat().st_size and not _looks_binary(file):
                        found.setdefault(file.resolve(), str(file.relative_to(path)))
                        matched_any = True
            elif path.is_file():
                named_directly = not glob.has_magic(source)
                if _looks_binary(path):
                    if named_directly:
                        raise CorpusError(
                            f"{path} looks like a binary file (it contains NUL bytes); "
                            "locod trains on text: pass text files or a folder of them"
                        )
                    continue
                if path.stat().st_size:
                    found.setdefault(path.resolve(), path.name if named_directly else match)
                    matched_any = True
            elif not glob.has_magic(source):
                raise CorpusError(f"data path {source} does not exist")
        if not matched_any:
            raise CorpusError(f"data source {source} holds no non-empty text files")
    if not found:
        raise CorpusError("the corpus is empty: no non-empty text files were found")
    return sorted(found.items(), key=lambda item: item[1])


def _fingerprint(files: Sequence[tuple[Path, str]]) -> str:
    digest = hashlib.sha256()
    for path, key in files:
        stat = path.stat()
        digest.update(f"{path}\0{key}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _pack(files: Sequence[tuple[Path, str]], destination: Path) -> None:
    """Concatenate files into ``<fp>.train`` / ``<fp>.heldout`` atomically (write, then rename)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "heldout": 0}
    temps: dict[str, Path] = {}
    handles = {}
    try:
        for split in counts:
            fd, name = tempfile.mkstemp(dir=destination.parent, prefix=".pack-")
            temps[split] = Path(name)
            handles[split] = os.fdopen(fd, "wb")
        for path, key in files:
            split = "heldout" if is_heldout(key) else "train"
            with path.open("rb") as source:
                data = source.read()
            handles[split].write(data)
            if not data.endswith(b"\n"):
                handles[split].write(b"\n")
            counts[split] += 1
        for handle in handles.values():
            handle.close()
        meta = {"train_files": counts["train"], "heldout_files": counts["heldout"]}
        for split, temp in temps.items():
            os.replace(temp, destination.with_suffix(f".{split}"))
        destination.with_suffix(".json").write_text(json.dumps(meta))
    finally:
        for handle in handles.values():
            handle.close()
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def load_corpus(sources: Sequence[str] | None = None, *, cache_dir: Path | None = None) -> Corpus:
    """Pack (once) and memory-map the corpus named by ``sources`` (default: the stdlib)."""
    is_default = not sources
    names = default_sources() if is_default else list(sources or [])
    files = resolve_files(names, suffixes=_DEFAULT_SUFFIXES if is_default else None)
    cache = (cache_dir or default_cache_dir()) / _fingerprint(files)
    meta_path = cache.with_suffix(".json")
    if not meta_path.exists():
        try:
            _pack(files, cache)
        except OSError as error:
            raise CorpusError(
                f"cannot write the packed corpus to {cache.parent}: {error}"
            ) from error
    meta = json.loads(meta_path.read_text())
    if meta["train_files"] == 0 or meta["heldout_files"] == 0:
        # Tiny corpora (a file or two) have no held-out file by hash: hold out the tail instead.
        # One split file is empty; slice the other one's map rather than concatenating, which
        # would copy a corpus of a few large files into memory.
        only = "train" if meta["train_files"] else "heldout"
        whole = _map(cache.with_suffix(f".{only}"))
        cut = max(1, len(whole) * (100 - HELDOUT_PERCENT) // 100)
        train, heldout = whole[:cut], whole[cut:]
    else:
        train, heldout = _map(cache.with_suffix(".train")), _map(cache.with_suffix(".heldout"))
    description = (
        f"Python {sysconfig.get_python_version()} standard library"
        if is_default
        else (", ".join(names))
    )
    return Corpus(
        train=train,
        heldout=heldout,
        train_files=int(meta["train_files"]),
        heldout_files=int(meta["heldout_files"]),
        description=f"{description} ({len(files)} files, {len(train) + len(heldout):,} bytes)",
    )


def _map(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


class BatchSampler:
    """Random windows of ``seq_len + 1`` bytes from one split; each peer seeds its own stream."""

    def __init__(self, data: np.ndarray, *, batch_size: int, seq_len: int, seed: int) -> None:
        if len(data) < seq_len + 1:
            raise CorpusError(
                f"the corpus split has {len(data)} bytes, fewer than one sequence of {seq_len + 1}"
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
            f"the held-out split has {len(data)} bytes, fewer than one sequence of {seq_len + 1}"
        )
    span = max(1, len(data) - seq_len - 1)
    starts = np.linspace(0, span - 1, count).astype(np.int64)
    windows = np.stack([np.asarray(data[s : s + seq_len + 1]) for s in starts]).astype(np.int64)
    tensor = torch.from_numpy(windows).view(num_batches, batch_size, seq_len + 1)
    return [(batch[:, :-1], batch[:, 1:]) for batch in tensor]
