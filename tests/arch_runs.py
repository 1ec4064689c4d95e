"""Tiny BERT and encoder-decoder run directories for the command-line tests of npllm.generate and npllm.evaluate (not a
test module): checkpoints saved with the meta npllm.train writes, built from library calls in a few seconds, once per
test session (``cached``).

    bert_run        a random BERT whose MLM head is biased towards frequent tokens (so that its accuracy is neither
                    0 nor 1), a 400-id BPE tokenizer; the run records seq_len=12 and seed=5 (not the defaults)
    seq2seq_run     an encoder-decoder trained for 150 steps to reverse strings of 2-4 letters of "abcdef" (a
                    character tokenizer of 8 ids, a model of 16 vocabulary rows: 8 padding rows); most of its
                    outputs are right, not all
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from npllm.checkpoint import save_checkpoint
from npllm.config import TrainConfig, get_preset
from npllm.corpus import default_corpus_text
from npllm.models import init_params
from npllm.run import RunMeta, TokenizerRef
from npllm.tokenizer import train_tokenizer

BERT = dict(vocab_size=400, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64, max_seq_len=32, dropout=0.0,
            attn_dropout=0.0)
BERT_TRAIN = dict(seq_len=12, seed=5)  # what the run records: evaluate's defaults for the encoder
SEQ2SEQ = dict(vocab_size=16, dim=32, n_layers=1, n_decoder_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64,
               max_seq_len=8, dropout=0.0, attn_dropout=0.0)
LETTERS = "abcdef"


def cached(tmp_path_factory, name: str, build) -> Path:
    """build(directory) once per session into the session's temporary directory; the directory afterwards."""
    directory = tmp_path_factory.getbasetemp() / name
    if not (directory / "built").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        build(directory)
        (directory / "built").write_text("")
    return directory


def save_run(root: Path, cfg, params: dict, tokenizer, data: str, **train_options) -> Path:
    """root/run/ckpt_00000001 with the RunMeta npllm.train writes (the tokenizer referenced where it lies)."""
    meta = RunMeta(model_config=cfg, train_config=TrainConfig(**train_options), step=1, sampler=dict(seed=0, step=1),
                   tokenizer=TokenizerRef(str(tokenizer.model_path.parent), tokenizer.fingerprint), data_dir=data)
    save_checkpoint(root / "run", 1, params, None, meta.to_json())
    return root / "run"


def build_bert(root: Path) -> None:
    """root/corpus.txt, root/tokenizer, root/run."""
    text = root / "corpus.txt"
    text.write_text(default_corpus_text()[:30_000], encoding="utf-8")
    tokenizer = train_tokenizer([text], BERT["vocab_size"], root / "tokenizer")
    cfg = get_preset("bert-nano", **BERT)
    params = init_params(cfg, seed=1)
    counts = np.bincount(tokenizer.encode(text.read_text(encoding="utf-8")), minlength=cfg.vocab_size)  # (V,)
    params["head.bias"] = np.log1p(counts).astype(np.float32) * 0.5  # (V,) frequent tokens first, not always
    save_run(root, cfg, params, tokenizer, str(text), preset="bert-nano", **BERT_TRAIN)


def bert_run(tmp_path_factory) -> Path:
    """The BERT run directory (its corpus is ../corpus.txt)."""
    return cached(tmp_path_factory, "bert_run", build_bert) / "run"


def reverse_words(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(LETTERS), rng.integers(2, 5))) for _ in range(n)]


def write_pairs(path: Path, sources: list[str], targets: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for source, target in zip(sources, targets):
            f.write(json.dumps({"source": source, "target": target}) + "\n")
    return path


def build_seq2seq(root: Path, steps: int = 150) -> None:
    """root/pairs.jsonl (400 reversals), root/tokenizer (characters), root/run."""
    from npllm.models import accumulate_loss_and_grads
    from npllm.optim import adamw_init, adamw_update, clip_grad_norm, lr_at
    from npllm.pairs import PairSampler, load_pairs_data

    words = reverse_words(400, seed=0)
    write_pairs(root / "pairs.jsonl", words, [w[::-1] for w in words])
    (root / "chars.txt").write_text(LETTERS, encoding="utf-8")
    tokenizer = train_tokenizer([root / "chars.txt"], None, root / "tokenizer", kind="char")
    cfg = get_preset("seq2seq-nano", **SEQ2SEQ)
    data = load_pairs_data(root / "pairs.jsonl", tokenizer, cfg.max_seq_len)
    params = init_params(cfg, seed=0)
    state = adamw_init(params)
    sampler = PairSampler(data.train, 32, cfg.max_seq_len, seed=0)
    for step in range(steps):
        loss, grads = accumulate_loss_and_grads(params, sampler.next_batch(), cfg)
        clip_grad_norm(grads, 1.0)
        lr = lr_at(step, lr=1e-2, warmup_steps=10, total_steps=steps, min_lr=1e-3)
        adamw_update(params, grads, state, lr=lr, beta1=0.9, beta2=0.98, eps=1e-9, weight_decay=0.0)
    save_run(root, cfg, params, tokenizer, str(root / "pairs.jsonl"), preset="seq2seq-nano",
             pairs=str(root / "pairs.jsonl"), seq_len=cfg.max_seq_len)


def seq2seq_run(tmp_path_factory) -> Path:
    """The encoder-decoder run directory (its pairs are ../pairs.jsonl)."""
    return cached(tmp_path_factory, "seq2seq_run", build_seq2seq) / "run"
