"""The masked-language-model objective (BERT's pre-training task): which positions to predict, and what the model sees
there. The model is npllm/models/bert.py; docs/bert.md explains the objective, docs/derivations/mlm.md its numbers.

From a batch of token rows, every real position (key_mask True, and not a special token such as [CLS], [SEP] or the
EOS between documents) is chosen independently with probability MLM_PROBABILITY = 0.15 (a Bernoulli draw per
position, as Hugging Face's DataCollatorForLanguageModeling does; the number chosen in a row is Binomial, not fixed).
A chosen position becomes

    [MASK] (spec.mask_id)                                with probability 0.8
    a random ordinary token, uniform on [random_low, random_high)   0.1
    itself (unchanged)                                   0.1

and its target is the original token; every other target is IGNORE_INDEX (-100), so the loss is the cross-entropy
at the chosen positions only. A row may get no chosen position (with n candidates, probability 0.85^n: 1.3e-9 for
bert-nano's 126); it then simply adds no target, and the batch's loss is the mean over the other rows' chosen
positions (a batch with none at all has loss 0 and zero gradients, as every loss here). Nothing is forced.

Where the draws come from. Every draw is a pure function of (key, global row, position), from the counter-based
Philox stream that dropout uses (npllm/layers/dropout.py):

    key     = dropout_key(seed, step, 0, 0, "mlm")        (validation: dropout_key(seed, 0, 0, 0, "mlm_val"))
    words   = philox4x64((0, t, 0, b), key)               four 64-bit words for global row b, position t
    chosen  = low32(words[0])  < round(0.15 * 2^32)       P = 0.15 up to 2^-33
    kind    = high32(words[0]):  < round(0.8 * 2^32) [MASK];  < round(0.9 * 2^32) random;  else unchanged
    random  = random_low + (low32(words[1]) * n) >> 32    n = random_high - random_low: each id has
                                                          probability floor or ceil of 2^32 / n over 2^32
                                                          (relative bias <= n / 2^32)

So a row's masks depend on nothing but the seed, the step and where the row sits in the step's global batch: a
resumed run, a data-parallel run (rank r's rows are r*B ... r*B + B - 1) and a run split into micro-batches all
mask every row exactly as one process does.

    MLMSpec / mlm_spec(cfg, tokenizer)   the ids the objective uses ([CLS], [SEP], [MASK], specials, random range)
    mask_tokens(tokens, key_mask, spec, key, row_offset)   -> (inputs, targets)
    MLMSampler                           training batches: random windows of the token stream, masked by step
    mlm_eval_batches                     fixed validation batches (the same masks at every evaluation)
    load_mlm_data(data_dir, cfg, seq_len)                  the data directory, checked for the encoder
    encode_masked_text(tokenizer, text, spec)              "The [MASK] statement" -> ids, for fill_mask
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .backend import get_array_module
from .checks import check_int, check_number
from .data import BatchSampler, TrainingData, load_token_data
from .layers.dropout import MASK32, dropout_key, philox4x64
from .layers.loss import IGNORE_INDEX
from .models.bert import MLM_PROBABILITY

MASK_SHARE = 0.8  # of the chosen positions: replaced by [MASK]
RANDOM_SHARE = 0.1  # replaced by a random ordinary token (the remaining 0.1 stay unchanged)
TRAIN_SITE, VAL_SITE = "mlm", "mlm_val"  # the Philox key's site names: training and validation masks never coincide
MASK_TEXT = "[MASK]"  # how encode_masked_text's input writes a masked token


@dataclass(frozen=True)
class MLMSpec:
    """The token ids the MLM objective uses."""

    cls_id: int  # [CLS], first in every row (our tokenizers: bos_id)
    sep_id: int  # [SEP], last in every row (eos_id; the EOS between two documents inside a row is the same id)
    mask_id: int  # [MASK] (cfg.mask_id)
    special_ids: tuple[int, ...]  # never chosen (cls, sep, mask and the tokenizer's other specials)
    random_low: int  # a random replacement is uniform on [random_low, random_high): the tokenizer's ordinary ids,
    random_high: int  # neither its specials nor the model's padding rows beyond the tokenizer's vocabulary
    probability: float = MLM_PROBABILITY  # the chance that a candidate position is chosen

    def __post_init__(self):
        for name in ("cls_id", "sep_id", "mask_id", "random_low"):
            check_int(name, getattr(self, name), 0)
        check_int("random_high", self.random_high, self.random_low + 1)
        check_number("probability", self.probability, 0.0, 1.0)
        for i in self.special_ids:
            check_int("special id", i, 0)
        if not {self.cls_id, self.sep_id, self.mask_id} <= set(self.special_ids):
            raise ValueError(f"special_ids={self.special_ids} must hold cls_id={self.cls_id}, sep_id={self.sep_id} and "
                             f"mask_id={self.mask_id}")
        if self.random_low <= self.mask_id < self.random_high:
            raise ValueError(f"mask_id={self.mask_id} lies in the random range [{self.random_low}, "
                             f"{self.random_high}); the random replacements must be ordinary tokens")


def mlm_spec(cfg, tokenizer, probability: float = MLM_PROBABILITY) -> MLMSpec:
    """The MLMSpec of an encoder ``cfg`` on ``tokenizer``: [CLS] = bos_id, [SEP] = eos_id, [MASK] = cfg.mask_id,
    random replacements uniform over the ids above the tokenizer's specials up to its vocab_size.

    cfg.mask_id must be a token the tokenizer never emits: its unk id when encode never produces it (our BPE's byte
    fallback; bert-nano's 0), or a model row beyond the tokenizer's vocabulary. ValueError otherwise.
    """
    if cfg.mask_id is None:
        raise ValueError("the MLM objective needs cfg.mask_id (arch='encoder')")
    specials = {tokenizer.bos_id, tokenizer.eos_id} | ({tokenizer.unk_id} - {None})
    mask_id = int(cfg.mask_id)
    if mask_id in (tokenizer.bos_id, tokenizer.eos_id) or (mask_id < tokenizer.vocab_size
                                                            and mask_id != tokenizer.unk_id):
        raise ValueError(f"mask_id={mask_id} is an id the tokenizer uses; use its unk id ({tokenizer.unk_id}, never "
                         f"emitted with byte fallback) or a model row in [{tokenizer.vocab_size}, {cfg.vocab_size})")
    low = max(specials) + 1  # our tokenizers put their specials first
    if low >= tokenizer.vocab_size:
        raise ValueError(f"the tokenizer has no ordinary ids above its specials {sorted(specials)}")
    return MLMSpec(cls_id=tokenizer.bos_id, sep_id=tokenizer.eos_id, mask_id=mask_id,
                   special_ids=tuple(sorted(specials | {mask_id})), random_low=low, random_high=tokenizer.vocab_size,
                   probability=probability)


def mlm_key(seed: int, step: int) -> tuple[int, int]:
    """The Philox key of the training masks of ``step``."""
    return dropout_key(seed, step, 0, 0, TRAIN_SITE)


def _threshold(xp, share: float):
    return xp.uint64(min(round(share * 2.0**32), 2**32))  # P(lane < threshold) = threshold / 2^32


def mask_tokens(tokens, key_mask, spec: MLMSpec, key, row_offset: int = 0):
    """(inputs, targets), each (B, T), of token rows (B, T) whose first row is row ``row_offset`` of the global batch:
    the module docstring's rule with ``key`` (``mlm_key(seed, step)``). key_mask (B, T) bool (None: all True):
    padding is never chosen. inputs has the tokens' dtype; targets is int64 with IGNORE_INDEX where not chosen.
    Works on NumPy or CuPy arrays alike."""
    xp = get_array_module(tokens)
    tokens = xp.asarray(tokens)  # (B, T)
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be an integer (B, T) array; got {tokens.dtype} {tuple(tokens.shape)}")
    B, T = tokens.shape
    key_mask = xp.ones((B, T), dtype=bool) if key_mask is None else xp.asarray(key_mask)  # (B, T)
    if key_mask.shape != (B, T) or key_mask.dtype != bool:
        raise ValueError(f"key_mask must be a boolean (B, T) = ({B}, {T}) array; got {key_mask.dtype} "
                         f"{tuple(key_mask.shape)}")
    row_offset = check_int("row_offset", row_offset, 0)
    t = xp.arange(T, dtype=xp.uint64)[None, :]  # (1, T) position
    b = xp.arange(row_offset, row_offset + B, dtype=xp.uint64)[:, None]  # (B, 1) global row
    zero = xp.zeros((1, 1), dtype=xp.uint64)
    words = philox4x64((zero, t, zero, b), key)  # 4 x (B, T)
    choose_lane = words[0] & xp.uint64(MASK32)  # (B, T)
    kind_lane = words[0] >> xp.uint64(32)  # (B, T)
    random_lane = words[1] & xp.uint64(MASK32)  # (B, T)

    candidate = key_mask & ~xp.isin(tokens, xp.asarray(spec.special_ids))  # (B, T) real, ordinary positions
    chosen = candidate & (choose_lane < _threshold(xp, spec.probability))  # (B, T)
    to_mask = chosen & (kind_lane < _threshold(xp, MASK_SHARE))  # (B, T)
    to_random = chosen & ~to_mask & (kind_lane < _threshold(xp, MASK_SHARE + RANDOM_SHARE))  # (B, T)
    n = spec.random_high - spec.random_low
    random_ids = (random_lane * xp.uint64(n)) >> xp.uint64(32)  # (B, T) in [0, n): the product fits in 64 bits
    random_ids = random_ids.astype(np.int64) + spec.random_low  # (B, T)

    inputs = xp.where(to_mask, spec.mask_id, xp.where(to_random, random_ids, tokens)).astype(tokens.dtype)  # (B, T)
    targets = xp.where(chosen, tokens, IGNORE_INDEX).astype(np.int64)  # (B, T)
    return inputs, targets


def wrap_rows(windows, spec: MLMSpec) -> dict:
    """Windows (B, T-2) of the token stream as unmasked encoder rows [CLS] window [SEP]: {"tokens" (B, T) int64,
    "segments" (B, T) zeros, "key_mask" (B, T) all True}."""
    B = windows.shape[0]
    tokens = np.concatenate([np.full((B, 1), spec.cls_id), np.asarray(windows, dtype=np.int64),
                             np.full((B, 1), spec.sep_id)], axis=1)  # (B, T)
    return {"tokens": tokens, "segments": np.zeros_like(tokens), "key_mask": np.ones(tokens.shape, dtype=bool)}


def masked_batch(rows: dict, spec: MLMSpec, key, row_offset: int) -> dict:
    """The unmasked rows of ``wrap_rows`` with their MLM inputs and targets: the encoder batch dict."""
    inputs, targets = mask_tokens(rows["tokens"], rows["key_mask"], spec, key, row_offset)
    return {**rows, "tokens": inputs, "targets": targets}


class MLMSampler(BatchSampler):
    """Training batches for BERT: B random windows of T-2 consecutive tokens of the stream per rank and step
    (BatchSampler's starts, a pure function of (seed, step, rank)), each wrapped as [CLS] window [SEP] (segments 0,
    key_mask all True: no padding), masked by ``mask_tokens`` with key mlm_key(seed, step) at global rows
    rank * B ... rank * B + B - 1.

    ``sample(step)`` / ``next_batch()`` give the encoder batch dict {"tokens", "segments", "key_mask", "targets"}
    (``rows(starts)``: the unmasked rows). The window starts are drawn as BatchSampler draws them, so one process
    with batch world_size * B sees exactly the rows and masks that world_size ranks see together.
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int, spec: MLMSpec, rank: int = 0,
                 world_size: int = 1):
        check_int("seq_len", seq_len, 3)  # [CLS], at least one token, [SEP]
        super().__init__(tokens, batch_size, seq_len, seed, rank, world_size)
        self.spec = spec

    def rows(self, starts: np.ndarray) -> dict:
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len - 2)]  # (B, T-2)
        return wrap_rows(windows, self.spec)

    def sample(self, step: int) -> dict:
        rows = super().sample(step)  # the unmasked rows of this rank's starts
        return masked_batch(rows, self.spec, mlm_key(self.seed, step), self.rank * self.batch_size)


