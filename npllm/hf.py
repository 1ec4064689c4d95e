"""Hugging Face checkpoints in and out: GPT2LMHeadModel, LlamaForCausalLM and BertForMaskedLM directories <-> npllm
parameters.

    load_hf(directory, dtype)              config.json + *.safetensors  ->  (params, ModelConfig)
    save_hf(params, cfg, directory, ...)   (params, ModelConfig)         ->  config.json + *.safetensors
    config_from_hf(dict) / config_to_hf(cfg)   the two configs, refusing what the other side cannot express exactly
    is_hf_dir(path)                        does this directory look like a Hugging Face model directory?
    to_hf_state(params, cfg)               {HF name: array in HF's layout} (also maps gradients; the tests use it)

Both directions read one table per architecture (``name_table``): each row is one tensor of the Hugging Face state
dict, the npllm parameters it holds, and whether it is stored transposed. A row with several npllm parameters is
their concatenation along the output axis (GPT-2's fused c_attn = [wq | wk | wv]). The layouts:

  * GPT-2's Conv1D stores its weight (in, out), as npllm does: copied as is; c_attn (C, 3C) is split into wq, wk, wv.
  * LLaMA's nn.Linear stores (out, in): transposed. HF's q_proj / k_proj rows are already in the rotate-half order
    (pair i with i + hs/2) that npllm's RoPE uses, so no permutation is needed (tests/test_hf.py checks the logits).
  * The lm_head is an nn.Linear (V, C) -> npllm's (C, V); a tied model stores none.
  * BERT's nn.Linear weights are transposed like LLaMA's. Its MLM decoder (cls.predictions.decoder) is tied to the
    word embedding and its bias to cls.predictions.bias (npllm's head.bias): a file may store either name of a tied
    pair, or both when they are equal (``tied_copies``). The pooler and the next-sentence head of BertForPreTraining
    files are not part of BertForMaskedLM and are skipped, as transformers skips them; TF-era LayerNorm.gamma/.beta
    names are read as .weight/.bias. HF's config has no [MASK] id: save_hf writes "mask_token_id" into config.json,
    and load_hf reads it from there or from the directory's vocab.txt.

The safetensors files are read and written here (an 8-byte little-endian header length, a JSON header with dtype,
shape and data_offsets per tensor, then the raw bytes), because NumPy has no bfloat16: BF16 -> float32 is the 16
bits shifted left by 16 (exact), float32 -> BF16 rounds to nearest even. F64, F32, F16 and BF16 are read; every
stored tensor is converted to the requested dtype. No torch, no pickle: a directory that holds only
pytorch_model.bin is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import asnumpy
from .config import ModelConfig
from .files import fsync_path
from .models import param_shapes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # one safetensors file holds at most this many bytes of tensors (as HF's "5GB")

# model_type -> the class we read/write
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertForMaskedLM"}
# HF's base-model prefix (absent in files saved from the base model, e.g. GPT-2's own), and its head's prefix
BASE_PREFIX = {"gpt2": "transformer.", "llama": "model.", "bert": "bert."}
HEAD_PREFIX = {"gpt2": "lm_head.", "llama": "lm_head.", "bert": "cls."}
# buffers HF may store next to the weights; they are recomputed, never parameters
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq", ".embeddings.position_ids",
                    ".embeddings.token_type_ids")
# parts of BertForPreTraining files that BertForMaskedLM has not got: the pooler and the next-sentence head
IGNORED_PREFIXES = {"bert": ("bert.pooler.", "cls.seq_relationship.")}
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are gelu's tanh approximation, npllm's "gelu"
BERT_MASK_TOKEN = "[MASK]"  # looked up in a BERT directory's vocab.txt when config.json has no mask_token_id

# safetensors dtype code <-> the dtype name HF writes in config.json, and the bytes per element
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
SAVE_DTYPES = {name: code for code, name in SAFETENSORS_DTYPES.items()}
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
LOAD_DTYPES = ("float32", "float64")  # npllm computes in these


# ----------------------------------------------------------------------------------------------------------------
# the name tables


@dataclass(frozen=True)
class Entry:
    hf: str  # the tensor's name in the Hugging Face state dict
    npllm: tuple[str, ...]  # the npllm parameters it holds; several: concatenated along the output (last) axis
    transpose: bool  # HF stores (out, in) (nn.Linear); npllm stores (in, out)


def _gpt2_table(cfg: ModelConfig) -> list[Entry]:
    E = Entry
    rows = [E("transformer.wte.weight", ("tok_emb",), False), E("transformer.wpe.weight", ("pos_emb",), False)]
    for l in range(cfg.n_layers):
        hf, np_ = f"transformer.h.{l}.", f"layers.{l}."
        rows += [
            E(hf + "ln_1.weight", (np_ + "attn_norm.w",), False),
            E(hf + "ln_1.bias", (np_ + "attn_norm.b",), False),
            E(hf + "attn.c_attn.weight", (np_ + "attn.wq", np_ + "attn.wk", np_ + "attn.wv"), False),  # (C, 3C)
            E(hf + "attn.c_attn.bias", (np_ + "attn.bq", np_ + "attn.bk", np_ + "attn.bv"), False),  # (3C,)
            E(hf + "attn.c_proj.weight", (np_ + "attn.wo",), False),
            E(hf + "attn.c_proj.bias", (np_ + "attn.bo",), False),
            E(hf + "ln_2.weight", (np_ + "mlp_norm.w",), False),
            E(hf + "ln_2.bias", (np_ + "mlp_norm.b",), False),
            E(hf + "mlp.c_fc.weight", (np_ + "mlp.w1",), False),
            E(hf + "mlp.c_fc.bias", (np_ + "mlp.b1",), False),
            E(hf + "mlp.c_proj.weight", (np_ + "mlp.w2",), False),
            E(hf + "mlp.c_proj.bias", (np_ + "mlp.b2",), False),
        ]
    rows += [E("transformer.ln_f.weight", ("norm.w",), False), E("transformer.ln_f.bias", ("norm.b",), False)]
    if not cfg.tie_embeddings:
        rows.append(E("lm_head.weight", ("lm_head",), True))
    return rows


def _llama_table(cfg: ModelConfig, attention_bias: bool, mlp_bias: bool) -> list[Entry]:
    E = Entry
    rows = [E("model.embed_tokens.weight", ("tok_emb",), False)]
    for l in range(cfg.n_layers):
        hf, np_ = f"model.layers.{l}.", f"layers.{l}."
        rows.append(E(hf + "input_layernorm.weight", (np_ + "attn_norm.w",), False))
        for proj, w in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o")):
            rows.append(E(f"{hf}self_attn.{proj}.weight", (f"{np_}attn.w{w}",), True))
            if attention_bias:
                rows.append(E(f"{hf}self_attn.{proj}.bias", (f"{np_}attn.b{w}",), False))
        rows.append(E(hf + "post_attention_layernorm.weight", (np_ + "mlp_norm.w",), False))
        for proj, w in (("gate_proj", "1"), ("up_proj", "3"), ("down_proj", "2")):
            rows.append(E(f"{hf}mlp.{proj}.weight", (f"{np_}mlp.w{w}",), True))
            if mlp_bias:
                rows.append(E(f"{hf}mlp.{proj}.bias", (f"{np_}mlp.b{w}",), False))
    rows.append(E("model.norm.weight", ("norm.w",), False))
    if not cfg.tie_embeddings:
        rows.append(E("lm_head.weight", ("lm_head",), True))
    return rows


def _bert_table(cfg: ModelConfig) -> list[Entry]:
    E = Entry
    rows = [E("bert.embeddings.word_embeddings.weight", ("tok_emb",), False),
            E("bert.embeddings.position_embeddings.weight", ("pos_emb",), False),
            E("bert.embeddings.token_type_embeddings.weight", ("seg_emb",), False),
            E("bert.embeddings.LayerNorm.weight", ("emb_norm.w",), False),
            E("bert.embeddings.LayerNorm.bias", ("emb_norm.b",), False)]
    for l in range(cfg.n_layers):
        hf, np_ = f"bert.encoder.layer.{l}.", f"layers.{l}."
        for proj, w in (("self.query", "q"), ("self.key", "k"), ("self.value", "v"), ("output.dense", "o")):
            rows += [E(f"{hf}attention.{proj}.weight", (f"{np_}attn.w{w}",), True),
                     E(f"{hf}attention.{proj}.bias", (f"{np_}attn.b{w}",), False)]
        rows += [
            E(hf + "attention.output.LayerNorm.weight", (np_ + "attn_norm.w",), False),
            E(hf + "attention.output.LayerNorm.bias", (np_ + "attn_norm.b",), False),
            E(hf + "intermediate.dense.weight", (np_ + "mlp.w1",), True),
            E(hf + "intermediate.dense.bias", (np_ + "mlp.b1",), False),
            E(hf + "output.dense.weight", (np_ + "mlp.w2",), True),
            E(hf + "output.dense.bias", (np_ + "mlp.b2",), False),
            E(hf + "output.LayerNorm.weight", (np_ + "mlp_norm.w",), False),
            E(hf + "output.LayerNorm.bias", (np_ + "mlp_norm.b",), False),
        ]
    rows += [E("cls.predictions.bias", ("head.bias",), False),
             E("cls.predictions.transform.dense.weight", ("head.dense.w",), True),
             E("cls.predictions.transform.dense.bias", ("head.dense.b",), False),
             E("cls.predictions.transform.LayerNorm.weight", ("head.norm.w",), False),
             E("cls.predictions.transform.LayerNorm.bias", ("head.norm.b",), False)]
    return rows


TOK_EMB_NAME = {"gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight",
                "bert": "bert.embeddings.word_embeddings.weight"}  # each architecture's token embedding


def tied_copies(cfg: ModelConfig, model_type: str) -> dict[str, str]:
    """{HF name of a tensor tied to a row of the table: that row's HF name}. A file may store the copy in place of
    the row's own name (it is read as the row), or both (they must be equal); save_hf writes the row only."""
    copies = {}
    if cfg.tie_embeddings:
        head = "cls.predictions.decoder.weight" if model_type == "bert" else "lm_head.weight"
        copies[head] = TOK_EMB_NAME[model_type]
    if model_type == "bert":  # BertLMPredictionHead's decoder.bias is its own .bias
        copies["cls.predictions.decoder.bias"] = "cls.predictions.bias"
    return copies


def name_table(cfg: ModelConfig, model_type: str, attention_bias: bool | None = None,
               mlp_bias: bool | None = None) -> list[Entry]:
    """The rows (HF tensor <-> npllm parameters) of ``model_type`` ("gpt2", "llama" or "bert") for ``cfg``, in HF's
    order.

    attention_bias / mlp_bias (LLaMA only; default cfg.bias): whether the HF side has those biases. GPT-2 always
    has every bias. An npllm parameter no row names is a bias the HF model lacks (it loads as zeros); a row naming
    a parameter npllm lacks is a bias npllm has not got (it saves as zeros).
    """
    if model_type == "gpt2":
        return _gpt2_table(cfg)
    if model_type == "bert":
        return _bert_table(cfg)
    if model_type == "llama":
        attention_bias = cfg.bias if attention_bias is None else attention_bias
        mlp_bias = cfg.bias if mlp_bias is None else mlp_bias
        return _llama_table(cfg, attention_bias, mlp_bias)
    raise ValueError(f"model_type={model_type!r} is not supported; allowed: {', '.join(ARCHITECTURES)}")


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("bq", "bk", "bv", "bo", "b1", "b2", "b3")


def _hf_shape(entry: Entry, shapes: dict) -> tuple[int, ...]:
    """The HF tensor's shape: the npllm shapes concatenated on the last axis, reversed when stored transposed."""
    parts = [shapes[n] for n in entry.npllm]
    shape = (*parts[0][:-1], sum(p[-1] for p in parts))
    return shape[::-1] if entry.transpose else shape


def _to_hf_layout(entry: Entry, params: dict, all_shapes: dict) -> np.ndarray:
    """The HF tensor of one row from npllm arrays (a bias npllm lacks is zeros of its shape in ``all_shapes``)."""
    parts = [asnumpy(params[n]) if n in params else np.zeros(all_shapes[n]) for n in entry.npllm]
    x = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]  # npllm's (in, out)
    return x.T if entry.transpose else x  # HF's (out, in) for nn.Linear


