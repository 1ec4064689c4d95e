"""Train and load a byte-fallback BPE tokenizer (a sentencepiece model).

Token ids (fixed for every tokenizer we train):
    unk = 0, bos = 1, eos = 2, ids 3..258 = the 256 bytes <0x00>..<0xFF>, ids 259.. = learned BPE pieces.
    There is no pad id (pad = -1): batches are fixed-length windows of one token stream, never padded.

With byte fallback, a character the vocabulary lacks is spelled as its UTF-8 bytes, so every string encodes
without <unk>. Text is not normalized (no NFKC, spaces and newlines are kept as written), so
decode(encode(s)) == s for any string s that does not contain the sentencepiece space mark U+2581.

A tokenizer is a directory:
    DIR/tokenizer.model   the sentencepiece model (protobuf, not a pickle)
    DIR/tokenizer.json    vocab size, special ids and the model's sha256 fingerprint, for people and checkpoints

    python -m npllm.tokenizer train --input FILE... --vocab_size N --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
from pathlib import Path

import sentencepiece as spm

from .checks import is_int
from .files import atomic_write, check_input_files

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, -1
NUM_BYTE_PIECES = 256
MIN_VOCAB_SIZE = 3 + NUM_BYTE_PIECES + 1  # specials + bytes + at least one learned piece
MODEL_FILE, INFO_FILE = "tokenizer.model", "tokenizer.json"

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


def _training_lines(paths: list[Path]):
    """Yield every non-blank line of the UTF-8 text files (sentencepiece trains on lines)."""
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                for line in f:
                    line = line.rstrip("\r\n")
                    if line.strip():
                        yield line
        except UnicodeDecodeError as e:
            raise ValueError(f"input file {p} is not UTF-8 text: {e}") from None


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


def train_tokenizer(inputs: list[str | Path], vocab_size: int, out_dir: str | Path) -> "Tokenizer":
    """Train a BPE tokenizer with exactly `vocab_size` ids on UTF-8 text files; write it to `out_dir`."""
    if not is_int(vocab_size) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (3 special ids + 256 bytes + "
                         f"learned pieces), got {vocab_size!r}")
    paths = check_input_files(inputs)
    spm.set_random_generator_seed(RANDOM_SEED)  # seeds the line sampling above
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=_training_lines(paths), model_writer=model,
                                       vocab_size=vocab_size, **TRAINER_OPTIONS)
    except RuntimeError as e:
        raise _clear_training_error(e, vocab_size) from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_bytes = model.getvalue()
    tokenizer = Tokenizer(model_bytes, out_dir / MODEL_FILE)
    atomic_write(out_dir / MODEL_FILE, model_bytes)
    atomic_write(out_dir / INFO_FILE, json.dumps(tokenizer.info(), indent=2) + "\n")
    return tokenizer


class Tokenizer:
    """A loaded tokenizer: text <-> list of token ids."""

    def __init__(self, model_bytes: bytes, model_path: Path):
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.model_path = Path(model_path)
        self.fingerprint = hashlib.sha256(model_bytes).hexdigest()  # identifies the exact model file
        self.vocab_size = self._sp.vocab_size()  # V
        self.unk_id, self.bos_id, self.eos_id = self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        """Load DIR/tokenizer.model; if DIR/tokenizer.json is there, check that it describes this model."""
        directory = Path(directory)
        model_path = directory / MODEL_FILE
        if not model_path.is_file():
            raise FileNotFoundError(f"no tokenizer in {directory}: {model_path} is missing "
                                    f"(train one with `python -m npllm.tokenizer train`)")
        try:
            tokenizer = cls(model_path.read_bytes(), model_path)
        except RuntimeError as e:  # sentencepiece's parse error, several lines of C++ context
            raise ValueError(f"{model_path} is not a sentencepiece model (corrupt or truncated): "
                             f"{str(e).splitlines()[0][:120]}") from None
        info_path = directory / INFO_FILE
        if info_path.is_file():
            try:
                recorded = json.loads(info_path.read_text()).get("fingerprint")
            except (ValueError, AttributeError) as err:  # not JSON, or JSON that is not an object
                raise ValueError(f"{info_path} is corrupt ({type(err).__name__}: {err})") from None
            if recorded != tokenizer.fingerprint:
                raise ValueError(f"{info_path} records fingerprint {recorded} but {model_path} has "
                                 f"{tokenizer.fingerprint}; the two files do not belong together")
        return tokenizer

    def info(self) -> dict:
        """What tokenizer.json holds."""
        return dict(vocab_size=self.vocab_size, unk_id=self.unk_id, bos_id=self.bos_id, eos_id=self.eos_id,
                    pad_id=PAD_ID, byte_fallback=True, fingerprint=self.fingerprint, model_file=MODEL_FILE)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, with bos_id before and/or eos_id after if asked."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return [self.bos_id] * bos + self._sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Text of a sequence of token ids (bos/eos/unk decode to nothing)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range; ids must be in [0, {self.vocab_size})")
        return self._sp.decode(ids)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]}, path={self.model_path})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m npllm.tokenizer", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a BPE tokenizer on text files")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    train.add_argument("--vocab_size", type=int, required=True, help=f"number of token ids (>= {MIN_VOCAB_SIZE})")
    train.add_argument("--out", required=True, metavar="DIR", help="directory for tokenizer.model/.json")
    args = parser.parse_args(argv)
    try:
        tokenizer = train_tokenizer(args.input, args.vocab_size, args.out)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"trained tokenizer: vocab_size={tokenizer.vocab_size} fingerprint={tokenizer.fingerprint[:12]} "
          f"-> {tokenizer.model_path}")


if __name__ == "__main__":
    main()
