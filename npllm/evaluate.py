"""Perplexity of a model on any text: ``python -m npllm.evaluate --ckpt=OUT --data=FILE_OR_DIR``.

A token sequence longer than the model's context is scored in sliding windows of at most ``seq_len`` tokens:

    targets 1 .. N-1 (token 0 has nothing before it to predict it from) are cut into consecutive chunks:
      the first chunk is targets 1 .. seq_len, every later chunk the next ``stride`` targets (the last may be shorter);
    each chunk is scored by one window of seq_len inputs that ends right before the chunk's last target, so its
      targets see as much left context as fits: at least seq_len - stride + 1 tokens, outside the first window.

Every target is scored exactly once. stride = seq_len means disjoint windows (fastest, least context at each
window's start); stride = 1 gives every token a full seq_len of context (one forward per token). The default is
seq_len // 2: each window costs two forwards' worth, and every token past the first window sees at least half a
context. loss = mean of -log p(target | context) over the scored targets, ppl = exp(loss).

Data: a directory made by ``python -m npllm.data prepare`` (its val.bin, or --split=train), a shard file (any
file that starts with the shard magic), or a UTF-8 text file, tokenized with the checkpoint's tokenizer as one
document the way generation sees a prompt: [eos] + tokens(text) + [eos], so its first token is scored too.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import asnumpy, get_array_module
from .checks import check_int
from .cli import run_command
from .config import EvaluateConfig, ModelConfig, options_help, parse_options
from .models.decoder import model_forward
from .run import read_data_meta, load_trained
from .sampling import log_softmax


@dataclass(frozen=True)
class Window:
    start: int  # inputs are tokens[start : end], targets tokens[start + 1 : end + 1]
    end: int
    n_scored: int  # only the last n_scored targets of the window count


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """The windows that score targets 1 .. n_tokens - 1 once each (see the module docstring)."""
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {n_tokens}")
    check_int("seq_len", seq_len)
    check_int("stride", stride)
    if stride > seq_len:
        raise ValueError(f"stride={stride} is larger than seq_len={seq_len}; tokens between windows would be skipped")
    last_target = n_tokens - 1
    scored_up_to = min(seq_len, last_target)  # the first window: targets 1 .. scored_up_to, from position 0
    windows = [Window(0, scored_up_to, scored_up_to)]
    while scored_up_to < last_target:
        chunk_end = min(scored_up_to + stride, last_target)  # the chunk is targets scored_up_to+1 .. chunk_end
        windows.append(Window(chunk_end - seq_len, chunk_end, chunk_end - scored_up_to))
        scored_up_to = chunk_end
    return windows


def evaluate_tokens(params, cfg: ModelConfig, tokens, seq_len: int | None = None, stride: int | None = None,
                    batch_size: int = 8, token_bytes=None) -> dict:
    """Mean loss, perplexity and count of the targets scored by ``sliding_windows`` over ``tokens`` (N,).

    tokens: host ints (a list, array or memmap). seq_len defaults to cfg.max_seq_len, stride to seq_len // 2.
    token_bytes: the tokenizer's (V,) table of the UTF-8 bytes each id stands for (``Tokenizer.token_bytes``); with
    it the result also holds bits per byte, sum of -log2 p over the scored targets / the bytes they stand for: a
    number that does not depend on the tokenizer, so models with different vocabularies compare.
    Returns dict(loss, ppl, n_tokens[, bpb, n_bytes]); the sum of -log p is accumulated in float64 on the host.
    """
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    if check_int("seq_len", seq_len) > cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} is longer than the model's context max_seq_len={cfg.max_seq_len}")
    stride = max(1, seq_len // 2) if stride is None else stride
    check_int("batch_size", batch_size)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be a 1-D array of integer ids, got shape {tokens.shape} dtype {tokens.dtype}")
    windows = sliding_windows(len(tokens), seq_len, stride)
    xp = get_array_module(params["tok_emb"])
    total_nll, n_scored, n_bytes = 0.0, 0, 0
    for first in range(0, len(windows), batch_size):
        batch = windows[first:first + batch_size]  # every window here has the same length but maybe the only one
        x = np.stack([tokens[w.start:w.end] for w in batch]).astype(np.int64)  # (B, T)
        y = np.stack([tokens[w.start + 1:w.end + 1] for w in batch]).astype(np.int64)  # (B, T)
        if x.max() >= cfg.vocab_size:
            raise ValueError(f"token id {int(x.max())} is out of range for the model's vocab_size={cfg.vocab_size}")
        logits, _ = model_forward(params, xp.asarray(x), cfg)  # (B, T, V)
        for b, w in enumerate(batch):
            rows = asnumpy(logits[b, -w.n_scored:])  # (n_scored, V) the scored positions only
            logp = log_softmax(rows)  # (n_scored, V) float64
            targets = y[b, -w.n_scored:]  # (n_scored,)
            total_nll -= float(logp[np.arange(w.n_scored), targets].sum())
            n_scored += w.n_scored
            if token_bytes is not None:
                n_bytes += int(token_bytes[targets].sum())
    loss = total_nll / n_scored
    ppl = math.exp(loss) if loss < 709.0 else math.inf  # exp overflows float64 past ~709.78
    result = dict(loss=loss, ppl=ppl, n_tokens=n_scored)
    if token_bytes is not None and n_bytes:
        result.update(bpb=total_nll / (math.log(2) * n_bytes), n_bytes=n_bytes)
    return result


# ----------------------------------------------------------------------------------------------------------
# data


def is_token_shard(path: Path) -> bool:
    from .data import MAGIC

    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def load_eval_tokens(data, tokenizer, split: str = "val") -> tuple[np.ndarray, str]:
    """The tokens to score and a description of where they came from."""
    from .data import encode_documents, load_tokens

    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data={data}: no such file or directory")
    if path.is_dir():
        if split not in ("train", "val"):
            raise ValueError(f"--split={split!r} is not allowed; choose train or val")
        shard = path / f"{split}.bin"
        if not shard.is_file():
            raise FileNotFoundError(f"{data} has no {split}.bin; pass a directory made by `python -m npllm.data "
                                    f"prepare`, a .bin shard, or a text file")
        if (path / "meta.json").is_file():
            recorded = read_data_meta(path).tokenizer_fingerprint
            if recorded != tokenizer.fingerprint:
                raise ValueError(f"{data} was tokenized with another tokenizer (fingerprint {recorded[:12]}) than "
                                 f"the model's ({tokenizer.fingerprint[:12]})")
        path = shard
    if is_token_shard(path):
        return load_tokens(path), f"shard {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is neither a token shard nor UTF-8 text") from None
    if not text.strip():
        raise ValueError(f"{path} holds no text to score (it is empty or only whitespace)")
    doc = encode_documents([text], tokenizer)  # tokens of the text, then eos_id
    return np.concatenate([[tokenizer.eos_id], doc]).astype(np.int64), f"text {path}"


# ----------------------------------------------------------------------------------------------------------
# command line


def run(ec: EvaluateConfig, out=None) -> dict:
    out = sys.stdout if out is None else out
    params, cfg, tokenizer, _, _ = load_trained(ec.ckpt, ec.device, ec.tokenizer)
    tokens, source = load_eval_tokens(ec.data, tokenizer, ec.split)
    if ec.max_tokens is not None:
        tokens = tokens[:ec.max_tokens]
    seq_len = cfg.max_seq_len if ec.seq_len is None else ec.seq_len
    stride = max(1, seq_len // 2) if ec.stride is None else ec.stride
    result = evaluate_tokens(params, cfg, tokens, seq_len, stride, ec.batch_size, tokenizer.token_bytes())
    if ec.json:
        out.write(json.dumps(dict(result, seq_len=seq_len, stride=stride, source=source)) + "\n")
    else:
        out.write(f"loss {result['loss']:.4f} | perplexity {result['ppl']:.3f} | bits per byte "
                  f"{result.get('bpb', float('nan')):.4f} | {result['n_tokens']:,} tokens "
                  f"scored | windows of {seq_len}, stride {stride} | {source}\n")
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__.split("\n\n")[0] + "\n\nOptions:\n" + options_help(EvaluateConfig))
        return 0
    return run_command("npllm.evaluate", lambda a: run(EvaluateConfig(**parse_options(a, EvaluateConfig)[0])), argv)


if __name__ == "__main__":
    sys.exit(main())
