"""Tests for npllm/hf.py against Hugging Face transformers (an implementation nobody here wrote).

Tiny random GPT-2 and LLaMA models are built locally (no network), perturbed so that no weight sits at its
initial value (norm weights 1 and biases 0 would hide a swapped or misplaced tensor), and compared in float64:
logits, the loss, every parameter's gradient, greedy generation; then the reverse (npllm -> save_hf ->
from_pretrained), sharding, float16 / bfloat16 storage and the one-line errors.

Tolerances: 1e-9 relative (max |a - b| / max |b| per tensor). Both sides compute the same float64 function in a
different order, which leaves ~1e-15; 1e-9 is far above that and far below any real difference (a wrong epsilon,
a float32 rounding, a misplaced head are all >= 1e-8).

Exactness needs two things of transformers. (1) HF's LLaMA rounds through float32 even in a float64 model: its
RMSNorm casts the input to float32 and its rotary embedding computes the angles in float32 (both mixed-precision
choices, ~1e-7 relative). ``exact_llama`` patches those two forwards to compute the same formulas in the input's
dtype; ``test_unpatched_llama_differs_by_float32_rounding_only`` shows the patch changes only rounding. (2) Its
"eager" LLaMA attention takes the softmax in float32; "sdpa" keeps float64, so every model here uses "sdpa". The
loss is torch's cross_entropy on the float64 logits (HF's own loss function casts the logits to float32).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from npllm.config import PRESETS, get_preset
from npllm.generate import generate
from npllm.hf import (
    bf16_bits_to_float32, config_from_hf, config_to_hf, float32_to_bf16_bits, is_hf_dir, load_hf, save_hf,
    to_hf_state,
)
from npllm.models import init_params, param_shapes
from npllm.models.decoder import forward, loss_and_grads

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
AutoModelForCausalLM, BertConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM = (
    getattr(transformers, name) for name in ("AutoModelForCausalLM", "BertConfig", "GPT2Config", "GPT2LMHeadModel",
                                             "LlamaConfig", "LlamaForCausalLM"))

TOL = 1e-9  # relative, see the module docstring
ATTN = "sdpa"  # float64 throughout (the eager LLaMA attention takes its softmax in float32)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------------------------------------------
# HF's LLaMA without its float32 roundings


def _rmsnorm_in_input_dtype(self, hidden_states):
    # LlamaRMSNorm's formula, w * x / sqrt(mean(x^2) + eps), without its cast of x to float32
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rope_in_float64(self, x, position_ids):
    # LlamaRotaryEmbedding's default angles pos * theta^(-2i/hs), computed in float64 instead of float32
    hs = 2 * self.inv_freq.shape[0]
    theta = self.config.rope_parameters["rope_theta"]
    inv_freq = theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (hs/2,)
    angles = position_ids[..., None].to(torch.float64) * inv_freq  # (B, T, hs/2)
    emb = torch.cat((angles, angles), dim=-1)  # (B, T, hs)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@pytest.fixture
def exact_llama(monkeypatch):
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rmsnorm_in_input_dtype)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", _rope_in_float64)


# ----------------------------------------------------------------------------------------------------------------
# tiny HF models


def perturbed(model, seed):
    """The model in float64 and eval mode, every parameter moved by 0.3 N(0, 1)."""
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def hf_gpt2(seed=0, **overrides):
    kw = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, attn_implementation=ATTN)
    torch.manual_seed(seed)
    return perturbed(GPT2LMHeadModel(GPT2Config(**{**kw, **overrides})), seed)


def hf_llama(seed=0, **overrides):
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
              intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500000.0,
              bos_token_id=None, eos_token_id=None, attn_implementation=ATTN)
    torch.manual_seed(seed)
    return perturbed(LlamaForCausalLM(LlamaConfig(**{**kw, **overrides})), seed)


HF_MODELS = {
    "gpt2 tied": lambda: hf_gpt2(),
    "gpt2 untied": lambda: hf_gpt2(seed=1, tie_word_embeddings=False),
    "llama GQA untied": lambda: hf_llama(),
    "llama tied": lambda: hf_llama(seed=2, tie_word_embeddings=True),
    "llama attention_bias": lambda: hf_llama(seed=3, attention_bias=True),
    "llama mlp_bias, MHA": lambda: hf_llama(seed=4, mlp_bias=True, num_key_value_heads=4),
}


def saved(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


def batch(V, B=3, T=11, seed=0):
    """tokens (B, T) and their next-token targets, the last position and a few others ignored (-100)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(B, T))  # (B, T)
    targets = np.full((B, T), -100)  # (B, T)
    targets[:, :-1] = tokens[:, 1:]
    targets[rng.random((B, T)) < 0.15] = -100
    return tokens, targets


