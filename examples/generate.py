"""Generation and perplexity from Python: greedy, sampled, streamed and beam-searched text.

    python examples/generate.py                   # trains a tiny model (about a minute on 2 CPU cores), then generates
    python examples/generate.py --ckpt=runs/nano     # uses a checkpoint written by `python -m npllm.train`

Without --ckpt the example trains its own small model: a 512-token tokenizer and a 2-layer model on the first
60 kB of the built-in default corpus (CPython's help topics), 300 AdamW steps. Its text will be
Python-doc-flavoured babble, but visibly better than the untrained model's, and its perplexity much lower.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from npllm.config import get_preset  # noqa: E402
from npllm.corpus import default_corpus_text  # noqa: E402
from npllm.data import encode_documents  # noqa: E402
from npllm.evaluate import evaluate_tokens  # noqa: E402
from npllm.generate import beam_search, generate, prompt_ids, stream  # noqa: E402
from npllm.run import load_trained  # noqa: E402
from npllm.models import init_params  # noqa: E402
from npllm.models.decoder import loss_and_grads  # noqa: E402
from npllm.optim import adamw_init, adamw_update, clip_grad_norm  # noqa: E402
from npllm.sampling import SamplingConfig  # noqa: E402
from npllm.tokenizer import train_tokenizer  # noqa: E402


def train_tiny_model(work_dir: Path, steps: int):
    """(params, cfg, tokenizer, val_tokens) of a small model trained here."""
    text = default_corpus_text()[:60_000]
    (work_dir / "corpus.txt").write_text(text, encoding="utf-8")
    tokenizer = train_tokenizer([work_dir / "corpus.txt"], 512, work_dir / "tokenizer")
    tokens = encode_documents([text], tokenizer).astype(np.int64)  # (N,)
    split = int(0.9 * len(tokens))
    train, val = tokens[:split], tokens[split:]
    cfg = get_preset("nano", vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                     ffn_dim=176, max_seq_len=128)
    params = init_params(cfg, seed=0)
    state = adamw_init(params)
    rng = np.random.default_rng(0)
    B, T = 8, 64
    start = time.perf_counter()
    for step in range(steps):
        starts = rng.integers(0, len(train) - T - 1, B)
        x = np.stack([train[s:s + T] for s in starts])  # (B, T)
        y = np.stack([train[s + 1:s + T + 1] for s in starts])  # (B, T)
        loss, grads = loss_and_grads(params, x, y, cfg)
        clip_grad_norm(grads, 1.0)
        adamw_update(params, grads, state, lr=3e-3 * min(1.0, (step + 1) / 30), weight_decay=0.0)
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d}  train loss {loss:.3f}  ({time.perf_counter() - start:.1f} s)")
    return params, cfg, tokenizer, val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", help="a run or checkpoint directory from npllm.train (default: train one here)")
    parser.add_argument("--steps", type=int, default=300, help="training steps when no --ckpt is given")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.ckpt:
            params, cfg, tokenizer = load_trained(args.ckpt)[:3]
            val = encode_documents([default_corpus_text()[-20_000:]], tokenizer)
            untrained = None
        else:
            print("training a tiny model on 60 kB of the default corpus:")
            params, cfg, tokenizer, val = train_tiny_model(Path(tmp), args.steps)
            untrained = init_params(cfg, seed=0)

        # perplexity, in sliding windows of the model's context
        result = evaluate_tokens(params, cfg, val[:4000])
        print(f"\nheld-out text: loss {result['loss']:.3f}, perplexity {result['ppl']:.1f} "
              f"over {result['n_tokens']} tokens", end="")
        if untrained is not None:
            print(f" (untrained: {evaluate_tokens(untrained, cfg, val[:4000])['ppl']:.1f}; uniform guessing: "
                  f"{cfg.vocab_size})", end="")
        print()

        prompt = prompt_ids(tokenizer, "The for statement")
        eos = tokenizer.eos_id
        n = min(60, cfg.max_seq_len - len(prompt))

        print("\ngreedy (temperature 0):")
        out = generate(params, cfg, [prompt], n, SamplingConfig(temperature=0.0), eos_id=eos)[0]
        print("  " + tokenizer.decode(prompt + out))

        print("\nsampled, streamed as produced (temperature 0.8, top_k 40, top_p 0.95, seed 1):\n  ", end="")
        ids = list(prompt)
        shown = tokenizer.decode(ids)
        print(shown, end="", flush=True)
        for token in stream(params, cfg, prompt, n, SamplingConfig(0.8, 40, 0.95), seed=1, eos_id=eos):
            ids.append(token)
            text = tokenizer.decode(ids)
            if text.startswith(shown) and not text.endswith("\ufffd"):
                print(text[len(shown):], end="", flush=True)
                shown = text
        print()

        print("\nbeam search (4 beams, length penalty 1.0), the best 2 hypotheses:")
        for h in beam_search(params, cfg, prompt, n, beams=4, eos_id=eos)[:2]:
            print(f"  score {h.score:.3f} ({len(h.tokens)} tokens): {tokenizer.decode(prompt + h.tokens)!r}")

        print("\nseveral prompts in one call (grouped by length inside):")
        prompts = [prompt_ids(tokenizer, p) for p in ("The", "A class", "The while loop")]
        for p, out in zip(prompts, generate(params, cfg, prompts, 25, SamplingConfig(0.8, 40), seed=2, eos_id=eos)):
            print("  " + tokenizer.decode(p + out).replace("\n", " "))


if __name__ == "__main__":
    main()
