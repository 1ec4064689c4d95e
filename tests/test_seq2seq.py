"""Tests for npllm/models/seq2seq.py: the encoder-decoder Transformer.

- Oracle: torch.nn.Transformer (float64, dropout 0) holding the same weights, with the embeddings, sqrt(C) scale,
  sinusoidal positions and head written here in torch: logits, loss and every gradient agree to <= 1e-9 relative
  (||ours - torch|| / ||torch|| per tensor; measured ~1e-15, float64 rounding), post-norm and norm_first, ReLU and
  GELU, shared/tied and separate/untied embeddings, padded sources and targets.
- Finite differences (the grad_check fixture: five-point stencil, h = 3e-4, bound 1e-6) of every parameter of tiny
  models drawn by hypothesis with padding patterns, and with dropout on under a fixed mask (the same Dropout in f
  and in the backward). The exact (erf) GELU there: a finite difference that steps across ReLU's kink at some
  pre-activation near 0 would be wrong, not the backward; ReLU's backward is checked against torch above.
- The fast paths (cfg.impl = "fast", the default, which every other test here runs) against the reference layers
  (cfg.impl = "reference"), float64: loss and every gradient within 1e-10 of each tensor's largest entry plus 1e-14 of
  the model's largest gradient, sources and targets of 1, 7, 33 and 70 positions (across the flash tiles' edges),
  padding with a sequence all padding, GQA, both norm placements, with dropout on under one fixed Dropout (hidden
  dropout in the fast FFN; the reference attentions where attention dropout is on); cached decoding, greedy and beams.
- Decoder causality, padding invariance (bit for bit), dropout rate 0 == no dropout (bit for bit), the cached decoder
  == the full decoder, beam search with beams=1 == greedy, a beam's log-probabilities == teacher-forced ones, tensor
  parallelism over two threads == one process, parameter counts of the presets.

The parameters are init_params + 0.3 N(0, 1) (the embeddings + N(0, 1/C)): at init the norms are exactly 1 and the
biases 0, which would let a transposed bias or a missing gain term pass. The finite-difference checks go along 3 (2
with dropout) random directions per parameter tensor rather than entry by entry, to keep the file under a minute (a
forward of the tiny model takes ~6 ms, ~27 ms with the twelve dropout sites' Philox masks).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.config import ModelConfig, get_preset
from npllm.layers.dropout import Dropout
from npllm.layers.loss import IGNORE_INDEX
from npllm.models import (
    accumulate_loss_and_grads,
    flops_per_token,
    init_params,
    num_params,
    param_shapes,
    split_axes,
)
from npllm.models import seq2seq as s2s
from npllm.parallel.tensor import (
    shard_params,
    unshard_params,
    vocab_parallel_cross_entropy_forward,
)

from tests.helpers import assert_fast_matches_reference, on_thread_ranks

ORACLE_TOL = 1e-9


def tiny_config(**overrides) -> ModelConfig:
    """A small seq2seq-nano without dropout; n_kv_heads follows n_heads unless given."""
    fields = dict(vocab_size=19, dim=16, n_layers=2, n_decoder_layers=2, n_heads=4, ffn_dim=24, max_seq_len=12,
                  dropout=0.0, attn_dropout=0.0)
    fields.update(overrides)
    fields.setdefault("n_kv_heads", fields["n_heads"])
    return get_preset("seq2seq-nano", **fields)


def perturbed_params(cfg, seed):
    """init_params + 0.3 N(0, 1), and the embedding tables + N(0, 1/C): their rows times sqrt(C) have unit variance
    (a unit-scale table times sqrt(C) = 2.8 for C = 8 saturates the first softmax, P = 1 - 6e-9 was seen, and then
    the query weights' gradient is ~1e-7 of the loss: below what finite differences of the loss can resolve)."""
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed=seed % 1000, dtype=np.float64)
    return {name: value + (cfg.dim ** -0.5 if name.endswith("_emb") else 0.3) * rng.standard_normal(value.shape)
            for name, value in params.items()}


def make_batch(cfg, src_lens, tgt_lens, seed):
    """A padded batch: row b has src_lens[b] real source and tgt_lens[b] real target positions; the padded slots
    hold random ids (they must not matter)."""
    rng = np.random.default_rng(seed + 7)
    B, S, T = len(src_lens), max(src_lens), max(tgt_lens)
    src_mask = np.arange(S)[None, :] < np.array(src_lens)[:, None]  # (B, S)
    tgt_mask = np.arange(T)[None, :] < np.array(tgt_lens)[:, None]  # (B, T)
    targets = rng.integers(0, cfg.vocab_size, (B, T))  # (B, T)
    targets[~tgt_mask] = IGNORE_INDEX
    return dict(src=rng.integers(0, cfg.vocab_size, (B, S)), src_mask=src_mask,
                tokens=rng.integers(0, cfg.vocab_size, (B, T)), tgt_mask=tgt_mask, targets=targets)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ----------------------------------------------------------------------------------------------------------------
