"""Supervised fine-tuning data: prompt/response records -> masked (x, y) batches.

    FILE.jsonl --load_sft_records--> [{"prompt", "response", "line"}] --encode_sft_example--> (x, y) rows of T tokens
    --split_records--> train / val --SFTBatchSampler.next()--> (x, y) int64 (B, T), y = -100 where nothing is learned

One record per line, a JSON object with string fields "prompt" and "response" (other keys are ignored; blank lines
are skipped). A record becomes one row of T = seq_len tokens:

    sequence = [eos] + encode(prompt) + encode(response) + [eos]          n = P + R + 2 tokens
    x = sequence[:-1], padded with eos to T                               (T,)
    y = sequence[1:],  padded with -100 to T, and -100 at the P positions whose next token is a prompt token

So the loss counts exactly the R response tokens and the final eos (which teaches the model to stop). The leading
eos is npllm.generate's prompt convention (``prompt_ids``): a fine-tuned model sees at generation time exactly the
tokens it was trained on. No separator is inserted between prompt and response; put one in the prompt if you want
one (e.g. "Q: ...\\nA:"). A record longer than T + 1 tokens is refused, naming its line: truncation would cut the
response and its final eos, teaching the model to stop mid-answer.

Validation: max(1, N // 10) records, chosen by a fixed permutation (``split_records``), are held out for the val
loss. The rest are drawn at random per step by ``SFTBatchSampler``, the rule of ``data.BatchSampler`` with records
in place of windows. See docs/finetuning.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .checks import check_int
from .data import StepSampler, TrainingData
from .layers.loss import IGNORE_INDEX
from .tokenizer import Tokenizer

VAL_FRACTION = 0.1  # share of the records held out for the validation loss (at least one)
SPLIT_SEED = 0  # the held-out records are fixed by this seed, not by --seed: every run of a file validates alike
MAX_REPORTED = 5  # malformed records named in the error message (the count of the others follows)


# ----------------------------------------------------------------------------------------------------------
# records


def _record_problem(text: str):
    """The reason a (non-blank) line is not a record, or None when it is one."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg} at column {err.colno})"
    except RecursionError:
        return "JSON nested too deeply to read"
    if not isinstance(record, dict):
        return f'expected a JSON object {{"prompt": ..., "response": ...}}, got {type(record).__name__}'
    missing = [key for key in ("prompt", "response") if key not in record]
    if missing:
        return "missing key " + " and ".join(repr(k) for k in missing)
    for key in ("prompt", "response"):
        if not isinstance(record[key], str):
            return f"{key!r} must be a string, got {type(record[key]).__name__}"
    if record["response"] == "":
        return "'response' is empty (the loss is taken over the response, so there would be nothing to learn)"
    return None


