"""Tokenizers: text <-> token ids, several kinds behind one small interface.

    tok = Tokenizer.load(DIR)          # or load_tokenizer(DIR): any kind below, recognised from the files in DIR
    ids = tok.encode(text)             # list[int]; encode(text, bos=True, eos=True) adds bos_id / eos_id
    text = tok.decode(ids)             # bos/eos (and, for hf, every special token) decode to nothing
    tok.vocab_size, tok.eos_id, tok.bos_id, tok.unk_id (None when the kind has none), tok.kind,
    tok.fingerprint (sha256 of the model file(s)), tok.model_path (the main model file; DIR is its parent)
    copy_tokenizer(tok, DEST) / tok.save(DEST)   # DEST becomes one of our directories, same fingerprint

Kinds:
    bpe            ours, the default: a byte-fallback BPE trained here by sentencepiece (train --kind=bpe)
    char           ours: one id per character of the training text, escapes for any other character (train --kind=char)
    sentencepiece  any pretrained sentencepiece model, e.g. LLaMA's tokenizer.model, with its own special ids
    hf             a Hugging Face `tokenizers` model: tokenizer.json, or GPT-2's vocab.json + merges.txt

Our directories hold the model file(s) and DIR/tokenizer.json, which records the kind, the special ids and the
fingerprint (a directory without it is read as a Hugging Face model directory; see Tokenizer.load).

bpe ids (fixed for every tokenizer we train): unk = 0, bos = 1, eos = 2, ids 3..258 = the 256 bytes
<0x00>..<0xFF>, ids 259.. = learned pieces. With byte fallback a character the vocabulary lacks is spelled as its
UTF-8 bytes, so every string encodes without <unk>. Text is not normalized (no NFKC, spaces and newlines kept as
written), so decode(encode(s)) == s for any s without the sentencepiece space mark U+2581.

char ids: eos = bos = 0, escape = 1, ids 2.. = the kept characters in code-point order. A character outside the
vocabulary is [1, d_1, ..., d_k]: the escape id, then the k base-V digits of its code point (most significant
first; any id 0..V-1 is a digit there), where k is the least with V**k > 0x10FFFF. So every Python string (even a
lone surrogate) encodes exactly and decode(encode(s)) == s. vocab_size V may be anything from 3 (eos, escape, one
character) to 2 + the number of distinct characters in the training text (the default): with fewer, the rarest
characters are escaped. tinyshakespeare has 65 distinct characters, so --vocab_size=67 keeps them all and
--vocab_size=65 escapes the two rarest ('$' once, '&' three times).

There is no pad id (pad = -1) in any kind: batches are windows of one token stream, never padded.

    python -m npllm.tokenizer train --input PATH... [--kind bpe|char] [--vocab_size N] --out DIR [--field text]
    python -m npllm.tokenizer show DIR
    python -m npllm.tokenizer copy DIR --out DIR
"""

from __future__ import annotations

import abc
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .checks import is_int
from .cli import run_command
from .config import TokenizerCopyConfig, TokenizerShowConfig, TokenizerTrainConfig, options_help, parse_subcommand
from .files import atomic_write, fsync_path
from .sources import READ_CHARS, DocumentReader, resolve_inputs, split_text

KINDS = ("bpe", "char", "sentencepiece", "hf")
TRAINED_KINDS = ("bpe", "char")
INFO_FILE = "tokenizer.json"  # our record of a directory's tokenizer (in an HF model directory: HF's model file)
PAD_ID = -1

# --- bpe -------------------------------------------------------------------------------------------------------
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_BYTE_PIECES = 256
MIN_VOCAB_SIZE = 3 + NUM_BYTE_PIECES + 1  # specials + bytes + at least one learned piece
MODEL_FILE = "tokenizer.model"
SP_BLOCK = 1 << 12  # a long text is encoded in groups of lines of about 4K characters (see _groups)

# Every sentencepiece option we set, and why. Training is deterministic: the same text and vocab_size give a
# byte-identical model file on any machine (num_threads is fixed, not taken from the CPU count, because it is
# recorded inside the model file).
TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,  # unknown characters become byte pieces, never <unk>
    character_coverage=0.9995,  # the rarest 0.05% of characters are left to byte fallback
    hard_vocab_limit=True,  # exactly vocab_size pieces, or an error
    normalization_rule_name="identity",  # keep text as written (no NFKC)
    remove_extra_whitespaces=False,  # keep runs of spaces (code indentation)
    add_dummy_prefix=False,  # do not invent a space before each text
    allow_whitespace_only_pieces=True,  # let "    " become one piece
    split_digits=True,  # numbers are spelled digit by digit
    unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
    input_sentence_size=1_000_000,  # train on at most 1M lines, sampled...
    shuffle_input_sentence=True,  # ...uniformly (seeded below) when the input has more
    max_sentence_length=1 << 16,  # lines longer than 64 KiB are skipped by the trainer
    num_threads=4,
    minloglevel=2,  # keep sentencepiece's training log quiet
)
RANDOM_SEED = 0