# the torch.nn.Transformer oracle


def torch_reference(params, batch, cfg):
    """(logits, loss, grads by our names) of torch.nn.Transformer holding ``params``, in float64."""
    torch = pytest.importorskip("torch")
    C, NH, V = cfg.dim, cfg.n_heads, cfg.vocab_size
    with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first was True": a fast path's
        warnings.simplefilter("ignore", UserWarning)  # note, and the fast path is not taken in training anyway
        model = torch.nn.Transformer(
            d_model=C, nhead=NH, num_encoder_layers=cfg.n_layers, num_decoder_layers=cfg.n_decoder_layers,
            dim_feedforward=cfg.ffn_dim, dropout=0.0, activation={"relu": "relu", "gelu_erf": "gelu"}[cfg.mlp],
            layer_norm_eps=cfg.norm_eps, batch_first=True, norm_first=cfg.norm_first).double()
    model.train()  # autograd on and training mode: the plain (not the nested-tensor fast) path

    def t(a):
        return torch.tensor(np.ascontiguousarray(a), dtype=torch.float64)

    slots = {}  # our name -> (torch parameter, how to read our gradient off its gradient)

    def put(torch_param, value):
        with torch.no_grad():
            torch_param.copy_(t(value))

    def attention(mha, pre):
        p = s2s.sub_params(params, pre)
        put(mha.in_proj_weight, np.concatenate([p["wq"].T, p["wk"].T, p["wv"].T]))  # (3C, C)
        put(mha.in_proj_bias, np.concatenate([p["bq"], p["bk"], p["bv"]]))
        put(mha.out_proj.weight, p["wo"].T)
        put(mha.out_proj.bias, p["bo"])
        for k, name in enumerate("qkv"):
            slots[f"{pre}.w{name}"] = (mha.in_proj_weight, lambda g, k=k: g[k * C:(k + 1) * C].T)
            slots[f"{pre}.b{name}"] = (mha.in_proj_bias, lambda g, k=k: g[k * C:(k + 1) * C])
        slots[pre + ".wo"] = (mha.out_proj.weight, lambda g: g.T)
        slots[pre + ".bo"] = (mha.out_proj.bias, lambda g: g)

    def linear(lin, pre, w, b):
        put(lin.weight, params[f"{pre}.{w}"].T)
        put(lin.bias, params[f"{pre}.{b}"])
        slots[f"{pre}.{w}"] = (lin.weight, lambda g: g.T)
        slots[f"{pre}.{b}"] = (lin.bias, lambda g: g)

    def norm(ln, pre):
        put(ln.weight, params[pre + ".w"])
        put(ln.bias, params[pre + ".b"])
        slots[pre + ".w"] = (ln.weight, lambda g: g)
        slots[pre + ".b"] = (ln.bias, lambda g: g)

    for l, layer in enumerate(model.encoder.layers):
        attention(layer.self_attn, f"enc.{l}.attn")
        linear(layer.linear1, f"enc.{l}.mlp", "w1", "b1")
        linear(layer.linear2, f"enc.{l}.mlp", "w2", "b2")
        norm(layer.norm1, f"enc.{l}.attn_norm")
        norm(layer.norm2, f"enc.{l}.mlp_norm")
    norm(model.encoder.norm, "enc_norm")
    for l, layer in enumerate(model.decoder.layers):
        attention(layer.self_attn, f"dec.{l}.self")
        attention(layer.multihead_attn, f"dec.{l}.cross")
        linear(layer.linear1, f"dec.{l}.mlp", "w1", "b1")
        linear(layer.linear2, f"dec.{l}.mlp", "w2", "b2")
        norm(layer.norm1, f"dec.{l}.self_norm")
        norm(layer.norm2, f"dec.{l}.cross_norm")
        norm(layer.norm3, f"dec.{l}.mlp_norm")
    norm(model.decoder.norm, "dec_norm")

    # the embeddings, positions and head (PyTorch's translation tutorial), written here
    tables = {name: t(params[name]).requires_grad_() for name in params if name.endswith("_emb")}
    src_table, tgt_table = (tables[n] for n in s2s.embedding_names(cfg))
    head = tgt_table.T if cfg.tie_embeddings else t(params["lm_head"]).requires_grad_()
    if not cfg.tie_embeddings:
        tables["lm_head"] = head

    def positions(n):
        pos = torch.arange(n, dtype=torch.float64)[:, None]  # (n, 1)
        div = torch.exp(torch.arange(0, C, 2, dtype=torch.float64) * (-math.log(10000.0) / C))  # (C/2,)
        pe = torch.zeros(n, C, dtype=torch.float64)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        return pe  # (n, C)

    scale = math.sqrt(C) if cfg.scale_embeddings else 1.0
    src, tokens = torch.tensor(batch["src"]), torch.tensor(batch["tokens"])
    S, T = src.shape[1], tokens.shape[1]
    x = src_table[src] * scale + positions(S)  # (B, S, C)
    y = tgt_table[tokens] * scale + positions(T)  # (B, T, C)
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True: may not attend
    src_pad, tgt_pad = torch.tensor(~batch["src_mask"]), torch.tensor(~batch["tgt_mask"])  # True: padding
    out = model(x, y, tgt_mask=causal, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
                memory_key_padding_mask=src_pad)  # (B, T, C)
    logits = out @ head  # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(batch["targets"]).reshape(-1),
                                             ignore_index=IGNORE_INDEX)
    loss.backward()
    grads = {name: read(p.grad.numpy()) for name, (p, read) in slots.items()}
    grads.update({name: table.grad.numpy() for name, table in tables.items()})
    return logits.detach().numpy(), loss.item(), grads


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "norm_first"])
@pytest.mark.parametrize("mlp, shared", [("relu", True), ("gelu_erf", False)], ids=["relu-shared-tied",
                                                                                     "gelu-separate-untied"])