def load_sft_records(path) -> list[dict]:
    """The records of a JSONL file: ``[{"prompt": str, "response": str, "line": int}]`` in file order.

    Blank lines are allowed and skipped; ``line`` is the 1-based line number. Every malformed line is a problem
    (bad UTF-8 or JSON, not an object, a missing key, a non-string value, an empty response): all of them are
    collected and raised as one ValueError naming the first few as ``FILE:LINE: reason``. None is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT file not found: {path} (expected a .jsonl file, one "
                                f'{{"prompt": ..., "response": ...}} object per line)')
    records, problems = [], []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start})")
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
        if not text.strip():
            continue
        problem = _record_problem(text)
        if problem is not None:
            problems.append(f"{path}:{number}: {problem}")
            continue
        record = json.loads(text)
        records.append(dict(prompt=record["prompt"], response=record["response"], line=number))
    if problems:
        raise ValueError(_many_problems(f"{len(problems)} malformed record(s) in {path}", problems))
    if not records:
        raise ValueError(f"{path} holds no records (every line is blank); expected one "
                         f'{{"prompt": ..., "response": ...}} object per line')
    return records


def _many_problems(header: str, problems: list[str]) -> str:
    """One line: the header, the first MAX_REPORTED problems, and how many more there are."""
    shown = "; ".join(problems[:MAX_REPORTED])
    more = f"; and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    return f"{header}: {shown}{more}"


# ----------------------------------------------------------------------------------------------------------
# one example


def _sequence(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """([eos] + encode(prompt) + encode(response) + [eos], P = the prompt's token count)."""
    prompt_ids = tok.encode(prompt)
    return [tok.eos_id] + prompt_ids + tok.encode(response) + [tok.eos_id], len(prompt_ids)


def _describe(sequence: list[int], P: int) -> str:
    return f"{len(sequence)} tokens (eos + {P} prompt + {len(sequence) - P - 2} response + eos)"


def encode_sft_example(tok: Tokenizer, prompt: str, response: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, targets), each int64 (T,) with T = seq_len: the row a record trains on.

    sequence = [eos] + encode(prompt) + encode(response) + [eos] (n = P + R + 2 tokens); tokens = sequence[:-1]
    padded with eos; targets = sequence[1:] padded with -100, and -100 at the first P positions (their next token
    is a prompt token). ValueError when n > seq_len + 1 (the record does not fit) or the response is empty.
    """
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(f"prompt and response must be strings, got {type(prompt).__name__} and "
                         f"{type(response).__name__}")
    if response == "":
        raise ValueError("the response is empty; the loss is taken over the response, so it needs at least one token")
    check_int("seq_len", seq_len)
    sequence, P = _sequence(tok, prompt, response)
    n = len(sequence)
    if n > seq_len + 1:
        raise ValueError(f"the record is {_describe(sequence, P)}, more than seq_len+1={seq_len + 1}; shorten it "
                         f"or train with --seq_len={n - 1} or more")
    tokens = np.full(seq_len, tok.eos_id, dtype=np.int64)  # (T,) padded with eos
    targets = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)  # (T,) padded with -100
    tokens[:n - 1] = sequence[:-1]
    targets[:n - 1] = sequence[1:]
    targets[:P] = IGNORE_INDEX  # positions 0..P-1 predict prompt tokens: not learned
    return tokens, targets


# ----------------------------------------------------------------------------------------------------------
# a set of examples, the split, and batches


@dataclass(frozen=True)
class SFTExamples:
    """Encoded records, one row each: tokens and targets int32 (N, T), and each record's line in the file (N,)."""

    tokens: np.ndarray  # (N, T) x rows, padded with eos
    targets: np.ndarray  # (N, T) y rows, -100 on prompt and padding positions
    lines: np.ndarray  # (N,) 1-based line numbers in the source file

    def __len__(self) -> int:
        return len(self.lines)

    def subset(self, index) -> "SFTExamples":
        """The examples at the given row indices, as SFTExamples."""
        return SFTExamples(self.tokens[index], self.targets[index], self.lines[index])

    def rows(self, index) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) int64 (len(index), T) of the given rows."""
        return self.tokens[index].astype(np.int64), self.targets[index].astype(np.int64)


def encode_sft_records(records: list[dict], tok: Tokenizer, seq_len: int, source="the records") -> SFTExamples:
    """Every record (a dict with "prompt", "response" and "line", as load_sft_records gives) as a row of seq_len
    tokens. Records longer than seq_len + 1 tokens are refused all at once, in one ValueError naming their lines
    (``source`` names the file in it) and the --seq_len that would fit them all."""
    too_long, longest = [], 0
    for record in records:
        sequence, P = _sequence(tok, record["prompt"], record["response"])
        if len(sequence) > seq_len + 1:
            too_long.append(f"{source}:{record['line']}: {_describe(sequence, P)}")
            longest = max(longest, len(sequence))
    if too_long:
        raise ValueError(_many_problems(f"{len(too_long)} record(s) longer than seq_len+1={seq_len + 1} tokens "
                                        f"(shorten them or train with --seq_len={longest - 1} or more)", too_long))
    tokens, targets = [], []
    for record in records:
        x, y = encode_sft_example(tok, record["prompt"], record["response"], seq_len)
        tokens.append(x)
        targets.append(y)
    T = seq_len
    return SFTExamples(tokens=np.array(tokens, dtype=np.int32).reshape(-1, T),  # (N, T)
                       targets=np.array(targets, dtype=np.int32).reshape(-1, T),  # (N, T)
                       lines=np.array([r["line"] for r in records], dtype=np.int64))  # (N,)


def split_records(n_records: int, val_fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices), each sorted: val is the first max(1, floor(N * val_fraction)) positions of
    np.random.default_rng(SPLIT_SEED).permutation(N). A fixed permutation rather than "the last 10%" because
    files are often sorted or cycle through templates; fixed, so every run on the same file validates alike."""
    if check_int("n_records", n_records) < 2:
        raise ValueError(f"need at least 2 records (one is held out for the validation loss), got {n_records}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(n_records * val_fraction))
    order = np.random.default_rng(SPLIT_SEED).permutation(n_records)  # (N,)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class SFTBatchSampler(StepSampler):
    """Random training records (data.StepSampler's rule over record indices): the same interface and the same
    guarantees as BatchSampler (distinct records across data-parallel ranks in a step; position = step number)."""

    item_name = "training records"
    state_keys = ("batch_size", "seq_len", "world_size", "num_records")

    def __init__(self, examples: SFTExamples, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if examples.tokens.shape[1] != seq_len:
            raise ValueError(f"the examples are rows of {examples.tokens.shape[1]} tokens but seq_len={seq_len}")
        self.examples = examples
        self.num_records = len(examples)
        super().__init__(self.num_records, batch_size, seq_len, seed, rank, world_size)

    def rows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.examples.rows(indices)  # x (B, T), y (B, T)


def sft_eval_batches(examples: SFTExamples, batch_size: int,
                     max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Validation batches: the examples in file order, B at a time (the last batch may be smaller), at most
    max_batches of them (None: all). Yields int64 (B, T) pairs."""
    check_int("batch_size", batch_size)
    if max_batches is not None:
        check_int("max_batches", max_batches)
    num_batches = -(-len(examples) // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    for b in range(num_batches):
        yield examples.rows(np.arange(b * batch_size, min((b + 1) * batch_size, len(examples))))


# ----------------------------------------------------------------------------------------------------------
# what the trainer loads


def load_sft_data(path, tokenizer: Tokenizer, seq_len: int) -> TrainingData:
    """A JSONL file as the trainer's data (``npllm.data.TrainingData``).

    train / val are SFTExamples (split_records); ``dir`` is the file's absolute path; ``sft`` is what a checkpoint
    records about the file (path, sha256 of its bytes, record counts) so that a resume can check it is unchanged.
    """
    records = load_sft_records(path)
    path = Path(path).resolve()
    examples = encode_sft_records(records, tokenizer, seq_len, source=path)
    train_index, val_index = split_records(len(examples))
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return TrainingData(dir=str(path), train=examples.subset(train_index), val=examples.subset(val_index),
                        tokenizer=tokenizer, unit="records",
                        sft=dict(path=str(path), sha256=sha256, records=len(examples),
                                 train_records=len(train_index), val_records=len(val_index)))