def _from_hf_layout(entry: Entry, x: np.ndarray, shapes: dict, dtype) -> dict:
    """The npllm arrays of one row from its HF tensor ``x``: transposed back, split on the output axis."""
    x = x.T if entry.transpose else x  # npllm's (in, out)
    bounds = np.cumsum([shapes[n][-1] for n in entry.npllm])[:-1]  # split points on the output axis
    return {name: np.ascontiguousarray(part, dtype=dtype) for name, part in zip(entry.npllm, np.split(x, bounds, -1))}


def to_hf_state(params: dict, cfg: ModelConfig, attention_bias: bool | None = None,
                mlp_bias: bool | None = None) -> dict[str, np.ndarray]:
    """{HF name: NumPy array in HF's layout} of npllm ``params`` (or of gradients, which have the same names).

    attention_bias / mlp_bias as in ``name_table``: a LLaMA loaded from a model without one of the bias groups
    maps back to exactly the tensors that model has.
    """
    model_type = hf_model_type(cfg)
    all_shapes = param_shapes(dataclasses.replace(cfg, bias=True))
    return {e.hf: _to_hf_layout(e, params, all_shapes)
            for e in name_table(cfg, model_type, attention_bias, mlp_bias)}


# ----------------------------------------------------------------------------------------------------------------
# configs