def torch_loss_and_grads(model, tokens, targets):
    model.zero_grad()
    logits = model(torch.tensor(tokens)).logits  # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters()}
    return logits.detach().numpy(), loss.item(), grads


# ----------------------------------------------------------------------------------------------------------------
# HF -> npllm: logits, loss, every gradient


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_load_hf_gives_hf_logits_loss_and_every_gradient(name, tmp_path, exact_llama):
    model = HF_MODELS[name]()
    params, cfg = load_hf(saved(model, tmp_path / "hf"), dtype=np.float64)
    assert list(params) == list(param_shapes(cfg)) and all(p.dtype == np.float64 for p in params.values())
    hf_cfg = model.config
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads) == (hf_cfg.vocab_size, hf_cfg.hidden_size,
                                                                   hf_cfg.num_hidden_layers, hf_cfg.num_attention_heads)
    assert cfg.tie_embeddings == hf_cfg.tie_word_embeddings
    tokens, targets = batch(cfg.vocab_size)

    ref_logits, ref_loss, ref_grads = torch_loss_and_grads(model, tokens, targets)
    assert rel_err(forward(params, tokens, cfg), ref_logits) <= TOL
    loss, grads = loss_and_grads(params, tokens, targets, cfg)
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss)

    flags = {}
    if cfg.norm == "rmsnorm":
        flags = dict(attention_bias=hf_cfg.attention_bias, mlp_bias=hf_cfg.mlp_bias)
    ours = to_hf_state(grads, cfg, **flags)  # npllm's gradients under HF's names and layouts
    assert set(ours) == set(ref_grads)  # every HF parameter (a tied head appears once, as the embedding)
    errors = {n: rel_err(ours[n], ref_grads[n]) for n in ref_grads}
    assert max(errors.values()) <= TOL, {n: e for n, e in errors.items() if e > TOL}
    if name == "llama attention_bias":  # npllm's bias=True covers the MLP too: those biases load as zeros
        assert cfg.bias and all(not params[f"layers.{l}.mlp.{b}"].any() for l in range(2) for b in ("b1", "b2", "b3"))


def test_unpatched_llama_differs_by_float32_rounding_only(tmp_path):
    # Without exact_llama, HF rounds its norms and RoPE angles to float32 (eps 6e-8): the logits then differ by a
    # few float32 roundings amplified by two layers (measured ~1e-7), far below a real error but above TOL.
    model = hf_llama()
    params, cfg = load_hf(saved(model, tmp_path / "hf"), dtype=np.float64)
    tokens, _ = batch(cfg.vocab_size)
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    assert TOL < rel_err(forward(params, tokens, cfg), ref) <= 1e-5


@pytest.mark.parametrize("name", ["gpt2 tied", "llama GQA untied", "llama tied"])
def test_greedy_generation_matches_hf_generate(name, tmp_path, exact_llama):
    model = HF_MODELS[name]()
    params, cfg = load_hf(saved(model, tmp_path / "hf"), dtype=np.float64)
    prompts = [[3], [5, 17, 2], [40, 41, 42, 43, 44, 45, 46]]
    ours = generate(params, cfg, prompts, max_new_tokens=12)  # greedy is the default sampling
    for prompt, tokens in zip(prompts, ours):
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             eos_token_id=None, pad_token_id=0)
        assert out[0, len(prompt):].tolist() == tokens
    assert len({tuple(t) for t in ours}) > 1  # the prompts lead to different continuations


