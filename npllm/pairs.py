"""Source/target pairs for the encoder-decoder: JSONL records -> padded batches.

    FILE.jsonl --load_pair_records--> [{"source", "target", "line"}] --encode_pairs--> PairExamples
    --split_records--> train / val --PairSampler.next_batch()--> {"src", "src_mask", "tokens", "tgt_mask", "targets"}

One record per line, a JSON object with string fields "source" and "target" (other keys are ignored; blank lines
are skipped; every malformed line is reported as FILE:LINE in one ValueError, by npllm.sft.read_jsonl). A pair is
encoded as

    src     = encode(source) + [eos]              S_i tokens: the encoder's input
    tokens  = [bos] + encode(target)              T_i tokens: the decoder's input (teacher forcing)
    targets = encode(target) + [eos]              T_i tokens: tokens shifted by one, ending with eos

(bos is the tokenizer's bos_id, its eos_id when it has none.) A batch pads every row to the batch's longest source
and target (``pad="batch"``, the default: no work on padding the batch does not need) or to seq_len both
(``pad="fixed"``: every batch has the same shape). Padded slots hold eos in src and tokens, which nothing reads:
src_mask / tgt_mask (B, S) / (B, T) are False there and the model never attends to them, and targets are
IGNORE_INDEX (-100) there, so the loss counts exactly the target tokens and the final eos of each pair. A pair with
S_i or T_i above seq_len is refused, naming its line and the --seq_len that would fit every pair: truncation would
cut the target's eos and teach the model never to stop.

Validation: max(1, N // 10) pairs held out by npllm.sft.split_records' fixed permutation; PairSampler draws the
training pairs per step by npllm.data.StepSampler's (seed, step, rank) rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .checks import check_choice, check_int
from .data import StepSampler, TrainingData
from .layers.loss import IGNORE_INDEX
from .sft import _many_problems, json_line, read_jsonl, records_file_data
from .tokenizer import Tokenizer

PADS = ("batch", "fixed")  # pad each batch to its longest pair, or to seq_len


# ----------------------------------------------------------------------------------------------------------
# records


def _parse_pair(text: str):
    """(record, None) of a (non-blank) line, or (None, the reason it is not a pair)."""
    record, problem = json_line(text)
    if problem:
        return None, problem
    if not isinstance(record, dict):
        return None, f'expected a JSON object {{"source": ..., "target": ...}}, got {type(record).__name__}'
    missing = [key for key in ("source", "target") if key not in record]
    if missing:
        return None, "missing key " + " and ".join(repr(k) for k in missing)
    for key in ("source", "target"):
        if not isinstance(record[key], str):
            return None, f"{key!r} must be a string, got {type(record[key]).__name__}"
    return {"source": record["source"], "target": record["target"]}, None


def load_pair_records(path) -> list[dict]:
    """The pairs of a JSONL file in file order: ``[{"source": str, "target": str, "line": int}]`` (1-based line
    numbers). Every malformed line is one problem of one ValueError (``npllm.sft.read_jsonl``)."""
    return read_jsonl(path, _parse_pair, "source/target pairs")


# ----------------------------------------------------------------------------------------------------------
# encoding


def bos_of(tok: Tokenizer) -> int:
    """The id that starts the decoder's input: bos_id, or eos_id for a tokenizer without one."""
    return tok.eos_id if tok.bos_id is None else tok.bos_id


def encode_pair(tok: Tokenizer, source: str, target: str) -> tuple[list[int], list[int], list[int]]:
    """(src, tokens, targets) of one pair: encode(source) + [eos], [bos] + encode(target), encode(target) + [eos]."""
    target_ids = tok.encode(target)
    return tok.encode(source) + [tok.eos_id], [bos_of(tok)] + target_ids, target_ids + [tok.eos_id]


@dataclass(frozen=True)
class PairExamples:
    """Encoded pairs, one row each, padded to the longest source / target of the set: src (N, S_max), tokens and
    targets (N, T_max) int32, their lengths (N,) and each pair's line in the file (N,)."""

    src: np.ndarray  # (N, S_max) padded with pad_id
    src_len: np.ndarray  # (N,) S_i, the eos included
    tokens: np.ndarray  # (N, T_max) decoder inputs, padded with pad_id
    targets: np.ndarray  # (N, T_max) padded with IGNORE_INDEX
    tgt_len: np.ndarray  # (N,) T_i
    lines: np.ndarray  # (N,) 1-based line numbers in the source file
    pad_id: int  # the id in padded src / tokens slots (the tokenizer's eos; masked, so never read)

    def __len__(self) -> int:
        return len(self.lines)

    def subset(self, index) -> "PairExamples":
        """The pairs at the given row indices."""
        return PairExamples(self.src[index], self.src_len[index], self.tokens[index], self.targets[index],
                            self.tgt_len[index], self.lines[index], self.pad_id)

    def batch(self, index, length: int | None = None) -> dict:
        """The batch dict of the pairs at ``index`` (B,): src, src_mask (B, S); tokens, tgt_mask, targets (B, T),
        int64 and bool. S and T are the longest source and target among them, or both ``length`` (fixed shapes)."""
        index = np.asarray(index)
        S, T = int(self.src_len[index].max()), int(self.tgt_len[index].max())
        if length is not None:
            if max(S, T) > length:
                raise ValueError(f"length={length} is shorter than the batch's longest pair ({max(S, T)} tokens)")
            S = T = int(length)
        B = len(index)
        src = np.full((B, S), self.pad_id, dtype=np.int64)  # (B, S)
        tokens = np.full((B, T), self.pad_id, dtype=np.int64)  # (B, T)
        targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)  # (B, T)
        s, t = min(S, self.src.shape[1]), min(T, self.tokens.shape[1])  # the stored columns that fit
        src[:, :s], tokens[:, :t], targets[:, :t] = self.src[index, :s], self.tokens[index, :t], self.targets[index, :t]
        return dict(src=src, src_mask=np.arange(S)[None, :] < self.src_len[index, None],  # (B, S) True: a real token
                    tokens=tokens, tgt_mask=np.arange(T)[None, :] < self.tgt_len[index, None],  # (B, T)
                    targets=targets)


