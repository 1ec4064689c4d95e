"""Configuration: the model's and the run's frozen dataclasses, named presets, and ``--key=value`` parsing.

Every field carries a comment; the command line's options and their help are read off these dataclasses, so they
are the one source of options. ``param_specs(cfg)`` in ``npllm.models.decoder`` turns a ModelConfig into the ordered
list of parameters (name, shape, split axis, init); nothing else lists parameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .checks import check_choice, check_int, check_number

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu", "gelu_erf", "relu")
POSITIONS = ("rope", "learned")


@dataclass(frozen=True)
class ModelConfig:
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
    pos: str = "rope"  # "rope": rotary on q and k; "learned": pos_emb added to the token embedding
    rope_theta: float = 10000.0  # RoPE base: frequency i is theta ** (-2i / hs)
    bias: bool = False  # biases on the attention and MLP linears (GPT-2 has them, LLaMA does not)
    tie_embeddings: bool = False  # logits = x @ tok_emb.T instead of a separate lm_head

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            check_int(name, getattr(self, name))
        check_choice("norm", self.norm, NORMS)
        check_choice("mlp", self.mlp, MLPS)
        check_choice("pos", self.pos, POSITIONS)
        check_number("norm_eps", self.norm_eps, 0, low_open=True)
        check_number("rope_theta", self.rope_theta, 0, low_open=True)
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
    return text


def parse_options(argv: list[str], *classes) -> list[dict]:
    """Command-line words -> one dict of typed values per config dataclass in ``classes`` (in that order).

    Accepts ``--name=value`` and ``--name value``; a bare ``--flag`` is true for a boolean field; the last of
    repeated options wins (a script's defaults can be overridden by appending). An unknown name is refused with the
    nearest known names.
    """
    types = [field_types(cls) for cls in classes]
    out: list[dict] = [{} for _ in classes]
    words, i = list(argv), 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) == 2:
            raise ValueError(f"unexpected argument {word!r}; options look like --name=value or --name value")
        name, has_value, text = word[2:].partition("=")
        group = next((g for g, t in enumerate(types) if name in t), None)
        if group is None:
            raise ValueError(f"unknown option --{name}{_suggest(name, types)}")
        annotation = types[group][name]
        if not has_value:
            is_bool = str(annotation).replace("| None", "").strip() in ("bool", "<class 'bool'>")
            if i + 1 < len(words) and not words[i + 1].startswith("--"):
                text, i = words[i + 1], i + 1
            elif is_bool:
                text = "true"
            else:
                raise ValueError(f"option --{name} needs a value (--{name}=VALUE or --{name} VALUE)")
        out[group][name] = parse_value(name, annotation, text)
        i += 1
    return out


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
    device: str = "cpu"  # "cpu" (NumPy) or "cuda" (CuPy)
    dtype: str = "float32"  # parameter and activation dtype: "float32", or "float64" for exactness checks
    seed: int = 0  # seeds the initial weights and the data order
    steps: int = 300  # optimizer steps of the whole run (a resumed run continues up to this)
    batch_size: int = 16  # sequences per optimizer step (on each data-parallel rank)
    micro_batches: int = 1  # split each batch into this many forward/backward passes, gradients summed
    seq_len: int = 128  # T: tokens per training sequence (at most the model's max_seq_len)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
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
        check_number("min_lr", self.min_lr, 0, self.lr)
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
        if self.warmup > self.decay_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be <= lr_decay_steps={self.decay_steps}")

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
