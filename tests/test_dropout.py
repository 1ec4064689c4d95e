"""Tests for npllm/layers/dropout.py: inverted dropout with counter-based (Philox4x64-10) masks.

Derivation: docs/derivations/dropout.md. The random function is checked against Random123's published known-answer
vectors and against NumPy's own Philox bit generator; the mask against its definition (keep rate, mean, keys) and
against slicing: any rank's rows, heads, positions or columns get exactly the slice of the whole mask.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.backend import asnumpy
from npllm.layers.dropout import (
    MASK64,
    SITES,
    dropout_backward,
    dropout_forward,
    dropout_key,
    keep_mask,
    philox4x64,
)

KEY = dropout_key(1234, 7, 0, 3, "attn_probs")

# Random123's kat_vectors, "philox4x64 10": counter (4 words), key (2 words) -> output (4 words)
PHILOX4X64_10_KAT = [
    ((0, 0, 0, 0), (0, 0),
     (0x16554D9ECA36314C, 0xDB20FE9D672D0FDC, 0xD7E772CEE186176B, 0x7E68B68AEC7BA23B)),
    ((MASK64,) * 4, (MASK64,) * 2,
     (0x87B092C3013FE90B, 0x438C3C67BE8D0224, 0x9CC7D7C69CD777B6, 0xA09CAEBF594F0BA0)),
    ((0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0, 0x082EFA98EC4E6C89),
     (0x452821E638D01377, 0xBE5466CF34E90C6C),
     (0xA528F45403E61D95, 0x38C72DBD566E9788, 0xA5A1610E72FD18B5, 0x57BD43B5E52B7FE6)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX4X64_10_KAT)
def test_philox_known_answers(backend, counter, key, expected):
    words = philox4x64(tuple(backend.asarray([c], dtype=np.uint64) for c in counter), key)
    assert [int(asnumpy(w)[0]) for w in words] == list(expected)


@settings(max_examples=10, deadline=None)
@given(key=st.tuples(st.integers(0, MASK64), st.integers(0, MASK64)), counter=st.integers(0, 2**256 - 100))
def test_philox_equals_numpys_philox_bit_generator(key, counter):
    # NumPy's Philox increments its 256-bit counter before each block of four outputs
    raw = np.random.Philox(counter=counter, key=key[0] + (key[1] << 64)).random_raw(4 * 5)  # 5 blocks
    blocks = [counter + 1 + j for j in range(5)]
    words = tuple(np.array([(c >> (64 * w)) & MASK64 for c in blocks], dtype=np.uint64) for w in range(4))
    out = np.stack(philox4x64(words, key), axis=1).reshape(-1)  # (5 blocks * 4 words,)
    np.testing.assert_array_equal(out, raw)


def test_rate_zero_is_the_identity_itself(backend):
    x = backend.asarray(np.random.default_rng(0).standard_normal((2, 3, 4)))
    y, cache = dropout_forward(x, 0.0, KEY)
    assert y is x and cache is None
    dy = backend.asarray(np.random.default_rng(1).standard_normal((2, 3, 4)))
    dx, grads = dropout_backward(dy, cache)
    assert dx is dy and grads == {}
    y, _ = dropout_forward(x, 0, None)  # no key is needed when nothing is drawn
    assert y is x


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_empirical_keep_rate(rate):
    n = 1 << 20
    mask = keep_mask((16, 4, 128, 128), rate, KEY)
    assert mask.dtype == bool and mask.size == n
    sigma = math.sqrt(rate * (1 - rate) / n)  # binomial standard deviation of the kept fraction
    assert abs(mask.mean() - (1 - rate)) < 5 * sigma
    # and per column lane (each 32-bit lane of the Philox output): no lane is biased
    by_lane = mask.reshape(-1, 8).mean(axis=0)
    assert np.abs(by_lane - (1 - rate)).max() < 5 * math.sqrt(rate * (1 - rate) / (n / 8))


def test_the_mean_of_y_is_x():
    # E[y] = x * E[mask] / (1 - rate) = x: average y over K independent keys (steps) and compare with x, in units of
    # the standard error |x| sqrt(rate / ((1 - rate) K)) of each element's average
    rate, K = 0.3, 400
    x = np.random.default_rng(0).standard_normal((50, 40)) + 0.5  # (B, X)
    total = np.zeros_like(x)
    for step in range(K):
        y, _ = dropout_forward(x, rate, dropout_key(5, step, 0, 0, "embed"))
        total += y
    z = (total / K - x) / (np.abs(x) * math.sqrt(rate / ((1 - rate) * K)))  # ~N(0, 1) per element
    assert abs(z.mean()) < 5 / math.sqrt(z.size)
    assert 0.9 < z.std() < 1.1


def test_kept_entries_are_scaled_and_the_dtype_is_kept(backend):
    x = backend.asarray(np.random.default_rng(3).standard_normal((4, 6, 10)).astype(np.float32))
    y, (mask, scale) = dropout_forward(x, 0.25, KEY)
    assert y.dtype == np.float32 and mask.dtype == bool and mask.shape == x.shape and scale == 1 / 0.75
    y, x, mask = asnumpy(y), asnumpy(x), asnumpy(mask)
    np.testing.assert_array_equal(y[~mask], 0)
    np.testing.assert_array_equal(y[mask], x[mask] * np.float32(1 / 0.75))


def test_same_key_same_mask_and_every_key_component_matters():
    shape, rate = (4, 3, 8, 16), 0.5
    base = keep_mask(shape, rate, dropout_key(1, 2, 3, 4, "attn_probs"))
    np.testing.assert_array_equal(base, keep_mask(shape, rate, dropout_key(1, 2, 3, 4, "attn_probs")))
    others = [dropout_key(2, 2, 3, 4, "attn_probs"), dropout_key(1, 3, 3, 4, "attn_probs"),
              dropout_key(1, 2, 4, 4, "attn_probs"), dropout_key(1, 2, 3, 5, "attn_probs"),
              dropout_key(1, 2, 3, 4, "attn_out")]
    assert len({dropout_key(1, 2, 3, 4, "attn_probs"), *others}) == 6
    for key in others:
        differ = (keep_mask(shape, rate, key) != base).mean()  # two independent masks disagree with prob. 1/2
        assert abs(differ - 0.5) < 5 * math.sqrt(0.25 / base.size)


def test_the_key_and_a_mask_are_pinned():
    # bit-exact resumption across versions of this code needs the same bits for the same (seed, step, ...): if this
    # fails, the key derivation or the lane layout changed, and runs saved before no longer resume exactly
    assert dropout_key(0, 0, 0, 0, "embed") == (13389267928812574347, 8562478156071359259)
    bits = keep_mask((1, 2, 16), 0.5, dropout_key(0, 0, 0, 0, "embed"))
    assert "".join("1" if b else "0" for b in bits.reshape(-1)) == "00101001011100111010100011011011"


split_cases = dict(
    B=st.integers(1, 4), H=st.integers(1, 4), T=st.integers(1, 5), X=st.integers(1, 21), data=st.data(),
    rate=st.sampled_from([0.1, 0.5]),
)


@settings(max_examples=20, deadline=None)
@given(**split_cases)
def test_rows_heads_positions_and_columns_are_slices_of_the_full_mask(backend, B, H, T, X, data, rate):
    full = asnumpy(keep_mask((B, H, T, X), rate, KEY, backend))  # what one process draws for everything
    b0 = data.draw(st.integers(0, B - 1), label="b0")
    b1 = data.draw(st.integers(b0 + 1, B), label="b1")
    h0 = data.draw(st.integers(0, H - 1), label="h0")
    h1 = data.draw(st.integers(h0 + 1, H), label="h1")
    c0 = data.draw(st.integers(0, X - 1), label="c0")
    c1 = data.draw(st.integers(c0 + 1, X), label="c1")
    # a data-parallel rank's rows, a tensor-parallel rank's heads, a shard of columns (hidden units, or a key tile)
    part = keep_mask((b1 - b0, h1 - h0, T, c1 - c0), rate, KEY, backend, row_offset=b0, head_offset=h0, col_offset=c0)
    np.testing.assert_array_equal(asnumpy(part), full[b0:b1, h0:h1, :, c0:c1])
    # positions: the mask of the first T' positions does not depend on how many follow
    t1 = data.draw(st.integers(1, T), label="t1")
    np.testing.assert_array_equal(asnumpy(keep_mask((B, H, t1, X), rate, KEY, backend)), full[:, :, :t1])
    # a (B, T, X) activation is the head-0 slice; a (B, X) one the position-0 slice of that
    np.testing.assert_array_equal(asnumpy(keep_mask((B, T, X), rate, KEY, backend)), full[:, 0])
    np.testing.assert_array_equal(asnumpy(keep_mask((B, X), rate, KEY, backend)), full[:, 0, 0])


def test_dropout_forward_of_a_slice_is_the_slice_of_dropout_forward():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 4, 5, 7))  # (B, NH, T, Tk): attention probabilities, say
    y, _ = dropout_forward(x, 0.2, KEY)
    for b0, b1, h0, h1 in ((0, 3, 0, 4), (3, 6, 0, 2), (3, 6, 2, 4)):  # dp = 2 ranks x tp = 2 ranks
        y_part, _ = dropout_forward(x[b0:b1, h0:h1], 0.2, KEY, row_offset=b0, head_offset=h0)
        np.testing.assert_array_equal(y_part, y[b0:b1, h0:h1])


@settings(max_examples=10, deadline=None)
@given(shape=st.sampled_from([(3, 5), (2, 3, 4), (2, 2, 3, 3)]), rate=st.sampled_from([0.1, 0.5, 0.8]),
       seed=st.integers(0, 2**32 - 1))
def test_gradient_with_a_fixed_mask(backend, grad_check, shape, rate, seed):
    key = dropout_key(seed, 0, 0, 0, "mlp_hidden")
    x = backend.asarray(np.random.default_rng(seed).standard_normal(shape))

    def forward(p, x):
        return dropout_forward(x, rate, key)

    errors = grad_check.layer(f"dropout (rate={rate})", forward, dropout_backward, {}, x, seed=seed)
    assert set(errors) == {"x"}


@pytest.mark.parametrize("rate", [1.0, -0.1, float("nan"), "0.1", None])
def test_bad_rate_is_refused(rate):
    with pytest.raises(ValueError, match="rate="):
        dropout_forward(np.ones((2, 2)), rate, KEY)


@pytest.mark.parametrize("key", [None, (1,), (1, 2, 3), (-1, 0), (0, 2**64), [1, 2], (1.0, 2)])
def test_bad_key_is_refused(key):
    with pytest.raises(ValueError, match="key="):
        dropout_forward(np.ones((2, 2)), 0.5, key)


def test_bad_shape_offsets_and_key_parts_are_refused():
    with pytest.raises(ValueError, match="shape"):
        dropout_forward(np.ones((2, 2, 2, 2, 2)), 0.5, KEY)
    with pytest.raises(ValueError, match="shape"):
        dropout_forward(np.ones(4), 0.5, KEY)
    with pytest.raises(ValueError, match="row_offset=-1"):
        dropout_forward(np.ones((2, 2)), 0.5, KEY, row_offset=-1)
    with pytest.raises(ValueError, match="step=-3"):
        dropout_key(0, -3, 0, 0, "embed")
    with pytest.raises(ValueError, match="seed=18446744073709551616"):
        dropout_key(2**64, 0, 0, 0, "embed")
    for site in ("", "Attn", "attn probs", 3):
        with pytest.raises(ValueError, match="site="):
            dropout_key(0, 0, 0, 0, site)
    assert all(isinstance(dropout_key(0, 0, 0, 0, site), tuple) for site in SITES)