def test_agrees_with_torch_nn_transformer(norm_first, mlp, shared):
    cfg = tiny_config(norm_first=norm_first, mlp=mlp, share_embeddings=shared, tie_embeddings=shared)
    params = perturbed_params(cfg, seed=3)
    batch = make_batch(cfg, src_lens=[7, 4, 1], tgt_lens=[5, 2, 6], seed=3)
    want_logits, want_loss, want_grads = torch_reference(params, batch, cfg)
    logits = s2s.forward(params, batch, cfg)
    loss, grads = s2s.batch_loss_and_grads(params, batch, cfg)
    real = batch["tgt_mask"]  # torch's outputs at padded target positions are not defined by the model alone
    assert rel(logits[real], want_logits[real]) <= ORACLE_TOL
    assert abs(loss - want_loss) <= ORACLE_TOL * abs(want_loss)
    assert set(grads) == set(want_grads) == set(params)
    # a key bias adds q . bk to every score of a query's row, which the softmax cancels: its gradient is 0 in exact
    # arithmetic, and both sides hold rounding noise (~1e-16) whose relative difference means nothing
    key_biases = [name for name in params if name.endswith(".bk")]
    assert all(np.abs(grads[n]).max() <= 1e-13 and np.abs(want_grads[n]).max() <= 1e-13 for n in key_biases)
    errors = {name: rel(grads[name], want_grads[name]) for name in params if name not in key_biases}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= ORACLE_TOL, (worst, errors[worst])


def test_transformer_base_parameter_count():
    """Vaswani et al.'s base shape, counted from the paper's description, and torch.nn.Transformer's own count."""
    d, h, d_ff, N, V = 512, 8, 2048, 6, 37000
    attention = 4 * (d * d + d)  # W_Q, W_K, W_V, W_O with biases (h heads of d/h share the d x d matrices)
    ffn = d * d_ff + d_ff + d_ff * d + d  # two linear maps with biases
    norm = 2 * d  # LayerNorm gain and bias
    encoder = N * (attention + ffn + 2 * norm) + norm  # + the final encoder LayerNorm of nn.Transformer
    decoder = N * (2 * attention + ffn + 3 * norm) + norm
    embedding = V * d  # one table: source, target and (transposed) the pre-softmax linear map (section 3.4)
    cfg = get_preset("transformer-base")
    assert (cfg.dim, cfg.n_heads, cfg.ffn_dim, cfg.n_layers, cfg.n_decoder_layers, cfg.vocab_size) == (d, h, d_ff, N,
                                                                                                        N, V)
    assert num_params(cfg) == encoder + decoder + embedding == 63_084_544
    torch = pytest.importorskip("torch")
    reference = torch.nn.Transformer(d_model=d, nhead=h, num_encoder_layers=N, num_decoder_layers=N,
                                     dim_feedforward=d_ff, dropout=0.1, batch_first=True)
    assert num_params(cfg) == sum(p.numel() for p in reference.parameters()) + embedding