def encode_pairs(records: list[dict], tok: Tokenizer, seq_len: int, source="the records") -> PairExamples:
    """Every record (a dict with "source", "target" and "line", as load_pair_records gives) as a padded row.

    A pair whose source (with eos) or decoder input (bos + target) is longer than seq_len is refused, all such
    pairs at once, in one ValueError naming their lines (``source`` names the file) and the --seq_len that would fit
    them all."""
    check_int("seq_len", seq_len)
    encoded = [encode_pair(tok, r["source"], r["target"]) for r in records]
    too_long, longest = [], 0
    for record, (src, tokens, _) in zip(records, encoded):
        if max(len(src), len(tokens)) > seq_len:
            too_long.append(f"{source}:{record['line']}: source {len(src)} tokens (with eos), target {len(tokens)} "
                            f"tokens (with bos)")
            longest = max(longest, len(src), len(tokens))
    if too_long:
        raise ValueError(_many_problems(f"{len(too_long)} pair(s) longer than seq_len={seq_len} tokens (shorten "
                                        f"them or train with --seq_len={longest} or more)", too_long))
    N = len(encoded)
    src_len = np.array([len(s) for s, _, _ in encoded], dtype=np.int64)  # (N,)
    tgt_len = np.array([len(t) for _, t, _ in encoded], dtype=np.int64)  # (N,)
    S, T = int(src_len.max(initial=1)), int(tgt_len.max(initial=1))
    src = np.full((N, S), tok.eos_id, dtype=np.int32)  # (N, S)
    tokens = np.full((N, T), tok.eos_id, dtype=np.int32)  # (N, T)
    targets = np.full((N, T), IGNORE_INDEX, dtype=np.int32)  # (N, T)
    for i, (s, x, y) in enumerate(encoded):
        src[i, :len(s)], tokens[i, :len(x)], targets[i, :len(y)] = s, x, y
    return PairExamples(src, src_len, tokens, targets, tgt_len, np.array([r["line"] for r in records], dtype=np.int64),
                        pad_id=tok.eos_id)


# ----------------------------------------------------------------------------------------------------------
# batches


class PairSampler(StepSampler):
    """Random training pairs (npllm.data.StepSampler's rule over pair indices): B distinct pairs per rank and step,
    a pure function of (seed, step, rank). next_batch() returns the encoder-decoder's batch dict."""

    item_name = "training pairs"
    state_keys = ("batch_size", "seq_len", "world_size", "num_records", "pad")

    def __init__(self, examples: PairExamples, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1, pad: str = "batch"):
        check_int("seq_len", seq_len)
        self.pad = check_choice("pad", pad, PADS)
        longest = max(int(examples.src_len.max()), int(examples.tgt_len.max()))
        if longest > seq_len:
            raise ValueError(f"the pairs hold up to {longest} tokens a side but seq_len={seq_len}; encode them with "
                             f"this seq_len")
        self.examples = examples
        self.num_records = len(examples)
        super().__init__(self.num_records, batch_size, seq_len, seed, rank, world_size)

    def rows(self, indices: np.ndarray) -> dict:
        """{"src", "src_mask", "tokens", "tgt_mask", "targets"} of the chosen pairs (B,)."""
        return self.examples.batch(indices, self.seq_len if self.pad == "fixed" else None)


def pair_eval_batches(examples: PairExamples, batch_size: int, max_batches: int | None = None,
                      length: int | None = None) -> Iterator[dict]:
    """Validation batches: the pairs in file order, B at a time (the last batch may be smaller), at most max_batches
    of them (None: all); each padded to its own longest pair, or to ``length``."""
    check_int("batch_size", batch_size)
    if max_batches is not None:
        check_int("max_batches", max_batches)
    num_batches = -(-len(examples) // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    for b in range(num_batches):
        yield examples.batch(np.arange(b * batch_size, min((b + 1) * batch_size, len(examples))), length)


# ----------------------------------------------------------------------------------------------------------
# what the trainer loads


def load_pairs_data(path, tokenizer: Tokenizer, seq_len: int) -> TrainingData:
    """A JSONL file of pairs as the trainer's data (``npllm.data.TrainingData``, unit "pairs").

    train / val are PairExamples (split_records' fixed 10%); ``dir`` is the file's absolute path; ``sft`` holds what
    a checkpoint records about the file (path, sha256 of its bytes, pair counts) so that a resume can check it."""
    records = load_pair_records(path)
    examples = encode_pairs(records, tokenizer, seq_len, source=Path(path).resolve())
    return records_file_data(path, examples, tokenizer, "pairs")