# --- char ------------------------------------------------------------------------------------------------------
CHAR_EOS_ID, CHAR_ESCAPE_ID = 0, 1
CHAR_FIRST_ID = 2
CHARS_FILE = "chars.json"
MAX_CODE_POINT = 0x10FFFF
REPLACEMENT = "\ufffd"  # what a malformed escape decodes to
CHAR_BLOCK = 1 << 13  # text is encoded 8K characters at a time

# --- hf --------------------------------------------------------------------------------------------------------
HF_JSON_COPY = "hf_tokenizer.json"  # HF's tokenizer.json inside one of our directories (tokenizer.json is ours)
GPT2_FILES = ("vocab.json", "merges.txt")
GPT2_EOS = "<|endoftext|>"
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")  # looked up when no tokenizer_config.json says
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")


def fingerprint_of(blobs: list[bytes]) -> str:
    """sha256 of a model file's bytes; for a model of several files (GPT-2's vocab.json and merges.txt, in that
    order), sha256 of the lines "<sha256 of each file>\\n". Independent of the files' names."""
    digests = [hashlib.sha256(b).hexdigest() for b in blobs]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(d + "\n" for d in digests).encode()).hexdigest()


def utf8_length(code_points: np.ndarray) -> np.ndarray:
    """Bytes of each code point in UTF-8 (a surrogate, written with surrogatepass, takes 3)."""
    cp = np.asarray(code_points, np.int64)
    return 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)


class Tokenizer(abc.ABC):
    """What every kind has. A kind sets the attributes below in __init__ and defines _encode, decode, token_bytes
    (and next_cut where it can cut a text)."""

    kind: str
    vocab_size: int  # V: every id is in [0, V)
    bos_id: int
    eos_id: int  # ends every document in a token stream
    unk_id: int | None
    fingerprint: str
    model_path: Path  # the main model file; its parent is the tokenizer's directory
    files: dict  # {file name: bytes}: the model files as loaded (copied verbatim by copy_tokenizer)

    # ---- the interface ----------------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with bos_id before and/or eos_id after if asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

    def encode_array(self, text: str, dtype) -> np.ndarray:
        """encode(text) as a 1-D array of ``dtype`` (the data preparation's path; a kind may do it faster)."""
        return np.array(self._encode(text), dtype=dtype)

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Text of a sequence of token ids (bos/eos decode to nothing)."""

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Token ids of text (without bos/eos)."""

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range; ids must be in [0, {self.vocab_size})")
        return ids

    def next_cut(self, text: str, pos: int) -> int:
        """The first position p >= pos (p < len(text)) where encode(text[:p]) + encode(text[p:]) == encode(text),
        whatever text[p+1:] holds, or -1. Data preparation cuts long documents there to bound memory. This default
        knows no such place, so documents are encoded whole."""
        return -1

    @property
    def directory(self) -> Path:
        return self.model_path.parent

    @abc.abstractmethod
    def token_bytes(self) -> np.ndarray:
        """(V,) int64: the UTF-8 bytes each id stands for in decoded text; eos counts 1 (the end of a document),
        bos, unk and other special ids 0."""

    def byte_counter(self) -> "ByteCounter":
        """Counts the bytes of text a token stream stands for, fed a chunk at a time (see token_bytes)."""
        return ByteCounter(self.token_bytes())

    def info(self) -> dict:
        """What our DIR/tokenizer.json holds."""
        return dict(kind=self.kind, vocab_size=self.vocab_size, unk_id=self.unk_id, bos_id=self.bos_id,
                    eos_id=self.eos_id, pad_id=PAD_ID, fingerprint=self.fingerprint, files=list(self.files),
                    model_file=next(iter(self.files)))

    def save(self, directory) -> Path:
        """Copy this tokenizer into ``directory`` (see copy_tokenizer)."""
        return copy_tokenizer(self, directory)

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        return load_tokenizer(directory)

    def __reduce__(self):  # for multiprocessing workers: rebuilt from the model bytes, not from the disk
        return (_rebuild, (self.kind, self.files, self.model_path, self._special_ids()))

    def _special_ids(self) -> dict:
        return dict(bos_id=self.bos_id, eos_id=self.eos_id, unk_id=self.unk_id)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind}, vocab_size={self.vocab_size}, "
                f"fingerprint={self.fingerprint[:12]}, path={self.model_path})")


