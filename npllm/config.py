"""Configuration: the model's and the run's frozen dataclasses, named presets, and ``--key=value`` parsing.

Every field carries a comment; the command line's options and their help are read off these dataclasses, so they
are the one source of options. ``param_specs(cfg)`` in ``npllm.models.decoder`` turns a ModelConfig into the ordered
list of parameters (name, shape, split axis, init); nothing else lists parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .checks import check_choice, check_int, check_number

ARCHS = ("decoder", "encoder", "encoder-decoder")
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu", "gelu_erf", "relu")
POSITIONS = ("rope", "learned", "sinusoidal")  # sinusoidal: the fixed table of Vaswani et al. (encoder-decoder)
RECOMPUTE = ("none", "attention", "block")  # what the decoder's backward recomputes instead of keeping (decoder.py)
# how the model runs, not what it computes: a resumed run or --init_from may change these (all else of the model not)
EXECUTION_FIELDS = ("impl", "recompute")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "decoder"  # "decoder" (GPT-2, LLaMA), "encoder" (BERT), "encoder-decoder" (the Transformer)
    vocab_size: int = 2048  # V: tokens in the vocabulary
    dim: int = 128  # C: width of the residual stream
    n_layers: int = 4  # L: transformer blocks
    n_heads: int = 4  # NH: query heads
    n_kv_heads: int = 4  # NKV: key/value heads (NKV < NH is grouped-query attention)
    ffn_dim: int = 352  # F: hidden width of the MLP
    max_seq_len: int = 256  # T_max: longest sequence (size of pos_emb; RoPE has no table to size)
    norm: str = "rmsnorm"  # "rmsnorm" (LLaMA) or "layernorm" (GPT-2)
    norm_eps: float = 1e-5  # eps inside the norm's square root
    mlp: str = "swiglu"  # "swiglu": (silu(x@w1) * (x@w3)) @ w2; "gelu": gelu_tanh(x@w1 + b1) @ w2 + b2
    pos: str = "rope"  # "rope": rotary on q and k; "learned": pos_emb added; "sinusoidal": the fixed table added
    rope_theta: float = 10000.0  # RoPE base: frequency i is theta ** (-2i / hs)
    bias: bool = False  # biases on the attention and MLP linears (GPT-2 has them, LLaMA does not)
    tie_embeddings: bool = False  # logits = x @ tok_emb.T instead of a separate lm_head
    n_decoder_layers: int = 0  # encoder-decoder: the decoder's blocks (n_layers counts the encoder's); else 0
    norm_first: bool = True  # pre-norm blocks x + f(norm(x)); false: post-norm norm(x + f(x)) (Transformer, BERT)
    dropout: float = 0.0  # dropout rate on the embeddings and on every block's output branch (training only)
    attn_dropout: float = 0.0  # dropout rate on the attention probabilities (training only)
    type_vocab_size: int = 0  # encoder: segment (token type) embeddings, BERT's 2; else 0
    scale_embeddings: bool = False  # token embeddings times sqrt(dim) before the positions are added (Transformer)
    pad_id: int | None = None  # the padding token: never attended to, never a target (encoder, encoder-decoder)
    mask_id: int | None = None  # encoder: the [MASK] token of the masked-language-model objective
    impl: str = "fast"  # "fast" (npllm/fast: flash attention, fused all-core elementwise work) or "reference"
    recompute: str = "none"  # decoder training: "none", or redo each "attention" / "block" in backward (less memory)
    share_embeddings: bool = False  # encoder-decoder: one tok_emb for source and target (else src_emb and tgt_emb)

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            check_int(name, getattr(self, name))
        check_choice("norm", self.norm, NORMS)
        check_choice("mlp", self.mlp, MLPS)
        check_choice("pos", self.pos, POSITIONS)
        check_number("norm_eps", self.norm_eps, 0, low_open=True)
        check_number("rope_theta", self.rope_theta, 0, low_open=True)
        check_choice("arch", self.arch, ARCHS)
        check_choice("impl", self.impl, ("fast", "reference"))
        check_choice("recompute", self.recompute, RECOMPUTE)
        if self.recompute != "none" and self.arch != "decoder":
            raise ValueError(f"recompute={self.recompute!r} is for arch='decoder' only; use 'none'")
        check_int("n_decoder_layers", self.n_decoder_layers, 1 if self.arch == "encoder-decoder" else 0)
        if self.arch != "encoder-decoder" and self.n_decoder_layers:
            raise ValueError(f"n_decoder_layers={self.n_decoder_layers} is for arch='encoder-decoder' only; use 0")
        check_number("dropout", self.dropout, 0, 1, high_open=True)
        check_number("attn_dropout", self.attn_dropout, 0, 1, high_open=True)
        check_int("type_vocab_size", self.type_vocab_size, 0)
        for name in ("pad_id", "mask_id"):
            value = check_int(name, getattr(self, name), 0, optional=True)
            if value is not None and value >= self.vocab_size:
                raise ValueError(f"{name}={value} is not a token of vocab_size={self.vocab_size}")
        if self.arch == "decoder" and (self.type_vocab_size or self.mask_id is not None):
            raise ValueError("type_vocab_size and mask_id are for arch='encoder' (BERT)")
        if self.arch == "encoder" and self.mask_id is None:
            raise ValueError("arch='encoder' trains with the masked-language-model objective: give mask_id")
        if self.pos == "sinusoidal" and self.arch == "decoder":
            raise ValueError("pos='sinusoidal' is not allowed for arch='decoder'; use 'rope' or 'learned'")
        if self.pos == "sinusoidal" and self.dim % 2:
            raise ValueError(f"dim={self.dim} is not allowed with pos='sinusoidal'; use an even dim")
        if self.arch == "encoder-decoder" and self.pos != "sinusoidal":
            raise ValueError(f"pos={self.pos!r} is not allowed for arch='encoder-decoder'; use 'sinusoidal'")
        if self.share_embeddings and self.arch != "encoder-decoder":
            raise ValueError("share_embeddings=True is for arch='encoder-decoder' (one table for source and target)")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size, got dim/n_heads={self.head_dim}")

    @property
    def head_dim(self) -> int:  # hs
        return self.dim // self.n_heads


PRESETS: dict[str, dict] = {
    # LLaMA-shaped and small: the default for tests, examples and the laptop main job.
    "nano": dict(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352, max_seq_len=256),
    # GPT-2-shaped and small: LayerNorm, GELU, learned positions, biases, tied embeddings.
    "nano-gpt2": dict(
        vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=512, max_seq_len=256,
        norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True,
    ),
    # GPT-2 small: 124,439,808 parameters.
    "gpt2-124m": dict(
        vocab_size=50257, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=3072, max_seq_len=1024,
        norm="layernorm", norm_eps=1e-5, mlp="gelu", pos="learned", bias=True, tie_embeddings=True,
    ),
    # A ~1.1B LLaMA shape (GQA), for GPU benchmarks.
    "1b": dict(
        vocab_size=32000, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, max_seq_len=2048,
    ),
    # LLaMA-7B: 6,738,415,616 parameters.
    "7b": dict(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, max_seq_len=4096,
        norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", pos="rope", rope_theta=10000.0, bias=False,
        tie_embeddings=False,
    ),
    # The encoder-decoder Transformer, small: torch.nn.Transformer's post-norm layers (ReLU, dropout 0.1 everywhere
    # torch applies it), sinusoidal positions, embeddings times sqrt(dim), one table for source, target and head.
    "seq2seq-nano": dict(
        arch="encoder-decoder", vocab_size=2048, dim=128, n_layers=3, n_decoder_layers=3, n_heads=4, n_kv_heads=4,
        ffn_dim=512, max_seq_len=64, norm="layernorm", mlp="relu", pos="sinusoidal", bias=True, norm_first=False,
        dropout=0.1, attn_dropout=0.1, scale_embeddings=True, share_embeddings=True, tie_embeddings=True,
    ),
    # Vaswani et al. (2017) base: 6 + 6 layers, d_model 512, 8 heads, d_ff 2048, dropout 0.1, a shared 37000-token
    # source/target vocabulary whose embedding is also the output layer: 63,084,544 parameters.
    "transformer-base": dict(
        arch="encoder-decoder", vocab_size=37000, dim=512, n_layers=6, n_decoder_layers=6, n_heads=8, n_kv_heads=8,
        ffn_dim=2048, max_seq_len=512, norm="layernorm", mlp="relu", pos="sinusoidal", bias=True, norm_first=False,
        dropout=0.1, attn_dropout=0.1, scale_embeddings=True, share_embeddings=True, tie_embeddings=True,
    ),
    # BERT, small (npllm/models/bert.py, BertForMaskedLM's math): post-norm encoder, exact GELU, learned positions,
    # segments A/B, the MLM decoder tied to tok_emb. [MASK] is id 0, our BPE tokenizer's unk, which encode never emits
    # (byte fallback); [CLS] and [SEP] are its bos and eos (npllm/mlm.py).
    "bert-nano": dict(
        arch="encoder", vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=512, max_seq_len=128,
        norm="layernorm", norm_eps=1e-12, mlp="gelu_erf", pos="learned", bias=True, tie_embeddings=True,
        norm_first=False, type_vocab_size=2, dropout=0.1, attn_dropout=0.1, mask_id=0,
    ),
    # BERT-base (Devlin et al. 2019, "110M"): BertForMaskedLM has 109,514,298 parameters; bert-base-uncased's
    # [PAD] is 0 and [MASK] 103.
    "bert-base": dict(
        arch="encoder", vocab_size=30522, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=3072,
        max_seq_len=512, norm="layernorm", norm_eps=1e-12, mlp="gelu_erf", pos="learned", bias=True,
        tie_embeddings=True, norm_first=False, type_vocab_size=2, dropout=0.1, attn_dropout=0.1, pad_id=0, mask_id=103,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The named preset, with any field replaced by ``overrides`` (each checked like the preset itself)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in overrides:
        if key not in fields:
            raise ValueError(f"unknown model option {key!r}; allowed: {', '.join(sorted(fields))}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def parse_value(name: str, annotation, text: str):
    """Turn the text of ``--name=text`` into the field's type ("int", "float", "bool", "str", or "X | None"),
    or raise a one-line ValueError. Numbers take any Python spelling (``2e3`` and ``2_000`` are the integer 2000);
    ``none`` is None for an optional field; an empty value is refused (an unset shell variable, say)."""
    if isinstance(annotation, type):
        type_name = annotation.__name__
    else:  # "int | None" as a string (dataclass fields here), a union type, or typing.Optional[int]
        type_name = str(annotation).replace("typing.", "")
        if type_name.startswith("Optional["):
            type_name = type_name[len("Optional["):-1] + " | None"
    base = type_name.replace("| None", "").strip()
    optional = type_name.endswith("| None")
    if text == "":
        raise ValueError(f"--{name}= is empty; give a value" + (" (or none)" if optional else "")
                         + " or leave the option out")
    if optional and text.lower() == "none":
        return None
    if base == "bool":
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name}={text!r} is not a boolean; use true or false")
    if base == "int":
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None and number.is_integer():
            return int(number)
        raise ValueError(f"--{name}={text!r} is not an integer")
    if base == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--{name}={text!r} is not a number") from None
    if base.startswith("tuple"):  # a repeatable option: one more element
        return (text,)
    return text


def parse_options(argv: list[str], *classes) -> list[dict]:
    """Command-line words -> one dict of typed values per config dataclass in ``classes`` (in that order).

    Accepts ``--name=value`` and ``--name value``; a bare ``--flag`` is true for a boolean field; a tuple field
    (``--prompt``) collects every occurrence; otherwise the last of repeated options wins (a script's defaults can
    be overridden by appending). ``--config=FILE`` (TOML or YAML, keys the option names) gives values that the other
    options override. An unknown name is refused with the nearest known names.
    """
    types = [field_types(cls) for cls in classes]
    out: list[dict] = [{} for _ in classes]
    words, i, given = list(argv), 0, []
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) == 2:
            raise ValueError(f"unexpected argument {word!r}; options look like --name=value or --name value")
        name, has_value, text = word[2:].partition("=")
        if name != "config" and not any(name in t for t in types):
            raise ValueError(f"unknown option --{name}{_suggest(name, types)}")
        annotation = "str" if name == "config" else next(t[name] for t in types if name in t)
        if not has_value and _base_type(annotation).startswith("tuple"):  # --input a b c: every word up to --
            j = i + 1
            while j < len(words) and not words[j].startswith("--"):
                given.append((name, words[j]))
                j += 1
            if j == i + 1:
                raise ValueError(f"option --{name} needs a value (--{name}=VALUE or --{name} VALUE ...)")
            i = j
            continue
        if not has_value:
            if i + 1 < len(words) and not words[i + 1].startswith("--"):
                text, i = words[i + 1], i + 1
            elif _base_type(annotation) == "bool":
                text = "true"
            else:
                raise ValueError(f"option --{name} needs a value (--{name}=VALUE or --{name} VALUE)")
        given.append((name, text))
        i += 1
    for name, text in given:
        if name == "config":
            for key, value in load_config_file(text, types).items():
                group = next(g for g, t in enumerate(types) if key in t)
                out[group][key] = value
    from_command_line: dict = {}  # the command line overrides the file; a tuple option collects its occurrences
    for name, text in given:
        if name != "config":
            group = next(g for g, t in enumerate(types) if name in t)
            value = parse_value(name, types[group][name], text)
            if _base_type(types[group][name]).startswith("tuple"):
                value = from_command_line.get(name, (group, ()))[1] + value
            from_command_line[name] = (group, value)
    for name, (group, value) in from_command_line.items():
        out[group][name] = value
    return out


def parse_subcommand(argv: list[str], commands: dict) -> tuple[str, object]:
    """``COMMAND [POSITIONAL] --options``: the command's name and its config dataclass built from the options.
    A config class may name fields that leading bare words fill (``positional = ("dir",)``)."""
    if not argv or argv[0] not in commands:
        given = f"{argv[0]!r} is not a command" if argv else "no command given"
        raise ValueError(f"{given}; choose one of: {', '.join(commands)} (each takes --help)")
    name, cls, words = argv[0], commands[argv[0]], list(argv[1:])
    for field in getattr(cls, "positional", ()):
        if words and not words[0].startswith("--"):
            words[0] = f"--{field}={words[0]}"
    return name, cls(**parse_options(words, cls)[0])


def _base_type(annotation) -> str:
    """The annotation as text without "| None": "int", "bool", "tuple[str, ...]", ..."""
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
    return text.replace("| None", "").strip()


def load_config_file(path, types: list[dict]) -> dict:
    """The options in a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file: a flat table whose keys are option names
    (a [model] / [train] table is read the same as the top level), each value checked against the option's type."""
    path = _config_path(path)
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text(encoding="utf-8"))
        else:
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # tomllib.TOMLDecodeError and yaml.YAMLError are ValueErrors
        raise ValueError(f"{path}: not valid {path.suffix[1:].upper()} ({' '.join(str(err).split())[:160]})") from None
    except ImportError as err:
        raise ValueError(f"{path}: reading it needs {err.name}; pip install pyyaml, or use a .toml file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of options, got {type(data).__name__}")
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in ("model", "train", "generate", "evaluate"):
            flat.update(value)
        else:
            flat[key] = value
    out = {}
    for key, value in flat.items():
        annotation = next((t[key] for t in types if key in t), None)
        if annotation is None:
            raise ValueError(f"{path}: unknown option {key!r}{_suggest(key, types).replace('--help', '`--help`')}")
        if _base_type(annotation).startswith("tuple") and isinstance(value, list):
            out[key] = tuple(parse_value(key, "str", str(v)) for v in value)
            continue
        text = "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        try:
            out[key] = parse_value(key, annotation, text)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return out