# ----------------------------------------------------------------------------------------------------------------
# npllm -> HF


NPLLM_MODELS = {  # preset, overrides
    "gpt2 tied": ("nano-gpt2", {}),
    "gpt2 untied, no bias (saved as zero biases)": ("nano-gpt2", {"bias": False, "tie_embeddings": False}),
    "llama GQA untied, theta 5e5": ("nano", {"rope_theta": 500000.0}),
    "llama tied with bias": ("nano", {"bias": True, "tie_embeddings": True, "n_kv_heads": 4}),
}


def npllm_model(preset, overrides, seed=0):
    cfg = get_preset(preset, **{"vocab_size": 53, "dim": 16, "n_layers": 2, "n_heads": 4, "ffn_dim": 24,
                                "max_seq_len": 20, **({"n_kv_heads": 2} if preset == "nano" else {}), **overrides})
    rng = np.random.default_rng(seed)
    params = {n: v + 0.3 * rng.standard_normal(v.shape) for n, v in init_params(cfg, seed, np.float64).items()}
    return params, cfg


@pytest.mark.parametrize("name", list(NPLLM_MODELS))
def test_save_hf_loads_in_transformers_with_the_same_logits(name, tmp_path, exact_llama):
    params, cfg = npllm_model(*NPLLM_MODELS[name])
    out = save_hf(params, cfg, tmp_path / "out", dtype="float64")
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64, attn_implementation=ATTN,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(model).__name__ == ("GPT2LMHeadModel" if cfg.norm == "layernorm" else "LlamaForCausalLM")
    tokens, _ = batch(cfg.vocab_size, T=cfg.max_seq_len, seed=5)
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    assert rel_err(forward(params, tokens, cfg), ref) <= TOL

    # and back: the same parameters, exactly (GPT-2 without biases comes back with zero biases)
    back, cfg_back = load_hf(out, dtype=np.float64)
    assert cfg_back == dataclasses.replace(cfg, bias=True if cfg.norm == "layernorm" else cfg.bias)
    for n, v in back.items():
        np.testing.assert_array_equal(v, params.get(n, 0.0))


def test_tied_models_store_no_lm_head(tmp_path):
    for preset in ("nano-gpt2", "nano"):
        params, cfg = npllm_model(preset, {"tie_embeddings": True})
        out = save_hf(params, cfg, tmp_path / preset, dtype="float32")
        header = _header(out / "model.safetensors")
        assert "lm_head.weight" not in header and json.loads((out / "config.json").read_text())["tie_word_embeddings"]