def test_the_nano_preset_and_the_parameter_layout():
    cfg = get_preset("seq2seq-nano")
    assert (cfg.arch, cfg.dim, cfg.n_layers, cfg.n_decoder_layers, cfg.n_heads, cfg.ffn_dim, cfg.mlp, cfg.pos,
            cfg.norm_first, cfg.scale_embeddings, cfg.share_embeddings, cfg.tie_embeddings, cfg.dropout) == (
        "encoder-decoder", 128, 3, 3, 4, 512, "relu", "sinusoidal", False, True, True, True, 0.1)
    shapes = param_shapes(tiny_config(n_layers=1, n_decoder_layers=1, share_embeddings=False, tie_embeddings=False))
    assert list(shapes) == [
        "src_emb", "tgt_emb",
        "enc.0.attn_norm.w", "enc.0.attn_norm.b", "enc.0.attn.wq", "enc.0.attn.wk", "enc.0.attn.wv", "enc.0.attn.wo",
        "enc.0.attn.bq", "enc.0.attn.bk", "enc.0.attn.bv", "enc.0.attn.bo", "enc.0.mlp_norm.w", "enc.0.mlp_norm.b",
        "enc.0.mlp.w1", "enc.0.mlp.w2", "enc.0.mlp.b1", "enc.0.mlp.b2", "enc_norm.w", "enc_norm.b",
        *[f"dec.0.{part}" for part in (
            "self_norm.w", "self_norm.b", "self.wq", "self.wk", "self.wv", "self.wo", "self.bq", "self.bk", "self.bv",
            "self.bo", "cross_norm.w", "cross_norm.b", "cross.wq", "cross.wk", "cross.wv", "cross.wo", "cross.bq",
            "cross.bk", "cross.bv", "cross.bo", "mlp_norm.w", "mlp_norm.b", "mlp.w1", "mlp.w2", "mlp.b1", "mlp.b2")],
        "dec_norm.w", "dec_norm.b", "lm_head"]
    assert shapes["lm_head"] == (16, 19) and shapes["dec.0.cross.wk"] == (16, 16) and shapes["enc.0.mlp.w2"] == (24, 16)
    axes = split_axes(tiny_config(n_layers=1, n_decoder_layers=1, share_embeddings=False, tie_embeddings=False))
    assert {n for n, a in axes.items() if a is None} == {n for n in shapes if n.endswith((".bo", ".b2", "_norm.w",
                                                                                          "_norm.b"))}
    assert (axes["src_emb"], axes["lm_head"], axes["dec.0.cross.wv"], axes["dec.0.cross.wo"]) == (0, 1, 1, 0)


def test_init_is_torchs_xavier_uniform_and_scaled_embeddings():
    cfg = get_preset("seq2seq-nano")
    params = init_params(cfg, seed=1, dtype=np.float64)
    C, F = cfg.dim, cfg.ffn_dim
    for name, bound in (("enc.0.attn.wq", math.sqrt(6 / (C + 3 * C))), ("dec.1.cross.wo", math.sqrt(6 / (2 * C))),
                        ("enc.2.mlp.w1", math.sqrt(6 / (C + F)))):
        w = params[name]
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound  # uniform on [-bound, bound]
        assert abs(w.std() - bound / math.sqrt(3)) < 0.03 * bound
    assert abs(params["tok_emb"].std() * math.sqrt(C) - 1) < 0.01  # the scaled rows have unit variance
    assert not params["dec.0.self.bq"].any() and (params["dec_norm.w"] == 1).all()


def test_flops_per_token_by_hand():
    cfg = tiny_config(n_layers=1, n_decoder_layers=1)
    C, F, V, T = 16, 24, 19, 10
    weights = (4 * C * C + 2 * C * F) + (8 * C * C + 2 * C * F) + C * V  # encoder + decoder layer + head
    assert flops_per_token(cfg, T) == 3 * (2 * weights + 3 * 4 * C * T)


# ----------------------------------------------------------------------------------------------------------------
# finite differences


@st.composite
def tiny_model_and_batch(draw):
    """A tiny config (1 encoder and 1 decoder layer, C = 8) and a padded batch."""
    cfg = tiny_config(vocab_size=draw(st.integers(3, 9), label="V"), dim=8, n_heads=draw(st.sampled_from([1, 2]),
                                                                                         label="NH"),
                      ffn_dim=draw(st.integers(2, 10), label="F"), n_layers=1, n_decoder_layers=1, mlp="gelu_erf",
                      norm_first=draw(st.booleans(), label="norm_first"), max_seq_len=5,
                      share_embeddings=(shared := draw(st.booleans(), label="shared")),
                      tie_embeddings=shared or draw(st.booleans(), label="tied"))
    B = draw(st.integers(1, 2), label="B")
    src_lens = draw(st.lists(st.integers(1, 4), min_size=B, max_size=B), label="source lengths")
    tgt_lens = draw(st.lists(st.integers(1, 4), min_size=B, max_size=B), label="target lengths")
    return cfg, src_lens, tgt_lens, draw(st.integers(0, 2**31), label="seed")