def _model_type(hf: dict, where: str) -> str:
    """"gpt2" or "llama" from config.json's "architectures" (preferred) or "model_type"; else ValueError."""
    archs = hf.get("architectures")
    if archs:
        known = [t for t, a in ARCHITECTURES.items() if a in archs]
        if not known:
            raise ValueError(f"{where}: architectures={archs} is not supported; allowed: "
                             f"{', '.join(ARCHITECTURES.values())}")
        return known[0]
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{where}: model_type={model_type!r} is not supported; allowed: {', '.join(ARCHITECTURES)}")
    return model_type


def _require(hf: dict, key: str, allowed, where: str, default=None, why: str = ""):
    """hf[key] (or default when absent); ValueError naming the field and the allowed values when it is not allowed."""
    value = hf.get(key, default)
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{where}: {key}={value!r} cannot be represented by npllm{why}; allowed: {shown}")
    return value


def _check_common(hf: dict, where: str) -> None:
    """Fields of other architectures that change the math; refused when present with a non-default value."""
    if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
        raise ValueError(f"{where}: sliding_window={hf['sliding_window']!r} cannot be represented by npllm "
                         f"(attention is full causal); allowed: null")
    _require(hf, "partial_rotary_factor", (None, 1, 1.0), where, why=" (RoPE rotates the whole head)")