def test_sharded_save_and_load_round_trip(tmp_path, exact_llama):
    params, cfg = npllm_model("nano", {})
    out = save_hf(params, cfg, tmp_path / "out", dtype="float64", max_shard_bytes=8000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(p.size * 8 for p in params.values())
    back, _ = load_hf(out, dtype=np.float64)
    assert all(np.array_equal(back[n], params[n]) for n in params)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64, attn_implementation=ATTN)
    tokens, _ = batch(cfg.vocab_size, T=9)
    with torch.no_grad():
        assert rel_err(forward(params, tokens, cfg), model(torch.tensor(tokens)).logits.numpy()) <= TOL

    # and a model transformers sharded itself
    hf = hf_gpt2()
    whole, _ = load_hf(saved(hf, tmp_path / "whole"), dtype=np.float64)
    sharded = saved(hf, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    parts, _ = load_hf(sharded, dtype=np.float64)
    assert all(np.array_equal(parts[n], whole[n]) for n in whole)


# ----------------------------------------------------------------------------------------------------------------
# float16 and bfloat16


@pytest.mark.parametrize("torch_dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_half_precision_hf_weights_load_as_their_exact_values(torch_dtype, dtype, tmp_path):
    model = hf_llama().to(torch_dtype)
    params, cfg = load_hf(saved(model, tmp_path / "hf"), dtype=dtype)
    assert all(p.dtype == dtype for p in params.values())
    ours = to_hf_state(params, cfg)
    for name, p in model.state_dict().items():
        np.testing.assert_array_equal(ours[name], p.double().numpy(), err_msg=name)


@pytest.mark.parametrize("name,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_save_hf_in_half_precision_rounds_as_torch_does(name, torch_dtype, tmp_path):
    params, cfg = npllm_model("nano-gpt2", {})
    params = {n: v.astype(np.float32) for n, v in params.items()}
    out = save_hf(params, cfg, tmp_path / "out", dtype=name)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == name
    assert {v["dtype"] for v in _header(out / "model.safetensors").values()} == {"F16" if name == "float16" else "BF16"}
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype)
    expected = to_hf_state(params, cfg)
    for n, p in model.state_dict().items():
        if n == "lm_head.weight":  # tied: the embedding itself
            n = "transformer.wte.weight"
        assert p.dtype == torch_dtype
        assert torch.equal(p, torch.from_numpy(np.ascontiguousarray(expected[n])).to(torch_dtype)), n


def test_bfloat16_rounding_matches_torch_bit_for_bit():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)  # every class of float32
    ties = (rng.integers(0, 2**16, size=1000, dtype=np.uint32) << 16) | 0x8000  # exactly halfway: to even
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x007FFFFF,
                        0x7FC00000, 0x7F800001, 0xFF800001, 0x3F808000, 0x3F818000], dtype=np.uint32)
    x = np.concatenate([bits, ties, special]).view(np.float32)
    ours = float32_to_bf16_bits(x)
    ref = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], ref[~nan])
    assert np.isnan(bf16_bits_to_float32(ours[nan])).all()
    assert np.isnan(bf16_bits_to_float32(ours)).sum() == nan.sum()
    np.testing.assert_array_equal(bf16_bits_to_float32(ref), torch.from_numpy(ref.view(np.int16)).view(
        torch.bfloat16).float().numpy())


def test_float16_overflow_is_one_line(tmp_path):
    params, cfg = npllm_model("nano", {})
    params["layers.1.mlp.w2"][0, 0] = 1e5
    with pytest.raises(ValueError) as err:
        save_hf(params, cfg, tmp_path / "out", dtype="float16")
    assert "model.layers.1.mlp.down_proj.weight" in one_line(err) and "100000" in one_line(err)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # the temp directory is gone too


# ----------------------------------------------------------------------------------------------------------------
# files as other writers make them


