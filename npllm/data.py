"""Token shards on disk, and the batches drawn from them.

    text files -> Tokenizer.encode -> one token stream -> DIR/train.bin, DIR/val.bin, DIR/meta.json
    load_tokens(DIR/train.bin) -> read-only memmap -> BatchSampler.next() -> (x, y) int64 (B, T)

The token stream is every document's tokens followed by eos_id (so documents are separated by EOS, and the stream
ends with one). The last floor(N * val_fraction) tokens of the stream are the validation split, the rest train.

Shard file (little-endian), see docs/data.md:
    bytes 0..8    magic b"NPLLMTOK"
    bytes 8..12   format version, uint32 (= 1)
    bytes 12..16  bytes per token, uint32: 2 (uint16 tokens, vocab_size <= 65536) or 4 (uint32 tokens)
    bytes 16..24  token count N, uint64
    bytes 24..28  vocab size V, uint32
    bytes 28..64  zero
    bytes 64..    the N tokens

    python -m npllm.data prepare --input FILE... --tokenizer DIR --out DIR [--val_fraction 0.1]
"""

from __future__ import annotations

import argparse
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from .checks import check_int
from .files import atomic_write, check_input_files
from .run import DataMeta, read_data_meta, write_data_meta
from .tokenizer import Tokenizer

MAGIC = b"NPLLMTOK"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQI")  # magic, version, bytes per token, token count, vocab size
TOKEN_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}  # bytes per token -> dtype
ENCODE_CHUNK_CHARS = 1 << 20  # documents are encoded about 1 MiB of text at a time, to bound memory
CHECK_CHUNK = 1 << 24  # token ids are range-checked 16M at a time


@dataclass(frozen=True)
class ShardHeader:
    version: int
    dtype: np.dtype  # token dtype, uint16 or uint32
    count: int  # N tokens
    vocab_size: int  # V of the tokenizer that made the tokens


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds ids 0..vocab_size-1: uint16 up to 65536 ids, else uint32."""
    return TOKEN_DTYPES[2] if vocab_size <= 1 << 16 else TOKEN_DTYPES[4]


def write_tokens(path: str | Path, tokens, vocab_size: int) -> None:
    """Write a 1-D sequence of token ids in [0, vocab_size) as a shard file, atomically."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0 or tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be a non-empty 1-D integer array, got shape {tokens.shape} {tokens.dtype}")
    if not 0 < vocab_size < 1 << 32:
        raise ValueError(f"vocab_size must be in [1, 2**32), got {vocab_size}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got min {tokens.min()} max {tokens.max()}")
    dtype = token_dtype(vocab_size)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, tokens.size, vocab_size).ljust(HEADER_BYTES, b"\0")
    atomic_write(path, [header, np.ascontiguousarray(tokens, dtype=dtype)])