def _int_field(hf: dict, key: str, where: str, default=None) -> int:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key}={value!r} must be a positive integer")
    return value


def _read_config(hf: dict, where: str = CONFIG_FILE) -> tuple[str, ModelConfig, bool, bool]:
    """(model_type, ModelConfig, attention_bias, mlp_bias) of a parsed config.json, or a one-line ValueError."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where}: a config must be a JSON object, got {type(hf).__name__}")
    model_type = _model_type(hf, where)
    _check_common(hf, where)
    if model_type == "bert":
        return model_type, _bert_config(hf, where), True, True
    if model_type == "gpt2":
        _require(hf, "activation_function", GPT2_ACTIVATIONS, where, "gelu_new",
                 " (its GELU is the tanh approximation)")
        _require(hf, "scale_attn_weights", (True,), where, True, " (scores are divided by sqrt(hs))")
        _require(hf, "scale_attn_by_inverse_layer_idx", (False,), where, False)
        _require(hf, "add_cross_attention", (False,), where, False)
        C = _int_field(hf, "n_embd", where, 768)
        n_inner = hf.get("n_inner")
        cfg = _model_config(where, vocab_size=_int_field(hf, "vocab_size", where, 50257), dim=C,
                            n_layers=_int_field(hf, "n_layer", where, 12), n_heads=_int_field(hf, "n_head", where, 12),
                            n_kv_heads=_int_field(hf, "n_head", where, 12),
                            ffn_dim=4 * C if n_inner is None else _int_field(hf, "n_inner", where),
                            max_seq_len=_int_field(hf, "n_positions", where, 1024),
                            norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), mlp="gelu",
                            pos="learned", bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
        return model_type, cfg, True, True
    _require(hf, "hidden_act", ("silu",), where, "silu", " (its SwiGLU gate is silu)")
    _require(hf, "rope_scaling", (None,), where, None, " (RoPE angles are pos * theta^(-2i/hs), unscaled)")
    theta = hf.get("rope_theta", 10000.0)
    rope_parameters = hf.get("rope_parameters")
    if rope_parameters is not None:  # transformers >= 5 keeps theta (and any scaling) here
        if not isinstance(rope_parameters, dict):
            raise ValueError(f"{where}: rope_parameters={rope_parameters!r} must be an object")
        rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"{where}: rope_parameters.rope_type={rope_type!r} cannot be represented by npllm "
                             f"(RoPE angles are pos * theta^(-2i/hs), unscaled); allowed: 'default'")
        extra = sorted(set(rope_parameters) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise ValueError(f"{where}: rope_parameters.{extra[0]}={rope_parameters[extra[0]]!r} cannot be "
                             f"represented by npllm; allowed keys: rope_type ('default'), rope_theta")
        theta = rope_parameters.get("rope_theta", theta)
    C = _int_field(hf, "hidden_size", where, 4096)
    NH = _int_field(hf, "num_attention_heads", where, 32)
    head_dim = hf.get("head_dim")
    if head_dim is not None and (NH * head_dim != C):
        raise ValueError(f"{where}: head_dim={head_dim!r} cannot be represented by npllm (its head size is "
                         f"hidden_size / num_attention_heads); allowed: {C // NH if C % NH == 0 else 'null'}")
    nkv = hf.get("num_key_value_heads")
    attention_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    cfg = _model_config(where, vocab_size=_int_field(hf, "vocab_size", where, 32000), dim=C,
                        n_layers=_int_field(hf, "num_hidden_layers", where, 32), n_heads=NH,
                        n_kv_heads=NH if nkv is None else _int_field(hf, "num_key_value_heads", where),
                        ffn_dim=_int_field(hf, "intermediate_size", where, 11008),
                        max_seq_len=_int_field(hf, "max_position_embeddings", where, 2048),
                        norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), mlp="swiglu", pos="rope",
                        rope_theta=float(theta), bias=attention_bias or mlp_bias,
                        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    return model_type, cfg, attention_bias, mlp_bias


def _bert_config(hf: dict, where: str) -> ModelConfig:
    """The ModelConfig of a BertForMaskedLM config.json (already known to be one)."""
    _require(hf, "hidden_act", ("gelu",), where, "gelu", " (its GELU is the exact erf form)")
    _require(hf, "position_embedding_type", ("absolute",), where, "absolute", " (positions are a learned table)")
    _require(hf, "is_decoder", (False,), where, False, " (BertForMaskedLM's attention is bidirectional)")
    _require(hf, "add_cross_attention", (False,), where, False)
    # untied, HF's MLM head adds decoder.bias and leaves cls.predictions.bias unused; npllm's BERT is tied only
    _require(hf, "tie_word_embeddings", (True,), where, True, " (its MLM decoder is the word embedding)")
    mask_id = hf.get("mask_token_id")
    if mask_id is None:
        raise ValueError(f"{where}: mask_token_id is missing and no vocab.txt beside it names {BERT_MASK_TOKEN}; "
                         f"npllm's encoder needs the [MASK] id: add \"mask_token_id\" (bert-base-uncased: 103)")
    rates = {}
    for key, name in (("hidden_dropout_prob", "dropout"), ("attention_probs_dropout_prob", "attn_dropout")):
        rate = hf.get(key, 0.1)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise ValueError(f"{where}: {key}={rate!r} must be a number in [0, 1)")
        rates[name] = float(rate)
    return _model_config(where, arch="encoder", vocab_size=_int_field(hf, "vocab_size", where, 30522),
                         dim=_int_field(hf, "hidden_size", where, 768),
                         n_layers=_int_field(hf, "num_hidden_layers", where, 12),
                         n_heads=_int_field(hf, "num_attention_heads", where, 12),
                         n_kv_heads=_int_field(hf, "num_attention_heads", where, 12),
                         ffn_dim=_int_field(hf, "intermediate_size", where, 3072),
                         max_seq_len=_int_field(hf, "max_position_embeddings", where, 512),
                         type_vocab_size=_int_field(hf, "type_vocab_size", where, 2),
                         norm="layernorm", norm_eps=float(hf.get("layer_norm_eps", 1e-12)), mlp="gelu_erf",
                         pos="learned", bias=True, norm_first=False,
                         tie_embeddings=True, pad_id=hf.get("pad_token_id", 0),
                         mask_id=mask_id, **rates)


def _vocab_mask_id(directory: Path) -> int | None:
    """The line number of [MASK] in a BERT directory's vocab.txt (its id), or None without one."""
    path = directory / "vocab.txt"
    if not path.is_file():
        return None
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip() == BERT_MASK_TOKEN:
            return i
    return None