def newline_cut(text: str, pos: int) -> int:
    """The first p >= pos (p < len(text)) just after a newline, or -1."""
    i = text.find("\n", max(pos - 1, 0))
    return i + 1 if 0 <= i < len(text) - 1 else -1


def any_cut(text: str, pos: int) -> int:
    return pos if pos < len(text) else -1


class ByteCounter:
    """Sum of token_bytes over the ids added so far."""

    def __init__(self, table: np.ndarray):
        self.table, self.total = table, 0

    def add(self, ids) -> None:
        self.total += int(self.table[np.asarray(ids, dtype=np.int64)].sum())


# ----------------------------------------------------------------------------------------------------------------
# sentencepiece: our bpe and any pretrained model


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model: ours (kind "bpe", trained here) or any other (kind "sentencepiece")."""

    def __init__(self, model_bytes: bytes, model_path, kind: str = "sentencepiece"):
        model_path = Path(model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        except RuntimeError as e:  # sentencepiece's parse error, several lines of C++ context
            raise ValueError(f"{model_path} is not a sentencepiece model (corrupt or truncated): "
                             f"{str(e).splitlines()[0][:120]}") from None
        self.kind, self.model_path = kind, model_path
        self.files = {MODEL_FILE: model_bytes}
        self.fingerprint = fingerprint_of([model_bytes])
        self.vocab_size = self._sp.vocab_size()  # V
        self.unk_id = self._sp.unk_id() if self._sp.unk_id() >= 0 else None
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"{model_path} has no end-of-sequence id (eos_id = -1); npllm ends each document with "
                             f"one, so it cannot use this model")
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eos_id  # none: eos serves as bos

    def _groups(self, text: str) -> list[str]:
        # sentencepiece's BPE slows down on long inputs (about 6x at 1 MB than at 4 KB of text), so ours encodes a
        # long text in groups of lines, which next_cut says encode as the whole does
        if self.kind != "bpe" or len(text) <= SP_BLOCK:
            return [text]
        return [piece for piece, _ in split_text(text, newline_cut, SP_BLOCK)]

    def _encode(self, text: str) -> list[int]:
        groups = self._groups(text)
        if len(groups) == 1:
            return self._sp.encode(text)
        return [i for ids in self._sp.encode(groups, num_threads=1) for i in ids]

    def encode_array(self, text: str, dtype) -> np.ndarray:
        groups = self._groups(text)
        if len(groups) == 1:  # (a list of one costs 3x more: the batch call's own overhead)
            return np.array(self._sp.encode(text), dtype)
        lists = self._sp.encode(groups, num_threads=1)  # one thread: data.py's pool is the parallelism
        return np.fromiter(itertools.chain.from_iterable(lists), dtype, count=sum(map(len, lists)))

    def decode(self, ids) -> str:
        return self._sp.decode(self._check_ids(ids))

    def next_cut(self, text: str, pos: int) -> int:
        # Ours only (kind "bpe"): sentencepiece trains on lines, so no piece holds a newline, and we set
        # add_dummy_prefix=False, so a text after a newline encodes as it would on its own. A pretrained model may
        # add a dummy "▁" to every text it is given (LLaMA's does): its documents are encoded whole.
        return newline_cut(text, pos) if self.kind == "bpe" else -1

    def token_bytes(self) -> np.ndarray:
        sp, table = self._sp, np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if sp.is_byte(i):
                table[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
                table[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        table[self.eos_id] = 1
        return table

    def info(self) -> dict:
        info = super().info()
        if self.kind == "bpe":
            info["byte_fallback"] = True
        return info

    def _special_ids(self) -> dict:
        return {}  # read from the model itself


TRAINING_LINE_CHARS = 8192  # sentencepiece skips lines over max_sentence_length bytes: longer lines are cut


def _training_lines(reader: DocumentReader):
    """Every non-blank line of the documents (sentencepiece trains on lines); a line longer than
    TRAINING_LINE_CHARS characters (at most 4 bytes each, below max_sentence_length) is cut into pieces, at the last
    space before the limit where there is one, so no text is skipped."""
    for piece, _ in reader.pieces():
        for line in piece.splitlines():
            while len(line) > TRAINING_LINE_CHARS:
                cut = line.rfind(" ", TRAINING_LINE_CHARS // 2, TRAINING_LINE_CHARS) + 1 or TRAINING_LINE_CHARS
                if line[:cut].strip():
                    yield line[:cut]
                line = line[cut:]
            if line.strip():
                yield line


def _clear_training_error(err: RuntimeError, vocab_size: int) -> Exception:
    """Turn sentencepiece's internal messages about vocab size and empty input into one clear line."""
    msg = str(err)
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", msg):
        return ValueError(f"vocab_size={vocab_size} is too large for this text: at most {m[1]} pieces can be "
                          f"learned from it; use --vocab_size <= {m[1]} or more text")
    if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg):
        return ValueError(f"vocab_size={vocab_size} is too small for this text: its special ids, 256 byte pieces "
                          f"and common characters need {m[1]}; use --vocab_size >= {m[1]}")
    if "sentences_.empty()" in msg:
        return ValueError("the input files contain no text (every line is blank)")
    return err


