"""Tests for npllm/sampling.py: greedy, temperature, top-k and top-p, each against an independent computation.

The allowed sets are computed here from their definitions (docs/generation.md), not with the module's code:
  top-k: token i is allowed when fewer than k tokens rank ahead of it, "ahead" meaning a larger logit, or an equal
         logit and a lower id;
  top-p: token i (of the top-k set) is allowed when the probability mass of the tokens ranked ahead of it is < p.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.sampling import (SamplingConfig, check_sampling, draw, greedy_token, log_softmax, sample_token,
                            sampling_distribution)


def softmax_reference(logits, temperature):
    z = [x / temperature for x in logits]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    total = math.fsum(e)
    return [x / total for x in e]


def ranks_ahead(values):
    """For each index i: how many indices rank ahead of it (a larger value, or an equal value and a lower index)."""
    n = len(values)
    return [sum(1 for j in range(n) if values[j] > values[i] or (values[j] == values[i] and j < i)) for i in range(n)]


def allowed_set(logits, temperature, top_k, top_p):
    """The tokens a sampler may emit, from the definitions alone."""
    probs = softmax_reference(list(map(float, logits)), temperature)
    ahead = ranks_ahead(probs)
    allowed = [i for i in range(len(probs)) if top_k == 0 or ahead[i] < top_k]
    if top_p < 1.0:
        mass = math.fsum(probs[i] for i in allowed)
        renormalised = {i: probs[i] / mass for i in allowed}
        allowed = [i for i in allowed
                   if math.fsum(renormalised[j] for j in allowed if ahead[j] < ahead[i]) < top_p]
    return set(allowed)


logit_rows = st.tuples(st.integers(2, 40), st.integers(0, 2**32 - 1), st.sampled_from(["normal", "ties"]))


def make_logits(V, seed, kind):
    rng = np.random.default_rng(seed)
    if kind == "ties":  # few distinct values, so the k-th place is often shared
        return rng.integers(-2, 3, size=V).astype(np.float64)
    return rng.standard_normal(V) * 3.0


@settings(max_examples=25, deadline=None)
@given(row=logit_rows, top_k=st.integers(0, 45), temperature=st.floats(0.2, 3.0))
def test_top_k_keeps_exactly_the_k_most_likely(row, top_k, temperature):
    logits = make_logits(*row)
    ids, probs = sampling_distribution(logits, temperature, top_k, 1.0)
    assert set(ids.tolist()) == allowed_set(logits, temperature, top_k, 1.0)
    assert len(ids) == (min(top_k, len(logits)) if top_k else len(logits))
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-12)
    for seed in range(50):  # many seeds: never a token outside the set
        token = sample_token(logits, np.random.default_rng(seed), SamplingConfig(temperature, top_k, 1.0))
        assert token in set(ids.tolist())


@settings(max_examples=25, deadline=None)
@given(row=logit_rows, top_p=st.floats(0.01, 1.0), top_k=st.integers(0, 10), temperature=st.floats(0.2, 3.0))
def test_top_p_keeps_the_smallest_prefix_reaching_p(row, top_p, top_k, temperature):
    logits = make_logits(*row)
    ids, probs = sampling_distribution(logits, temperature, top_k, top_p)
    allowed = allowed_set(logits, temperature, top_k, top_p)
    assert set(ids.tolist()) == allowed
    assert len(ids) >= 1
    # the prefix is minimal: its mass reaches top_p and dropping its last token falls short
    full = np.array(softmax_reference(list(logits), temperature))
    k_set = allowed_set(logits, temperature, top_k, 1.0)
    mass_k = math.fsum(full[i] for i in k_set)
    kept_mass = math.fsum(full[i] for i in ids) / mass_k
    without_last = math.fsum(full[i] for i in ids[:-1]) / mass_k
    assert kept_mass >= top_p or len(ids) == len(k_set)
    assert without_last < top_p
    for seed in range(50):
        token = sample_token(logits, np.random.default_rng(seed), SamplingConfig(temperature, top_k, top_p))
        assert token in allowed


def test_top_p_keeps_the_most_likely_token_even_for_tiny_p():
    logits = np.array([0.0, 5.0, 1.0, 4.9])
    ids, probs = sampling_distribution(logits, 1.0, 0, 1e-9)
    assert ids.tolist() == [1] and probs.tolist() == [1.0]


def test_top_p_worked_example():
    # probs 0.5, 0.3, 0.15, 0.05: p = 0.8 keeps {0, 1} (mass 0.8 reached), p = 0.81 adds token 2
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    assert sampling_distribution(logits, 1.0, 0, 0.79)[0].tolist() == [0, 1]
    assert sampling_distribution(logits, 1.0, 0, 0.81)[0].tolist() == [0, 1, 2]
    ids, probs = sampling_distribution(logits, 1.0, 0, 0.81)
    np.testing.assert_allclose(probs, np.array([0.5, 0.3, 0.15]) / 0.95, rtol=1e-12)
    # a prefix whose mass equals top_p exactly is enough ("mass >= p"): nothing past it is kept
    _, all_probs = sampling_distribution(logits, 1.0, 0, 1.0)
    exactly_two = float(np.cumsum(all_probs)[1])
    assert sampling_distribution(logits, 1.0, 0, exactly_two)[0].tolist() == [0, 1]


def test_temperature_scales_logits_before_softmax():
    logits = np.array([1.0, 2.0, 0.5, -1.0])
    for temperature in (0.5, 1.0, 2.0):
        ids, probs = sampling_distribution(logits, temperature, 0, 1.0)
        expected = np.array(softmax_reference(list(logits), temperature))
        np.testing.assert_allclose(probs, expected[ids], rtol=1e-12)


def test_draw_frequencies_match_the_distribution():
    logits = np.log([0.1, 0.2, 0.3, 0.4, 1e-3])
    sampling = SamplingConfig(temperature=1.0, top_k=4)
    rng = np.random.default_rng(0)
    counts = np.bincount([sample_token(logits, rng, sampling) for _ in range(20000)], minlength=5)
    assert counts[4] == 0  # cut by top-k
    # binomial standard deviation is at most sqrt(0.25 / 20000) = 0.0035; allow 5 of them
    np.testing.assert_allclose(counts[:4] / 20000, [0.1, 0.2, 0.3, 0.4], atol=0.018)


def test_draw_never_picks_a_zero_probability_token():
    ids = np.arange(6)
    probs = np.array([0.0, 0.5, 0.0, 0.5, 0.0, 0.0])
    for seed in range(300):
        assert draw(ids, probs, np.random.default_rng(seed)) in (1, 3)


def test_greedy_is_argmax_and_draws_nothing():
    logits = np.array([0.1, 3.0, -2.0, 3.0])
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert sample_token(logits, rng, SamplingConfig(temperature=0.0, top_k=2, top_p=0.5)) == 1  # first of the max
    assert greedy_token(logits) == 1
    assert rng.bit_generator.state == state  # greedy consumed no random numbers


def test_same_seed_same_tokens():
    logits = np.random.default_rng(1).standard_normal(50)
    sampling = SamplingConfig(temperature=1.3, top_k=20, top_p=0.9)
    a = [sample_token(logits, np.random.default_rng(7), sampling) for _ in range(5)]
    b = [sample_token(logits, np.random.default_rng(7), sampling) for _ in range(5)]
    assert a == b


def test_log_softmax_is_normalised_and_stable():
    z = np.array([[1000.0, 1001.0, 999.0], [-5.0, 0.0, 5.0]])
    out = log_softmax(z)
    np.testing.assert_allclose(np.exp(out).sum(axis=-1), 1.0, rtol=1e-14)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("temperature, top_k, top_p, word", [
    (-0.1, 0, 1.0, "temperature"), (float("nan"), 0, 1.0, "temperature"), (float("inf"), 0, 1.0, "temperature"),
    (1.0, -1, 1.0, "top_k"), (1.0, 2.5, 1.0, "top_k"), (1.0, 0, 0.0, "top_p"), (1.0, 0, 1.5, "top_p"),
    (1.0, 0, -0.2, "top_p"),
])
def test_bad_sampling_options_raise_one_clear_error(temperature, top_k, top_p, word):
    with pytest.raises(ValueError, match=word):
        check_sampling(temperature, top_k, top_p)
    with pytest.raises(ValueError, match=word):
        SamplingConfig(temperature, top_k, top_p)


def test_greedy_has_no_distribution():
    with pytest.raises(ValueError, match="greedy"):
        sampling_distribution(np.zeros(3), 0.0)
