"""What a run learns from: its data, the sampler that draws each step's training batch, and its fixed validation
batches, for each architecture and kind of data. train.py asks here and nowhere else.

    cfg.arch          data                               training batches                validation batches
    decoder           --data DIR or the default corpus   BatchSampler: random windows    windows of val.bin
    decoder           --sft FILE.jsonl (prompt/response)  SFTBatchSampler: records        held-out records in order
    encoder (BERT)    --data DIR or the default corpus   MLMSampler: masked windows      masked windows of val.bin
    encoder-decoder   --pairs FILE.jsonl (source/target)  PairSampler: padded pairs       held-out pairs in order

Every batch is a dict of (B, ...) arrays with a "targets" entry (IGNORE_INDEX where nothing is learned): the form
``npllm.models.batch_loss_and_grads`` takes for every architecture. Every sampler draws this dp rank's rows of the
step's global batch as a pure function of (seed, step, rank), with ``state_dict`` / ``load_state_dict`` for an exact
resume; validation batches are the same global batches at every evaluation.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .config import ModelConfig, TrainConfig
from .corpus import default_data_dir
from .data import BatchSampler, TrainingData, eval_batches, load_token_data
from .mlm import MLMSampler, load_mlm_data, mlm_eval_batches, mlm_spec
from .pairs import PairSampler, load_pair_records, load_pairs_data, pair_eval_batches
from .sft import SFTBatchSampler, load_sft_data, sft_eval_batches
from .tokenizer import load_tokenizer, train_tokenizer

DATA_OPTION = {"decoder": "--data or --sft", "encoder": "--data", "encoder-decoder": "--pairs"}


def check_data_options(cfg: ModelConfig, tc: TrainConfig) -> None:
    """Each architecture reads its own kind of data: ValueError naming the option otherwise."""
    given = {name: getattr(tc, name) for name in ("data", "sft", "pairs") if getattr(tc, name) is not None}
    allowed = {"decoder": {"data", "sft"}, "encoder": {"data"}, "encoder-decoder": {"pairs"}}[cfg.arch]
    for name, value in given.items():
        if name not in allowed:
            raise ValueError(f"--{name}={value} is not data for arch={cfg.arch!r}; it trains on "
                             f"{DATA_OPTION[cfg.arch]}")
    if cfg.arch == "encoder-decoder" and tc.pairs is None:
        raise ValueError("an encoder-decoder model trains on --pairs=FILE.jsonl, {\"source\": ..., \"target\": ...} "
                         "records (e.g. examples/translate.py writes one)")
    if tc.tokenizer is not None and cfg.arch != "encoder-decoder":
        raise ValueError(f"--tokenizer={tc.tokenizer} is for --pairs; a data directory names its own tokenizer")


def load_data(tc: TrainConfig, cfg: ModelConfig, weights_tokenizer, world) -> TrainingData:
    """The run's data. Token shards of --data (or of the default corpus) for a decoder or BERT; with --sft the JSONL
    records tokenized with ``weights_tokenizer``, the tokenizer of the model the weights come from; with --pairs the
    pairs tokenized with ``weights_tokenizer`` (a resumed or --init_from run), --tokenizer, or else a character
    tokenizer of the pairs' own text (every rank builds the same one; the run keeps a copy in RUN/tokenizer)."""
    check_data_options(cfg, tc)
    if tc.pairs is not None:
        tokenizer = weights_tokenizer
        if tokenizer is None:
            tokenizer = load_tokenizer(tc.tokenizer) if tc.tokenizer is not None else pairs_char_tokenizer(tc.pairs)
        check_vocab(tokenizer, cfg)
        return load_pairs_data(tc.pairs, tokenizer, tc.seq_len)
    if tc.sft is not None:
        check_vocab(weights_tokenizer, cfg)
        return load_sft_data(tc.sft, weights_tokenizer, tc.seq_len)
    data_dir = default_data_dir(cfg.vocab_size, world) if tc.data is None else Path(tc.data)
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data={tc.data}: no such directory (make one with `python -m npllm.data prepare`)")
    if cfg.arch == "encoder":
        return load_mlm_data(data_dir, cfg, tc.seq_len)
    return load_token_data(data_dir, cfg.vocab_size, tc.seq_len)


def check_vocab(tokenizer, cfg: ModelConfig) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model vocab_size={cfg.vocab_size}; "
                         f"pass --vocab_size={tokenizer.vocab_size} (or more) for a new model")


def pairs_char_tokenizer(path):
    """One id per character of the pairs' sources and targets (npllm.tokenizer's "char" kind): deterministic, so
    every rank of a parallel run builds the same tokenizer from the same file."""
    records = load_pair_records(path)
    with tempfile.TemporaryDirectory(prefix="npllm-pairs-tokenizer-") as tmp:
        texts = Path(tmp) / "texts.jsonl"  # one document per source and per target: no separator joins them
        lines = (json.dumps({"text": r[side]}) + "\n" for r in records for side in ("source", "target"))
        texts.write_text("".join(lines), encoding="utf-8")
        return train_tokenizer([texts], None, Path(tmp) / "tokenizer", kind="char")  # read into memory: tmp may go


def training_sampler(data: TrainingData, cfg: ModelConfig, tc: TrainConfig, rank: int, world_size: int):
    """This dp rank's sampler of the run's training batches."""
    common = dict(seed=tc.seed, rank=rank, world_size=world_size)
    if data.unit == "pairs":
        return PairSampler(data.train, tc.batch_size, tc.seq_len, **common)
    if data.unit == "records":
        return SFTBatchSampler(data.train, tc.batch_size, tc.seq_len, **common)
    if cfg.arch == "encoder":
        return MLMSampler(data.train, tc.batch_size, tc.seq_len, spec=mlm_spec(cfg, data.tokenizer), **common)
    return BatchSampler(data.train, tc.batch_size, tc.seq_len, **common)


def validation_batches(data: TrainingData, cfg: ModelConfig, rows: int, tc: TrainConfig) -> list[dict]:
    """The fixed validation batches of ``rows`` rows each (a global batch: dp * batch_size rows), at most
    ``eval_batches`` of them."""
    if data.unit == "pairs":
        return list(pair_eval_batches(data.val, rows, tc.eval_batches))
    if data.unit == "records":
        return [dict(tokens=x, targets=y) for x, y in sft_eval_batches(data.val, rows, tc.eval_batches)]
    if cfg.arch == "encoder":
        return list(mlm_eval_batches(data.val, rows, tc.seq_len, mlm_spec(cfg, data.tokenizer), seed=tc.seed,
                                     max_batches=tc.eval_batches))
    return [dict(tokens=x, targets=y) for x, y in eval_batches(data.val, rows, tc.seq_len, tc.eval_batches)]