def _config_path(path):
    from pathlib import Path

    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"--config={path}: use a .toml, .yaml or .yml file")
    if not path.is_file():
        raise FileNotFoundError(f"--config={path}: no such file")
    return path


def write_config_file(path, *configs) -> None:
    """The resolved options of a run as TOML, one ``name = value`` line per field (fields that are None are left
    out: None is every such field's default), atomically; ``--config=`` this file runs the same run again."""
    from .files import atomic_write

    lines = ["# the resolved options of this run: python -m npllm.train --config=THIS_FILE runs it again"]
    for config in configs:
        lines.append(f"\n[{'model' if isinstance(config, ModelConfig) else 'train'}]")
        for name, value in dataclasses.asdict(config).items():
            if value is not None:
                lines.append(f"{name} = {_toml_value(value)}")
    atomic_write(path, "\n".join(lines) + "\n")


def _toml_value(value) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a basic TOML string: JSON's escapes are TOML's


def _suggest(name: str, types: list[dict]) -> str:
    import difflib

    names = sorted(set().union(*types))
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    if close:
        return "; did you mean " + " or ".join("--" + c for c in close) + "? (--help lists every option)"
    return "; --help lists every option"


def field_types(cls) -> dict:
    """{field name: annotation} of a config dataclass."""
    return {f.name: f.type for f in dataclasses.fields(cls)}


DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run that is not the model's shape. Every field is a ``--name=value`` option."""

    preset: str = "nano"  # model preset; model fields given as options override it
    data: str | None = None  # directory made by `python -m npllm.data prepare`; None: the built-in default corpus
    out_dir: str = "runs/nano"  # checkpoints, metrics.jsonl and loss.png go here
    resume: str | None = None  # a run directory (or checkpoint) to continue exactly where it stopped
    overwrite: bool = False  # start anew in an out_dir that holds a run: the old run is renamed aside, not deleted
    init_from: str | None = None  # a run directory (or checkpoint) whose weights start a new run (fresh AdamW, step 0)
    sft: str | None = None  # a .jsonl file of {"prompt", "response"} records to fine-tune on (needs init_from)
    pairs: str | None = None  # an encoder-decoder's .jsonl file of {"source", "target"} records
    tokenizer: str | None = None  # --pairs: a tokenizer directory; None: one id per character of the pairs' text
    device: str = "cpu"  # "cpu" (NumPy) or "cuda" (CuPy)
    dtype: str = "float32"  # parameter and activation dtype: "float32", or "float64" for exactness checks
    seed: int = 0  # seeds the initial weights and the data order
    steps: int = 300  # optimizer steps of the whole run (a resumed run continues up to this)
    batch_size: int = 16  # sequences per optimizer step (on each data-parallel rank)
    micro_batches: int = 1  # split each batch into this many forward/backward passes, gradients summed
    row_groups: int | None = None  # cut each micro-batch's rows into this many groups run side by side, one per core
    # (their gradients summed in row order); None: one per core of this process, at most the rows (1 on a GPU, tp > 1)
    seq_len: int = 128  # T: tokens per training sequence (at most, and by default capped at, the max_seq_len)
    lr: float = 1e-3  # peak learning rate
    min_lr: float | None = None  # learning rate at the end of the cosine decay; None: a tenth of lr
    warmup_steps: int | None = None  # linear warmup steps; None: 10% of lr_decay_steps
    lr_decay_steps: int | None = None  # steps of the cosine schedule; None: the same as steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay on 2-D weights
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 disables)
    eval_interval: int = 50  # evaluate validation loss every this many steps (and at the last step)
    eval_batches: int = 8  # validation batches per evaluation (the same fixed windows each time)
    log_interval: int = 10  # print a line every this many steps (metrics.jsonl gets every step)
    ckpt_interval: int = 100  # save a checkpoint every this many steps (and at the last step)
    keep_checkpoints: int = 3  # how many recent checkpoints to keep
    peak_tflops: float | None = None  # peak FLOP/s of the device for MFU, in TFLOP/s; None: measured at start
    # parallel training under mpirun (docs/parallelism.md): world = tp x dp ranks
    tp: int = 1  # tensor-parallel ranks per model replica; must divide the ranks and n_heads, n_kv_heads, ffn_dim, V
    dp: int | None = None  # data-parallel ranks; None: (ranks under mpirun) / tp. --dry_run plans for it (default 1)
    zero: int = 0  # 1: ZeRO-1, the AdamW moments and the update sharded over the dp ranks
    dry_run: bool = False  # print parameters, bytes per rank, FLOPs per token and the fit, allocate nothing, exit
    device_memory_gb: float | None = None  # GiB per rank for --dry_run's fit; None: 80 (cuda), RAM / ranks (cpu)

    def __post_init__(self):
        check_choice("device", self.device, ("cpu", "cuda"))
        check_choice("dtype", self.dtype, DTYPES)
        for name in ("steps", "batch_size", "micro_batches", "seq_len", "eval_interval", "eval_batches",
                     "log_interval", "ckpt_interval", "keep_checkpoints"):
            check_int(name, getattr(self, name))
        check_int("seed", self.seed, 0)
        check_number("lr", self.lr, 0)
        check_number("min_lr", self.min_lr, 0, self.lr, optional=True)
        check_number("beta1", self.beta1, 0, 1, high_open=True)
        check_number("beta2", self.beta2, 0, 1, high_open=True)
        check_number("eps", self.eps, 0, low_open=True)
        check_number("weight_decay", self.weight_decay, 0)
        check_number("grad_clip", self.grad_clip, 0)  # 0 disables clipping
        check_int("lr_decay_steps", self.lr_decay_steps, optional=True)
        check_int("warmup_steps", self.warmup_steps, 0, optional=True)
        check_number("peak_tflops", self.peak_tflops, 0, low_open=True, optional=True)
        check_int("tp", self.tp)
        check_int("dp", self.dp, optional=True)
        check_choice("zero", self.zero, (0, 1))
        check_number("device_memory_gb", self.device_memory_gb, 0, low_open=True, optional=True)
        if self.sft is not None and self.init_from is None:
            raise ValueError(f"--sft={self.sft} needs --init_from=CKPT: fine-tuning starts from a trained "
                             f"checkpoint's weights and tokenizer")
        if self.sft is not None and self.data is not None:
            raise ValueError(f"--sft={self.sft} and --data={self.data} are two kinds of training data; give one")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by micro_batches={self.micro_batches}")
        check_int("row_groups", self.row_groups, optional=True)
        if self.row_groups is not None and self.row_groups > self.batch_size // self.micro_batches:
            raise ValueError(f"row_groups={self.row_groups} is more than the {self.batch_size // self.micro_batches} "
                             f"rows of a micro-batch (batch_size / micro_batches); use at most that many")
        if self.warmup > self.decay_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be <= lr_decay_steps={self.decay_steps}")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def decay_steps(self) -> int:
        return self.steps if self.lr_decay_steps is None else self.lr_decay_steps

    @property
    def warmup(self) -> int:
        return self.decay_steps // 10 if self.warmup_steps is None else self.warmup_steps


