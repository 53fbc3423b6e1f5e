"""Calibration and evaluation text -> token windows.

Accepted files: plain text (``.txt``), JSON lines with a ``"text"`` field (``.jsonl``),
either optionally compressed (``.xz``, ``.gz``, ``.bz2``). Calibration takes ``n`` windows of
``seqlen`` tokens at seeded random, non-overlapping positions of the tokenized file (GPTQ
style); evaluation takes the first ``n * seqlen`` tokens as consecutive windows, so every
run scores the same text.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator, Optional

import numpy as np

from ..errors import CalibrationError, CheckpointError
from ..plan import check_path

if TYPE_CHECKING:
    import torch

_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
# Text is read lazily, never more than the tokens asked for can use: a 10 KB .xz may expand to gigabytes.
CHARS_PER_TOKEN = 128  # generous: BPE tokens average 3-5 characters; calibration samples windows from 25x more
MAX_TEXT_CHARS = 8 * 2**20  # hard cap whatever the request: tokenizing it peaks at 2.2 GB (docs/reliability-inputs.md)
CALIB_TOKENS = 32768  # GPTQ-style 64 x 512: enough for stable per-tensor Fisher sums, minutes on CPU
CALIB_SEQLEN = 512
EVAL_TOKENS = 32768  # the fixed evaluation protocol (docs/eval.md)
EVAL_SEQLEN = 512
TOKENIZE_CHUNK = 2**18  # characters per tokenizer call: bounds its memory (about 180 bytes per character at once)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


class _HashingReader(io.RawIOBase):
    """A binary file that feeds every byte read through sha256, so text is read and hashed in one pass."""

    def __init__(self, f: BinaryIO):
        self._f, self.hash = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._f.readinto(buf)
        self.hash.update(memoryview(buf)[:n])
        return n

    def finish(self) -> str:
        """Hash the bytes not read yet (text past the read limit) and return the whole file's sha256."""
        for block in iter(lambda: self._f.read(2**20), b""):
            self.hash.update(block)
        return self.hash.hexdigest()


@dataclass(frozen=True)
class Text:
    """A text file's content (up to the read limit) and the sha256 of the whole file as stored."""

    text: str
    sha256: str


def max_chars(tokens: Optional[int]) -> int:
    """How many characters of text ``tokens`` tokens can use (all the hard cap allows when unknown)."""
    return MAX_TEXT_CHARS if tokens is None else min(MAX_TEXT_CHARS, max(tokens, 1) * CHARS_PER_TOKEN)


def read_text_hashed(path: str | Path, max_tokens: Optional[int] = None) -> Text:
    """The text of a .txt / .jsonl file (optionally compressed) and the file's sha256; raises on missing or empty.

    Only the first :func:`max_chars` (``max_tokens``) characters are decompressed and kept, so memory is
    bounded by the request, not by the file (the rest of the stored file is hashed without decompressing).
    """
    p = Path(path)
    check_path(p, "text file", CalibrationError)
    if not p.is_file():
        raise CalibrationError(f"text file not found: {p}")
    suffixes = p.suffixes
    opener = _OPENERS.get(suffixes[-1] if suffixes else "")
    is_jsonl = ".jsonl" in suffixes
    limit = max_chars(max_tokens)
    try:
        with open(p, "rb") as f:
            raw_file = _HashingReader(f)
            binary = opener(raw_file, "rb") if opener else io.BufferedReader(raw_file)
            with io.TextIOWrapper(binary, encoding="utf-8") as stream:
                raw = stream.read(limit)
                truncated = bool(stream.read(1))
                sha256 = raw_file.finish()
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read {p}: {exc}") from None
    if is_jsonl:
        raw = _jsonl_text(p, raw, truncated)
    if not raw.strip():
        raise CalibrationError(f"{p} contains no text")
    return Text(raw, sha256)


def _jsonl_text(p: Path, raw: str, truncated: bool) -> str:
    """The ``text`` fields of JSON lines, joined; the last line is dropped when the read limit cut it."""
    lines = raw.splitlines()
    if truncated and lines:
        lines.pop()
    docs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise CalibrationError(f"{p}:{n} is not valid JSON; every line must be an object with a 'text' "
                                   "string") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            found = f"'text' is {type(doc['text']).__name__}" if isinstance(doc, dict) and "text" in doc else \
                f"a {type(doc).__name__} without 'text'"
            raise CalibrationError(f"{p}:{n}: {found}; every line must be an object with a 'text' string")
        text = doc["text"]
        docs.append(text)
    return "\n\n".join(docs)