def _header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _rewrite(path, change):
    """Read a safetensors file with the safetensors library, apply change(dict) and write it back."""
    from safetensors.numpy import load_file, save_file
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_gpt2_files_without_the_base_prefix_and_with_mask_buffers_load(tmp_path):
    # GPT-2's own hub files name tensors "h.0.attn.c_attn.weight" (no "transformer.") and keep the causal-mask
    # buffers "h.0.attn.bias"; a tied lm_head may be stored too. All of that loads to the same parameters.
    model = hf_gpt2()
    expected, _ = load_hf(saved(model, tmp_path / "a"), dtype=np.float64)
    path = saved(model, tmp_path / "b") / "model.safetensors"

    def hub_style(t):
        for name in list(t):
            t[name.removeprefix("transformer.")] = t.pop(name)
        for l in range(2):
            t[f"h.{l}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        t["lm_head.weight"] = t["wte.weight"].copy()

    _rewrite(path, hub_style)
    params, _ = load_hf(path.parent, dtype=np.float64)
    assert all(np.array_equal(params[n], expected[n]) for n in expected)

    _rewrite(path, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
    with pytest.raises(ValueError) as err:
        load_hf(path.parent)
    assert "lm_head.weight differs" in one_line(err)


def test_missing_unexpected_and_misshapen_tensors_are_one_line_each(tmp_path):
    model = hf_llama()
    path = saved(model, tmp_path / "hf") / "model.safetensors"
    original = path.read_bytes()

    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError) as err:
        load_hf(path.parent)
    assert "'model.layers.1.self_attn.k_proj.weight'" in one_line(err) and "missing" in one_line(err)
    assert "layers.1.attn.wk" in one_line(err)

    path.write_bytes(original)
    _rewrite(path, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError) as err:
        load_hf(path.parent)
    assert "unexpected tensor 'model.layers.0.extra.weight'" in one_line(err)

    path.write_bytes(original)
    config = json.loads((path.parent / "config.json").read_text())
    (path.parent / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(ValueError) as err:
        load_hf(path.parent)
    assert "model.layers.0.mlp.gate_proj.weight" in one_line(err) and "(48, 32)" in one_line(err)

    path.write_bytes(original)
    (path.parent / "config.json").write_text(json.dumps(config))
    _rewrite(path, lambda t: t.update({"model.norm.weight": np.ones(32, np.int8)}))
    with pytest.raises(ValueError) as err:
        load_hf(path.parent)
    assert "'model.norm.weight' is stored as I8" in one_line(err)

    path.write_bytes(original[:-100])  # truncated
    with pytest.raises(ValueError) as err:
        load_hf(path.parent)
    assert "truncated" in one_line(err)


# ----------------------------------------------------------------------------------------------------------------
# configs


def test_config_round_trip_for_every_preset_hf_can_express():
    for name in PRESETS:
        cfg = get_preset(name)
        if (cfg.norm, cfg.mlp, cfg.pos) in (("layernorm", "gelu", "learned"), ("rmsnorm", "swiglu", "rope")):
            assert config_from_hf(config_to_hf(cfg)) == cfg, name
    hf = config_to_hf(get_preset("gpt2-124m"))
    reference = GPT2Config().to_dict()  # transformers' own GPT-2 small
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon",
                "activation_function", "tie_word_embeddings"):
        assert hf[key] == reference[key], key
    llama = config_to_hf(get_preset("7b"), extra={"bos_token_id": 1, "eos_token_id": 2})
    reference = LlamaConfig(rms_norm_eps=1e-5).to_dict()  # the LLaMA-7B shape is transformers' default
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "rms_norm_eps", "bos_token_id", "eos_token_id"):
        assert llama[key] == reference[key], key