def _train_bpe(reader: DocumentReader, vocab_size) -> bytes:
    if not is_int(vocab_size) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (3 special ids + 256 bytes + "
                         f"learned pieces), got {vocab_size!r}")
    spm.set_random_generator_seed(RANDOM_SEED)  # seeds the line sampling above
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=_training_lines(reader), model_writer=model,
                                       vocab_size=vocab_size, **TRAINER_OPTIONS)
    except RuntimeError as e:
        raise _clear_training_error(e, vocab_size) from None
    return model.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# char


class CharTokenizer(Tokenizer):
    """One id per kept character; escapes for the others (module docstring)."""

    kind = "char"

    def __init__(self, chars_bytes: bytes, model_path):
        model_path = Path(model_path)
        chars = _parse_chars(chars_bytes, model_path)
        self.model_path, self.files = model_path, {CHARS_FILE: chars_bytes}
        self.fingerprint = fingerprint_of([chars_bytes])
        self.vocab_size = CHAR_FIRST_ID + len(chars)  # V
        self.eos_id = self.bos_id = CHAR_EOS_ID
        self.unk_id = None
        self.escape_id = CHAR_ESCAPE_ID
        self.digits = 1  # k: the least with V**k > MAX_CODE_POINT
        while self.vocab_size ** self.digits <= MAX_CODE_POINT:
            self.digits += 1
        self._code_points = np.array(sorted(ord(c) for c in chars), np.int64)  # (V - 2,) id - 2 -> code point
        if [chr(c) for c in self._code_points] != chars:
            raise ValueError(f"{model_path} is not a character vocabulary: its characters must be in code-point order")

    def encode_array(self, text: str, dtype) -> np.ndarray:
        if len(text) > CHAR_BLOCK:  # bounds the temporaries below (tens of bytes per character)
            return np.concatenate([self.encode_array(text[i:i + CHAR_BLOCK], dtype)
                                   for i in range(0, len(text), CHAR_BLOCK)])
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), "<u4")  # (n,) code points
        at = np.minimum(np.searchsorted(self._code_points, cps), len(self._code_points) - 1)  # (n,)
        unseen = self._code_points[at] != cps  # (n,) characters outside the vocabulary
        ids = at + CHAR_FIRST_ID  # (n,)
        if not unseen.any():
            return ids.astype(dtype)
        k = self.digits
        length = np.where(unseen, 1 + k, 1)  # tokens per character
        start = np.cumsum(length) - length  # (n,) where each character's tokens begin
        out = np.empty(int(length.sum()), dtype)
        out[start[~unseen]] = ids[~unseen]
        esc_start, value = start[unseen], cps[unseen].astype(np.int64)
        out[esc_start] = self.escape_id
        for j in range(k - 1, -1, -1):  # the least significant digit last
            out[esc_start + 1 + j] = value % self.vocab_size
            value //= self.vocab_size
        return out

    def _encode(self, text: str) -> list[int]:
        return self.encode_array(text, np.int64).tolist()

    def decode(self, ids) -> str:
        ids = np.asarray(self._check_ids(ids), np.int64)
        if not (ids == self.escape_id).any():
            cps = self._code_points[ids[ids >= CHAR_FIRST_ID] - CHAR_FIRST_ID]
            return cps.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")
        out, i, k = [], 0, self.digits
        while i < len(ids):
            t = int(ids[i])
            if t == self.escape_id:
                digits = ids[i + 1:i + 1 + k]
                value = 0
                for d in digits:
                    value = value * self.vocab_size + int(d)
                out.append(chr(value) if len(digits) == k and value <= MAX_CODE_POINT else REPLACEMENT)
                i += 1 + k
            else:
                if t >= CHAR_FIRST_ID:
                    out.append(chr(self._code_points[t - CHAR_FIRST_ID]))
                i += 1
        return "".join(out)

    def next_cut(self, text: str, pos: int) -> int:
        return any_cut(text, pos)  # each character encodes on its own

    def token_bytes(self) -> np.ndarray:
        table = np.zeros(self.vocab_size, np.int64)
        table[CHAR_FIRST_ID:] = utf8_length(self._code_points)
        table[self.eos_id] = 1
        return table

    def byte_counter(self) -> "CharByteCounter":
        return CharByteCounter(self)

    def info(self) -> dict:
        return dict(super().info(), escape_id=self.escape_id, escape_digits=self.digits)

    def _special_ids(self) -> dict:
        return {}


