"""Fine-tuning on prompt/response pairs: pretrain a tiny model, fine-tune it on a JSONL file, ask it new questions.

    python examples/finetune.py                        # pretrains its own tiny model first (about 1-2 min on 2 cores)
    python examples/finetune.py --ckpt=runs/nano       # fine-tunes a run written by `python -m npllm.train`
    python examples/finetune.py --out=runs/finetune    # keep the files (default: a temporary directory)

The task is one a small model cannot know from pretraining and can learn from a few hundred examples: copying or
reversing the digits of a number, as asked.

    {"prompt": "Copy 4721:", "response": " 4721"}
    {"prompt": "Reverse 4721:", "response": " 1274"}

The example writes such records to OUT/tasks.jsonl, runs the same command a user would,

    python -m npllm.train --init_from=OUT/pretrained --sft=OUT/tasks.jsonl --out_dir=OUT/finetuned ...

(here through npllm.train.main), then loads the fine-tuned checkpoint with npllm.generate's functions and answers
prompts whose numbers are in no record (held out), greedily, stopping at the EOS the records taught it to emit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from npllm.corpus import default_corpus_text  # noqa: E402
from npllm.data import prepare_data  # noqa: E402
from npllm.generate import generate, prompt_ids  # noqa: E402
from npllm.run import load_trained  # noqa: E402
from npllm.sampling import SamplingConfig  # noqa: E402
from npllm.tokenizer import train_tokenizer  # noqa: E402
from npllm.metrics import read_metrics  # noqa: E402
from npllm.train import main as train_main  # noqa: E402

# A 2-layer LLaMA-shaped model (RMSNorm, RoPE, SwiGLU, grouped-query attention), ~0.2M parameters.
MODEL = ["--vocab_size=512", "--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--ffn_dim=176",
         "--max_seq_len=128"]
PRETRAIN = ["--seq_len=64", "--batch_size=8", "--lr=3e-3", "--min_lr=3e-4", "--eval_interval=100",
            "--log_interval=50", "--peak_tflops=1"]
FINETUNE = ["--seq_len=24", "--batch_size=16", "--lr=3e-3", "--min_lr=1e-4", "--weight_decay=0",
            "--eval_interval=100", "--eval_batches=4", "--log_interval=50", "--peak_tflops=1"]


def task_record(kind: str, number: str) -> dict:
    answer = number if kind == "Copy" else number[::-1]
    return dict(prompt=f"{kind} {number}:", response=f" {answer}")


def random_numbers(rng, count: int, exclude: set = frozenset()) -> list[str]:
    """Distinct 4-digit numbers (leading zeros allowed), none of them in exclude."""
    found: list[str] = []
    while len(found) < count:
        digits = "".join(str(d) for d in rng.integers(0, 10, 4))
        if digits not in exclude and digits not in found:
            found.append(digits)
    return found


def write_records(path: Path, n_records: int, seed: int = 0) -> set:
    """n_records Copy/Reverse records, one JSON object per line; returns the numbers used."""
    rng = np.random.default_rng(seed)
    numbers = random_numbers(rng, n_records)
    with open(path, "w", encoding="utf-8") as f:
        for i, number in enumerate(numbers):
            f.write(json.dumps(task_record("Copy" if i % 2 == 0 else "Reverse", number)) + "\n")
    return set(numbers)


def pretrain(out: Path, steps: int) -> Path:
    """A tokenizer, token shards and a short pretraining run on 60 kB of the built-in corpus; the run directory."""
    (out / "corpus.txt").write_text(default_corpus_text()[:60_000], encoding="utf-8")
    train_tokenizer([out / "corpus.txt"], 512, out / "tokenizer")
    prepare_data([out / "corpus.txt"], out / "tokenizer", out / "data")
    run = out / "pretrained"
    if train_main([*MODEL, *PRETRAIN, f"--steps={steps}", f"--data={out / 'data'}", f"--out_dir={run}"]) != 0:
        raise SystemExit("pretraining failed")
    return run


def answer(params, cfg, tokenizer, prompts: list[str]) -> list[str]:
    """Greedy answers, each up to the model's EOS (not included), for prompts given the way npllm.generate does."""
    ids = [prompt_ids(tokenizer, p) for p in prompts]  # [eos] + encode(prompt): the layout the records trained on
    outs = generate(params, cfg, ids, 8, SamplingConfig(temperature=0.0), eos_id=tokenizer.eos_id)
    return [tokenizer.decode([t for t in out if t != tokenizer.eos_id]) for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", help="a run or checkpoint directory from npllm.train (default: pretrain one here)")
    parser.add_argument("--out", help="directory for the files (default: a temporary directory, removed at the end)")
    parser.add_argument("--pretrain_steps", type=int, default=150, help="pretraining steps when no --ckpt is given")
    parser.add_argument("--steps", type=int, default=500, help="fine-tuning steps")
    parser.add_argument("--records", type=int, default=500, help="records written to tasks.jsonl")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        if args.ckpt:
            base = Path(args.ckpt)
        else:
            print(f"1. pretraining a tiny model on 60 kB of the default corpus ({args.pretrain_steps} steps)")
            base = pretrain(out, args.pretrain_steps)

        used = write_records(out / "tasks.jsonl", args.records)
        print(f"\n2. fine-tuning on {args.records} records in {out / 'tasks.jsonl'}, for example:")
        for line in (out / "tasks.jsonl").read_text().splitlines()[:2]:
            print("     " + line)
        run = out / "finetuned"
        command = [f"--init_from={base}", f"--sft={out / 'tasks.jsonl'}", f"--out_dir={run}", *FINETUNE,
                   f"--steps={args.steps}"]
        print("   python -m npllm.train " + " ".join(command))
        if train_main(command) != 0:
            raise SystemExit("fine-tuning failed")
        val = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
        print(f"\n   val loss on held-out records (response tokens only): {val[0]:.3f} before -> {val[-1]:.4f} after")

        print("\n3. answers to prompts whose numbers are in no record (greedy):")
        params, cfg, tokenizer = load_trained(run)[:3]
        held_out = random_numbers(np.random.default_rng(1), 20, exclude=used)
        prompts = [task_record(kind, n) for n in held_out for kind in ("Copy", "Reverse")]
        answers = answer(params, cfg, tokenizer, [p["prompt"] for p in prompts])
        for p, a in list(zip(prompts, answers))[:6]:
            verdict = "right" if a == p["response"] else f"expected {p['response']!r}"
            print(f"   {p['prompt']!r:18} -> {a!r:8} ({verdict})")
        for kind in ("Copy", "Reverse"):
            pairs = [(p, a) for p, a in zip(prompts, answers) if p["prompt"].startswith(kind)]
            right = sum(a == p["response"] for p, a in pairs)
            print(f"   {kind}: {right}/{len(pairs)} held-out answers exactly right")
        before, _, _ = load_trained(base)[:3]
        untrained = answer(before, cfg, tokenizer, [prompts[0]["prompt"]])[0]
        print(f"   (the model before fine-tuning answered {prompts[0]['prompt']!r} with {untrained!r})")
        print(f"\ntotal time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