def _model_config(where: str, **fields) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of a parsed Hugging Face config.json (GPT2LMHeadModel, LlamaForCausalLM or BertForMaskedLM).

    ValueError (one line, naming the field, its value and what is allowed) for anything npllm cannot compute
    exactly: another architecture or activation, RoPE scaling, partial rotary, a sliding window, a head_dim other
    than hidden_size / num_attention_heads, cross-attention... GPT-2's and LLaMA's dropout rates are ignored;
    BERT's hidden_dropout_prob and attention_probs_dropout_prob become dropout and attn_dropout, its pad_token_id
    pad_id (HF's padding_idx: the lookup never trains that row) and its mask_token_id (an npllm field) mask_id.
    A LLaMA with attention_bias but not mlp_bias (or the reverse) becomes bias=True; load_hf fills the biases HF
    lacks with zeros, which computes the same function.
    """
    return _read_config(hf)[1]


def hf_model_type(cfg: ModelConfig) -> str:
    """"gpt2", "llama" or "bert": the Hugging Face architecture that computes exactly what ``cfg`` computes; else
    ValueError."""
    if cfg.arch == "encoder":
        from .models.bert import check_config

        check_config(cfg)  # what npllm's encoder computes is BertForMaskedLM's math, or it refuses the config
        if cfg.n_kv_heads != cfg.n_heads:
            raise ValueError(f"BERT has no grouped-query attention: n_kv_heads={cfg.n_kv_heads} must equal "
                             f"n_heads={cfg.n_heads} to save as {ARCHITECTURES['bert']}")
        return "bert"
    if cfg.arch != "decoder":
        raise ValueError(f"arch={cfg.arch!r} has no Hugging Face architecture in npllm.hf; allowed: 'decoder' "
                         f"(GPT-2, LLaMA), 'encoder' (BERT)")
    if (cfg.norm, cfg.mlp, cfg.pos) == ("layernorm", "gelu", "learned"):
        if cfg.n_kv_heads != cfg.n_heads:
            raise ValueError(f"GPT-2 has no grouped-query attention: n_kv_heads={cfg.n_kv_heads} must equal "
                             f"n_heads={cfg.n_heads} to save as {ARCHITECTURES['gpt2']}")
        return "gpt2"
    if (cfg.norm, cfg.mlp, cfg.pos) == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    raise ValueError(f"norm={cfg.norm!r}, mlp={cfg.mlp!r}, pos={cfg.pos!r} has no Hugging Face architecture; allowed: "
                     f"layernorm + gelu + learned ({ARCHITECTURES['gpt2']}), rmsnorm + swiglu + rope "
                     f"({ARCHITECTURES['llama']})")


def config_to_hf(cfg: ModelConfig, dtype: str = "float32", extra: dict | None = None) -> dict:
    """The config.json contents (a dict) of ``cfg`` as a GPT2LMHeadModel, LlamaForCausalLM or BertForMaskedLM.

    dtype: the dtype the weights are stored in (written as "dtype" and, for transformers 4.x, "torch_dtype").
    extra: more fields to write, e.g. {"bos_token_id": 1, "eos_token_id": 2}; they may not replace a field written
    here. GPT-2's and LLaMA's dropout rates are written as 0, BERT's as cfg.dropout and cfg.attn_dropout. ValueError
    when no HF architecture fits ``cfg``.
    """
    _check_save_dtype(dtype)
    model_type = hf_model_type(cfg)
    if model_type == "gpt2":
        hf = {
            "architectures": [ARCHITECTURES["gpt2"]], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.dim, "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads, "n_inner": cfg.ffn_dim, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "add_cross_attention": False, "tie_word_embeddings": cfg.tie_embeddings,
        }
    elif model_type == "bert":
        hf = {
            "architectures": [ARCHITECTURES["bert"]], "model_type": "bert",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.ffn_dim, "hidden_act": "gelu",
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.attn_dropout,
            "max_position_embeddings": cfg.max_seq_len, "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.norm_eps, "pad_token_id": cfg.pad_id, "mask_token_id": cfg.mask_id,
            "is_decoder": False, "add_cross_attention": False, "classifier_dropout": None,
            "tie_word_embeddings": cfg.tie_embeddings,
        }
    else:
        hf = {
            "architectures": [ARCHITECTURES["llama"]], "model_type": "llama",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_scaling": None,  # transformers 4.x
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
            "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": 0.0,
            "tie_word_embeddings": cfg.tie_embeddings, "pretraining_tp": 1,
        }
    hf.update({"initializer_range": 0.02, "use_cache": True, "bos_token_id": None, "eos_token_id": None,
               "dtype": dtype, "torch_dtype": dtype})
    for key, value in (extra or {}).items():
        if key in hf and key not in ("bos_token_id", "eos_token_id"):
            raise ValueError(f"extra={{{key!r}: ...}} would replace a field config_to_hf writes; allowed: new fields "
                             f"and bos_token_id, eos_token_id")
        hf[key] = value
    return hf


# ----------------------------------------------------------------------------------------------------------------
# safetensors, read and written here (NumPy has no bfloat16)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32, exactly: bfloat16 is the top half of a float32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)  # same shape


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, rounded to nearest even (as torch does); NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)  # same shape
    lsb = (bits >> np.uint32(16)) & np.uint32(1)  # ties go to the even neighbour
    rounded = ((bits + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)  # same shape
    # a NaN whose payload sits in the dropped bits would round to an infinity: keep the sign and make it quiet
    return np.where(np.isnan(x), (bits >> np.uint32(16)).astype(np.uint16) | np.uint16(0x0040), rounded)


def _read_header(path: Path) -> tuple[dict, int]:
    """({name: {"dtype", "shape", "data_offsets"}}, byte offset of the data) of a safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {err})") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= size - 8 - n:
            raise ValueError(f"{path}: tensor {name!r} lies at bytes {start}..{end} of a {size - 8 - n}-byte data "
                             f"section; the file is truncated or corrupt")
    return header, 8 + n