UNSUPPORTED = {  # (config.json change, text the error must contain)
    "rope_scaling (4.x)": ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling="),
    "rope type (5.x)": ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
                        "rope_type='yarn'"),
    "partial rotary": ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    "sliding window": ("llama", {"sliding_window": 16}, "sliding_window=16"),
    "llama act": ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    "head_dim": ("llama", {"head_dim": 16}, "head_dim=16"),
    "gpt2 erf gelu": ("gpt2", {"activation_function": "gelu"}, "activation_function='gelu'"),
    "gpt2 layer scaling": ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    "architecture": ("llama", {"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
                     "MistralForCausalLM"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_configs_are_refused_in_one_line(case):
    arch, change, text = UNSUPPORTED[case]
    base = config_to_hf(npllm_model("nano" if arch == "llama" else "nano-gpt2", {})[1])
    with pytest.raises(ValueError) as err:
        config_from_hf({**base, **change})
    assert text in one_line(err) and "allowed" in one_line(err)


def test_load_hf_refuses_rope_scaling_naming_the_file(tmp_path):
    model = hf_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError) as err:
        load_hf(saved(model, tmp_path / "hf"))
    assert "config.json" in one_line(err) and "rope_type='linear'" in one_line(err)


def test_save_hf_refuses_what_hf_cannot_express(tmp_path):
    params, cfg = npllm_model("nano-gpt2", {"mlp": "swiglu"})
    with pytest.raises(ValueError) as err:
        save_hf(params, cfg, tmp_path / "a")
    assert "mlp='swiglu'" in one_line(err) and "LlamaForCausalLM" in one_line(err)
    params, cfg = npllm_model("nano-gpt2", {"n_kv_heads": 2})
    with pytest.raises(ValueError) as err:
        save_hf(params, cfg, tmp_path / "a")
    assert "n_kv_heads=2" in one_line(err)
    params, cfg = npllm_model("nano", {})
    with pytest.raises(ValueError) as err:
        save_hf(params, cfg, tmp_path / "a", dtype="int8")
    assert "dtype='int8'" in one_line(err)
    with pytest.raises(ValueError) as err:
        save_hf({n: v for n, v in params.items() if n != "norm.w"}, cfg, tmp_path / "a")
    assert "'norm.w'" in one_line(err)
    assert not list(tmp_path.iterdir())


def test_save_hf_overwrites_only_when_asked(tmp_path):
    params, cfg = npllm_model("nano", {})
    out = tmp_path / "out"
    out.mkdir()
    save_hf(params, cfg, out)  # an empty directory is fine
    (out / "note.txt").write_text("old")
    with pytest.raises(ValueError) as err:
        save_hf(params, cfg, out)
    assert "overwrite=True" in one_line(err)
    save_hf(params, cfg, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old directory left beside it


def test_is_hf_dir_and_pickle_only_directories(tmp_path):
    from npllm.checkpoint import save_checkpoint

    params, cfg = npllm_model("nano", {})
    assert is_hf_dir(save_hf(params, cfg, tmp_path / "hf"))
    ckpt = save_checkpoint(tmp_path / "run", 1, params)
    assert not is_hf_dir(ckpt) and not is_hf_dir(tmp_path / "run") and not is_hf_dir(tmp_path / "absent")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    assert is_hf_dir(pickled)
    with pytest.raises(ValueError) as err:
        load_hf(pickled)
    assert "pickle" in one_line(err) and "safetensors" in one_line(err)


# ----------------------------------------------------------------------------------------------------------------
# BertForMaskedLM (logits, loss and every gradient against HF: tests/test_bert.py)


def npllm_bert(seed=0, **overrides):
    cfg = get_preset("bert-nano", **{"vocab_size": 41, "dim": 16, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4,
                                     "ffn_dim": 24, "max_seq_len": 12, "type_vocab_size": 3, "mask_id": 4,
                                     "pad_id": 1, **overrides})
    rng = np.random.default_rng(seed)
    params = {n: v + 0.3 * rng.standard_normal(v.shape) for n, v in init_params(cfg, seed, np.float64).items()}
    return params, cfg


def bert_inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (3, 10))  # (B, T)
    segments = rng.integers(0, cfg.type_vocab_size, (3, 10))  # (B, T)
    key_mask = np.arange(10)[None, :] < np.array([[10], [6], [2]])  # (B, T)
    return {"tokens": tokens, "segments": segments, "key_mask": key_mask}


def hf_bert_logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=torch.tensor(inputs["tokens"]), token_type_ids=torch.tensor(inputs["segments"]),
                     attention_mask=torch.tensor(inputs["key_mask"].astype(np.int64))).logits.numpy()


