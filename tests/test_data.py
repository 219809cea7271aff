"""peer.data: corpora from the stdlib, files and folders; the split; the cache; sampling."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from locod.peer import data
from locod.peer.data import (
    BatchSampler,
    Corpus,
    CorpusError,
    default_sources,
    heldout_batches,
    is_heldout,
    load_corpus,
)


@pytest.fixture(scope="module")
def stdlib_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stdlib-cache")


@pytest.fixture(scope="module")
def stdlib_corpus(stdlib_cache: Path) -> Corpus:
    """The default corpus, packed once for the module (a few seconds)."""
    return load_corpus(cache_dir=stdlib_cache)


def _write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _all_bytes(corpus: Corpus) -> bytes:
    return corpus.train.tobytes() + corpus.heldout.tobytes()


def _random_bytes(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)


# -- the default corpus: the running Python's standard library ----------------------------


def test_default_source_is_the_stdlib_of_the_running_python() -> None:
    (source,) = default_sources()
    # ``os`` is a pure-Python stdlib module: its folder is the stdlib, in a venv too.
    assert Path(source).resolve() == Path(os.__file__).resolve().parent
    assert "site-packages" not in Path(source).parts


def test_stdlib_corpus_is_memory_mapped_from_the_cache(
    stdlib_corpus: Corpus, stdlib_cache: Path
) -> None:
    for split in (stdlib_corpus.train, stdlib_corpus.heldout):
        assert isinstance(split, np.memmap)
        assert split.dtype == np.uint8
        assert not split.flags.writeable
        assert split.filename is not None and Path(split.filename).parent == stdlib_cache
    assert "standard library" in stdlib_corpus.description
    assert len(stdlib_corpus.train) > 1_000_000


def test_stdlib_corpus_holds_about_two_percent_of_files_out(stdlib_corpus: Corpus) -> None:
    files = stdlib_corpus.train_files + stdlib_corpus.heldout_files
    assert files > 500
    assert f"{files} files" in stdlib_corpus.description
    assert 0.005 < stdlib_corpus.heldout_files / files < 0.04
    assert 0 < len(stdlib_corpus.heldout) < len(stdlib_corpus.train) // 10


def test_stdlib_files_land_in_the_split_their_relative_path_picks(stdlib_corpus: Corpus) -> None:
    source = Path(os.__file__).read_bytes()
    train, heldout = stdlib_corpus.train.tobytes(), stdlib_corpus.heldout.tobytes()
    if is_heldout("os.py"):
        assert source in heldout and source not in train
    else:
        assert source in train and source not in heldout


def test_default_corpus_takes_only_py_files_outside_site_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdlib = tmp_path / "lib"
    _write(stdlib / "os.py", b"KEEP_TOP_LEVEL_MODULE\n")
    _write(stdlib / "json" / "__init__.py", b"KEEP_PACKAGE_MODULE\n")
    _write(stdlib / "LICENSE.txt", b"DROP_NOT_PYTHON\n")
    _write(stdlib / "site-packages" / "pip" / "__init__.py", b"DROP_SITE_PACKAGES\n")
    _write(stdlib / "__pycache__" / "stale.py", b"DROP_PYCACHE\n")
    _write(stdlib / ".hidden" / "secret.py", b"DROP_HIDDEN\n")
    _write(stdlib / "binary.py", b"DROP_BINARY\x00\n")
    _write(stdlib / "empty.py", b"")
    monkeypatch.setattr(data, "default_sources", lambda: [str(stdlib)])

    corpus = load_corpus(cache_dir=tmp_path / "cache")

    text = _all_bytes(corpus)
    assert b"KEEP_TOP_LEVEL_MODULE" in text and b"KEEP_PACKAGE_MODULE" in text
    for dropped in (
        b"DROP_NOT_PYTHON",
        b"DROP_SITE_PACKAGES",
        b"DROP_PYCACHE",
        b"DROP_HIDDEN",
        b"DROP_BINARY",
    ):
        assert dropped not in text
    assert corpus.train_files + corpus.heldout_files == 2


# -- the held-out split --------------------------------------------------------------------


def test_is_heldout_is_a_stable_function_of_the_path_near_two_percent() -> None:
    paths = [f"pkg{i // 50}/module_{i}.py" for i in range(20_000)]
    first = [is_heldout(p) for p in paths]
    assert first == [is_heldout(p) for p in paths]
    assert 0.015 < sum(first) / len(paths) < 0.025
    assert data.HELDOUT_PERCENT == 2


def _many_files(folder: Path, count: int) -> dict[str, bytes]:
    contents = {
        f"part{i % 3}/f{i:03}.txt": f"file {i} says hello\n".encode() * 3 for i in range(count)
    }
    for name, content in contents.items():
        _write(folder / name, content)
    return contents


def test_folder_split_is_by_relative_path_so_every_machine_agrees(tmp_path: Path) -> None:
    contents = _many_files(tmp_path / "site-a" / "corpus", 200)
    _many_files(tmp_path / "site-b" / "elsewhere", 200)
    held = sorted(name for name in contents if is_heldout(name))
    assert held, "the fixture's names must put some files in the held-out split"

    a = load_corpus([str(tmp_path / "site-a" / "corpus")], cache_dir=tmp_path / "cache")
    b = load_corpus([str(tmp_path / "site-b" / "elsewhere")], cache_dir=tmp_path / "cache")

    assert (a.train_files, a.heldout_files) == (200 - len(held), len(held))
    assert a.heldout.tobytes() == b"".join(contents[name] for name in held)
    kept = sorted(name for name in contents if not is_heldout(name))
    assert a.train.tobytes() == b"".join(contents[name] for name in kept)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.heldout, b.heldout)
    assert isinstance(a.train, np.memmap) and isinstance(a.heldout, np.memmap)


def test_one_small_file_still_gets_a_nonempty_heldout_tail(tmp_path: Path) -> None:
    text = b"".join(f"line {i}: the quick brown fox\n".encode() for i in range(100))
    path = _write(tmp_path / "notes.txt", text)

    corpus = load_corpus([str(path)], cache_dir=tmp_path / "cache")

    assert len(corpus.heldout) > 0 and len(corpus.train) > len(corpus.heldout)
    assert corpus.train.tobytes() + corpus.heldout.tobytes() == text
    # Still views of the packed file, not in-memory copies.
    assert isinstance(corpus.train, np.memmap) and isinstance(corpus.heldout, np.memmap)


def test_a_file_without_final_newline_gets_one(tmp_path: Path) -> None:
    _write(tmp_path / "d" / "a.txt", b"alpha")
    _write(tmp_path / "d" / "b.txt", b"beta\n")
    corpus = load_corpus([str(tmp_path / "d")], cache_dir=tmp_path / "cache")
    assert _all_bytes(corpus) == b"alpha\nbeta\n"


# -- bad sources ---------------------------------------------------------------------------


def test_a_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-corpus"
    with pytest.raises(CorpusError, match=f"{re.escape(str(missing))} does not exist"):
        load_corpus([str(missing)], cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("layout", ["empty folder", "only empty files", "only binary files"])
def test_a_folder_without_text_is_named(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    if layout == "only empty files":
        _write(folder / "a.txt", b"")
    elif layout == "only binary files":
        _write(folder / "a.bin", b"\x00\x01\x02")
    with pytest.raises(
        CorpusError, match=f"{re.escape(str(folder))} holds no non-empty text files"
    ):
        load_corpus([str(folder)], cache_dir=tmp_path / "cache")


def test_a_glob_matching_nothing_is_named(tmp_path: Path) -> None:
    pattern = str(tmp_path / "*.txt")
    with pytest.raises(CorpusError, match="holds no non-empty text files") as caught:
        load_corpus([pattern], cache_dir=tmp_path / "cache")
    assert pattern in str(caught.value)


def test_a_named_binary_file_is_refused_by_name(tmp_path: Path) -> None:
    path = _write(tmp_path / "weights.bin", b"PK\x03\x04\x00\x00binary")
    with pytest.raises(CorpusError, match=f"{re.escape(str(path))} looks like a binary file"):
        load_corpus([str(path)], cache_dir=tmp_path / "cache")


def test_binary_files_inside_a_folder_are_skipped(tmp_path: Path) -> None:
    _write(tmp_path / "d" / "readme.txt", b"plain text\n" * 10)
    _write(tmp_path / "d" / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    corpus = load_corpus([str(tmp_path / "d")], cache_dir=tmp_path / "cache")
    assert _all_bytes(corpus) == b"plain text\n" * 10
    assert corpus.train_files + corpus.heldout_files == 1


def test_an_unwritable_cache_is_a_corpus_error(tmp_path: Path) -> None:
    source = _write(tmp_path / "a.txt", b"some text\n" * 10)
    blocker = _write(tmp_path / "not-a-folder", b"")
    with pytest.raises(CorpusError, match="cannot write the packed corpus"):
        load_corpus([str(source)], cache_dir=blocker / "cache")


# -- the cache ------------------------------------------------------------------------------


def test_same_files_reuse_the_cache_and_a_changed_file_rebuilds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "d"
    _write(folder / "a.txt", b"first version of a\n" * 20)
    _write(folder / "b.txt", b"b never changes\n" * 20)
    cache = tmp_path / "cache"
    packed: list[Path] = []
    real_pack = data._pack

    def counting_pack(
        files: Sequence[tuple[Path, str]], destination: Path, *rest: Any, **kwargs: Any
    ) -> None:
        packed.append(destination)
        real_pack(files, destination, *rest, **kwargs)

    monkeypatch.setattr(data, "_pack", counting_pack)

    first = load_corpus([str(folder)], cache_dir=cache)
    assert len(packed) == 1
    packed_files = sorted(cache.iterdir())
    stats = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in packed_files]

    again = load_corpus([str(folder)], cache_dir=cache)
    assert len(packed) == 1, "the same files must not be packed again"
    assert sorted(cache.iterdir()) == packed_files
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in packed_files] == stats
    assert _all_bytes(again) == _all_bytes(first)

    # A different length changes the fingerprint whatever the file system's clock does.
    (folder / "a.txt").write_bytes(b"second, longer version of a\n" * 20)
    changed = load_corpus([str(folder)], cache_dir=cache)
    assert len(packed) == 2 and packed[1] != packed[0]
    assert b"second, longer version of a" in _all_bytes(changed)
    assert b"first version of a" not in _all_bytes(changed)


# -- batches ---------------------------------------------------------------------------------


def _draw(sampler: BatchSampler, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [sampler.next() for _ in range(count)]


def _assert_same(
    a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    assert len(a) == len(b)
    for (x1, y1), (x2, y2) in zip(a, b, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_batches_are_windows_of_the_data_with_targets_shifted_by_one() -> None:
    source = _random_bytes(5_000)
    sampler = BatchSampler(source, batch_size=4, seq_len=32, seed=1)
    windows = sliding_window_view(source, 33)
    for inputs, targets in _draw(sampler, 3):
        assert inputs.shape == targets.shape == (4, 32)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for row in range(4):
            window = torch.cat([inputs[row], targets[row, -1:]]).numpy()
            assert (windows == window).all(axis=1).any()
    assert sampler.tokens_per_batch == 128
    assert sampler.batches_drawn == 3


def test_same_seed_same_stream_other_seed_other_stream() -> None:
    source = _random_bytes(50_000)
    a = _draw(BatchSampler(source, batch_size=2, seq_len=16, seed=7), 5)
    b = _draw(BatchSampler(source, batch_size=2, seq_len=16, seed=7), 5)
    c = _draw(BatchSampler(source, batch_size=2, seq_len=16, seed=8), 5)
    _assert_same(a, b)
    assert not any(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c, strict=True))


def test_state_dict_resumes_exactly_the_same_stream() -> None:
    source = _random_bytes(50_000)
    original = BatchSampler(source, batch_size=3, seq_len=16, seed=11)
    _draw(original, 4)
    state = original.state_dict()
    expected = _draw(original, 5)

    restarted = BatchSampler(source, batch_size=3, seq_len=16, seed=99)
    restarted.load_state_dict(state)
    _assert_same(_draw(restarted, 5), expected)
    assert restarted.state_dict() == original.state_dict() == {"seed": 11, "batches_drawn": 9}


def test_heldout_batches_are_fixed_and_evenly_spaced() -> None:
    source = _random_bytes(10_000)
    first = heldout_batches(source, batch_size=2, seq_len=16, num_batches=3)
    _assert_same(first, heldout_batches(source, batch_size=2, seq_len=16, num_batches=3))
    assert len(first) == 3
    for inputs, targets in first:
        assert inputs.shape == targets.shape == (2, 16)
        assert inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
    # The first window starts at the first byte, the last one ends within a byte of the end.
    windows = sliding_window_view(source, 17)
    starts = [
        int(np.flatnonzero((windows == torch.cat([x[row], y[row, -1:]]).numpy()).all(axis=1))[0])
        for x, y in first
        for row in range(2)
    ]
    assert starts[0] == 0 and starts[-1] >= len(source) - 17 - 1
    assert starts == sorted(starts) and len(set(starts)) == 6


@pytest.mark.parametrize("size", [0, 10, 16])
def test_a_split_shorter_than_one_sequence_is_refused(size: int) -> None:
    short = _random_bytes(size)
    with pytest.raises(CorpusError, match=f"has {size} bytes, fewer than one sequence of 17"):
        BatchSampler(short, batch_size=2, seq_len=16, seed=0)
    with pytest.raises(CorpusError, match=f"has {size} bytes, fewer than one sequence of 17"):
        heldout_batches(short, batch_size=2, seq_len=16, num_batches=1)


def test_a_split_of_exactly_one_sequence_is_enough() -> None:
    """seq_len + 1 bytes hold one window: the sampler and the held-out batches both use it."""
    exact = _random_bytes(17)
    expected = torch.from_numpy(exact.astype(np.int64))
    inputs, targets = BatchSampler(exact, batch_size=2, seq_len=16, seed=0).next()
    assert all(torch.equal(row, expected[:-1]) for row in inputs)
    assert all(torch.equal(row, expected[1:]) for row in targets)
    [(held_in, held_target)] = heldout_batches(exact, batch_size=2, seq_len=16, num_batches=1)
    assert torch.equal(held_in[0], expected[:-1]) and torch.equal(held_target[1], expected[1:])
