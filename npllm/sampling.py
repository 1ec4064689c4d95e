"""Choosing the next token from one row of logits: greedy, temperature, top-k, top-p.

Everything here runs on the host in float64 NumPy on a single logits row (V,): the model may run in float32 on a
GPU, but the choice of one token out of V is cheap, and doing it in float64 keeps the probabilities that the
filters compare (top-p's running mass) free of float32 rounding. The rules, applied in this order
(the order Hugging Face ``generate`` uses):

    temperature == 0   greedy: the index of the largest logit (the lowest index among equal maxima); nothing else
                       is applied and no random number is drawn.
    temperature T > 0  probs = softmax(logits / T).
    top_k = k > 0      keep the k tokens of highest probability (ties at the k-th place go to the lower token id);
                       top_k = 0 keeps all V. The kept probabilities are renormalised.
    top_p = p < 1      nucleus: sort the (top-k) probabilities in decreasing order and keep the smallest prefix whose
                       mass is >= p; that prefix always holds at least the most likely token. top_p = 1 keeps all.
                       The kept probabilities are renormalised.
    draw               one uniform number u in [0, 1) from the caller's ``np.random.Generator``; the token is the
                       first kept token whose cumulative (renormalised) probability exceeds u (inverse CDF).

Docs: docs/generation.md
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import asnumpy
from .checks import check_int, check_number


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 is greedy; > 0 divides the logits before the softmax
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of most likely tokens with mass >= top_p; 1 keeps all

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_sampling(temperature, top_k, top_p) -> None:
    """Raise a one-line ValueError naming the bad value and what is allowed."""
    check_number("temperature", temperature, 0)  # 0 is greedy
    check_int("top_k", top_k, 0)  # 0 keeps every token
    check_number("top_p", top_p, 0, 1, low_open=True)  # 1 keeps every token


def log_softmax(logits) -> np.ndarray:
    """log softmax of a row (V,) or rows (N, V), in float64 on the host."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)  # stable: the largest entry becomes 0
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def greedy_token(logits) -> int:
    """Index of the largest logit; the lowest index among equal maxima (np.argmax's rule)."""
    return int(np.argmax(np.asarray(logits, dtype=np.float64)))


def order_by_probability(probs) -> np.ndarray:
    """Token ids sorted by decreasing probability; equal probabilities keep increasing token id (stable sort)."""
    return np.argsort(-probs, kind="stable")  # (V,)


def sampling_distribution(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """The tokens a sampler may emit and their probabilities, after temperature, top-k and top-p.

    logits (V,). Returns (kept_ids (K,) int64, kept_probs (K,) float64 summing to 1), kept_ids in decreasing
    probability. temperature must be > 0 here (greedy takes no distribution).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("temperature=0 is greedy decoding and has no sampling distribution; use greedy_token")
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 1:
        raise ValueError(f"logits must be one row (V,), got shape {z.shape}")
    probs = np.exp(log_softmax(z / temperature))  # (V,)
    order = order_by_probability(probs)  # (V,) most likely first
    if 0 < top_k < order.size:
        order = order[:top_k]  # (k,)
    kept = probs[order] / probs[order].sum()  # (K,) renormalised
    if top_p < 1.0:
        mass_before = np.cumsum(kept) - kept  # (K,) mass of the tokens strictly ahead of each one
        n_keep = int(np.count_nonzero(mass_before < top_p))  # the prefix up to the first token reaching top_p
        order, kept = order[:n_keep], kept[:n_keep]  # n_keep >= 1: the first token has mass_before = 0 < top_p
        kept = kept / kept.sum()
    return order.astype(np.int64), kept


def draw(kept_ids, kept_probs, rng: np.random.Generator) -> int:
    """One token from a discrete distribution, by inverse CDF with a single uniform draw u in [0, 1)."""
    cdf = np.cumsum(kept_probs)  # (K,)
    u = rng.random() * cdf[-1]  # scaling by the total guards against a sum of 1 - 1e-16
    index = int(np.searchsorted(cdf, u, side="right"))  # first entry with cdf > u
    # a token of probability 0 never has cdf > u where its predecessor did not; clamp u * total rounding up to total
    index = min(index, int(np.flatnonzero(kept_probs > 0)[-1]))
    return int(kept_ids[index])


def sample_token(logits, rng: np.random.Generator | None, sampling: SamplingConfig) -> int:
    """The next token from one logits row (V,) (NumPy or CuPy, any float dtype) under ``sampling``."""
    row = np.asarray(asnumpy(logits), dtype=np.float64)  # (V,) host float64 copy of the row
    if sampling.greedy:
        return greedy_token(row)
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs an np.random.Generator (rng=None given)")
    ids, probs = sampling_distribution(row, sampling.temperature, sampling.top_k, sampling.top_p)
    return draw(ids, probs, rng)