class CharByteCounter(ByteCounter):
    """token_bytes, except that an escape and its k digits count the bytes of the escaped character (digits are
    ordinary ids, so they are recognised by position). A stream that starts inside an escape counts the digits it
    starts with as the characters they would be: at most a few bytes at a split, which the other side's count
    makes up for."""

    def __init__(self, tok: CharTokenizer):
        super().__init__(tok.token_bytes())
        self.tok, self.pending, self.value = tok, 0, 0  # digits still to come of an escape begun earlier

    def add(self, ids) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        V, k = self.tok.vocab_size, self.tok.digits
        i = 0
        while self.pending and i < len(ids):  # finish an escape that the previous chunk began
            self.value, self.pending, i = self.value * V + int(ids[i]), self.pending - 1, i + 1
            if not self.pending:
                self.total += self._char_bytes(self.value)
        ids = ids[i:]
        self.total += int(self.table[ids].sum())
        free = 0  # ids before this belong to an escape already counted
        for p in np.flatnonzero(ids == self.tok.escape_id):
            if p < free:
                continue
            digits = ids[p + 1:p + 1 + k]
            self.total -= int(self.table[digits].sum())  # counted above as characters
            value = 0
            for d in digits:
                value = value * V + int(d)
            if len(digits) < k:
                self.pending, self.value = k - len(digits), value
                break
            self.total += self._char_bytes(value)
            free = p + 1 + k

    @staticmethod
    def _char_bytes(value: int) -> int:
        return int(utf8_length(value)) if value <= MAX_CODE_POINT else 3  # U+FFFD


def _parse_chars(raw: bytes, path: Path) -> list[str]:
    try:
        obj = json.loads(raw)
        chars = obj["chars"]
        ok = isinstance(chars, list) and len(chars) >= 1 and all(isinstance(c, str) and len(c) == 1 for c in chars)
    except (ValueError, TypeError, KeyError):
        ok = False
    if not ok or len(set(chars)) != len(chars):
        raise ValueError(f"{path} is not a character vocabulary (expected a JSON object with \"chars\": a list of "
                         f"distinct one-character strings)")
    return chars


def _train_char(reader: DocumentReader, vocab_size) -> bytes:
    counts = np.zeros(MAX_CODE_POINT + 1, np.int64)  # (0x110000,) occurrences of each code point
    for piece, _ in reader.pieces():
        cps = np.frombuffer(piece.encode("utf-32-le", "surrogatepass"), "<u4")
        counts += np.bincount(cps, minlength=MAX_CODE_POINT + 1)
    seen = np.flatnonzero(counts)  # code points in increasing order
    if len(seen) == 0:
        raise ValueError("the input files contain no text")
    most = CHAR_FIRST_ID + len(seen)
    if vocab_size is None:
        vocab_size = most
    if not is_int(vocab_size) or not CHAR_FIRST_ID + 1 <= vocab_size <= most:
        raise ValueError(f"vocab_size={vocab_size!r} is not allowed for --kind=char on this text: use an integer "
                         f"from {CHAR_FIRST_ID + 1} to {most} (eos, escape and at most its {len(seen)} distinct "
                         f"characters; below {most} the rarest characters are escaped)")
    by_frequency = seen[np.lexsort((seen, -counts[seen]))]  # most frequent first, ties by code point
    kept = np.sort(by_frequency[:vocab_size - CHAR_FIRST_ID])
    return (json.dumps(dict(format="npllm-char-vocab", version=1, chars=[chr(c) for c in kept]), indent=1)
            + "\n").encode()


# ----------------------------------------------------------------------------------------------------------------
# hf: Hugging Face tokenizers


