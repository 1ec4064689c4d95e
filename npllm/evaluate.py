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

The command reads the checkpoint's cfg.arch; the two other architectures are scored on what they are trained for:

    encoder (BERT), --data     the masked-language-model loss on fixed masked rows of the data
                               (npllm.mlm.mlm_eval_batches: rows of seq_len tokens [CLS] ... [SEP] tiling the token
                               stream, masked by the validation stream of --seed), its perplexity, and the accuracy:
                               the share of the masked positions whose most likely token is the original one
    encoder-decoder, --pairs   the teacher-forced loss over the target tokens (each target's eos included), its
                               perplexity, and the exact match of greedy (or --beams) decoding: the share of pairs
                               whose output ends with eos and reads exactly as the target
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
from .layers.loss import IGNORE_INDEX
from .models.decoder import model_forward
from .run import RunMeta, read_data_meta, load_trained
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
    result = dict(loss=loss, ppl=_ppl(loss), n_tokens=n_scored)
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
# encoder (BERT): the masked-language-model objective


def evaluate_mlm(params, cfg: ModelConfig, batches) -> dict:
    """MLM loss, perplexity and accuracy over every masked position (targets != -100) of ``batches``, encoder batch
    dicts {"tokens", "segments", "key_mask", "targets"} (``npllm.mlm.mlm_eval_batches``).

    loss = mean of -log p(original token) over the masked positions (softmax over the whole vocabulary, as in
    training); accuracy = the share of them whose most likely token (the lowest id among equal logits) is the
    original. Returns dict(loss, ppl, accuracy, n_masked, n_rows); sums in float64 on the host.
    """
    from .models.bert import model_forward as encoder_forward

    xp = get_array_module(params["tok_emb"])
    total_nll, correct, n_masked, n_rows = 0.0, 0, 0, 0
    for batch in batches:
        targets = np.asarray(asnumpy(batch["targets"]))  # (B, T)
        n_rows += targets.shape[0]
        b, t = np.nonzero(targets != IGNORE_INDEX)  # (N,) each: the masked positions
        if len(b) == 0:
            continue
        logits, _ = encoder_forward(params, batch, cfg, head_rows=(xp.asarray(b), xp.asarray(t)))  # (N, V)
        logp = log_softmax(asnumpy(logits))  # (N, V) float64
        y = targets[b, t]  # (N,)
        total_nll -= float(logp[np.arange(len(y)), y].sum())
        correct += int((logp.argmax(axis=-1) == y).sum())
        n_masked += len(y)
    if n_masked == 0:
        raise ValueError(f"the {n_rows} validation rows hold no masked position; give more text to score")
    loss = total_nll / n_masked
    return dict(loss=loss, ppl=_ppl(loss), accuracy=correct / n_masked, n_masked=n_masked, n_rows=n_rows)


def mlm_settings(ec: EvaluateConfig, cfg: ModelConfig, meta: RunMeta | None) -> tuple[int, int]:
    """(seq_len, seed) of the masked rows: the options, else the run's own (its --seq_len capped at the model's
    max_seq_len, and its --seed, with which the trainer masked its validation rows), else max_seq_len and 0."""
    trained = meta.train_config if meta is not None else None
    seq_len = ec.seq_len
    if seq_len is None:
        seq_len = cfg.max_seq_len if trained is None else min(trained.seq_len, cfg.max_seq_len)
    if not 3 <= seq_len <= cfg.max_seq_len:
        raise ValueError(f"--seq_len={seq_len} is not allowed for an encoder; use 3 ([CLS], a token, [SEP]) to the "
                         f"model's max_seq_len={cfg.max_seq_len}")
    seed = ec.seed if ec.seed is not None else (0 if trained is None else trained.seed)
    return seq_len, seed


# ----------------------------------------------------------------------------------------------------------
# encoder-decoder: source/target pairs


def load_eval_pairs(path, tokenizer, cfg: ModelConfig, split: str | None = None):
    """(PairExamples, description) of a JSONL file of pairs, encoded as training encodes them (npllm.pairs); split
    "val" / "train": the part the trainer holds out / trains on (npllm.sft.split_records' fixed permutation), None:
    every pair. A pair longer than the model's max_seq_len is refused, naming its line."""
    from .pairs import encode_pair, encode_pairs, load_pair_records
    from .sft import split_records

    records = load_pair_records(path)
    too_long = []
    for record in records:
        src, tokens, _ = encode_pair(tokenizer, record["source"], record["target"])
        if max(len(src), len(tokens)) > cfg.max_seq_len:
            too_long.append(f"{path}:{record['line']}: source {len(src)} tokens (with eos), target {len(tokens)} "
                            f"(with bos)")
    if too_long:
        raise ValueError(f"{len(too_long)} pair(s) longer than the model's max_seq_len={cfg.max_seq_len} tokens, "
                         f"which it cannot read: {'; '.join(too_long[:3])}" + ("; ..." if len(too_long) > 3 else ""))
    examples = encode_pairs(records, tokenizer, cfg.max_seq_len, source=path)
    if split is None:
        return examples, f"pairs {path}"
    train_index, val_index = split_records(len(examples))
    part = val_index if split == "val" else train_index
    return examples.subset(part), f"pairs {path} (--split={split}: {len(part)} of {len(examples)})"


def evaluate_pairs(params, cfg: ModelConfig, examples, tokenizer, batch_size: int = 8,
                   max_new_tokens: int | None = None, beams: int = 1, length_penalty: float = 1.0) -> dict:
    """Teacher-forced loss and perplexity over the target tokens of ``examples`` (npllm.pairs.PairExamples), and
    the exact match of decoding each source: greedy (models.seq2seq.greedy) or beam search with ``beams``
    (models.seq2seq.translate, its best hypothesis).

    The loss is the training loss: softmax over the whole vocabulary, every target token and each target's eos.
    Decoding chooses among the tokenizer's ids (npllm.generate_encoders.tokenizer_vocabulary), at most
    max_new_tokens per source (None: the longest target with its eos; no longer output can match). An output
    matches when it ends with eos and its text equals the target's, both decoded by the tokenizer.
    Returns dict(loss, ppl, n_tokens, exact_match, n_exact, n_pairs, max_new_tokens).
    """
    from .generate_encoders import tokenizer_vocabulary
    from .models.seq2seq import forward, greedy, translate
    from .pairs import bos_of, pair_eval_batches

    check_int("batch_size", batch_size)
    xp = get_array_module(next(iter(params.values())))
    total_nll, n_tokens = 0.0, 0
    for batch in pair_eval_batches(examples, batch_size):
        logits = forward(params, {k: xp.asarray(v) for k, v in batch.items()}, cfg)  # (B, T, V)
        real = batch["targets"] != IGNORE_INDEX  # (B, T)
        logp = log_softmax(asnumpy(logits[xp.asarray(real)]))  # (N, V) float64
        y = batch["targets"][real]  # (N,)
        total_nll -= float(logp[np.arange(len(y)), y].sum())
        n_tokens += len(y)

    n_pairs = len(examples)
    sources = [examples.src[i, :examples.src_len[i]].tolist() for i in range(n_pairs)]
    targets = [examples.targets[i, :examples.tgt_len[i] - 1].tolist() for i in range(n_pairs)]  # eos dropped
    if max_new_tokens is None:
        max_new_tokens = int(examples.tgt_len.max())  # the longest target, with its eos
    dec_params, dec_cfg = tokenizer_vocabulary(params, cfg, tokenizer.vocab_size)
    bos, eos = bos_of(tokenizer), tokenizer.eos_id
    n_exact = 0
    for first in range(0, n_pairs, batch_size):
        chunk = sources[first:first + batch_size]
        if beams > 1:
            outputs = [hyps[0].tokens for hyps in translate(dec_params, dec_cfg, chunk, max_new_tokens, beams,
                                                            length_penalty, bos_id=bos, eos_id=eos)]
        else:
            outputs = greedy(dec_params, dec_cfg, chunk, max_new_tokens, bos_id=bos, eos_id=eos)
        for out, target in zip(outputs, targets[first:first + batch_size]):
            if out and out[-1] == eos and tokenizer.decode(out[:-1]) == tokenizer.decode(target):
                n_exact += 1
    loss = total_nll / n_tokens
    return dict(loss=loss, ppl=_ppl(loss), n_tokens=n_tokens, exact_match=n_exact / n_pairs, n_exact=n_exact,
                n_pairs=n_pairs, max_new_tokens=max_new_tokens)


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 709.0 else math.inf  # exp overflows float64 past ~709.78


# ----------------------------------------------------------------------------------------------------------
# command line


def check_mode(ec: EvaluateConfig, cfg: ModelConfig, where) -> None:
    """ValueError unless the options fit the checkpoint's architecture."""
    if cfg.arch == "encoder-decoder" and ec.data is not None:
        raise ValueError(f"--data={ec.data} is token data for a decoder or an encoder; {where} holds an "
                         f"encoder-decoder: pass --pairs=FILE.jsonl of {{\"source\": ..., \"target\": ...}} records")
    if cfg.arch != "encoder-decoder" and ec.pairs is not None:
        raise ValueError(f"--pairs={ec.pairs} is for an encoder-decoder checkpoint; {where} holds arch={cfg.arch!r}: "
                         f"pass --data=FILE_OR_DIR")
    if cfg.arch == "encoder" and ec.stride is not None:
        raise ValueError(f"--stride={ec.stride} is for a decoder's sliding windows; an encoder scores fixed masked "
                         f"rows (--seq_len sets their length)")
    if cfg.arch == "decoder" and ec.seed is not None:
        raise ValueError(f"--seed={ec.seed} seeds an encoder's masks; a decoder's evaluation draws nothing")



def run(ec: EvaluateConfig, out=None) -> dict:
    out = sys.stdout if out is None else out
    params, cfg, tokenizer, meta, where = load_trained(ec.ckpt, ec.device, ec.tokenizer)
    check_mode(ec, cfg, where)
    if cfg.arch == "encoder-decoder":
        return run_pairs(ec, params, cfg, tokenizer, out)
    tokens, source = load_eval_tokens(ec.data, tokenizer, ec.split or "val")
    if ec.max_tokens is not None:
        tokens = tokens[:ec.max_tokens]
    if cfg.arch == "encoder":
        return run_mlm(ec, params, cfg, tokenizer, meta, tokens, source, out)
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


def run_mlm(ec: EvaluateConfig, params, cfg: ModelConfig, tokenizer, meta, tokens, source: str, out) -> dict:
    from .mlm import mlm_eval_batches, mlm_spec

    seq_len, seed = mlm_settings(ec, cfg, meta)
    batches = mlm_eval_batches(tokens, ec.batch_size, seq_len, mlm_spec(cfg, tokenizer), seed=seed)
    result = evaluate_mlm(params, cfg, batches)
    if ec.json:
        out.write(json.dumps(dict(result, seq_len=seq_len, seed=seed, source=source)) + "\n")
    else:
        out.write(f"MLM loss {result['loss']:.4f} | perplexity {result['ppl']:.3f} | accuracy "
                  f"{result['accuracy']:.2%} | {result['n_masked']:,} masked tokens in {result['n_rows']:,} rows of "
                  f"{seq_len} (mask seed {seed}) | {source}\n")
    return result


def run_pairs(ec: EvaluateConfig, params, cfg: ModelConfig, tokenizer, out) -> dict:
    examples, source = load_eval_pairs(ec.pairs, tokenizer, cfg, ec.split)
    result = evaluate_pairs(params, cfg, examples, tokenizer, ec.batch_size, ec.max_new_tokens, ec.beams,
                            ec.length_penalty)
    decoding = "greedy" if ec.beams == 1 else f"{ec.beams} beams"
    if ec.json:
        out.write(json.dumps(dict(result, decoding=decoding, source=source), ensure_ascii=False) + "\n")
    else:
        out.write(f"loss {result['loss']:.4f} | perplexity {result['ppl']:.3f} | exact match "
                  f"{result['exact_match']:.1%} ({result['n_exact']}/{result['n_pairs']}, {decoding}, at most "
                  f"{result['max_new_tokens']} new tokens) | {result['n_tokens']:,} target tokens | {source}\n")
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__.split("\n\n")[0] + "\n\nOptions:\n" + options_help(EvaluateConfig))
        return 0
    return run_command("npllm.evaluate", lambda a: run(EvaluateConfig(**parse_options(a, EvaluateConfig)[0])), argv)


if __name__ == "__main__":
    sys.exit(main())
