"""A tiny run directory for CLI tests: a real tokenizer and a random-init checkpoint with the meta npllm.train writes.

Used by tests/test_generate.py and tests/test_evaluate.py (not a test module itself).
"""

from pathlib import Path

import numpy as np

from npllm.checkpoint import save_checkpoint
from npllm.config import TrainConfig, get_preset
from npllm.corpus import default_corpus_text
from npllm.models import init_params
from npllm.run import RunMeta, TokenizerRef
from npllm.tokenizer import train_tokenizer

TINY = dict(vocab_size=400, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)


def make_run(root: Path, preset: str = "nano", seed: int = 0) -> Path:
    """root/tokenizer (400 ids, trained on 30 kB of the default corpus) and root/run/ckpt_00000001."""
    root = Path(root)
    text = root / "corpus.txt"
    text.write_text(default_corpus_text()[:30_000], encoding="utf-8")
    tokenizer = train_tokenizer([text], TINY["vocab_size"], root / "tokenizer")
    cfg = get_preset(preset, **TINY)
    params = init_params(cfg, seed=seed, dtype=np.float32)
    meta = RunMeta(model_config=cfg, train_config=TrainConfig(preset=preset), step=1, sampler=dict(seed=0, step=1),
                   tokenizer=TokenizerRef(str(tokenizer.model_path.parent), tokenizer.fingerprint),
                   data_dir=str(text))
    save_checkpoint(root / "run", 1, params, None, meta.to_json())
    return root / "run"