def read_header(path: str | Path) -> ShardHeader:
    """Read and check a shard's header; ValueError says what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token shard not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"{path} is not a token shard: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, version, itemsize, count, vocab_size = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ValueError(f"{path} is not a token shard: it starts with {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has shard format version {version}; this npllm reads version {FORMAT_VERSION}")
    if itemsize not in TOKEN_DTYPES:
        raise ValueError(f"{path} has token size {itemsize} bytes; allowed: {sorted(TOKEN_DTYPES)}")
    if count == 0:
        raise ValueError(f"{path} is an empty token shard (0 tokens)")
    if size != HEADER_BYTES + count * itemsize:
        raise ValueError(f"{path} is truncated or corrupt: its header says {count} tokens "
                         f"({HEADER_BYTES + count * itemsize} bytes) but the file has {size} bytes")
    return ShardHeader(version, TOKEN_DTYPES[itemsize], count, vocab_size)


def load_tokens(path: str | Path, vocab_size: int | None = None) -> np.memmap:
    """The tokens of a shard as a read-only memmap of shape (N,); nothing is read until it is indexed.

    vocab_size: when given, every id is checked to be below it (one vectorised pass over the file, a chunk at a
    time): an id the model has no embedding row for would train on garbage without a word.
    """
    header = read_header(path)
    tokens = np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.count,))
    if vocab_size is not None:
        for start in range(0, len(tokens), CHECK_CHUNK):
            largest = int(tokens[start:start + CHECK_CHUNK].max())
            if largest >= vocab_size:
                position = start + int(np.argmax(tokens[start:start + CHECK_CHUNK] >= vocab_size))
                raise ValueError(f"{path}: token id {int(tokens[position])} at position {position} is out of range "
                                 f"for vocab_size={vocab_size} (ids must be in [0, {vocab_size}))")
    return tokens


def _line_chunks(text: str, chunk_chars: int) -> Iterator[str]:
    """Cut text into pieces of about chunk_chars, each ending just after a newline (or at the end of text).

    No token spans a newline (no learned piece contains one), so encoding the pieces one by one gives
    exactly the tokens of encoding the whole text.
    """
    start = 0
    while start < len(text):
        end = text.find("\n", start + chunk_chars - 1) + 1 or len(text)
        yield text[start:end]
        start = end


def encode_documents(documents: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
    """One token stream: each document's tokens followed by eos_id. Returns (N,) of token_dtype(V)."""
    dtype = token_dtype(tokenizer.vocab_size)
    pieces = []
    for doc in documents:
        for chunk in _line_chunks(doc, ENCODE_CHUNK_CHARS):
            pieces.append(np.array(tokenizer.encode(chunk), dtype=dtype))
        pieces.append(np.array([tokenizer.eos_id], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype)


def write_dataset(documents: Iterable[str], tokenizer: Tokenizer, out_dir: str | Path,
                  val_fraction: float = 0.1, sources: list[str] | None = None) -> DataMeta:
    """Encode documents, split the stream (last floor(N * val_fraction) tokens are val), and write
    out_dir/train.bin, out_dir/val.bin and out_dir/meta.json. Returns the DataMeta."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tokens = encode_documents(documents, tokenizer)  # (N,)
    n_val = int(len(tokens) * val_fraction)
    if n_val == 0 or n_val == len(tokens):
        raise ValueError(f"the text has only {len(tokens)} tokens: too few to split with val_fraction={val_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokens(out_dir / "train.bin", tokens[:-n_val], tokenizer.vocab_size)
    write_tokens(out_dir / "val.bin", tokens[-n_val:], tokenizer.vocab_size)
    tokenizer_dir = tokenizer.model_path.parent.resolve()
    if tokenizer_dir.is_relative_to(out_dir.resolve()):  # a tokenizer inside the data dir moves with it
        tokenizer_dir = tokenizer_dir.relative_to(out_dir.resolve())
    meta = DataMeta(tokenizer_dir=str(tokenizer_dir), tokenizer_fingerprint=tokenizer.fingerprint,
                    vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
                    dtype=str(token_dtype(tokenizer.vocab_size)), val_fraction=val_fraction,
                    train_tokens=len(tokens) - n_val, val_tokens=n_val, sources=sources or [])
    write_data_meta(out_dir, meta)
    return meta


def prepare_data(inputs: list[str | Path], tokenizer_dir: str | Path, out_dir: str | Path,
                 val_fraction: float = 0.1) -> DataMeta:
    """Tokenize UTF-8 text files (each file is one document) into shards in out_dir. Returns the DataMeta."""
    paths = check_input_files(inputs)
    tokenizer = Tokenizer.load(tokenizer_dir)

    def documents():
        for p in paths:
            try:
                yield p.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"input file {p} is not UTF-8 text: {e}") from None

    return write_dataset(documents(), tokenizer, out_dir, val_fraction, sources=[str(p) for p in paths])


class TrainingData(NamedTuple):
    """What the trainer trains and validates on: token windows of a data directory, or SFT records."""

    dir: str  # the data directory (or the SFT file), absolute
    train: object  # token stream (N,) memmap, or npllm.sft.SFTExamples
    val: object
    tokenizer: Tokenizer
    unit: str  # "tokens" or "records", for the log line
    sft: dict | None = None  # SFT runs: the file's path, sha256 and record counts (a resume checks the sha256)


def load_token_data(data_dir, vocab_size: int, seq_len: int) -> TrainingData:
    """Train/val token shards of a data directory and the tokenizer that made them, checked against a model of
    ``vocab_size`` rows: the tokenizer's fingerprint must be the one recorded in DATA/meta.json, it may not have
    more tokens than the model, and every token id must be below the model's vocab_size.

    The model's vocab_size may exceed the tokenizer's: the extra embedding rows and logits are padding that no
    token uses (how Megatron pads a vocabulary so that tp splits it evenly).
    """
    data_dir = Path(data_dir)
    meta = read_data_meta(data_dir)
    tokenizer_dir = meta.tokenizer_path(data_dir)
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.fingerprint != meta.tokenizer_fingerprint:
        raise ValueError(f"{data_dir / 'meta.json'}: the shards were made with tokenizer fingerprint "
                         f"{meta.tokenizer_fingerprint[:12]}, but {tokenizer_dir} now holds "
                         f"{tokenizer.fingerprint[:12]} (retrained?); prepare the data again with this tokenizer")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens but the model "
                         f"has vocab_size={vocab_size}, too few rows for them; pass --vocab_size="
                         f"{tokenizer.vocab_size} or use matching data")
    train = load_tokens(data_dir / "train.bin", vocab_size)
    val = load_tokens(data_dir / "val.bin", vocab_size)
    if len(val) < seq_len + 1:
        raise ValueError(f"the validation split in {data_dir} has {len(val)} tokens, fewer than "
                         f"seq_len+1={seq_len + 1}")
    return TrainingData(dir=str(data_dir.resolve()), train=train, val=val, tokenizer=tokenizer, unit="tokens")


class StepSampler:
    """B distinct items per rank and step, a pure function of (seed, step, rank): the rule every training sampler
    shares (token windows here, SFT records in npllm/sft.py).

    At step s, all ranks draw the same world_size * B distinct item indices, without replacement, from
    np.random.default_rng([seed, s]); rank r takes indices r*B .. (r+1)*B - 1. So data-parallel ranks never share
    an item within a step, and the sampler's whole position is the step number: exact resume needs only it.
    A subclass sets ``num_items`` and ``item_name`` and turns chosen indices into a batch in ``rows``.
    """

    item_name = "items"
    state_keys = ("batch_size", "seq_len", "world_size")  # what must match for a saved position to mean the same

    def __init__(self, num_items: int, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        for name, value in [("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)]:
            check_int(name, value)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not allowed; use an integer in [0, world_size={world_size})")
        check_int("seed", seed, 0)
        self.batch_size, self.seq_len, self.seed = int(batch_size), int(seq_len), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_items = int(num_items)
        if self.num_items < self.world_size * self.batch_size:
            raise ValueError(f"world_size * batch_size = {self.world_size * self.batch_size} distinct "
                             f"{self.item_name} per step, but the data holds only {self.num_items} "
                             f"{self.item_name}; use a smaller "
                             f"--batch_size or more data")
        self.step = 0

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (x, y) batch, each int64 (B, T), of the chosen item indices (B,)."""
        raise TypeError(f"{type(self).__name__} must define rows(indices)")

    def sample(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The (x, y) batch of this rank at `step`, each int64 (B, T). Does not move the sampler."""
        check_int("step", step, 0)
        B = self.batch_size
        rng = np.random.default_rng([self.seed, int(step)])
        chosen = rng.choice(self.num_items, size=self.world_size * B, replace=False)  # (world_size*B,)
        return self.rows(chosen[self.rank * B:(self.rank + 1) * B])  # x (B, T), y (B, T)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """The batch at the current step; then advance one step."""
        batch = self.sample(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        state = dict(seed=self.seed, step=self.step, rank=self.rank)
        state.update({key: getattr(self, key) for key in self.state_keys})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume at state["step"] with state["seed"]. The ``state_keys`` must match this sampler's (a different
        shape would be a different data order); rank stays this process's own."""
        for key in self.state_keys:
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state.get(key)} but this sampler has "
                                 f"{key}={getattr(self, key)}; they must match to resume")
        if not isinstance(state["step"], int) or state["step"] < 0:
            raise ValueError(f"sampler state step must be a non-negative integer, got {state['step']!r}")
        self.seed, self.step = int(state["seed"]), state["step"]


