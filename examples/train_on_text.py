"""Train a small model on your own text file, from Python, in about a minute on a laptop.

    python examples/train_on_text.py path/to/book.txt [OUT_DIR]

The three stages are the library's public functions, one call each (each also has a command line, shown in the
comments):

    text file --train_tokenizer--> OUT/tokenizer/   (sentencepiece BPE, byte fallback)
              --prepare_data-----> OUT/data/        (train.bin, val.bin: uint16 token shards)
              --train------------> OUT/run/         (checkpoints, metrics.jsonl, loss.png)

Any UTF-8 text of a few hundred KB works (a book from Project Gutenberg, your notes, source code). Run it again with
a bigger model or more steps by changing MODEL and RUN below; docs/training.md explains every option.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from npllm.config import TrainConfig, get_preset
from npllm.data import prepare_data
from npllm.tokenizer import train_tokenizer
from npllm.train import train

VOCAB_SIZE = 512  # small text, small vocabulary: common words become one token, the rest byte-level pieces
# A 2-layer LLaMA-shaped model (RMSNorm, RoPE, SwiGLU, grouped-query attention), ~0.2M parameters.
MODEL = dict(vocab_size=VOCAB_SIZE, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=128)
RUN = dict(steps=300, batch_size=8, seq_len=64, lr=3e-3, min_lr=3e-4, eval_interval=50, eval_batches=8,
           log_interval=25, ckpt_interval=100)


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    text_file = Path(argv[0])
    out = Path(argv[1]) if len(argv) == 2 else Path("runs") / f"text-{text_file.stem}"
    try:
        # 1. tokenizer   (CLI: python -m npllm.tokenizer train --input FILE --vocab_size 512 --out OUT/tokenizer)
        tokenizer = train_tokenizer([text_file], VOCAB_SIZE, out / "tokenizer")
        print(f"tokenizer: {tokenizer.vocab_size} tokens in {out / 'tokenizer'}")

        # 2. token shards   (CLI: python -m npllm.data prepare --input FILE --tokenizer OUT/tokenizer --out OUT/data)
        meta = prepare_data([text_file], out / "tokenizer", out / "data")
        print(f"data: {meta.train_tokens:,} train + {meta.val_tokens:,} val tokens in {out / 'data'}")

        # 3. training   (CLI: python -m npllm.train --preset=nano --dim=64 ... --data=OUT/data --out_dir=OUT/run)
        cfg = get_preset("nano", **MODEL)
        tc = TrainConfig(data=str(out / "data"), out_dir=str(out / "run"), **RUN)
        history = train(cfg, tc)
    except (ValueError, FileNotFoundError) as err:
        print(f"train_on_text: error: {err}", file=sys.stderr)
        return 1

    val = [m["val_loss"] for m in history if "val_loss" in m]
    print(f"\nval loss {val[0]:.3f} (untrained) -> {val[-1]:.3f} after {tc.steps} steps")
    print(f"checkpoint:  {out / 'run'} (resume with: python -m npllm.train --resume={out / 'run'} --steps=600)")
    print(f"loss curve:  {out / 'run' / 'loss.png'}  (if matplotlib is installed)")
    print(f"metrics:     {out / 'run' / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
