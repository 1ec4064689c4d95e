"""Data preparation at scale: wall time and peak memory of `prepare_data` on a ~100 MB corpus.

    python benchmarks/bench_prepare.py [--mb 100] [--workers N] [--keep DIR]

The corpus is built in a temp dir from tinyshakespeare (../shared/data, or the default corpus when it is absent),
copied with variations until it holds --mb megabytes: each copy has its paragraphs in another (seeded) order and
some of them upper-cased, and the copies are spread over every input kind prepare reads, in nested folders: a
third as .txt files (one document each), a third as .jsonl (one record per paragraph), a third as .jsonl.gz. A
2048-token BPE is trained on a 1 MB sample, then `prepare_data(corpus folder)` runs in a child process, which
reports its wall time and peak memory three ways:

    parent peak RSS      getrusage(RUSAGE_SELF).ru_maxrss of the process that reads, routes and writes
    largest worker       getrusage(RUSAGE_CHILDREN).ru_maxrss: the largest peak RSS among its worker processes
    tree peak (sampled)  the largest sum of VmRSS over the process and its workers, read from /proc every 20 ms
                         (pages shared between them, like NumPy's code, count once per process: an upper bound)

The target is a parent peak under 300 MB, whatever the corpus size.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def source_text() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")
    from npllm.corpus import default_corpus_text

    return default_corpus_text()


def make_corpus(root: Path, megabytes: float) -> int:
    """Copies of the source text with variations in root/{txt,jsonl,gz}/NN/, about `megabytes` MB. Returns bytes."""
    paragraphs = [p for p in source_text().split("\n\n") if p.strip()]
    written, k = 0, 0
    while written < megabytes * 1e6:
        rng = np.random.default_rng(k)
        order = rng.permutation(len(paragraphs))
        upper = rng.random(len(paragraphs)) < 0.05
        docs = [paragraphs[i].upper() if upper[i] else paragraphs[i] for i in order]
        kind = ("txt", "jsonl", "gz")[k % 3]
        folder = root / kind / f"{k // 30:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "txt":
            path = folder / f"copy{k:03d}.txt"
            path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        else:
            lines = "".join(json.dumps({"text": d, "copy": k}) + "\n" for d in docs).encode()
            path = folder / f"copy{k:03d}.jsonl"
            if kind == "gz":
                path = path.with_name(path.name + ".gz")
                path.write_bytes(gzip.compress(lines, compresslevel=1))
            else:
                path.write_bytes(lines)
        written += sum(len(d.encode()) for d in docs)
        k += 1
    return written


def tree_rss_bytes(pid: int) -> int:
    """VmRSS of pid and its child processes, from /proc (0 where it cannot be read)."""
    total, pids = 0, [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def child(corpus: str, tokenizer: str, out: str, workers: int | None) -> None:
    """Runs in a fresh process: prepare, then print one JSON line of measurements."""
    from npllm.data import prepare_data

    peak, stop = [0], threading.Event()

    def sample():
        while not stop.wait(0.02):
            peak[0] = max(peak[0], tree_rss_bytes(os.getpid()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    meta = prepare_data([corpus], tokenizer, out, workers=workers, progress=False)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    kib = 1024  # ru_maxrss is in KiB on Linux
    print(json.dumps(dict(wall_s=wall, parent_peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
                          worker_peak=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib,
                          tree_peak=peak[0], tokens=meta.train_tokens + meta.val_tokens,
                          text_bytes=meta.train_bytes + meta.val_bytes,
                          documents=meta.train_documents + meta.val_documents, val_documents=meta.val_documents)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=100, help="corpus size in MB of text")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: one per core)")
    parser.add_argument("--keep", default=None, metavar="DIR", help="build in DIR and keep it (default: a temp dir)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        corpus, tokenizer, out, workers = args.child
        return child(corpus, tokenizer, out, None if workers == "auto" else int(workers))

    from npllm.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench_prepare.") as tmp:
        root = Path(args.keep or tmp)
        start = time.perf_counter()
        n_bytes = make_corpus(root / "corpus", args.mb)
        (root / "sample.txt").write_text(source_text()[:1_000_000], encoding="utf-8")
        made = time.perf_counter() - start
        tokenizer = train_tokenizer([root / "sample.txt"], 2048, root / "tokenizer")
        on_disk = sum(p.stat().st_size for p in (root / "corpus").rglob("*") if p.is_file())
        print(f"corpus: {n_bytes / 1e6:.1f} MB of text ({on_disk / 1e6:.1f} MB on disk, .txt/.jsonl/.jsonl.gz) "
              f"built in {made:.1f} s; tokenizer: bpe, vocab {tokenizer.vocab_size}")
        print(f"cores: {len(os.sched_getaffinity(0))}; workers: {args.workers or 'default (one per core)'}")
        result = subprocess.run([sys.executable, __file__, "--child", str(root / "corpus"), str(root / "tokenizer"),
                                 str(root / "data"), str(args.workers or "auto")], cwd=REPO, capture_output=True,
                                text=True)
        if result.returncode != 0:
            sys.exit(result.stderr)
        r = json.loads(result.stdout.strip().splitlines()[-1])
        mb = 1 << 20
        print(f"prepare: {r['wall_s']:.1f} s, {r['text_bytes'] / 1e6 / r['wall_s']:.2f} MB/s of text, "
              f"{r['tokens'] / r['wall_s'] / 1e6:.2f} M tokens/s; {r['tokens']:,} tokens, {r['documents']:,} "
              f"documents ({r['val_documents']:,} val)")
        print(f"memory: parent peak RSS {r['parent_peak'] / mb:.0f} MiB, largest worker {r['worker_peak'] / mb:.0f} "
              f"MiB, process tree peak (sampled sum) {r['tree_peak'] / mb:.0f} MiB")


if __name__ == "__main__":
    main()
