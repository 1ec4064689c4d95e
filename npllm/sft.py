"""Supervised fine-tuning data: prompt/response, Alpaca and chat records -> masked (x, y) batches.

    FILE.jsonl --load_sft_records--> [{"segments", "line"}] --encode_segments--> (x, y) rows of T tokens
    --split_records--> train / val --SFTBatchSampler.next()--> (x, y) int64 (B, T), y = -100 where nothing is learned

One record per line (blank lines skipped), a JSON object in one of three forms, each turned into segments of text
that are learned (the loss counts them) or only read:

    {"prompt": P, "response": R}                        P read; R learned, then eos learned
    {"instruction": I, "input": X, "output": O}         Alpaca: ALPACA_PROMPT (or ALPACA_PROMPT_NO_INPUT when X is
                                                        missing or empty) read; O learned, then eos learned
    {"messages": [{"role": ..., "content": ...}, ...]}  the chat template below: every role header and every system
                                                        and user message read; each assistant message learned, then
                                                        eos learned (the model learns to end its turn)

    chat template (plain text: every tokenizer spells it):  "<|role|>\n" + content + "\n" for system and user,
    "<|assistant|>\n" read, then the assistant's content and eos learned; roles are system, user, assistant, and
    the last message must be the assistant's. ``chat_prompt(messages)`` renders a conversation up to the assistant's
    next turn, for generation.

A record becomes one row of T = seq_len tokens:

    sequence = [eos] + encode(segment 1) (+ [eos]) + encode(segment 2) (+ [eos]) ...    n tokens
    x = sequence[:-1], padded with eos to T                                            (T,)
    y = sequence[1:],  padded with -100 to T, and -100 wherever the next token is read, not learned

For a prompt/response record that is [eos] + encode(prompt) + encode(response) + [eos]: the loss counts the response
tokens and the final eos. The leading eos is npllm.generate's prompt convention (``prompt_ids``): a fine-tuned model
sees at generation time exactly the tokens it was trained on. A record longer than T + 1 tokens is refused, naming
its line: truncation would cut the response and its final eos, teaching the model to stop mid-answer.

Validation: max(1, N // 10) records, chosen by a fixed permutation (``split_records``), are held out for the val
loss. The rest are drawn at random per step by ``SFTBatchSampler``, the rule of ``data.BatchSampler`` with records
in place of windows. See docs/finetuning.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from .checks import check_int
from .data import StepSampler, TrainingData
from .layers.loss import IGNORE_INDEX
from .tokenizer import Tokenizer

VAL_FRACTION = 0.1  # share of the records held out for the validation loss (at least one)
SPLIT_SEED = 0  # the held-out records are fixed by this seed, not by --seed: every run of a file validates alike
MAX_REPORTED = 5  # malformed records named in the error message (the count of the others follows)
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}"
                 "\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
CHAT_ROLES = ("system", "user", "assistant")
RECORD_FORMS = ('{"prompt": ..., "response": ...}, {"instruction": ..., "input": ..., "output": ...} or '
                '{"messages": [{"role": ..., "content": ...}, ...]}')


class Segment(NamedTuple):
    text: str
    learned: bool  # the loss counts its tokens
    eos: bool = False  # an eos follows it (learned with it): the end of a response or an assistant turn


# ----------------------------------------------------------------------------------------------------------
# records


def _segments(record) -> list[Segment] | str:
    """A record's segments, or the reason it is not a record of any form."""
    if not isinstance(record, dict):
        return f"expected a JSON object ({RECORD_FORMS}), got {type(record).__name__}"
    if "messages" in record:
        return _chat_segments(record["messages"])
    if "instruction" in record or "output" in record:
        problem = _strings(record, ("instruction", "output"), optional=("input",))
        if problem:
            return problem
        template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
        return [Segment(template.format(instruction=record["instruction"], input=record.get("input", "")), False),
                Segment(record["output"], True, eos=True)]
    problem = _strings(record, ("prompt", "response"))
    return problem or [Segment(record["prompt"], False), Segment(record["response"], True, eos=True)]