def _read_tensor(path: Path, info: dict, data_start: int, name: str) -> np.ndarray:
    """One stored tensor as float32 (F32, F16, BF16) or float64 (F64), from a read-only memory map."""
    code = info["dtype"]
    if code not in SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} is stored as {code}; supported: {', '.join(SAFETENSORS_DTYPES)}")
    shape = tuple(info["shape"])
    start, end = info["data_offsets"]
    if end - start != math.prod(shape) * ITEM_BYTES[code]:
        raise ValueError(f"{path}: tensor {name!r} has {end - start} bytes, but {code} {list(shape)} needs "
                         f"{math.prod(shape) * ITEM_BYTES[code]}")
    if end == start:
        return np.zeros(shape, np.float32)
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start + start, shape=(end - start,))  # (bytes,)
    if code == "BF16":
        return bf16_bits_to_float32(raw.view("<u2")).reshape(shape)
    stored = raw.view({"F64": "<f8", "F32": "<f4", "F16": "<f2"}[code]).reshape(shape)
    return stored.astype(np.float64 if code == "F64" else np.float32)  # a copy: the map is closed with the file


def _encode(name: str, x: np.ndarray, code: str) -> bytes:
    """A float array as the little-endian bytes of safetensors dtype ``code``; ValueError when a value overflows."""
    if code == "BF16":
        out = float32_to_bf16_bits(x.astype(np.float32))  # float64 is rounded to float32 first
        back = bf16_bits_to_float32(out)
    else:
        with np.errstate(over="ignore"):  # an overflow is reported below, naming the tensor
            out = x.astype({"F64": "<f8", "F32": "<f4", "F16": "<f2"}[code])
        back = out
    overflow = np.isinf(back) & np.isfinite(x)
    if overflow.any():
        bad = float(x[overflow].flat[0])
        raise ValueError(f"tensor {name!r} holds {bad!r}, beyond the range of {SAFETENSORS_DTYPES[code]}; save it as "
                         f"float32 or bfloat16")
    return np.ascontiguousarray(out).tobytes()