def describe_fields(cls) -> list[tuple[str, str, str]]:
    """(name, default, comment) of every field of a config dataclass; the comment is the one on its line above."""
    import inspect
    import re

    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+): [^=]+=.*?  # (.*)$", line)
        if match:
            comments[match.group(1)] = match.group(2)
    return [(f.name, repr(f.default), comments.get(f.name, "")) for f in dataclasses.fields(cls)]


def options_help(cls) -> str:
    """One line per field of a config dataclass: ``--name=default   meaning``."""
    return "\n".join(f"  {'--' + name + '=' + default:<26} {comment}"
                     for name, default, comment in describe_fields(cls))


@dataclass(frozen=True)
class GenerateConfig:
    """Every option of ``python -m npllm.generate``."""

    ckpt: str | None = None  # a run directory, a ckpt_XXXXXXXX directory (or a Hugging Face model directory)
    prompt: tuple[str, ...] = ()  # prompt text (an encoder-decoder: a source); repeat --prompt for several prompts
    prompt_file: str | None = None  # a UTF-8 file with one prompt per line (\n for a newline); "-": standard input
    max_new_tokens: int | None = None  # tokens to generate per prompt at most; None: 100 (at most max_seq_len)
    temperature: float | None = None  # 0 is greedy; None: 1.0 (an encoder-decoder: greedy without sampling options)
    top_k: int | None = None  # keep the k most likely tokens; None or 0: all. --fill_mask: guesses per [MASK] (5)
    top_p: float | None = None  # keep the smallest set of likeliest tokens holding this probability; None: 1 (all)
    seed: int = 0  # seeds each prompt's own sampling stream
    beams: int = 1  # beam search with this many beams (1: sampling or greedy)
    length_penalty: float = 1.0  # beam score = sum of log-probs / length ** length_penalty
    stop: tuple[str, ...] = ()  # end a prompt's text before the first of these strings; repeatable
    json: bool = False  # one JSON object per prompt (prompt, completion, new_tokens, finish_reason, tokens_per_s)
    no_kv_cache: bool = False  # run the full forward at every step (the slow reference) instead of the KV cache
    device: str = "cpu"  # "cpu" (NumPy) or "cuda" (CuPy)
    tokenizer: str | None = None  # a tokenizer directory; None: the one the checkpoint recorded
    fill_mask: tuple[str, ...] = ()  # an encoder (BERT): text with [MASK] where a token is to be guessed; repeatable

    def __post_init__(self):
        if self.ckpt is None:
            raise ValueError("--ckpt is required: a run directory or a checkpoint directory")
        check_int("max_new_tokens", self.max_new_tokens, optional=True)
        check_int("seed", self.seed, 0)
        check_int("beams", self.beams)
        check_number("length_penalty", self.length_penalty, 0)
        check_choice("device", self.device, ("cpu", "cuda"))
        if self.fill_mask:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            unused = [n for n in FILL_MASK_UNUSED if getattr(self, n) != defaults[n]]
            if unused:
                raise ValueError(f"--{unused[0]}={getattr(self, unused[0])!r} does not apply to --fill_mask, which "
                                 f"guesses each [MASK] in one forward; with it use --top_k, --json, --device, "
                                 f"--tokenizer")
            check_int("top_k", self.top_k, optional=True)
            return
        given = [n for n in ("temperature", "top_k", "top_p") if getattr(self, n) is not None]
        if self.beams > 1 and given:
            raise ValueError(f"--{given[0]} applies to sampling; beam search (--beams={self.beams}) is deterministic "
                             f"and takes no sampling options")
        if any(s == "" for s in self.stop):
            raise ValueError("--stop= is empty; a stop string needs at least one character")
        self.sampling  # checks temperature, top_k, top_p

    @property
    def sampling(self):
        from .sampling import SamplingConfig

        return SamplingConfig(temperature=1.0 if self.temperature is None else self.temperature,
                              top_k=0 if self.top_k is None else self.top_k,
                              top_p=1.0 if self.top_p is None else self.top_p)

    @property
    def samples(self) -> bool:
        """True when a sampling option asks for sampling (a temperature other than 0, or top_k / top_p alone)."""
        given = any(getattr(self, n) is not None for n in ("temperature", "top_k", "top_p"))
        return given and self.temperature != 0

    @property
    def kv_cache(self) -> bool:
        return not self.no_kv_cache


