"""Token shards on disk, and the batches drawn from them.

    text -> documents (npllm.sources) -> Tokenizer.encode, on every core -> DIR/train.bin, DIR/val.bin, DIR/meta.json
    load_tokens(DIR/train.bin) -> read-only memmap -> BatchSampler.next() -> (x, y) int64 (B, T)

Each document's tokens are followed by eos_id (so documents are separated by EOS, and each split ends with one).
The split is by documents: document i (counted from 0 over all inputs, in order) goes to val when
val_score(i) < val_fraction, a fixed hash of i, so val is drawn from the whole corpus and the same inputs give the
same split. Each split gets at least one document: if none fell in one, the document whose score came nearest
moves over. A single document is split by tokens instead: its last floor(N * val_fraction) tokens are val.

Preparation streams in bounded memory: documents are read and encoded a piece at a time (npllm.sources), workers
encode batches of pieces in parallel (results are taken in order, so the output does not depend on the number of
workers), and each shard is appended to a temp file whose header gets its token count at the end, then renamed.

Shard file (little-endian), see docs/data.md:
    bytes 0..8    magic b"NPLLMTOK"
    bytes 8..12   format version, uint32 (= 1)
    bytes 12..16  bytes per token, uint32: 2 (uint16 tokens, vocab_size <= 65536) or 4 (uint32 tokens)
    bytes 16..24  token count N, uint64
    bytes 24..28  vocab size V, uint32
    bytes 28..64  zero
    bytes 64..    the N tokens

    python -m npllm.data prepare --input PATH... --tokenizer DIR --out DIR [--val_fraction 0.1] [--field text]
                                 [--workers N]
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from .checks import check_int
from .cli import run_command
from .config import PrepareConfig, options_help, parse_subcommand
from .files import atomic_write, fsync_path, temp_name
from .run import DataMeta, read_data_meta, write_data_meta
from .sources import DocumentReader, resolve_inputs, split_text, total_bytes
from .tokenizer import Tokenizer, load_tokenizer

MAGIC = b"NPLLMTOK"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQI")  # magic, version, bytes per token, token count, vocab size
TOKEN_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}  # bytes per token -> dtype
ENCODE_CHUNK_CHARS = 1 << 20  # a document is encoded at most about 1M characters at a time, to bound memory
BATCH_CHARS = 1 << 20  # a worker's task: pieces of documents adding up to about 1M characters
IN_FLIGHT = 2  # batches sent to the pool per worker, at most, before the oldest result is taken
COPY_TOKENS = 1 << 20  # tokens are moved between temp shards and counted 1M at a time
SPLIT_SEED = 0  # val_score's fixed seed
EOS_BYTES = 1  # an EOS stands for one byte of text: the end of its document (see byte counts in docs/data.md)
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
    atomic_write(path, [shard_header(dtype, tokens.size, vocab_size), np.ascontiguousarray(tokens, dtype=dtype)])


def shard_header(dtype: np.dtype, count: int, vocab_size: int) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, count, vocab_size).ljust(HEADER_BYTES, b"\0")


class ShardWriter:
    """One shard written a batch at a time: tokens are appended to a temp file beside ``path`` (after a header
    that says 0 tokens); commit() writes the real count into the header, fsyncs and renames the file to ``path``.
    Until then ``path`` is the old file or none, never a half shard; abort() removes the temp file."""

    def __init__(self, path: str | Path, vocab_size: int):
        self.path, self.vocab_size = Path(path), int(vocab_size)
        self.dtype = token_dtype(self.vocab_size)
        self.temp = temp_name(self.path)
        self.file = open(self.temp, "x+b")
        self.file.write(shard_header(self.dtype, 0, self.vocab_size))
        self.count = 0  # tokens written

    def write(self, tokens) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)  # (n,)
        self.file.seek(0, os.SEEK_END)
        self.file.write(tokens)
        self.count += tokens.size

    def read(self, start: int, stop: int) -> Iterator[np.ndarray]:
        """Tokens [start, stop) of what was written, COPY_TOKENS at a time."""
        for s in range(start, stop, COPY_TOKENS):
            n = min(COPY_TOKENS, stop - s)
            self.file.seek(HEADER_BYTES + s * self.dtype.itemsize)
            yield np.frombuffer(self.file.read(n * self.dtype.itemsize), self.dtype)  # (n,)

    def remove(self, start: int, stop: int) -> None:
        """Remove tokens [start, stop): the tokens after them move down, a chunk at a time."""
        for s in range(stop, self.count, COPY_TOKENS):
            (chunk,) = self.read(s, min(s + COPY_TOKENS, self.count))
            self.file.seek(HEADER_BYTES + (s - (stop - start)) * self.dtype.itemsize)
            self.file.write(chunk)
        self.count -= stop - start
        self.file.truncate(HEADER_BYTES + self.count * self.dtype.itemsize)

    def commit(self) -> None:
        self.file.seek(0)
        self.file.write(shard_header(self.dtype, self.count, self.vocab_size))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temp, self.path)
        fsync_path(self.path.parent)

    def abort(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


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


def val_score(index: int) -> float:
    """Document ``index``'s fixed place in [0, 1): the first 8 bytes of blake2b("SEED:index"), little-endian, over
    2**64. The document goes to val when val_score(index) < val_fraction."""
    digest = hashlib.blake2b(f"{SPLIT_SEED}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def encode_pieces(tokenizer: Tokenizer, pieces: list[str], ends: list[bool]):
    """Encode pieces of documents, an EOS after each piece that ends its document.

    Returns (tokens (n,) of token_dtype(V), tokens per piece (P,) int64 with its EOS, UTF-8 bytes per piece (P,)
    int64 with EOS_BYTES for its EOS).
    """
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype)  # (1,)
    arrays, counts, nbytes = [], np.zeros(len(pieces), np.int64), np.zeros(len(pieces), np.int64)
    for j, (text, end) in enumerate(zip(pieces, ends)):
        arrays.append(tokenizer.encode_array(text, dtype))  # (n_j,)
        if end:
            arrays.append(eos)
        counts[j] = len(arrays[-1 - end]) + end
        nbytes[j] = len(text.encode("utf-8", "surrogatepass")) + EOS_BYTES * end
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype)  # (sum of counts,)
    return tokens, counts, nbytes


def encode_documents(documents: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
    """One token stream: each document's tokens followed by eos_id. Returns (N,) of token_dtype(V).

    A long document is encoded a piece of about ENCODE_CHUNK_CHARS at a time, cut where the tokenizer says the
    pieces encode as the whole does (Tokenizer.next_cut)."""
    parts = [encode_pieces(tokenizer, [text], [end])[0]
             for doc in documents for text, end in split_text(doc, tokenizer.next_cut, ENCODE_CHUNK_CHARS)]
    return np.concatenate(parts) if parts else np.zeros(0, token_dtype(tokenizer.vocab_size))


def _batches(pieces: Iterable[tuple[str, bool]]) -> Iterator[tuple[list[str], list[bool]]]:
    """Pieces grouped into batches of about BATCH_CHARS characters: (texts, ends)."""
    texts, ends, size = [], [], 0
    for text, end in pieces:
        texts.append(text)
        ends.append(end)
        size += len(text)
        if size >= BATCH_CHARS:
            yield texts, ends
            texts, ends, size = [], [], 0
    if texts:
        yield texts, ends


_worker_tokenizer = None  # each pool worker's own copy


def _start_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; no threads inside each worker
    _worker_tokenizer = tokenizer


def _encode_in_worker(pieces: list[str], ends: list[bool]):
    return encode_pieces(_worker_tokenizer, pieces, ends)


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Encoder:
    """Encodes batches of pieces in order, in this process (workers=1) or in a pool of worker processes. At most
    IN_FLIGHT batches per worker are out at a time, so reading never runs far ahead of encoding."""

    def __init__(self, tokenizer: Tokenizer, workers: int = 1):
        check_int("workers", workers)
        self.tokenizer, self.workers = tokenizer, int(workers)
        self.pool = None
        if self.workers > 1:
            self.pool = multiprocessing.get_context().Pool(self.workers, initializer=_start_worker,
                                                           initargs=(tokenizer,))

    def map(self, batches: Iterable[tuple[list[str], list[bool]]]):
        """(ends, encode_pieces result) for each batch, in the batches' order."""
        if self.pool is None:
            for texts, ends in batches:
                yield ends, encode_pieces(self.tokenizer, texts, ends)
            return
        pending = collections.deque()
        for texts, ends in batches:
            pending.append((ends, self.pool.apply_async(_encode_in_worker, (texts, ends))))
            if len(pending) >= IN_FLIGHT * self.workers:
                ends, result = pending.popleft()
                yield ends, result.get()
        while pending:
            ends, result = pending.popleft()
            yield ends, result.get()

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.pool is not None:
            if exc_type is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()  # reaps the workers (their peak memory then shows in RUSAGE_CHILDREN)