def read_text(path: str | Path, max_tokens: Optional[int] = None) -> str:
    """The text of a .txt / .jsonl file (optionally compressed); raises on missing or empty."""
    return read_text_hashed(path, max_tokens).text


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' notes (long texts trip "sequence longer than max length") for one call only."""
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


def load_tokenizer(model_path: str | Path):
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(str(model_path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer of {model_path}: {exc}") from None


@dataclass(frozen=True)
class Tokens:
    """Token ids of a text file and the sha256 of the file they came from."""

    ids: np.ndarray
    sha256: str


def tokenize_hashed(model_path: str | Path, text_path: str | Path, max_tokens: Optional[int] = None) -> Tokens:
    """Tokenize (the part of ``text_path`` that ``max_tokens`` can use) with the model's tokenizer; the whole
    file is hashed while it is read."""
    tok = load_tokenizer(model_path)
    text = read_text_hashed(text_path, max_tokens)

    def encode(part: str) -> np.ndarray:
        return np.asarray(tok(part, add_special_tokens=False)["input_ids"], dtype=np.int64)

    with _quiet_transformers():
        pieces = list(text_chunks(text.text, TOKENIZE_CHUNK))
        if len(pieces) > 1 and not _cuts_cleanly(encode, pieces[0], pieces[1]):
            pieces = [text.text]  # a prefix-adding tokenizer: one call (its memory is bounded by MAX_TEXT_CHARS)
        ids = np.concatenate([encode(part) for part in pieces])
    return Tokens(ids, text.sha256)


def _cuts_cleanly(encode, before: str, after: str, margin: int = 256) -> bool:
    """Whether tokenizing across the cut between two pieces equals tokenizing them separately."""
    a, b = before[-margin:], after[:margin]
    return np.array_equal(encode(a + b), np.concatenate([encode(a), encode(b)]))


def text_chunks(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, each cut at a single newline between two
    non-space characters.

    Why there: the tokenizer's pre-tokenizer splits text at such a point anyway (the newline is one
    piece, the word after it another; after a run of newlines, GPT-2-style regexes hold the last one
    back for the next word, so a cut there would change the pieces), so tokenizing the pieces one by one gives the ids of the whole
    text (tests check it for the bundled and reference tokenizers) while the tokenizer's memory stays
    bounded by the piece (it used to take about 450 MiB for 2.5 MB of text in one call). A tokenizer
    that prepends a marker to every call's first word (SentencePiece's dummy prefix) would differ at
    the cuts: :func:`tokenize_hashed` checks the first cut and tokenizes such text in one call.
    Text with no such line is kept whole.
    """
    start = 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut - 2].isspace()
                                       and not text[cut].isspace()):
            cut += 1
        yield text[start:cut]
        start = cut
    yield text[start:]


def tokenize(model_path: str | Path, text_path: str | Path, max_tokens: Optional[int] = None) -> np.ndarray:
    return tokenize_hashed(model_path, text_path, max_tokens).ids


def calibration_windows(ids: np.ndarray, tokens: int, seqlen: int, seed: int) -> "torch.Tensor":
    """``tokens // seqlen`` random non-overlapping windows, [n, seqlen]."""
    import torch

    n_avail = len(ids) // seqlen
    if n_avail < 1:
        raise CalibrationError(f"calibration text has {len(ids)} tokens, fewer than one window of {seqlen}")
    n = max(1, tokens // seqlen)
    if n > n_avail:
        raise CalibrationError(
            f"calibration text has {len(ids)} tokens, {n_avail} windows of {seqlen}; asked for {n} "
            f"(lower --calib-tokens to at most {n_avail * seqlen})")
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(n_avail, size=n, replace=False)) * seqlen
    return torch.from_numpy(np.stack([ids[s:s + seqlen] for s in starts]))


def eval_windows(ids: np.ndarray, tokens: int, seqlen: int) -> "torch.Tensor":
    """The first ``tokens`` tokens as consecutive windows, [tokens // seqlen, seqlen]."""
    import torch

    n = tokens // seqlen
    if n < 1 or len(ids) < n * seqlen:
        raise CalibrationError(f"evaluation text has {len(ids)} tokens; the protocol needs {max(n, 1) * seqlen}")
    return torch.from_numpy(ids[: n * seqlen].reshape(n, seqlen).copy())