def _strings(record: dict, keys, optional=()) -> str | None:
    """The reason a record's fields are unusable, or None: every key present and a string, the last non-empty."""
    missing = [key for key in keys if key not in record]
    if missing:
        return "missing key " + " and ".join(repr(k) for k in missing) + f" (records look like {RECORD_FORMS})"
    for key in (*keys, *(k for k in optional if k in record)):
        if not isinstance(record[key], str):
            return f"{key!r} must be a string, got {type(record[key]).__name__}"
    if record[keys[-1]] == "":
        return f"{keys[-1]!r} is empty (the loss is taken over it, so there would be nothing to learn)"
    return None


def _chat_segments(messages) -> list[Segment] | str:
    """The chat template's segments of a conversation (module docstring)."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects"
    segments = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"} or "role" not in message:
            return f"messages[{i}] must be an object with \"role\" and \"content\""
        role, content = message["role"], message.get("content")
        if role not in CHAT_ROLES:
            return f"messages[{i}] has role {role!r}; allowed: {', '.join(CHAT_ROLES)}"
        if not isinstance(content, str):
            return f"messages[{i}].content must be a string, got {type(content).__name__}"
        if role == "assistant":
            if not content:
                return f"messages[{i}] is an empty assistant message (nothing to learn)"
            segments += [Segment(f"<|{role}|>\n", False), Segment(content, True, eos=True)]
        else:
            segments.append(Segment(f"<|{role}|>\n{content}\n", False))
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's (the loss is taken over the assistant's messages)"
    return segments


def sft_segments(record) -> list[Segment]:
    """The segments of one record object (any of the three forms); a one-line ValueError when it is none of them."""
    segments = _segments(record)
    if isinstance(segments, str):
        raise ValueError(segments)
    return segments


def chat_prompt(messages: list[dict]) -> str:
    """A conversation rendered by the chat template up to the assistant's next turn: the text to generate from."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def json_line(text: str):
    """(the value, None) of one JSONL line, or (None, why it is not JSON): the first check of every record reader."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at column {err.colno})"
    except RecursionError:
        return None, "JSON nested too deeply to read"


def _record_problem(text: str):
    """(segments, None) of a (non-blank) line, or (None, the reason it is not a record)."""
    record, problem = json_line(text)
    if problem:
        return None, problem
    segments = _segments(record)
    return (None, segments) if isinstance(segments, str) else (segments, None)


def read_jsonl(path, parse, what: str) -> list[dict]:
    """``[{**parse(line), "line": n}]`` of a JSONL file, blank lines skipped. parse(text) -> (record dict, None) or
    (None, reason). Every malformed line (bad UTF-8, bad JSON, a reason from parse) is collected and raised as one
    ValueError naming the first few as ``FILE:LINE: reason``; none is dropped. what: a file's records, for messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path} (expected a .jsonl file, one object per line)")
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
        record, problem = parse(text)
        if problem is not None:
            problems.append(f"{path}:{number}: {problem}")
            continue
        records.append(dict(record, line=number))
    if problems:
        raise ValueError(_many_problems(f"{len(problems)} malformed record(s) in {path}", problems))
    if not records:
        raise ValueError(f"{path} holds no records (every line is blank); expected one {what} record per line")
    return records


def load_sft_records(path) -> list[dict]:
    """The records of a JSONL file in file order: ``[{"segments": [Segment], "line": int}]`` (any of the three
    forms of the module docstring); every malformed line is one problem of one ValueError (``read_jsonl``)."""
    def parse(text):
        segments, problem = _record_problem(text)
        return (None, problem) if problem else ({"segments": segments}, None)

    return read_jsonl(path, parse, "SFT")


def _many_problems(header: str, problems: list[str]) -> str:
    """One line: the header, the first MAX_REPORTED problems, and how many more there are."""
    shown = "; ".join(problems[:MAX_REPORTED])
    more = f"; and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    return f"{header}: {shown}{more}"


# ----------------------------------------------------------------------------------------------------------
# one example