def _write_safetensors(path: Path, tensors: list[tuple[str, str, tuple]], produce) -> None:
    """Write a safetensors file of ``tensors`` ((name, dtype code, shape) in file order), fsync'ed. The header is
    made from the shapes; produce(i) then gives tensor i's bytes, one tensor alive at a time."""
    header, offset = {}, 0
    for name, code, shape in tensors:
        size = math.prod(shape) * ITEM_BYTES[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}  # transformers refuses files without it
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    with open(path, "xb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for i, (name, _, _) in enumerate(tensors):
            raw = produce(i)
            assert len(raw) == header[name]["data_offsets"][1] - header[name]["data_offsets"][0], name
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------------
# loading


def is_hf_dir(path) -> bool:
    """True when ``path`` is a directory holding a config.json and Hugging Face weights (safetensors, or the pickle
    files load_hf refuses with its own message). An npllm checkpoint (meta.json, no config.json) is not one."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        return False
    return any((path / name).is_file() for name in (WEIGHTS_FILE, INDEX_FILE, *PICKLE_FILES))


def _stored_tensors(directory: Path) -> dict[str, tuple[Path, dict, int]]:
    """{name as stored: (file, header entry, data offset)} over model.safetensors or the shards of the index."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index_path}: not a safetensors index (needs a 'weight_map' object): {err}") from None
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS_FILE).is_file():
        weight_map, files = None, [WEIGHTS_FILE]
    elif any((directory / name).is_file() for name in PICKLE_FILES):
        raise ValueError(f"{directory} holds PyTorch pickle weights only; npllm reads safetensors (never pickles): "
                         f"re-save it with transformers' save_pretrained(safe_serialization=True)")
    else:
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}")
    stored = {}
    for file_name in files:
        path = directory / file_name
        if not path.is_file():
            raise FileNotFoundError(f"{index_path}: shard {file_name} is missing")
        header, data_start = _read_header(path)
        for name, info in header.items():
            stored[name] = (path, info, data_start)
    if weight_map is not None:
        for name, file_name in weight_map.items():
            if name not in stored or stored[name][0].name != file_name:
                raise ValueError(f"{index_path}: tensor {name!r} is listed in {file_name} but is not there")
    return stored


def _check_load_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in LOAD_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed for npllm parameters; allowed: {', '.join(LOAD_DTYPES)}")
    return dt