class _Nearest:
    """The document of a split whose score came nearest to the other split, and where its tokens lie."""

    def __init__(self):
        self.distance, self.start, self.stop, self.nbytes = None, 0, 0, 0

    def offer(self, distance: float, start: int, stop: int, nbytes: int) -> None:
        if self.distance is None or distance < self.distance:
            self.distance, self.start, self.stop, self.nbytes = distance, start, stop, nbytes


def _move(src: ShardWriter, dst: ShardWriter, start: int, stop: int) -> None:
    """Append src's tokens [start, stop) to dst and remove them from src."""
    for chunk in src.read(start, stop):
        dst.write(chunk)
    src.remove(start, stop)


def write_splits(pieces: Iterable[tuple[str, bool]], tokenizer: Tokenizer, out_dir: str | Path,
                 val_fraction: float = 0.1, sources: list[str] | None = None,
                 encoder: Encoder | None = None) -> DataMeta:
    """Encode the pieces of documents ((text, ends_document) pairs, in order), split them by documents (module
    docstring), write out_dir/train.bin, val.bin and meta.json. Returns the DataMeta."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    encoder = encoder or Encoder(tokenizer, 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    V = tokenizer.vocab_size
    writers = {False: ShardWriter(out_dir / "train.bin", V), True: ShardWriter(out_dir / "val.bin", V)}
    try:
        n_docs = {False: 0, True: 0}
        n_bytes = {False: 0, True: 0}
        position = {False: 0, True: 0}  # tokens routed to each split so far
        nearest = {False: _Nearest(), True: _Nearest()}  # train: lowest score; val: highest
        in_val, score, doc_start, doc_bytes = None, 0.0, 0, 0  # the document being read (in_val None: between)
        for ends, (tokens, counts, piece_bytes) in encoder.map(_batches(pieces)):
            to_val = np.zeros(len(ends), bool)  # (P,) the split of each piece's document
            for j, end in enumerate(ends):
                if in_val is None:  # a document starts
                    score = val_score(n_docs[False] + n_docs[True])
                    in_val = score < val_fraction
                    doc_start, doc_bytes = position[in_val], 0
                to_val[j] = in_val
                position[in_val] += int(counts[j])
                doc_bytes += int(piece_bytes[j])
                if end:
                    n_docs[in_val] += 1
                    n_bytes[in_val] += doc_bytes
                    nearest[in_val].offer(val_fraction - score if in_val else score - val_fraction,
                                          doc_start, position[in_val], doc_bytes)
                    in_val = None
            mask = np.repeat(to_val, counts)  # (n,) each token's split
            writers[False].write(tokens[~mask])
            writers[True].write(tokens[mask])
        split = _fix_split(writers, n_docs, n_bytes, nearest, val_fraction, tokenizer)
        for w in writers.values():
            w.commit()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    tokenizer_dir = tokenizer.directory.resolve()
    if tokenizer_dir.is_relative_to(out_dir.resolve()):  # a tokenizer inside the data dir moves with it
        tokenizer_dir = tokenizer_dir.relative_to(out_dir.resolve())
    meta = DataMeta(tokenizer_dir=str(tokenizer_dir), tokenizer_fingerprint=tokenizer.fingerprint,
                    vocab_size=V, eos_id=tokenizer.eos_id, dtype=str(token_dtype(V)), val_fraction=val_fraction,
                    train_tokens=writers[False].count, val_tokens=writers[True].count, sources=sources or [],
                    train_bytes=n_bytes[False], val_bytes=n_bytes[True], train_documents=n_docs[False],
                    val_documents=n_docs[True], split=split)
    write_data_meta(out_dir, meta)
    return meta


def _fix_split(writers, n_docs, n_bytes, nearest, val_fraction, tokenizer) -> str:
    """Make both splits non-empty (module docstring); update the counts. Returns the split rule used."""
    total_docs = n_docs[False] + n_docs[True]
    if total_docs == 0:
        raise ValueError("the inputs hold no documents (only empty or blank .jsonl files)")
    if total_docs == 1:  # one document: its last floor(N * val_fraction) tokens are val
        in_val = n_docs[True] == 1
        N = writers[in_val].count
        n_val = int(N * val_fraction)
        if n_val == 0 or n_val == N:
            raise ValueError(f"the text has only {N} tokens: too few to split with val_fraction={val_fraction}")
        if in_val:
            _move(writers[True], writers[False], 0, N - n_val)
        else:
            _move(writers[False], writers[True], N - n_val, N)
        counter = tokenizer.byte_counter()
        for chunk in writers[True].read(0, n_val):
            counter.add(chunk)
        total = n_bytes[in_val]
        n_bytes[True], n_bytes[False] = counter.total, total - counter.total
        return "tokens"
    for empty in (True, False):
        if n_docs[empty] == 0:  # the other split's document nearest to this one moves over
            doc = nearest[not empty]
            _move(writers[not empty], writers[empty], doc.start, doc.stop)
            n_docs[empty], n_docs[not empty] = 1, n_docs[not empty] - 1
            n_bytes[empty], n_bytes[not empty] = doc.nbytes, n_bytes[not empty] - doc.nbytes
    return "documents"


def write_dataset(documents: Iterable[str], tokenizer: Tokenizer, out_dir: str | Path,
                  val_fraction: float = 0.1, sources: list[str] | None = None) -> DataMeta:
    """Encode documents (strings, in this process), split them (module docstring) and write out_dir/train.bin,
    out_dir/val.bin and out_dir/meta.json. Returns the DataMeta."""
    pieces = (piece for doc in documents for piece in split_text(doc, tokenizer.next_cut, ENCODE_CHUNK_CHARS))
    return write_splits(pieces, tokenizer, out_dir, val_fraction, sources)


def prepare_data(inputs, tokenizer_dir: str | Path, out_dir: str | Path, val_fraction: float = 0.1, *,
                 field: str = "text", workers: int | None = None, progress: bool | None = None) -> DataMeta:
    """Tokenize the inputs (files, folders, glob patterns; .txt, .jsonl with ``field``, .gz: npllm.sources) with the
    tokenizer in tokenizer_dir (any kind npllm.tokenizer.load_tokenizer reads) into shards in out_dir.

    workers: encoding processes (default: one per core, fewer for a small input). progress: a tqdm bar of the
    bytes read (default: when stderr is a terminal). Returns the DataMeta.
    """
    from tqdm import tqdm

    if not 0.0 < val_fraction < 1.0:  # before the reading starts
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = resolve_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_dir)
    size = total_bytes(files)
    if workers is None:
        workers = max(1, min(default_workers(), -(-size // BATCH_CHARS)))  # a pool only for more than one batch
    with Encoder(tokenizer, workers) as encoder, tqdm(
            total=size, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare", leave=False,
            disable=not sys.stderr.isatty() if progress is None else not progress) as bar:
        reader = DocumentReader(files, field, tokenizer.next_cut, ENCODE_CHUNK_CHARS, on_bytes=bar.update)
        return write_splits(reader.pieces(), tokenizer, out_dir, val_fraction, [str(i) for i in inputs], encoder)


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

    def next_batch(self) -> dict:
        """``next()`` as the dict every architecture's loss takes: {"tokens": x, "targets": y} for (x, y) rows."""
        rows = self.next()
        return rows if isinstance(rows, dict) else {"tokens": rows[0], "targets": rows[1]}

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


def run_prepare(pc: PrepareConfig) -> None:
    if Path(pc.out).exists() and not Path(pc.out).is_dir():
        raise ValueError(f"--out={pc.out} is a file; give a directory (it is made if missing)")
    meta = prepare_data(list(pc.input), pc.tokenizer, pc.out, pc.val_fraction, field=pc.field, workers=pc.workers)
    print(f"wrote {meta.train_tokens} train + {meta.val_tokens} val tokens ({meta.dtype}; "
          f"{meta.train_documents} + {meta.val_documents} documents, {meta.train_bytes} + {meta.val_bytes} bytes) "
          f"to {pc.out}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or "--help" in argv:
        print(__doc__.split("\n")[0] + "\n\n    python -m npllm.data prepare --input PATH... --tokenizer DIR --out DIR"
              "\n\nOptions of prepare:\n" + options_help(PrepareConfig))
        return 0
    return run_command("npllm.data", lambda a: run_prepare(parse_subcommand(a, {"prepare": PrepareConfig})[1]), argv)


if __name__ == "__main__":
    sys.exit(main())