# the options of decoding that --fill_mask (one forward per text, no decoding) refuses
FILL_MASK_UNUSED = ("prompt", "prompt_file", "max_new_tokens", "temperature", "top_p", "seed", "beams",
                    "length_penalty", "stop", "no_kv_cache")


@dataclass(frozen=True)
class EvaluateConfig:
    """Every option of ``python -m npllm.evaluate``."""

    ckpt: str | None = None  # a run directory or ckpt_XXXXXXXX directory (or a Hugging Face model directory)
    data: str | None = None  # decoder, encoder: a data directory (its val.bin), a token shard, or a UTF-8 text file
    pairs: str | None = None  # encoder-decoder: a .jsonl file of {"source": ..., "target": ...} records
    split: str | None = None  # a data directory: "val" (None) or "train"; --pairs: the training split's, None: all
    seq_len: int | None = None  # decoder: window length, None: max_seq_len; encoder: row length, None: the run's
    stride: int | None = None  # decoder: new targets per window; None: seq_len // 2
    batch_size: int = 8  # windows, rows or pairs per forward
    max_tokens: int | None = None  # score only the first N tokens; None: all
    seed: int | None = None  # encoder: seeds the validation masks; None: the run's --seed (0 without a run)
    max_new_tokens: int | None = None  # encoder-decoder: tokens decoded per source; None: the longest target's
    beams: int = 1  # encoder-decoder: exact match of beam search with this many beams (1: greedy)
    length_penalty: float = 1.0  # encoder-decoder, --beams: score = sum of log-probs / length ** length_penalty
    device: str = "cpu"  # "cpu" (NumPy) or "cuda" (CuPy)
    tokenizer: str | None = None  # a tokenizer directory; None: the one the checkpoint recorded
    json: bool = False  # print one JSON object instead of a sentence

    def __post_init__(self):
        if self.ckpt is None:
            raise ValueError("--ckpt is required")
        if (self.data is None) == (self.pairs is None):
            raise ValueError("give --data=FILE_OR_DIR (a decoder or an encoder) or --pairs=FILE.jsonl (an "
                             "encoder-decoder)" + ("" if self.data is None else ", not both"))
        check_choice("split", self.split, (None, "val", "train"))
        check_int("seq_len", self.seq_len, optional=True)
        check_int("stride", self.stride, optional=True)
        check_int("batch_size", self.batch_size)
        check_int("max_tokens", self.max_tokens, 2, optional=True)
        check_int("seed", self.seed, 0, optional=True)
        check_int("max_new_tokens", self.max_new_tokens, optional=True)
        check_int("beams", self.beams)
        check_number("length_penalty", self.length_penalty, 0)
        check_choice("device", self.device, ("cpu", "cuda"))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        unused = PAIRS_UNUSED if self.pairs is not None else ("max_new_tokens", "beams", "length_penalty")
        for name in unused:
            if getattr(self, name) != defaults[name]:
                raise ValueError(f"--{name}={getattr(self, name)!r} does not apply to "
                                 f"{'--pairs' if self.pairs is not None else '--data'}; it is for "
                                 f"{'--data' if self.pairs is not None else '--pairs (an encoder-decoder)'}")