@settings(max_examples=4, deadline=None)
@given(drawn=tiny_model_and_batch())
def test_every_gradient_by_finite_differences(grad_check, drawn):
    cfg, src_lens, tgt_lens, seed = drawn
    params = perturbed_params(cfg, seed)
    batch = make_batch(cfg, src_lens, tgt_lens, seed)
    _, grads = s2s.batch_loss_and_grads(params, batch, cfg)
    errors = grad_check.function("seq2seq", lambda: s2s.batch_loss(params, batch, cfg), params, grads, seed=seed,
                                 max_elementwise=0, n_directions=3)
    assert set(errors) == set(params)  # every parameter is checked


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "norm_first"])
def test_dropout_gradient_under_a_fixed_mask(grad_check, norm_first):
    """The same Dropout in f and in the backward: the masks are fixed, so f is differentiable and the backward
    through every site (embeddings, attention and cross-attention probabilities, branch outputs, FFN hidden units)
    is checked by finite differences."""
    cfg = tiny_config(vocab_size=7, dim=8, n_heads=2, ffn_dim=10, n_layers=1, n_decoder_layers=1, mlp="gelu_erf",
                      max_seq_len=5, norm_first=norm_first, dropout=0.3, attn_dropout=0.4)
    params = perturbed_params(cfg, 11)
    batch = make_batch(cfg, [5, 3], [4, 2], seed=11)
    dropout = Dropout(cfg.dropout, cfg.attn_dropout, seed=5, step=3, row_offset=2)
    loss, grads = s2s.batch_loss_and_grads(params, batch, cfg, dropout=dropout)
    assert loss != s2s.batch_loss(params, batch, cfg)  # something was dropped
    _, cache = s2s.model_forward(params, batch, cfg, dropout=dropout)
    c_mlp = cache["encoder"]["layers"][0][1][1]  # the encoder FFN's cache: (p, x, act(h), a, hidden dropout)
    assert len(c_mlp) == 5 and 0 < c_mlp[4][0].mean() < 1

    def f():
        logits, c = s2s.model_forward(params, batch, cfg, dropout=dropout)
        return vocab_parallel_cross_entropy_forward(logits, batch["targets"], c["tp"])[0]

    grad_check.function(f"seq2seq with dropout: {'norm_first' if norm_first else 'post-norm'}", f, params, grads,
                        seed=11, max_elementwise=0, n_directions=2)


def test_dropout_rate_zero_is_no_dropout_bit_for_bit_and_rows_split_like_one_process():
    cfg = tiny_config()
    params = perturbed_params(cfg, 4)
    batch = make_batch(cfg, [6, 3, 5, 2], [4, 5, 1, 3], seed=4)
    plain = s2s.batch_loss_and_grads(params, batch, cfg)
    zero = s2s.batch_loss_and_grads(params, batch, cfg, dropout=Dropout(0.0, 0.0, seed=1, step=1))
    assert plain[0] == zero[0] and all(np.array_equal(plain[1][n], zero[1][n]) for n in params)
    drop = tiny_config(dropout=0.2, attn_dropout=0.3)
    whole, _ = s2s.model_forward(params, batch, drop, dropout=Dropout(0.2, 0.3, seed=1, step=1))
    rows = {key: value[2:] for key, value in batch.items()}
    part, _ = s2s.model_forward(params, rows, drop, dropout=Dropout(0.2, 0.3, seed=1, step=1, row_offset=2))
    np.testing.assert_array_equal(whole[2:], part)  # global rows: a data-parallel rank drops what one process does
    one = accumulate_loss_and_grads(params, batch, drop, 1, dropout=Dropout(0.2, 0.3, seed=1, step=1))
    two = accumulate_loss_and_grads(params, batch, drop, 2, dropout=Dropout(0.2, 0.3, seed=1, step=1))
    assert abs(one[0] - two[0]) <= 1e-12 * abs(one[0])  # the same sums in another order: rounding only
    assert all(np.allclose(one[1][n], two[1][n], rtol=1e-10, atol=1e-14) for n in params)
    groups = accumulate_loss_and_grads(params, batch, drop, 1, dropout=Dropout(0.2, 0.3, seed=1, step=1),
                                       row_groups=3)  # rows side by side on threads: the same global rows
    assert abs(one[0] - groups[0]) <= 1e-12 * abs(one[0])
    assert all(np.allclose(one[1][n], groups[1][n], rtol=1e-10, atol=1e-14) for n in params)


# ----------------------------------------------------------------------------------------------------------------
# the fast paths against the reference layers


DROPOUTS = {"none": None, "hidden": Dropout(0.2, 0.0, seed=3, step=2, row_offset=1),
            "hidden+attention": Dropout(0.2, 0.3, seed=3, step=2, row_offset=1)}