class BatchSampler(StepSampler):
    """Random training windows of a token stream (StepSampler's rule over window starts).

    A window is T+1 consecutive tokens starting at one of N-T starts; x is its first T, y its last T
    (y[:, t] is the token after x[:, t]).
    """

    item_name = "windows"

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1):
        check_int("seq_len", seq_len)
        num_windows = len(tokens) - int(seq_len)  # starts 0 .. N-T-1, each window T+1 tokens
        if num_windows < 1:
            raise ValueError(f"the data has {len(tokens)} tokens; seq_len={seq_len} needs at least {seq_len + 1}")
        self.tokens = tokens  # (N,)
        self.num_windows = num_windows
        super().__init__(num_windows, batch_size, seq_len, seed, rank, world_size)

    def rows(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        T = self.seq_len
        windows = np.asarray(self.tokens[starts[:, None] + np.arange(T + 1)], dtype=np.int64)  # (B, T+1)
        return windows[:, :-1], windows[:, 1:]  # x (B, T), y (B, T)


def eval_batches(tokens, batch_size: int, seq_len: int,
                 max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Validation batches in order: row k of the stream is x = tokens[kT : kT+T], y = tokens[kT+1 : kT+T+1].

    The x rows tile the stream without overlap, so every token after the first is a target exactly once.
    Yields int64 (B, T) pairs; the last batch may have fewer rows. At most max_batches batches (None: all).
    """
    check_int("batch_size", batch_size)
    check_int("seq_len", seq_len)
    if max_batches is not None:
        check_int("max_batches", max_batches)
    B, T = batch_size, seq_len
    num_rows = (len(tokens) - 1) // T
    if num_rows < 1:
        raise ValueError(f"the data has {len(tokens)} tokens; seq_len={seq_len} needs at least {seq_len + 1}")
    num_batches = -(-num_rows // B)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    for b in range(num_batches):
        rows = np.arange(b * B, min((b + 1) * B, num_rows))  # (B,)
        windows = np.asarray(tokens[rows[:, None] * T + np.arange(T + 1)], dtype=np.int64)  # (B, T+1)
        yield windows[:, :-1], windows[:, 1:]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m npllm.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="tokenize text files into train.bin / val.bin")
    prepare.add_argument("--input", nargs="+", required=True, metavar="FILE",
                         help="UTF-8 text files, one document each")
    prepare.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer directory")
    prepare.add_argument("--out", required=True, metavar="DIR", help="output directory")
    prepare.add_argument("--val_fraction", type=float, default=0.1, help="last fraction of tokens kept for validation")
    args = parser.parse_args(argv)
    try:
        meta = prepare_data(args.input, args.tokenizer, args.out, args.val_fraction)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {meta.train_tokens} train + {meta.val_tokens} val tokens ({meta.dtype}) to {args.out}")


if __name__ == "__main__":
    main()