PAIRS_UNUSED = ("seq_len", "stride", "max_tokens", "seed")  # options about token streams, which --pairs refuses


@dataclass(frozen=True)
class PrepareConfig:
    """``python -m npllm.data prepare``: text to token shards."""

    input: tuple[str, ...] = ()  # text files (a document each), .jsonl (a document per line), .gz, folders, globs
    tokenizer: str | None = None  # the tokenizer directory: ours, or a Hugging Face model directory
    out: str | None = None  # the output directory: train.bin, val.bin, meta.json
    val_fraction: float = 0.1  # share of the documents held out for validation
    field: str = "text"  # the JSON field that holds the text in .jsonl inputs
    workers: int | None = None  # encoding processes; None: one per core

    def __post_init__(self):
        for name in ("input", "tokenizer", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        check_number("val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)
        check_int("workers", self.workers, optional=True)


@dataclass(frozen=True)
class TokenizerTrainConfig:
    """``python -m npllm.tokenizer train``: a tokenizer from text."""

    input: tuple[str, ...] = ()  # text or .jsonl files (.gz too), folders, glob patterns
    out: str | None = None  # the tokenizer directory to write
    kind: str = "bpe"  # "bpe" (byte-fallback BPE) or "char" (one id per character)
    vocab_size: int | None = None  # token ids; bpe needs it; char: 3 .. 2 + the distinct characters (None: all)
    field: str = "text"  # the JSON field that holds the text in .jsonl inputs

    def __post_init__(self):
        for name in ("input", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        check_choice("kind", self.kind, ("bpe", "char"))
        check_int("vocab_size", self.vocab_size, optional=True)


@dataclass(frozen=True)
class TokenizerShowConfig:
    """``python -m npllm.tokenizer show DIR``: describe a tokenizer (ours or a Hugging Face one)."""

    positional = ("dir",)
    dir: str | None = None  # the tokenizer directory

    def __post_init__(self):
        if not self.dir:
            raise ValueError("give the tokenizer directory: show DIR")


@dataclass(frozen=True)
class TokenizerCopyConfig:
    """``python -m npllm.tokenizer copy DIR --out=DEST``: copy any tokenizer into one of our directories."""

    positional = ("dir",)
    dir: str | None = None  # the tokenizer to copy
    out: str | None = None  # the directory to make

    def __post_init__(self):
        if not self.dir or not self.out:
            raise ValueError("give the tokenizer and the destination: copy DIR --out=DEST")