@st.composite
def fast_case(draw, T):
    """A tiny config (GQA drawn, either norm placement and FFN, shared or separate tables) and a padded batch whose
    targets have T positions and sources S (also drawn from 1, 7, 33, 70); one sequence may be all padding."""
    NH = draw(st.sampled_from([2, 4]), label="n_heads")
    S = draw(st.sampled_from([1, 7, 33, 70]), label="S")
    shared = draw(st.booleans(), label="shared")
    cfg = tiny_config(vocab_size=11, dim=16, n_heads=NH, n_kv_heads=draw(st.sampled_from([1, NH]), label="n_kv_heads"),
                      ffn_dim=12, n_layers=draw(st.integers(1, 2), label="L"), n_decoder_layers=2,
                      mlp=draw(st.sampled_from(["relu", "gelu_erf"]), label="mlp"),
                      norm_first=draw(st.booleans(), label="norm_first"), share_embeddings=shared,
                      tie_embeddings=shared or draw(st.booleans(), label="tied"), max_seq_len=max(S, T))
    B = draw(st.integers(1, 3), label="B")
    src_lens = [S] + draw(st.lists(st.integers(0, S), min_size=B - 1, max_size=B - 1), label="source lengths")
    tgt_lens = [T] + draw(st.lists(st.integers(0, T), min_size=B - 1, max_size=B - 1), label="target lengths")
    return cfg, src_lens, tgt_lens, draw(st.integers(0, 2**31), label="seed")


@pytest.mark.parametrize("dropout", list(DROPOUTS))
@pytest.mark.parametrize("T", [1, 7, 33, 70])
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_fast_paths_are_the_reference_model_in_float64(T, dropout, data):
    """Loss and every gradient of the fast paths (flash self- and cross-attention, fused FFN, norms and loss) against
    the reference layers. Bound (as test_model.py's): the same sums in other orders (tiles, online softmax) differ by
    ~1e-15 relative in float64, so 1e-10 of each tensor's largest entry; a gradient that is zero in exact math (the
    key biases; the queries' where a softmax has one key) is rounding on both sides, hence the absolute floor of 1e-14
    of the model's largest gradient. Under dropout both draw the same masks (the attention dropout's in the
    reference attention, which the fast model runs then too)."""
    cfg, src_lens, tgt_lens, seed = data.draw(fast_case(T), label="case")
    cfg = dataclasses.replace(cfg, impl="fast")
    params = perturbed_params(cfg, seed)
    batch = make_batch(cfg, src_lens, tgt_lens, seed)
    reference = assert_fast_matches_reference(
        lambda c: s2s.batch_loss_and_grads(params, batch, c, dropout=DROPOUTS[dropout]), cfg, params)
    if dropout == "none":
        real = batch["tgt_mask"]
        logits, logits_ref = s2s.forward(params, batch, cfg), s2s.forward(params, batch, reference)
        assert np.abs(logits - logits_ref)[real].max() <= 1e-10 * np.abs(logits_ref[real]).max()


def test_fast_decoding_is_the_reference_decoding():
    """Cached decoding on the fast paths (flash self-attention over past_kv, flash cross-attention over memory_kv)
    gives the reference's logits, greedy tokens and beams."""
    cfg = tiny_config(vocab_size=13, n_kv_heads=2)
    reference = dataclasses.replace(cfg, impl="reference")
    params = perturbed_params(cfg, 12)
    batch = make_batch(cfg, [6, 2, 9], [7, 7, 7], seed=12)
    logits = {}
    for c in (cfg, reference):
        memory_kv = s2s.cross_attention_kvs(params, s2s.encode(params, batch["src"], batch["src_mask"], c), c)
        past, steps = None, []
        for t0, t1 in ((0, 1), (1, 4), (4, 7)):
            step, past = s2s.decode_step(params, c, batch["tokens"][:, t0:t1], memory_kv, batch["src_mask"], past)
            steps.append(step)
        logits[c.impl] = np.concatenate(steps, axis=1)  # (B, 7, V)
    assert np.abs(logits["fast"] - logits["reference"]).max() <= 1e-10 * np.abs(logits["reference"]).max()
    assert s2s.greedy(params, cfg, SOURCES, 8, bos_id=0, eos_id=1) == s2s.greedy(params, reference, SOURCES, 8,
                                                                                    bos_id=0, eos_id=1)
    beams = [s2s.translate(params, c, SOURCES, 6, beams=3, bos_id=0, eos_id=1) for c in (cfg, reference)]
    assert [[h.tokens for h in hyps] for hyps in beams[0]] == [[h.tokens for h in hyps] for hyps in beams[1]]
    for fast_hyps, ref_hyps in zip(*beams):
        assert all(abs(f.logprob - r.logprob) <= 1e-10 * abs(r.logprob) for f, r in zip(fast_hyps, ref_hyps))