def read_hf_config(directory) -> dict:
    """The parsed config.json of a Hugging Face model directory (FileNotFoundError / ValueError in one line)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


def load_hf(directory, dtype=np.float32) -> tuple[dict, ModelConfig]:
    """(params, cfg) of a Hugging Face GPT2LMHeadModel, LlamaForCausalLM or BertForMaskedLM directory (safetensors
    weights).

    params: NumPy arrays of ``dtype`` (float32 or float64) in ``param_shapes(cfg)`` order. Stored F64, F32, F16 and
    BF16 tensors are converted exactly to float32/float64 (BF16 and F16 are exact in float32). Buffers HF may store
    (GPT-2's attn.bias masks, rotary inv_freq, BERT's position_ids) and the parts of a BertForPreTraining file that
    BertForMaskedLM lacks (pooler, next-sentence head) are skipped. A missing or unexpected tensor or a wrong shape
    is a one-line ValueError naming it; so is a config npllm cannot compute exactly (see ``config_from_hf``).
    """
    directory = Path(directory)
    dt = _check_load_dtype(dtype)
    config_path = directory / CONFIG_FILE
    hf_config = read_hf_config(directory)
    if isinstance(hf_config, dict) and hf_config.get("model_type") == "bert" and hf_config.get("mask_token_id") is None:
        hf_config = {**hf_config, "mask_token_id": _vocab_mask_id(directory)}  # still None without a vocab.txt
    model_type, cfg, attention_bias, mlp_bias = _read_config(hf_config, str(config_path))
    table = name_table(cfg, model_type, attention_bias, mlp_bias)
    shapes = param_shapes(cfg)

    prefix, head = BASE_PREFIX[model_type], HEAD_PREFIX[model_type]
    stored = {}
    for name, where in _stored_tensors(directory).items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        # files saved from the base model (GPT-2's own checkpoints) leave out the "transformer." prefix
        full = name if name.startswith((prefix, head)) else prefix + name
        if model_type == "bert":  # TF-era BERT files: LayerNorm.gamma / .beta
            full = full.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if not full.startswith(IGNORED_PREFIXES.get(model_type, ())):
            stored[full] = where
    wanted = {e.hf for e in table}
    copies = {}  # tied copies stored beside their original: checked to be equal to it once everything is read
    for copy, original in tied_copies(cfg, model_type).items():
        if copy in stored:
            if original in stored:
                copies[copy] = (original, stored.pop(copy))
            else:
                stored[original] = stored.pop(copy)  # only the copy's name was stored: it is the original
    for entry in table:
        if entry.hf not in stored:
            raise ValueError(f"{directory}: tensor {entry.hf!r} (npllm {', '.join(entry.npllm)}) is missing")
    unexpected = sorted(set(stored) - wanted)
    if unexpected:
        first = unexpected[0]
        raise ValueError(f"{directory}: unexpected tensor {first!r} (stored in {stored[first][0].name}) for "
                         f"{ARCHITECTURES[model_type]} with this config")

    params = {}
    for entry in table:
        path, info, data_start = stored[entry.hf]
        expect = _hf_shape(entry, shapes)
        if tuple(info["shape"]) != expect:
            raise ValueError(f"{path}: tensor {entry.hf!r} has shape {tuple(info['shape'])}; config.json says "
                             f"{expect}")
        params.update(_from_hf_layout(entry, _read_tensor(path, info, data_start, entry.hf), shapes, dt))
    for copy, (original, (path, info, data_start)) in copies.items():
        value = _read_tensor(path, info, data_start, copy)
        if not np.array_equal(value, _read_tensor(*stored[original], original)):
            raise ValueError(f"{directory}: the stored {copy} differs from {original}, which it is tied to")
    for name, shape in shapes.items():
        if name not in params:
            assert _is_bias(name), name  # the table names every weight; only biases HF lacks are left
            params[name] = np.zeros(shape, dt)
    return {name: params[name] for name in shapes}, cfg


# ----------------------------------------------------------------------------------------------------------------
# saving


def _check_save_dtype(dtype) -> str:
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed for saving; allowed: {', '.join(SAVE_DTYPES)}")
    return dtype


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_json(path: Path, obj) -> None:
    with open(path, "x") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_hf(params: dict, cfg: ModelConfig, directory, dtype: str = "float32", *,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write ``params`` as a Hugging Face model directory that ``from_pretrained`` loads: config.json and
    model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when the tensors exceed
    max_shard_bytes (a tensor larger than that gets a file of its own).

    dtype: the stored dtype, "float32" (default), "float64", "float16" or "bfloat16" (round to nearest even; float64
    params are rounded to float32 first). A value outside float16's range is a ValueError. extra: more config.json
    fields (``config_to_hf``). Atomic: everything is written into a temp directory beside ``directory``, fsync'ed,
    and renamed into place; an existing non-empty ``directory`` is replaced only with overwrite=True.
    Returns the directory's Path.
    """
    directory = Path(directory)
    hf_config = config_to_hf(cfg, dtype, extra)
    model_type, code = hf_model_type(cfg), SAVE_DTYPES[dtype]
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r} must be a positive integer")
    shapes = param_shapes(cfg)
    _check_params(params, shapes)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise ValueError(f"{directory} exists and is not empty; pass overwrite=True to replace it")

    table = name_table(cfg, model_type)
    all_shapes = param_shapes(dataclasses.replace(cfg, bias=True))  # biases HF has and npllm lacks save as zeros
    for entry in table:
        for name in entry.npllm:
            assert name in shapes or _is_bias(name), name
    # plan the shards from the shapes alone, then build and write one shard's tensors at a time
    sizes = [math.prod(_hf_shape(e, all_shapes)) * ITEM_BYTES[code] for e in table]
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weight_map = {}
        for s, rows in enumerate(shards):
            file_name = WEIGHTS_FILE if len(shards) == 1 else _shard_name(s, len(shards))
            entries = [table[i] for i in rows]

            def produce(j, entries=entries):
                return _encode(entries[j].hf, _to_hf_layout(entries[j], params, all_shapes), code)

            _write_safetensors(tmp / file_name, [(e.hf, code, _hf_shape(e, all_shapes)) for e in entries], produce)
            weight_map.update({e.hf: file_name for e in entries})
        if len(shards) > 1:
            _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})
        _write_json(tmp / CONFIG_FILE, hf_config)
        fsync_path(tmp)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _check_params(params: dict, shapes: dict) -> None:
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict {{name: array}}, got {type(params).__name__}")
    for name, shape in shapes.items():
        if name not in params:
            raise ValueError(f"params has no {name!r}; the config needs every name of param_shapes(cfg)")
        if tuple(params[name].shape) != shape:
            raise ValueError(f"params[{name!r}] has shape {tuple(params[name].shape)}; the config says {shape}")
    unexpected = [name for name in params if name not in shapes]
    if unexpected:
        raise ValueError(f"params[{unexpected[0]!r}] is not a parameter of this config")


def _replace_dir(tmp: Path, directory: Path) -> None:
    """Rename the complete ``tmp`` to ``directory``: one rename(2) when it is absent or empty; else the old one is
    first renamed aside and removed after the new one is in place."""
    old = None
    if directory.is_dir() and any(directory.iterdir()):
        old = directory.parent / f".{directory.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(directory, old)
    elif directory.is_dir():
        directory.rmdir()
    os.rename(tmp, directory)
    fsync_path(directory.parent)
    if old is not None:
        shutil.rmtree(old)