def test_save_hf_bert_loads_in_transformers_with_the_same_logits_and_back(tmp_path):
    from transformers import AutoModelForMaskedLM

    from npllm.models.bert import mlm_logits

    params, cfg = npllm_bert(dropout=0.1, attn_dropout=0.2)
    out = save_hf(params, cfg, tmp_path / "out", dtype="float64")
    model, info = AutoModelForMaskedLM.from_pretrained(out, dtype=torch.float64, attn_implementation="eager",
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(model).__name__ == "BertForMaskedLM"
    assert (model.config.hidden_dropout_prob, model.config.attention_probs_dropout_prob) == (0.1, 0.2)
    assert (model.config.pad_token_id, model.config.mask_token_id) == (1, 4)
    inputs = bert_inputs(cfg)
    real = inputs["key_mask"]
    assert rel_err(mlm_logits(params, inputs, cfg)[real], hf_bert_logits(model.eval(), inputs)[real]) <= TOL
    header = _header(out / "model.safetensors")  # one name per tied pair
    assert "cls.predictions.decoder.weight" not in header and "cls.predictions.decoder.bias" not in header

    back, cfg_back = load_hf(out, dtype=np.float64)
    assert cfg_back == cfg and list(back) == list(params)
    for n, v in back.items():
        np.testing.assert_array_equal(v, params[n])


def test_bert_files_as_others_write_them_load(tmp_path):
    # BertForPreTraining-style files (pooler, next-sentence head), the position_ids buffer, TF-era gamma/beta names,
    # the tied decoder stored under its own names, and a config without mask_token_id beside a vocab.txt
    params, cfg = npllm_bert()
    path = save_hf(params, cfg, tmp_path / "a", dtype="float32") / "model.safetensors"
    expected, _ = load_hf(path.parent, dtype=np.float64)

    def others(t):
        t["bert.pooler.dense.weight"] = np.zeros((16, 16), np.float32)
        t["cls.seq_relationship.bias"] = np.zeros(2, np.float32)
        t["bert.embeddings.position_ids"] = np.arange(12)[None].astype(np.int64)
        t["bert.embeddings.LayerNorm.gamma"] = t.pop("bert.embeddings.LayerNorm.weight")
        t["bert.encoder.layer.1.output.LayerNorm.beta"] = t.pop("bert.encoder.layer.1.output.LayerNorm.bias")
        t["cls.predictions.decoder.weight"] = t["bert.embeddings.word_embeddings.weight"].copy()
        t["cls.predictions.decoder.bias"] = t.pop("cls.predictions.bias")  # only the copy's name

    _rewrite(path, others)
    config = json.loads((path.parent / "config.json").read_text())
    del config["mask_token_id"]
    (path.parent / "config.json").write_text(json.dumps(config))
    (path.parent / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    loaded, cfg_loaded = load_hf(path.parent, dtype=np.float64)
    assert cfg_loaded == cfg
    assert all(np.array_equal(loaded[n], expected[n]) for n in expected)

    _rewrite(path, lambda t: t.update({"cls.predictions.bias": t["cls.predictions.decoder.bias"] + 1}))
    with pytest.raises(ValueError) as err:
        load_hf(path.parent)
    assert "cls.predictions.decoder.bias differs from cls.predictions.bias" in one_line(err)
    (path.parent / "vocab.txt").unlink()
    with pytest.raises(ValueError) as err:
        load_hf(path.parent)
    assert "mask_token_id is missing" in one_line(err)


def test_bert_configs_round_trip_and_match_transformers_defaults():
    for name in ("bert-nano", "bert-base"):
        cfg = get_preset(name)
        assert config_from_hf(config_to_hf(cfg)) == cfg, name
    reference = {**BertConfig().to_dict(), "mask_token_id": 103}  # transformers' default BERT is bert-base
    assert config_from_hf(reference) == get_preset("bert-base")


BERT_UNSUPPORTED = {  # config.json change -> text the one-line error must contain
    "tanh gelu": ({"hidden_act": "gelu_new"}, "hidden_act='gelu_new'"),
    "relative positions": ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
    "decoder": ({"is_decoder": True}, "is_decoder=True"),
    "untied": ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
    "no mask id": ({"mask_token_id": None}, "mask_token_id is missing"),
}


@pytest.mark.parametrize("case", list(BERT_UNSUPPORTED))
def test_unsupported_bert_configs_are_refused_in_one_line(case):
    change, text = BERT_UNSUPPORTED[case]
    with pytest.raises(ValueError) as err:
        config_from_hf({**config_to_hf(get_preset("bert-nano")), **change})
    assert text in one_line(err)


def test_save_hf_refuses_a_bert_hf_cannot_express(tmp_path):
    params, cfg = npllm_bert(n_kv_heads=2)
    with pytest.raises(ValueError) as err:
        save_hf(params, cfg, tmp_path / "a")
    assert "n_kv_heads=2" in one_line(err) and "BertForMaskedLM" in one_line(err)