# ----------------------------------------------------------------------------------------------------------------
# causality and padding


def test_a_target_token_changes_no_earlier_logit():
    cfg = tiny_config()
    params = perturbed_params(cfg, 5)
    batch = make_batch(cfg, [6, 4], [7, 7], seed=5)
    logits = s2s.forward(params, batch, cfg)
    for t in range(7):
        changed = {**batch, "tokens": batch["tokens"].copy()}
        changed["tokens"][:, t] = (changed["tokens"][:, t] + 1) % cfg.vocab_size
        other = s2s.forward(params, changed, cfg)
        np.testing.assert_array_equal(other[:, :t], logits[:, :t])
        assert not np.allclose(other[:, t], logits[:, t])  # position t itself reads it


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "norm_first"])
def test_padded_tokens_change_nothing_else(norm_first):
    """New ids in every padded source and target slot: the logits at real positions, the loss and every gradient
    stay the same bit for bit (masked keys get probability exactly 0, padded targets are ignored)."""
    cfg = tiny_config(norm_first=norm_first)
    params = perturbed_params(cfg, 6)
    batch = make_batch(cfg, [7, 3, 1], [2, 6, 4], seed=6)
    changed = dict(batch)
    rng = np.random.default_rng(0)
    changed["src"] = np.where(batch["src_mask"], batch["src"], rng.integers(0, cfg.vocab_size, batch["src"].shape))
    changed["tokens"] = np.where(batch["tgt_mask"], batch["tokens"],
                                 rng.integers(0, cfg.vocab_size, batch["tokens"].shape))
    assert (changed["src"] != batch["src"]).any() and (changed["tokens"] != batch["tokens"]).any()
    real = batch["tgt_mask"]
    np.testing.assert_array_equal(s2s.forward(params, changed, cfg)[real], s2s.forward(params, batch, cfg)[real])
    loss, grads = s2s.batch_loss_and_grads(params, batch, cfg)
    loss2, grads2 = s2s.batch_loss_and_grads(params, changed, cfg)
    assert loss == loss2 and all(np.array_equal(grads[n], grads2[n]) for n in params)


# ----------------------------------------------------------------------------------------------------------------
# decoding


def test_the_cached_decoder_equals_the_full_decoder():
    cfg = tiny_config(n_kv_heads=2)  # grouped-query attention too
    params = perturbed_params(cfg, 8)
    batch = make_batch(cfg, [6, 2], [7, 7], seed=8)
    memory = s2s.encode(params, batch["src"], batch["src_mask"], cfg)
    full, _ = s2s.decoder_forward(params, batch["tokens"], memory, batch["src_mask"], None, cfg)  # (B, T, V)
    memory_kv = s2s.cross_attention_kvs(params, memory, cfg)
    past, steps = None, []
    for t0, t1 in ((0, 1), (1, 4), (4, 5), (5, 7)):  # one token at a time, and several
        logits, past = s2s.decode_step(params, cfg, batch["tokens"][:, t0:t1], memory_kv, batch["src_mask"], past)
        steps.append(logits)
    assert rel(np.concatenate(steps, axis=1), full) <= 1e-13
    np.testing.assert_array_equal(s2s.forward(params, {**batch, "tgt_mask": np.ones((2, 7), bool)}, cfg), full)


SOURCES = [[3, 4, 5, 6, 7], [8, 2], [5], [9, 9, 10, 11]]


