"""The built-in default corpus: CPython's own help text, so `python -m npllm.train` runs with no download.

Every CPython ships `pydoc_data.topics`, the text that `help("assert")` prints: about 80 topics of the
language reference, ~465 KB of English prose and code. The documents are its topics in sorted key order.
The first call of ensure_default_data() trains a tokenizer on it and writes token shards into a cache
directory; later calls find them there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .data import write_dataset
from .files import atomic_write
from .tokenizer import train_tokenizer

DEFAULT_VOCAB_SIZE = 2048  # small enough for the nano model's embedding, large enough for whole common words
# The corpus (~465 KB of text) trains tokenizers up to MAX_VOCAB_SIZE; a model with a larger vocabulary trains on the
# usual DEFAULT_VOCAB_SIZE tokenizer, its other embedding rows and logits being padding (npllm.data.load_token_data).
MAX_VOCAB_SIZE = 8192
VAL_FRACTION = 0.1
# Bumped when the way the cache is built changes, so old cache entries are not reused (2: the split is by documents,
# and meta.json records byte counts).
BUILD_RECIPE = 2


def default_corpus_documents() -> list[str]:
    """The topics of pydoc_data.topics, in sorted key order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise FileNotFoundError("the built-in default corpus needs CPython's pydoc_data module, which this "
                                "Python does not have; pass --data DIR with shards made by "
                                "`python -m npllm.data prepare`") from None
    return [topics[key] for key in sorted(topics)]


def default_corpus_text() -> str:
    """The default corpus as one string: its documents joined by newlines."""
    return "\n".join(default_corpus_documents())


def default_cache_dir() -> Path:
    """$NPLLM_CACHE if set, else ~/.cache/npllm."""
    return Path(os.environ.get("NPLLM_CACHE") or Path.home() / ".cache" / "npllm")


def default_data_dir(model_vocab_size: int, world=None) -> Path:
    """The default corpus's data directory for a model of ``model_vocab_size`` rows, built on first use: its
    tokenizer has the model's vocabulary when the corpus can train one that large, else DEFAULT_VOCAB_SIZE tokens.

    world: under mpirun, world rank 0 builds the data first and the others then find it built.
    """
    vocab = model_vocab_size if model_vocab_size <= MAX_VOCAB_SIZE else DEFAULT_VOCAB_SIZE
    if world is not None and world.size > 1:
        if world.rank == 0:
            ensure_default_data(vocab_size=vocab)
        world.barrier()  # one rank trains the tokenizer; the others wait, then read its cache
    return ensure_default_data(vocab_size=vocab)


def ensure_default_data(vocab_size: int = DEFAULT_VOCAB_SIZE, cache_dir: str | Path | None = None) -> Path:
    """The data directory of the default corpus, built on first use:

        CACHE/default-corpus-v{vocab_size}-{hash}/  corpus.txt, tokenizer/, train.bin, val.bin, meta.json

    hash covers the corpus text (it differs between Python versions) and BUILD_RECIPE.
    """
    text = default_corpus_text()
    key = hashlib.sha256(f"npllm default corpus, recipe {BUILD_RECIPE}\n{text}".encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"default-corpus-v{vocab_size}-{key}"
    if not (target / "meta.json").is_file():
        build_default_data(target, vocab_size)
    return target


def build_default_data(target: Path, vocab_size: int) -> None:
    """Build the default data directory at `target`, safely when several processes race to do it.

    Each process builds in its own temporary directory beside `target` and renames it to `target`. A rename
    onto an existing non-empty directory fails, so the first process to finish wins and the others use its
    result and delete their own.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(target)
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.building.{os.getpid()}.", dir=target.parent))
    try:
        text = default_corpus_text()
        atomic_write(build / "corpus.txt", text)
        tokenizer = train_tokenizer([build / "corpus.txt"], vocab_size, build / "tokenizer")
        write_dataset(default_corpus_documents(), tokenizer, build, VAL_FRACTION,
                      sources=["pydoc_data.topics (CPython)"])
        try:
            os.rename(build, target)
        except OSError:
            if not (target / "meta.json").is_file():  # not another process's finished build: a real error
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone already when our rename succeeded


def remove_dead_builds(target: Path) -> None:
    """Delete the build directories of ``target`` that a killed process left: ``.NAME.building.PID.*`` whose PID is
    no longer running on this machine (a live one may be building right now, and is left alone)."""
    for entry in target.parent.glob(f".{target.name}.building.*"):
        pid = entry.name[len(f".{target.name}.building."):].split(".")[0]
        if not pid.isdigit():
            continue  # not one of ours (or from before builds carried their pid): leave it
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass  # alive, and another user's