def _sequence(tok: Tokenizer, segments: list[Segment]) -> tuple[list[int], list[bool]]:
    """([eos] + the segments' tokens (each followed by eos where it says so), learned[i]: token i is learned)."""
    sequence, learned = [tok.eos_id], [False]
    for segment in segments:
        ids = tok.encode(segment.text) + ([tok.eos_id] if segment.eos else [])
        sequence += ids
        learned += [segment.learned] * len(ids)
    return sequence, learned


def _describe(sequence: list[int], learned: list[bool]) -> str:
    return f"{len(sequence)} tokens ({sum(learned)} of them learned)"


def encode_segments(tok: Tokenizer, segments: list[Segment], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, targets), each int64 (T,) with T = seq_len: the row a record trains on (module docstring).
    ValueError when the sequence is longer than seq_len + 1 tokens (the record does not fit)."""
    check_int("seq_len", seq_len)
    sequence, learned = _sequence(tok, segments)
    n = len(sequence)
    if n > seq_len + 1:
        raise ValueError(f"the record is {_describe(sequence, learned)}, more than seq_len+1={seq_len + 1}; shorten "
                         f"it or train with --seq_len={n - 1} or more")
    tokens = np.full(seq_len, tok.eos_id, dtype=np.int64)  # (T,) padded with eos
    targets = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)  # (T,) padded with -100
    tokens[:n - 1] = sequence[:-1]
    targets[:n - 1] = np.where(learned[1:], sequence[1:], IGNORE_INDEX)  # position i predicts token i + 1
    return tokens, targets


def encode_sft_example(tok: Tokenizer, prompt: str, response: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The row of a prompt/response record: [eos] + encode(prompt) + encode(response) + [eos], the response and the
    final eos learned. ValueError when it does not fit or the response is empty."""
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(f"prompt and response must be strings, got {type(prompt).__name__} and "
                         f"{type(response).__name__}")
    if response == "":
        raise ValueError("the response is empty; the loss is taken over the response, so it needs at least one token")
    return encode_segments(tok, [Segment(prompt, False), Segment(response, True, eos=True)], seq_len)


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
    """Every record (a dict with "segments" and "line", as load_sft_records gives) as a row of seq_len tokens.
    Records longer than seq_len + 1 tokens are refused all at once, in one ValueError naming their lines (``source``
    names the file in it) and the --seq_len that would fit them all."""
    too_long, longest = [], 0
    for record in records:
        sequence, learned = _sequence(tok, record["segments"])
        if len(sequence) > seq_len + 1:
            too_long.append(f"{source}:{record['line']}: {_describe(sequence, learned)}")
            longest = max(longest, len(sequence))
    if too_long:
        raise ValueError(_many_problems(f"{len(too_long)} record(s) longer than seq_len+1={seq_len + 1} tokens "
                                        f"(shorten them or train with --seq_len={longest - 1} or more)", too_long))
    rows = [encode_segments(tok, record["segments"], seq_len) for record in records]
    T = seq_len
    return SFTExamples(tokens=np.array([x for x, _ in rows], dtype=np.int32).reshape(-1, T),  # (N, T)
                       targets=np.array([y for _, y in rows], dtype=np.int32).reshape(-1, T),  # (N, T)
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
    examples = encode_sft_records(records, tokenizer, seq_len, source=Path(path).resolve())
    return records_file_data(path, examples, tokenizer, "records")


def records_file_data(path, examples, tokenizer: Tokenizer, unit: str) -> TrainingData:
    """TrainingData of a file's encoded ``examples`` (anything with ``len`` and ``subset(index)``): split_records'
    fixed train / val split, and what a checkpoint records about the file so that a resume can check it."""
    path = Path(path).resolve()
    train_index, val_index = split_records(len(examples))
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return TrainingData(dir=str(path), train=examples.subset(train_index), val=examples.subset(val_index),
                        tokenizer=tokenizer, unit=unit,
                        sft=dict(path=str(path), sha256=sha256, records=len(examples),
                                 train_records=len(train_index), val_records=len(val_index)))