def decoding_model(seed):
    cfg = tiny_config(vocab_size=13)
    return cfg, perturbed_params(cfg, seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_with_one_beam_is_greedy(seed):
    cfg, params = decoding_model(seed)
    greedy = s2s.greedy(params, cfg, SOURCES, 10, bos_id=0, eos_id=1)
    beams = s2s.translate(params, cfg, SOURCES, 10, beams=1, bos_id=0, eos_id=1)
    assert [h[0].tokens for h in beams] == greedy
    # batching pads the sources: each one alone decodes the same
    assert [s2s.greedy(params, cfg, [s], 10, bos_id=0, eos_id=1)[0] for s in SOURCES] == greedy


def test_beam_hypotheses_carry_their_teacher_forced_log_probabilities():
    cfg, params = decoding_model(3)
    results = s2s.translate(params, cfg, SOURCES, 6, beams=3, length_penalty=0.7, bos_id=0, eos_id=1)
    assert [len(h) for h in results] == [3] * len(SOURCES)
    for source, hyps in zip(SOURCES, results):
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            assert h.finished == (h.tokens[-1] == 1) and (h.finished or len(h.tokens) == 6)
            assert abs(h.score - h.logprob / len(h.tokens) ** 0.7) <= 1e-12 * abs(h.score)
            tokens = np.array([[0] + h.tokens[:-1]])
            logits = s2s.forward(params, dict(src=np.array([source]), src_mask=np.ones((1, len(source)), bool),
                                              tokens=tokens, tgt_mask=np.ones(tokens.shape, bool),
                                              targets=np.array([h.tokens])), cfg)[0]  # (T, V)
            logp = logits - logits.max(-1, keepdims=True)
            logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
            assert abs(logp[np.arange(len(h.tokens)), h.tokens].sum() - h.logprob) <= 1e-10 * abs(h.logprob)
    # more beams never find a worse best total log-probability among full-length searches without eos
    wide = s2s.translate(params, cfg, SOURCES, 3, beams=5, length_penalty=0.0, bos_id=0, eos_id=12)
    narrow = s2s.translate(params, cfg, SOURCES, 3, beams=1, length_penalty=0.0, bos_id=0, eos_id=12)
    assert all(w[0].logprob >= n[0].logprob - 1e-12 for w, n in zip(wide, narrow))


# ----------------------------------------------------------------------------------------------------------------
# tensor parallelism in one process: two threads, an all-reduce between them


def test_two_tensor_parallel_ranks_give_one_process_loss_and_gradients():
    cfg = tiny_config(vocab_size=18, n_heads=4, n_kv_heads=2, dropout=0.2, attn_dropout=0.3, share_embeddings=False,
                      tie_embeddings=True)
    params = perturbed_params(cfg, 9)
    batch = make_batch(cfg, [6, 2, 4], [3, 5, 1], seed=9)
    dropout = Dropout(0.2, 0.3, seed=2, step=5)
    want_loss, want_grads = s2s.batch_loss_and_grads(params, batch, cfg, dropout=dropout)
    axes = split_axes(cfg)

    def rank(r, comm):
        return s2s.batch_loss_and_grads(shard_params(params, axes, r, 2), batch, cfg, tp=comm, dropout=dropout)

    results = on_thread_ranks(2, rank)
    assert results[0][0] == results[1][0] and abs(results[0][0] - want_loss) <= 1e-12 * want_loss
    grads = unshard_params([results[0][1], results[1][1]], axes)
    for name in params:  # the same sums in another order (rounding only); the replicated ones equal on both ranks
        assert np.allclose(grads[name], want_grads[name], rtol=1e-11, atol=1e-14), name
        if axes[name] is None:
            np.testing.assert_array_equal(results[0][1][name], results[1][1][name])


# ----------------------------------------------------------------------------------------------------------------
# errors


def test_bad_configs_batches_and_decoding_arguments_are_refused():
    with pytest.raises(ValueError, match="pos='rope' is not allowed for arch='encoder-decoder'"):
        get_preset("seq2seq-nano", pos="rope")
    with pytest.raises(ValueError, match="pos='sinusoidal' is not allowed for arch='decoder'"):
        get_preset("nano", pos="sinusoidal")
    with pytest.raises(ValueError, match="share_embeddings=True is for arch='encoder-decoder'"):
        get_preset("nano", share_embeddings=True)
    cfg = tiny_config()
    params = perturbed_params(cfg, 1)
    batch = make_batch(cfg, [3, 2], [2, 2], seed=1)
    with pytest.raises(ValueError, match="missing tgt_mask"):
        s2s.batch_loss(params, {k: v for k, v in batch.items() if k != "tgt_mask"}, cfg)
    with pytest.raises(ValueError, match=r"src_mask must be a boolean \(2, 3\) array"):
        s2s.batch_loss(params, {**batch, "src_mask": batch["src_mask"].astype(int)}, cfg)
    with pytest.raises(ValueError, match="src has 13 positions; max_seq_len=12 is the most"):
        s2s.encode(params, np.zeros((1, 13), int), None, cfg)
    with pytest.raises(ValueError, match="params has no 'src_emb'"):
        s2s.batch_loss(params, batch, tiny_config(share_embeddings=False, tie_embeddings=False))
    with pytest.raises(ValueError, match=r"params\['tok_emb'\] has shape \(19, 16\); with tp=1 this rank's shard "
                                         r"has shape \(20, 16\)"):
        s2s.batch_loss(params, batch, tiny_config(vocab_size=20))
    with pytest.raises(ValueError, match="source 1 must be 1 to max_seq_len=12 token ids in"):
        s2s.translate(params, cfg, [[1, 2], [1, 99]], 4, bos_id=0, eos_id=1)
    with pytest.raises(ValueError, match="max_new_tokens=13 is not allowed"):
        s2s.greedy(params, cfg, [[1, 2]], 13, bos_id=0, eos_id=1)
    with pytest.raises(ValueError, match="eos_id=19 is not a token of vocab_size=19"):
        s2s.translate(params, cfg, [[1, 2]], 4, beams=2, bos_id=0, eos_id=19)
