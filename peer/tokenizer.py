"""Tokenizers: bytes (the default, vocabulary 256) or a local ``tokenizer.json``.

``--tokenizer PATH`` names a ``tokenizer.json`` (the format of the ``tokenizers`` library
and of transformers' fast tokenizers), or a folder holding one, such as a transformers
model folder. It is read from disk only: nothing is downloaded. ``tokenizers`` is imported
only when such a file is loaded.

Text is encoded without the tokenizer's special tokens (no BOS/EOS added by its
post-processor), for training data and prompts alike, so that a prompt looks like the
text the model was trained on; documents are separated by a newline, as in byte corpora.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from locod.peer.model import VOCAB_SIZE

TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded: the message names the file and what is wrong."""


class TextTokenizer(Protocol):
    """Text to ids and back."""

    @property
    def vocab_size(self) -> int:
        """Every id this tokenizer produces is below this."""
        ...

    @property
    def description(self) -> str:
        """Human-readable origin, for logs and corpus descriptions."""
        ...

    @property
    def fingerprint(self) -> str:
        """Identifies the tokenizer's behaviour (it keys packed corpora and run configs)."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: what the byte-level models read."""

    vocab_size = VOCAB_SIZE
    description = "bytes"
    fingerprint = "bytes"

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; a sequence cut inside a character shows U+FFFD there."""
        return bytes(i for i in ids if 0 <= i < VOCAB_SIZE).decode("utf-8", errors="replace")


class FileTokenizer:
    """A ``tokenizers.Tokenizer`` loaded from a local ``tokenizer.json``."""

    def __init__(self, path: Path, tokenizer: Any) -> None:
        self.path = path
        self._tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def description(self) -> str:
        return f"{self.path} ({self.vocab_size:,} ids)"

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [list(e.ids) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=False))

    def to_json(self) -> str:
        """The tokenizer as ``tokenizers`` serialises it (what export writes)."""
        return str(self._tokenizer.to_str())

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short hash of the tokenizer as ``tokenizers`` re-serialises it, keys sorted: two
        files that differ only in layout or key order agree; any change to the vocabulary,
        merges, normaliser or pre-tokeniser changes it."""
        canonical = json.dumps(json.loads(self.to_json()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def tokenizer_file(path: str | Path) -> Path:
    """The ``tokenizer.json`` that ``path`` names (the file, or a folder holding it)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer folder {path.parent} has no {TOKENIZER_FILE}; give the path of "
                "a tokenizer.json (the tokenizers library's format)"
            )
    elif not path.exists():
        raise TokenizerError(f"tokenizer file {path} does not exist")
    return path


def load_tokenizer(path: str | Path) -> FileTokenizer:
    """The tokenizer in ``path`` (a ``tokenizer.json`` or a folder holding one)."""
    file = tokenizer_file(path)
    try:
        from tokenizers import Tokenizer
    except ImportError as error:
        raise TokenizerError(
            f"--tokenizer needs the tokenizers library ({error}); "
            "install the optional extra: pip install 'locod[hf]'"
        ) from error
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception for every parse error
        raise TokenizerError(
            f"{file} is not a tokenizer.json the tokenizers library can read: {error}"
        ) from error
    loaded = FileTokenizer(file, tokenizer)
    if loaded.vocab_size < 1:
        raise TokenizerError(f"{file} has an empty vocabulary")
    return loaded


def tokenizer_fingerprint(path: str | Path) -> str:
    """A short hash of the tokenizer in ``path``, for the run config (see
    :attr:`FileTokenizer.fingerprint`)."""
    return load_tokenizer(path).fingerprint
