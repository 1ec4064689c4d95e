"""Tests for npllm/data.py (shards, sampler, eval batches) and npllm/corpus.py (the cached default corpus)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npllm.corpus as corpus
import npllm.data as data
from npllm.data import (HEADER_BYTES, BatchSampler, encode_documents, eval_batches, load_tokens, prepare_data,
                        read_header, write_tokens)
from npllm.run import read_data_meta
from npllm.tokenizer import Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """Three documents of the default corpus, one per file."""
    folder = tmp_path_factory.mktemp("text")
    paths = []
    for i, doc in enumerate(corpus.default_corpus_documents()[:3]):
        paths.append(folder / f"doc{i}.txt")
        paths[-1].write_text(doc, encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(corpus.default_corpus_text()[:100_000], encoding="utf-8")
    return train_tokenizer([path], 512, tmp_path_factory.mktemp("tok"))


# ---- shard files ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_size, dtype", [(512, np.uint16), (65536, np.uint16), (65537, np.uint32),
                                               (70_000, np.uint32)])
def test_shard_roundtrip(tmp_path, vocab_size, dtype):
    tokens = np.random.default_rng(0).integers(0, vocab_size, size=1000)
    tokens[:2] = [0, vocab_size - 1]  # both ends of the id range
    write_tokens(tmp_path / "t.bin", tokens, vocab_size)
    header = read_header(tmp_path / "t.bin")
    assert (header.version, header.dtype, header.count, header.vocab_size) == (1, np.dtype(dtype), 1000, vocab_size)
    assert (tmp_path / "t.bin").stat().st_size == HEADER_BYTES + 1000 * np.dtype(dtype).itemsize
    loaded = load_tokens(tmp_path / "t.bin")
    assert isinstance(loaded, np.memmap) and loaded.dtype == dtype
    np.testing.assert_array_equal(loaded, tokens)
    with pytest.raises(ValueError):  # read-only
        loaded[0] = 1


def test_shard_header_bytes(tmp_path):
    write_tokens(tmp_path / "t.bin", [7, 8, 9], 300)
    raw = (tmp_path / "t.bin").read_bytes()
    assert raw[:8] == b"NPLLMTOK"
    assert np.frombuffer(raw[8:16], "<u4").tolist() == [1, 2]  # version, bytes per token
    assert np.frombuffer(raw[16:24], "<u8").tolist() == [3]  # token count
    assert np.frombuffer(raw[24:28], "<u4").tolist() == [300]  # vocab size
    assert raw[28:64] == bytes(36)
    assert np.frombuffer(raw[64:], "<u2").tolist() == [7, 8, 9]


@pytest.mark.parametrize("tokens, vocab_size, match", [([], 10, "non-empty"), ([[1, 2]], 10, "1-D"),
                                                       ([1.5], 10, "integer"), ([3, 10], 10, r"in \[0, 10\)"),
                                                       ([-1], 10, r"in \[0, 10\)"), ([1], 0, "vocab_size")])
def test_write_tokens_rejects_bad_input(tmp_path, tokens, vocab_size, match):
    with pytest.raises(ValueError, match=match):
        write_tokens(tmp_path / "t.bin", np.array(tokens), vocab_size)
    assert not list(tmp_path.iterdir())


def _corrupt(path, raw):
    path.write_bytes(raw)
    return path


def test_load_tokens_errors(tmp_path):
    write_tokens(tmp_path / "good.bin", np.arange(100), 512)
    good = (tmp_path / "good.bin").read_bytes()
    cases = [
        ("truncated or corrupt", good[:-1]),
        ("truncated or corrupt", good + b"\0\0"),  # longer than the header says
        ("is not a token shard: it starts with", b"NOTTOKEN" + good[8:]),
        ("shorter than the 64-byte header", good[:40]),
        ("format version 2", good[:8] + np.array([2], "<u4").tobytes() + good[12:]),
        ("token size 3 bytes", good[:12] + np.array([3], "<u4").tobytes() + good[16:]),
        ("empty token shard", good[:16] + np.array([0], "<u8").tobytes() + good[24:64]),
    ]
    for match, raw in cases:
        with pytest.raises(ValueError, match=match):
            load_tokens(_corrupt(tmp_path / "bad.bin", raw))
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_tokens(tmp_path / "missing.bin")


# ---- tokenizing text into shards -----------------------------------------------------------------------------

def test_encode_documents_separates_with_eos(tok):
    docs = ["first document\nline two\n", "second: ünïcode", ""]
    expected = tok.encode(docs[0], eos=True) + tok.encode(docs[1], eos=True) + [tok.eos_id]
    assert encode_documents(docs, tok).tolist() == expected


def test_encoding_in_chunks_matches_whole_text(tok, monkeypatch):
    doc = corpus.default_corpus_documents()[0]
    whole = tok.encode(doc, eos=True)
    for chunk_chars in (1, 7, 100):
        monkeypatch.setattr(data, "ENCODE_CHUNK_CHARS", chunk_chars)
        assert encode_documents([doc], tok).tolist() == whole


def test_prepare_data(text_files, tok, tmp_path):
    meta = prepare_data(text_files, tok.model_path.parent, tmp_path, val_fraction=0.2)
    stream = encode_documents([p.read_text() for p in text_files], tok)
    n_val = int(len(stream) * 0.2)
    train, val = load_tokens(tmp_path / "train.bin"), load_tokens(tmp_path / "val.bin")
    assert (len(train), len(val)) == (len(stream) - n_val, n_val)
    np.testing.assert_array_equal(np.concatenate([train, val]), stream)  # val is the end of the stream
    assert stream[-1] == tok.eos_id
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk == meta.to_json() and read_data_meta(tmp_path) == meta
    assert (meta.vocab_size, meta.tokenizer_fingerprint, meta.dtype) == (512, tok.fingerprint, "uint16")
    assert (meta.train_tokens, meta.val_tokens) == (len(train), len(val))
    assert Tokenizer.load(read_data_meta(tmp_path).tokenizer_path(tmp_path)).fingerprint == tok.fingerprint


def test_prepare_data_errors(text_files, tok, tmp_path):
    with pytest.raises(ValueError, match="val_fraction must be in"):
        prepare_data(text_files, tok.model_path.parent, tmp_path, val_fraction=1.0)
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(ValueError, match="too few to split"):
        prepare_data([tmp_path / "tiny.txt"], tok.model_path.parent, tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        prepare_data(text_files, tmp_path / "no_tokenizer", tmp_path)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        read_data_meta(tmp_path / "nothing")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "npllm.data", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_prepare(text_files, tok, tmp_path):
    result = run_cli("prepare", "--input", *text_files, "--tokenizer", tok.model_path.parent, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    meta = read_data_meta(tmp_path)
    assert len(load_tokens(tmp_path / "val.bin")) == meta.val_tokens > 0


def test_cli_missing_input_is_one_line_error(tok, tmp_path):
    result = run_cli("prepare", "--input", tmp_path / "missing.txt", "--tokenizer", tok.model_path.parent,
                     "--out", tmp_path / "out")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"error: input file not found: {tmp_path / 'missing.txt'}"]
    assert not (tmp_path / "out").exists()


# ---- batch sampler -------------------------------------------------------------------------------------------
# With tokens = arange(N) every token is its own position, so a row of x is arange(start, start + T).

def test_batches_are_windows_and_y_is_x_shifted():
    sampler = BatchSampler(np.arange(1000, dtype=np.uint16), batch_size=8, seq_len=16, seed=0)
    for _ in range(5):
        x, y = sampler.next()
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int64
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(16))  # contiguous windows
        np.testing.assert_array_equal(y, x + 1)  # y[:, t] is the token after x[:, t]
        assert len(set(x[:, 0].tolist())) == 8  # no window twice in one batch


def test_sampler_is_deterministic_in_seed_and_step():
    tokens = np.arange(5000)
    a, b = BatchSampler(tokens, 4, 32, seed=3), BatchSampler(tokens, 4, 32, seed=3)
    for step in range(5):
        np.testing.assert_array_equal(a.next()[0], b.sample(step)[0])
    assert not np.array_equal(a.sample(0)[0], BatchSampler(tokens, 4, 32, seed=4).sample(0)[0])
    assert not np.array_equal(a.sample(0)[0], a.sample(1)[0])


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_never_share_a_window_in_a_step(world_size):
    tokens, B, T = np.arange(600), 8, 20
    samplers = [BatchSampler(tokens, B, T, seed=11, rank=r, world_size=world_size) for r in range(world_size)]
    for step in range(200):
        starts = np.concatenate([s.sample(step)[0][:, 0] for s in samplers])  # (world_size * B,)
        assert len(set(starts.tolist())) == world_size * B


def test_every_window_can_be_drawn_including_the_last():
    N, T = 50, 10  # windows start at 0 .. N - T - 1 = 39
    sampler = BatchSampler(np.arange(N), batch_size=40, seq_len=T, seed=0)  # all 40 windows, each step
    x, y = sampler.next()
    assert sorted(x[:, 0].tolist()) == list(range(N - T))
    assert y.max() == N - 1


def test_state_dict_resumes_the_same_batches():
    tokens = np.arange(3000)
    sampler = BatchSampler(tokens, 4, 16, seed=5, rank=1, world_size=2)
    for _ in range(3):
        sampler.next()
    state = json.loads(json.dumps(sampler.state_dict()))  # JSON-serialisable
    assert state == dict(seed=5, step=3, rank=1, world_size=2, batch_size=4, seq_len=16)
    expected = [sampler.next() for _ in range(3)]
    resumed = BatchSampler(tokens, 4, 16, seed=0, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = resumed.next()
        np.testing.assert_array_equal(rx, x)
        np.testing.assert_array_equal(ry, y)


def test_load_state_dict_rejects_a_different_shape():
    state = BatchSampler(np.arange(3000), 4, 16, seed=5).state_dict()
    with pytest.raises(ValueError, match="batch_size=4 but this sampler has batch_size=8"):
        BatchSampler(np.arange(3000), 8, 16, seed=5).load_state_dict(state)


@pytest.mark.parametrize("n_tokens, kwargs, match", [
    (16, dict(batch_size=1, seq_len=16), "needs at least 17"),
    (17, dict(batch_size=2, seq_len=16), "only 1 windows"),
    (100, dict(batch_size=30, seq_len=10, rank=1, world_size=4), "120 distinct windows"),
    (100, dict(batch_size=0, seq_len=10), "batch_size=0 is not allowed; use a positive integer"),
    (100, dict(batch_size=2, seq_len=10, rank=2, world_size=2),
     r"rank=2 is not allowed; use an integer in \[0, world_size=2\)"),
    (100, dict(batch_size=2, seq_len=10, seed=-1), "seed=-1 is not allowed"),
])
def test_sampler_errors(n_tokens, kwargs, match):
    kwargs = dict(dict(seed=0), **kwargs)
    with pytest.raises(ValueError, match=match):
        BatchSampler(np.arange(n_tokens), **kwargs)


def test_smallest_data_gives_its_one_window():
    x, y = BatchSampler(np.arange(17), batch_size=1, seq_len=16, seed=0).next()
    assert x.tolist() == [list(range(16))] and y.tolist() == [list(range(1, 17))]


# ---- evaluation batches --------------------------------------------------------------------------------------

def test_eval_batches_tile_the_stream():
    N, B, T = 1000, 4, 30  # (N - 1) // T = 33 rows: 8 batches of 4 and one of 1
    batches = list(eval_batches(np.arange(N, dtype=np.uint16), B, T))
    assert [len(x) for x, _ in batches] == [4] * 8 + [1]
    x = np.concatenate([x for x, _ in batches])
    y = np.concatenate([y for _, y in batches])
    assert x.dtype == np.int64
    np.testing.assert_array_equal(x.ravel(), np.arange(33 * T))  # no overlap, no gap
    np.testing.assert_array_equal(y, x + 1)
    assert len(list(eval_batches(np.arange(N), B, T, max_batches=3))) == 3
    with pytest.raises(ValueError, match="needs at least 31"):
        next(eval_batches(np.arange(30), B, T))


# ---- default corpus ------------------------------------------------------------------------------------------

def test_default_corpus_text():
    docs = corpus.default_corpus_documents()
    from pydoc_data.topics import topics
    assert docs == [topics[k] for k in sorted(topics)]
    assert corpus.default_corpus_text() == "\n".join(docs)
    assert len(corpus.default_corpus_text()) > 100_000


def test_default_data_builds_once_then_is_cached(tmp_path, monkeypatch):
    data_dir = corpus.ensure_default_data(vocab_size=512, cache_dir=tmp_path)
    assert data_dir.parent == tmp_path and "v512" in data_dir.name
    meta = read_data_meta(data_dir)
    tok = Tokenizer.load(meta.tokenizer_path(data_dir))
    assert meta.tokenizer_path(data_dir) == (data_dir / "tokenizer").resolve()
    assert tok.vocab_size == meta.vocab_size == 512 and tok.fingerprint == meta.tokenizer_fingerprint
    train = load_tokens(data_dir / "train.bin")
    assert len(train) == meta.train_tokens > 50_000
    assert tok.decode(train[:200]) in corpus.default_corpus_text()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached default data was rebuilt")

    monkeypatch.setattr(corpus, "train_tokenizer", no_training)
    assert corpus.ensure_default_data(vocab_size=512, cache_dir=tmp_path) == data_dir
    monkeypatch.setenv("NPLLM_CACHE", str(tmp_path))
    assert corpus.ensure_default_data(vocab_size=512) == data_dir


def test_losing_a_build_race_keeps_the_winner(tmp_path):
    data_dir = corpus.ensure_default_data(vocab_size=400, cache_dir=tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    corpus.build_default_data(data_dir, 400)  # a second process finishing after the first
    assert {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == [data_dir.name]  # its temp build dir was removed


def test_concurrent_first_use_from_two_processes(tmp_path):
    code = "from npllm.corpus import ensure_default_data; print(ensure_default_data(vocab_size=600))"
    env = dict(__import__("os").environ, NPLLM_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1 and [p.name for p in tmp_path.iterdir()] == [Path(paths.pop()).name]
    data_dir = next(tmp_path.iterdir())
    assert len(load_tokens(data_dir / "val.bin")) == read_data_meta(data_dir).val_tokens


def test_missing_pydoc_data_says_to_pass_data(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # makes the import fail
    with pytest.raises(FileNotFoundError, match="pass --data"):
        corpus.ensure_default_data(cache_dir=tmp_path)
