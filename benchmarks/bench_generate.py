"""Tokens per second of KV-cached versus uncached generation, in one process on the same model.

    python benchmarks/bench_generate.py                       # nano, 32-token prompt, 256 new tokens, CPU float32
    python benchmarks/bench_generate.py --batch=4 --device=cuda

The model is a random-init preset (the speed of a forward does not depend on the weights' values) with
max_seq_len raised to fit prompt + new tokens. Both paths decode greedily with no EOS, so both produce exactly
--new_tokens tokens per prompt; the tokens are checked to be equal. Each path runs once to warm up, then
--repeats times; the best time is reported (the least disturbed by other work on the machine).

Uncached decoding runs a full forward over the whole sequence for every new token: O(T^2) work per token in
attention and O(T) in everything else, against O(T) and O(1) with the cache, so the ratio grows with the length.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from npllm.backend import xp_for_device  # noqa: E402
from npllm.config import get_preset  # noqa: E402
from npllm.generate import generate  # noqa: E402
from npllm.models import init_params, num_params  # noqa: E402


def time_generation(params, cfg, prompts, new_tokens, use_kv_cache, repeats):
    """(best seconds, tokens) for greedy generation of new_tokens per prompt."""
    out = generate(params, cfg, prompts, new_tokens, use_kv_cache=use_kv_cache)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(params, cfg, prompts, new_tokens, use_kv_cache=use_kv_cache)  # ends on a host copy
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="prompts of equal length decoded as one batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args(argv)

    base = get_preset(args.preset)
    cfg = get_preset(args.preset, max_seq_len=max(base.max_seq_len, args.prompt_len + args.new_tokens))
    params = init_params(cfg, seed=0, dtype=np.dtype(args.dtype), xp=xp_for_device(args.device))
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()
    print(f"{args.preset}: {num_params(cfg):,} parameters, max_seq_len {cfg.max_seq_len} | "
          f"{args.device} {args.dtype} | "
          f"batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, best of {args.repeats}")

    n_tokens = args.batch * args.new_tokens
    t_cached, out_cached = time_generation(params, cfg, prompts, args.new_tokens, True, args.repeats)
    t_plain, out_plain = time_generation(params, cfg, prompts, args.new_tokens, False, args.repeats)
    same = sum(a == b for a, b in zip(out_cached, out_plain))
    print(f"cached (KV cache):          {n_tokens / t_cached:10.1f} tokens/s  ({t_cached:.3f} s)")
    print(f"uncached (full forward):    {n_tokens / t_plain:10.1f} tokens/s  ({t_plain:.3f} s)")
    print(f"ratio cached / uncached:    {t_plain / t_cached:10.2f} x")
    print(f"identical tokens:           {same}/{args.batch} prompts")


if __name__ == "__main__":
    main()