class HFTokenizer(Tokenizer):
    """A `tokenizers` model. Encoding treats every character of the text as text: a special token's spelling in the
    text (say "<|endoftext|>") is encoded as ordinary characters, so decode(encode(s)) == s; decoding skips the
    special ids (eos among them)."""

    kind = "hf"

    def __init__(self, files: dict, model_path, special_ids: dict | None = None, specials_config: dict | None = None):
        import tokenizers

        model_path = Path(model_path)
        self.files, self.model_path = dict(files), model_path
        try:
            if set(files) == set(GPT2_FILES):
                self._tok = _gpt2_from_files(files[GPT2_FILES[0]], files[GPT2_FILES[1]])
                self.fingerprint = fingerprint_of([files[n] for n in GPT2_FILES])
            else:
                (raw,) = files.values()
                self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
                self.fingerprint = fingerprint_of([raw])
        except Exception as e:  # tokenizers raises its own exception types, with one-line messages
            raise ValueError(f"{model_path} is not a tokenizers model (corrupt, or of a format it does not read): "
                             f"{str(e).splitlines()[0][:160] if str(e) else type(e).__name__}") from None
        self._tok.encode_special_tokens = True  # "<|endoftext|>" written in the text is text
        self._config = json.loads(self._tok.to_str())
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)  # V
        if special_ids is None:
            special_ids = self._find_special_ids(specials_config or {})
        self.bos_id, self.eos_id, self.unk_id = special_ids["bos_id"], special_ids["eos_id"], special_ids["unk_id"]
        for name, value in special_ids.items():
            if value is not None and not (is_int(value) and 0 <= value < self.vocab_size):
                raise ValueError(f"{model_path}: {name}={value!r} is outside the vocabulary [0, {self.vocab_size})")

    def _find_special_ids(self, config: dict) -> dict:
        def token_id(names):
            for name in names:
                if isinstance(name, dict):  # {"content": "</s>", ...} in tokenizer_config.json
                    name = name.get("content")
                if isinstance(name, str) and self._tok.token_to_id(name) is not None:
                    return self._tok.token_to_id(name)
            return None

        eos = token_id([config.get("eos_token"), *EOS_NAMES])
        if eos is None:
            raise ValueError(f"{self.model_path}: found no end-of-text token (tokenizer_config.json's eos_token, or "
                             f"one of {', '.join(EOS_NAMES)}); npllm ends each document with one")
        bos = token_id([config.get("bos_token"), *BOS_NAMES])
        unk_name = self._config.get("model", {}).get("unk_token")  # the model's own: GPT-2's BPE has none
        return dict(bos_id=eos if bos is None else bos, eos_id=eos, unk_id=token_id([unk_name]))

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=True)

    def _is_plain_byte_level(self) -> bool:
        pre = self._config.get("pre_tokenizer") or {}
        added = self._tok.get_added_tokens_decoder().values()  # special ones are encoded as text (see __init__)
        return (self._config.get("normalizer") is None and pre.get("type") == "ByteLevel"
                and not pre.get("add_prefix_space") and pre.get("use_regex", True) and all(t.special for t in added))

    def next_cut(self, text: str, pos: int) -> int:
        # GPT-2's byte-level pre-tokenizer (its regex, no normalizer, no prefix space): between a non-space
        # character, "\n" and a non-space character, "\n" is a pre-token of its own in the whole text and at the end
        # of a piece alike, and BPE never merges across pre-tokens. Other pipelines: documents are encoded whole.
        if not self._is_plain_byte_level():
            return -1
        i = text.find("\n", max(pos - 1, 1))
        while 0 < i < len(text) - 1:
            if not text[i - 1].isspace() and not text[i + 1].isspace():
                return i + 1
            i = text.find("\n", i + 1)
        return -1

    def token_bytes(self) -> np.ndarray:
        table = np.zeros(self.vocab_size, np.int64)
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        added = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        byte_level = (self._config.get("decoder") or {}).get("type") == "ByteLevel"
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            if token in special:
                continue
            if byte_level and token not in added:
                table[i] = len(token)  # one character per byte (GPT-2's byte-to-unicode map)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                table[i] = 1
            else:
                table[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        table[self.eos_id] = 1
        return table


def _gpt2_from_files(vocab_raw: bytes, merges_raw: bytes):
    """GPT-2's tokenizer from its vocab.json and merges.txt: byte-level BPE, no prefix space, <|endoftext|> special."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers

    vocab = json.loads(vocab_raw)
    if not isinstance(vocab, dict):
        raise ValueError("vocab.json must be a JSON object {token: id}")
    merges = []
    for n, line in enumerate(merges_raw.decode("utf-8").splitlines(), 1):
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"merges.txt line {n} is {line[:40]!r}; expected two tokens separated by one space")
        merges.append((pair[0], pair[1]))
    tok = HFTok(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if GPT2_EOS in vocab:
        tok.add_special_tokens([GPT2_EOS])
    return tok


# ----------------------------------------------------------------------------------------------------------------
# loading, copying, training


def _rebuild(kind, files, model_path, special_ids):
    return _make(kind, files, Path(model_path), special_ids or None)


def _make(kind: str, files: dict, model_path: Path, special_ids: dict | None = None,
          specials_config: dict | None = None) -> Tokenizer:
    if kind in ("bpe", "sentencepiece"):
        (raw,) = files.values()
        return SentencePieceTokenizer(raw, model_path, kind)
    if kind == "char":
        return CharTokenizer(files[CHARS_FILE], model_path)
    return HFTokenizer(files, model_path, special_ids, specials_config)


def _read_json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt ({type(err).__name__}: {str(err)[:120]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is corrupt (a JSON {type(obj).__name__}, not an object)")
    return obj


def _is_ours(info: dict) -> bool:
    return "fingerprint" in info and "model" not in info  # HF's tokenizer.json always has "model"


def load_tokenizer(directory) -> Tokenizer:
    """The tokenizer in ``directory``, of any kind:

    1. DIR/tokenizer.json is ours (it has "fingerprint", not HF's "model"): the kind and files it records (a
       file without "kind", from before there were kinds, is bpe with tokenizer.model); the files' fingerprint
       must be the recorded one.
    2. DIR/tokenizer.model: a sentencepiece model (LLaMA's), special ids from the model.
    3. DIR/tokenizer.json (HF's): a tokenizers model; eos/bos from DIR/tokenizer_config.json when it names them,
       else the first of <|endoftext|>, </s>, <|end_of_text|>, <eos> (bos: <s>, <|begin_of_text|>, <bos>, else
       eos); unk is the model's own unk token (GPT-2 has none).
    4. DIR/vocab.json + DIR/merges.txt: GPT-2's byte-level BPE; <|endoftext|> (50256 in GPT-2) is eos and bos.
    """
    directory = Path(directory)
    info_path = directory / INFO_FILE
    hf_json = None
    if info_path.is_file():
        info = _read_json_object(info_path)
        if _is_ours(info):
            return _load_ours(directory, info, info_path)
        hf_json = info_path
    if (directory / MODEL_FILE).is_file():
        path = directory / MODEL_FILE
        return SentencePieceTokenizer(path.read_bytes(), path, "sentencepiece")
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins where both say
        if (directory / name).is_file():
            config.update(_read_json_object(directory / name))
    if hf_json is not None:
        return HFTokenizer({HF_JSON_COPY: hf_json.read_bytes()}, hf_json, specials_config=config)
    if all((directory / n).is_file() for n in GPT2_FILES):
        return HFTokenizer({n: (directory / n).read_bytes() for n in GPT2_FILES}, directory / GPT2_FILES[0],
                           specials_config=config)
    raise FileNotFoundError(f"no tokenizer in {directory}: it has no {MODEL_FILE}, {INFO_FILE} or "
                            f"vocab.json + merges.txt (train one with `python -m npllm.tokenizer train`)")


def _load_ours(directory: Path, info: dict, info_path: Path) -> Tokenizer:
    kind = info.get("kind", "bpe")
    if kind not in KINDS:
        raise ValueError(f"{info_path} is corrupt: kind {kind!r} is not one of {', '.join(KINDS)}")
    names = info.get("files", [info.get("model_file", MODEL_FILE)])
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{info_path} is corrupt: \"files\" must be a list of file names, got {names!r}")
    files = {}
    for name in names:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no tokenizer in {directory}: {directory / name} is missing "
                                    f"({info_path} names it)")
        files[name] = (directory / name).read_bytes()
    special = {k: info.get(k) for k in ("bos_id", "eos_id", "unk_id")} if kind == "hf" else None
    tokenizer = _make(kind, files, directory / names[0], special)
    if info["fingerprint"] != tokenizer.fingerprint:
        raise ValueError(f"{info_path} records fingerprint {info['fingerprint']} but {tokenizer.model_path} has "
                         f"{tokenizer.fingerprint}; the two files do not belong together")
    return tokenizer


def _write_directory(tokenizer: Tokenizer, directory: Path) -> None:
    """The model files and our tokenizer.json into ``directory``, each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, raw in tokenizer.files.items():
        atomic_write(directory / name, raw)
    atomic_write(directory / INFO_FILE, json.dumps(tokenizer.info(), indent=2) + "\n")


def copy_tokenizer(tokenizer: Tokenizer, dest_dir) -> Path:
    """Make ``dest_dir`` one of our tokenizer directories holding exactly ``tokenizer`` (its model files as loaded,
    byte for byte, so the fingerprint is kept, and our tokenizer.json). Atomic: the directory is built beside
    dest_dir and renamed into place, so a reader finds no tokenizer or the whole one. If dest_dir already holds
    this tokenizer (same kind and fingerprint) it is left as it is; if it holds anything else, ValueError.
    Returns dest_dir as a Path."""
    dest = Path(dest_dir)
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        try:
            existing = load_tokenizer(dest)
        except (ValueError, FileNotFoundError):
            existing = None
        if existing is None or (existing.kind, existing.fingerprint) != (tokenizer.kind, tokenizer.fingerprint):
            raise ValueError(f"{dest} already holds something else than this tokenizer ({tokenizer.kind}, "
                             f"fingerprint {tokenizer.fingerprint[:12]}); remove it or choose another directory")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        _write_directory(tokenizer, build)
        try:
            os.rename(build, dest)  # replaces an empty dest directory; fails onto a non-empty one
        except OSError:
            if load_tokenizer(dest).fingerprint != tokenizer.fingerprint:  # another process's copy, of another one
                raise
        fsync_path(dest.parent)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone already when the rename succeeded
    return dest


def train_tokenizer(inputs, vocab_size: int | None, out_dir, kind: str = "bpe", field: str = "text") -> Tokenizer:
    """Train a tokenizer of ``kind`` (bpe or char) on the inputs (files, folders, globs, .jsonl with ``field``,
    .gz: npllm.sources) and write it to ``out_dir``.

    bpe: exactly ``vocab_size`` ids (>= 260). char: vocab_size None keeps every character of the text (module
    docstring for the allowed sizes).
    """
    if kind not in TRAINED_KINDS:
        raise ValueError(f"kind={kind!r} is not allowed; train one of: {', '.join(TRAINED_KINDS)}")
    if kind == "bpe" and vocab_size is None:
        raise ValueError(f"--kind=bpe needs --vocab_size (an integer >= {MIN_VOCAB_SIZE})")
    files = resolve_inputs(inputs)
    out_dir = Path(out_dir)
    if kind == "bpe":
        reader = DocumentReader(files, field, cut=newline_cut, chunk_chars=READ_CHARS)
        tokenizer = SentencePieceTokenizer(_train_bpe(reader, vocab_size), out_dir / MODEL_FILE, "bpe")
    else:
        reader = DocumentReader(files, field, cut=any_cut, chunk_chars=READ_CHARS)
        tokenizer = CharTokenizer(_train_char(reader, vocab_size), out_dir / CHARS_FILE)
    _write_directory(tokenizer, out_dir)
    return tokenizer


COMMANDS = {"train": TokenizerTrainConfig, "show": TokenizerShowConfig, "copy": TokenizerCopyConfig}


def run(command: str, options) -> None:
    if command == "train":
        tokenizer = train_tokenizer(list(options.input), options.vocab_size, options.out, options.kind, options.field)
        print(f"trained tokenizer: kind={tokenizer.kind} vocab_size={tokenizer.vocab_size} "
              f"fingerprint={tokenizer.fingerprint[:12]} -> {tokenizer.directory}")
    elif command == "show":
        print(json.dumps(load_tokenizer(options.dir).info(), indent=2))
    else:
        tokenizer = load_tokenizer(options.dir)
        print(f"copied {tokenizer.kind} tokenizer (fingerprint {tokenizer.fingerprint[:12]}) -> "
              f"{copy_tokenizer(tokenizer, options.out)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or "--help" in argv:
        print(__doc__.split("\n")[0] + "\n\n    python -m npllm.tokenizer train --input PATH... --out DIR [--kind=char]"
              "\n    python -m npllm.tokenizer show DIR\n    python -m npllm.tokenizer copy DIR --out DEST")
        for name, cls in COMMANDS.items():
            print(f"\nOptions of {name}:\n" + options_help(cls))
        return 0
    return run_command("npllm.tokenizer", lambda a: run(*parse_subcommand(a, COMMANDS)), argv)


if __name__ == "__main__":
    sys.exit(main())