def mlm_eval_batches(tokens, batch_size: int, seq_len: int, spec: MLMSpec, seed: int = 0,
                     max_batches: int | None = None) -> Iterator[dict]:
    """Fixed validation batches: row k is [CLS] tokens[k(T-2) : (k+1)(T-2)] [SEP] (the rows tile the stream), masked
    with key dropout_key(seed, 0, 0, 0, "mlm_val") at global row k. Every evaluation (and every run with the same
    seed, whatever its training seed or batch size) scores the same positions with the same inputs. The last batch
    may have fewer rows; at most max_batches batches (None: all)."""
    check_int("batch_size", batch_size)
    check_int("seq_len", seq_len, 3)
    if max_batches is not None:
        check_int("max_batches", max_batches)
    W = seq_len - 2
    num_rows = len(tokens) // W
    if num_rows < 1:
        raise ValueError(f"the data has {len(tokens)} tokens; seq_len={seq_len} needs at least {W}")
    num_batches = -(-num_rows // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    key = dropout_key(seed, 0, 0, 0, VAL_SITE)
    for i in range(num_batches):
        first = i * batch_size
        rows = np.arange(first, min(first + batch_size, num_rows))  # (B,)
        windows = tokens[rows[:, None] * W + np.arange(W)]  # (B, T-2)
        yield masked_batch(wrap_rows(windows, spec), spec, key, first)


def load_mlm_data(data_dir, cfg, seq_len: int) -> TrainingData:
    """A prepared data directory (npllm.data) for an encoder ``cfg``: TrainingData(unit "tokens") whose train and
    val are the token streams, after ``load_token_data``'s checks and ``mlm_spec``'s (cfg.mask_id must be an id
    the tokenizer never emits). The sampler is MLMSampler(data.train, ..., spec=mlm_spec(cfg, data.tokenizer))."""
    if cfg.arch != "encoder":
        raise ValueError(f"the MLM objective is for arch='encoder' (BERT); got arch={cfg.arch!r}")
    check_int("seq_len", seq_len, 3)
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} is not allowed; use at most max_seq_len={cfg.max_seq_len}")
    data = load_token_data(data_dir, cfg.vocab_size, seq_len)
    mlm_spec(cfg, data.tokenizer)  # the ids are checked now, not at the first step
    return data


def encode_masked_text(tokenizer, text: str, spec: MLMSpec) -> np.ndarray:
    """The ids (T,) of ``text`` with every "[MASK]" as spec.mask_id, as one row [CLS] ... [SEP].

    A space just before a [MASK] is taken to belong to the masked word ("The [MASK] statement" masks the token
    " if", space included, as our BPE tokenizer splits text), so it is not encoded itself."""
    pieces = text.split(MASK_TEXT)
    if len(pieces) < 2:
        raise ValueError(f"text={text!r} has no {MASK_TEXT}; write {MASK_TEXT} where the model should fill in a token")
    ids = [spec.cls_id]
    for i, piece in enumerate(pieces):
        if i < len(pieces) - 1:
            piece = piece.rstrip(" ")
        ids += tokenizer.encode(piece) if piece else []
        if i < len(pieces) - 1:
            ids.append(spec.mask_id)
    return np.array(ids + [spec.sep_id], dtype=np.int64)
