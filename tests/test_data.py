"""Tests for npllm/data.py (shards, preparation, sampler, eval batches) and npllm/corpus.py (the default corpus)."""

import gzip
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import npllm.corpus as corpus
import npllm.data as data
from npllm.data import (HEADER_BYTES, BatchSampler, encode_documents, eval_batches, load_tokens, prepare_data,
                        read_header, val_score, write_tokens)
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


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    path = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    if path.is_file():
        return path
    path = tmp_path_factory.mktemp("text") / "text.txt"  # a checkout without ../shared: the default corpus
    path.write_text(corpus.default_corpus_text() * 3, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(corpus.default_corpus_text(), encoding="utf-8")
    return train_tokenizer([path], None, tmp_path_factory.mktemp("char"), kind="char")


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


def test_encoding_in_chunks_matches_whole_text(tok, char_tok, monkeypatch):
    doc = corpus.default_corpus_documents()[0]
    for t in (tok, char_tok):
        whole = t.encode(doc, eos=True)
        for chunk_chars in (1, 7, 100):
            monkeypatch.setattr(data, "ENCODE_CHUNK_CHARS", chunk_chars)
            assert encode_documents([doc], t).tolist() == whole


def expected_split(docs, tok, val_fraction):
    """The rule of npllm/data.py written out: (train tokens, val tokens, train bytes, val bytes, docs per split)."""
    in_val = [val_score(i) < val_fraction for i in range(len(docs))]
    if not any(in_val):
        in_val[min(range(len(docs)), key=val_score)] = True
    if all(in_val):
        in_val[max(range(len(docs)), key=val_score)] = False
    out = {}
    for split in (False, True):
        chosen = [d for d, v in zip(docs, in_val) if v == split]
        out[split] = (sum((tok.encode(d, eos=True) for d in chosen), []),
                      sum(len(d.encode()) + 1 for d in chosen), len(chosen))
    return out


def check_split(out_dir, meta, docs, tok, val_fraction):
    expected = expected_split(docs, tok, val_fraction)
    train, val = load_tokens(out_dir / "train.bin"), load_tokens(out_dir / "val.bin")
    assert train.tolist() == expected[False][0] and val.tolist() == expected[True][0]
    assert (meta.train_tokens, meta.val_tokens) == (len(train), len(val))
    assert (meta.train_bytes, meta.val_bytes) == (expected[False][1], expected[True][1])
    assert (meta.train_documents, meta.val_documents) == (expected[False][2], expected[True][2])
    assert meta.split == "documents"


def write_docs(folder: Path, docs, per_file: int) -> list[Path]:
    """The documents as .jsonl files of per_file records each."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(0, len(docs), per_file):
        paths.append(folder / f"part{k // per_file:03d}.jsonl")
        paths[-1].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[k:k + per_file]))
    return paths


@pytest.fixture(scope="module")
def many_docs():
    """~200 documents: the default corpus's topics cut into paragraphs."""
    docs = [p for topic in corpus.default_corpus_documents()[:30] for p in topic.split("\n\n") if p.strip()]
    return docs[:200]


def test_prepare_data(text_files, tok, tmp_path):
    meta = prepare_data(text_files, tok.model_path.parent, tmp_path, val_fraction=0.2)
    check_split(tmp_path, meta, [p.read_text() for p in text_files], tok, 0.2)
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk == meta.to_json() and read_data_meta(tmp_path) == meta
    assert (meta.vocab_size, meta.tokenizer_fingerprint, meta.dtype) == (512, tok.fingerprint, "uint16")
    assert meta.train_bytes + meta.val_bytes == sum(p.stat().st_size + 1 for p in text_files)
    assert Tokenizer.load(read_data_meta(tmp_path).tokenizer_path(tmp_path)).fingerprint == tok.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # no temp files


def test_val_is_drawn_across_the_files_and_is_deterministic(many_docs, tok, tmp_path):
    paths = write_docs(tmp_path / "in", many_docs, per_file=20)  # 10 files
    meta = prepare_data(paths, tok.directory, tmp_path / "a", val_fraction=0.1, workers=1)
    check_split(tmp_path / "a", meta, many_docs, tok, 0.1)
    val_files = {i // 20 for i in range(len(many_docs)) if val_score(i) < 0.1}
    assert len(val_files) >= 5  # not the last file(s)
    assert 0.04 < meta.val_documents / len(many_docs) < 0.2
    prepare_data(paths, tok.directory, tmp_path / "b", val_fraction=0.1, workers=2)  # a pool of two workers
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_pool_with_small_batches_gives_the_same_shards(many_docs, tok, tmp_path, monkeypatch):
    paths = write_docs(tmp_path / "in", many_docs, per_file=50)
    prepare_data(paths, tok.directory, tmp_path / "a", workers=1)
    monkeypatch.setattr(data, "BATCH_CHARS", 500)  # many batches, several in flight
    monkeypatch.setattr(data, "ENCODE_CHUNK_CHARS", 300)
    prepare_data(paths, tok.directory, tmp_path / "b", workers=2)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_a_folder_reads_every_kind_of_file_recursively(many_docs, tok, tmp_path):
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    docs = many_docs[:12]
    (root / "a.txt").write_text(docs[0])
    with gzip.open(root / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(docs[1])
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n\n" for d in docs[2:5]))  # blank lines
    with gzip.open(root / "sub" / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[5:9]))
    (root / "sub" / "deeper" / "e.txt").write_text(docs[9])
    (root / "sub" / "notes.md").write_text("not read: a folder takes .txt, .jsonl and their .gz")
    (root / ".hidden" / "x.txt").write_text("not read: hidden")
    (root / ".y.txt").write_text("not read: hidden")
    meta = prepare_data([root], tok.directory, tmp_path / "out", val_fraction=0.3)
    check_split(tmp_path / "out", meta, docs[:10], tok, 0.3)
    assert meta.sources == [str(root)]


def test_globs_and_repeated_files(many_docs, tok, tmp_path):
    paths = write_docs(tmp_path / "in", many_docs[:40], per_file=10)
    (tmp_path / "in" / "skip.txt").write_text("a .txt the pattern does not match")
    meta = prepare_data([str(tmp_path / "in" / "*.jsonl"), paths[0]], tok.directory, tmp_path / "out")
    check_split(tmp_path / "out", meta, many_docs[:40], tok, 0.1)  # paths[0] is read once
    meta = prepare_data([str(tmp_path / "**" / "part00[12].jsonl")], tok.directory, tmp_path / "out2")
    check_split(tmp_path / "out2", meta, many_docs[10:30], tok, 0.1)
    with pytest.raises(FileNotFoundError, match=r"no files match the input pattern .*\*\.nothing"):
        prepare_data([str(tmp_path / "*.nothing")], tok.directory, tmp_path / "out3")


def test_gz_reads_as_the_text_it_holds(text_files, tok, tmp_path):
    gz = []
    for p in text_files:
        gz.append(tmp_path / (p.name + ".gz"))
        gz[-1].write_bytes(gzip.compress(p.read_bytes()))
    a = prepare_data(text_files, tok.directory, tmp_path / "a")
    b = prepare_data(gz, tok.directory, tmp_path / "b")
    assert (a.train_bytes, a.val_bytes) == (b.train_bytes, b.val_bytes)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_jsonl_field(tok, tmp_path):
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"body": f"record {i}\n" * 20, "text": 1}) + "\n"
                                              for i in range(30)))
    meta = prepare_data([tmp_path / "r.jsonl"], tok.directory, tmp_path / "out", field="body")
    check_split(tmp_path / "out", meta, [f"record {i}\n" * 20 for i in range(30)], tok, 0.1)


@pytest.mark.parametrize("line, match", [
    ('{"title": "x", "body": "y"}', r"r.jsonl line 3 has no 'text' field \(its fields: 'title', 'body'\); "
                                    r"pass --field=NAME"),
    ('{"text": 5}', r"r.jsonl line 3: field 'text' is a JSON int, not a string"),
    ('["text"]', r"r.jsonl line 3 is a JSON list; each line must be an object with a 'text' field"),
    ('{"text": "unterminated', r"r.jsonl line 3 is not valid JSON"),
])
def test_a_bad_jsonl_record_names_the_file_and_line(tok, tmp_path, line, match):
    (tmp_path / "r.jsonl").write_text('{"text": "fine"}\n\n' + line + "\n")
    write_tokens(tmp_path / "out" / "train.bin" if (tmp_path / "out").mkdir() is None else None, [1, 2, 3], 512)
    with pytest.raises(ValueError, match=match):
        prepare_data([tmp_path / "r.jsonl"], tok.directory, tmp_path / "out")
    # the old shard is untouched and no temp file is left
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.bin"]
    assert load_tokens(tmp_path / "out" / "train.bin").tolist() == [1, 2, 3]


def test_one_document_is_split_by_tokens(tok, shakespeare, tmp_path):
    text = shakespeare.read_text(encoding="utf-8")[:50_000]  # ASCII
    (tmp_path / "one.txt").write_text(text)
    meta = prepare_data([tmp_path / "one.txt"], tok.directory, tmp_path / "out", val_fraction=0.1)
    stream = tok.encode(text, eos=True)
    n_val = int(len(stream) * 0.1)
    train, val = load_tokens(tmp_path / "out" / "train.bin"), load_tokens(tmp_path / "out" / "val.bin")
    assert train.tolist() == stream[:-n_val] and val.tolist() == stream[-n_val:]  # the last tokens, as before
    assert meta.split == "tokens" and (meta.train_documents, meta.val_documents) == (1, 0)
    assert meta.val_bytes == len(tok.decode(val).encode()) + 1  # + the EOS
    assert meta.train_bytes == len(text.encode()) + 1 - meta.val_bytes


@pytest.mark.parametrize("val_fraction", [1e-9, 1 - 1e-9])
def test_each_split_gets_a_document(many_docs, tok, tmp_path, val_fraction):
    docs = many_docs[:5]
    meta = prepare_data(write_docs(tmp_path / "in", docs, 2), tok.directory, tmp_path / "out", val_fraction)
    check_split(tmp_path / "out", meta, docs, tok, val_fraction)
    assert (meta.train_documents, meta.val_documents) == ((4, 1) if val_fraction < 0.5 else (1, 4))


def test_bits_per_byte_counts(tok, char_tok, many_docs, tmp_path):
    paths = write_docs(tmp_path / "in", many_docs[:50] + ["日本語 ünïcode 🙂"], 10)
    for t in (tok, char_tok):
        meta = prepare_data(paths, t.directory, tmp_path / t.kind)
        docs = many_docs[:50] + ["日本語 ünïcode 🙂"]
        assert meta.train_bytes + meta.val_bytes == sum(len(d.encode()) + 1 for d in docs)
        val = load_tokens(tmp_path / t.kind / "val.bin")
        val_docs = t.decode(val).encode() if t.kind == "bpe" else None
        if val_docs is not None:  # eos decodes to nothing: the val text's bytes + one per document
            assert meta.val_bytes == len(val_docs) + meta.val_documents


def test_preparing_holds_only_a_piece_of_the_stream(char_tok, shakespeare, tmp_path, monkeypatch):
    """The writer never holds the whole stream: the peak of Python allocations while preparing 4 MB of text is far
    below the stream's size (tokens * itemsize)."""
    (tmp_path / "big.txt").write_text(shakespeare.read_text(encoding="utf-8")[:1_000_000] * 4)
    monkeypatch.setattr(data, "ENCODE_CHUNK_CHARS", 1 << 16)
    monkeypatch.setattr(data, "BATCH_CHARS", 1 << 16)
    monkeypatch.setattr(data, "COPY_TOKENS", 1 << 16)
    prepare_data([shakespeare], char_tok.directory, tmp_path / "warm", workers=1)  # imports what it imports
    tracemalloc.start()
    try:
        meta = prepare_data([tmp_path / "big.txt"], char_tok.directory, tmp_path / "out", workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stream_bytes = (meta.train_tokens + meta.val_tokens) * 2
    assert stream_bytes >= 8_000_002  # 4M characters and an EOS (escapes add a few)
    assert peak < stream_bytes / 4, f"peak {peak} bytes"
    print(f"tracemalloc peak {peak} bytes for a stream of {stream_bytes} bytes")


def test_shard_writer_moves_and_removes(tmp_path):
    a, b = data.ShardWriter(tmp_path / "a.bin", 300), data.ShardWriter(tmp_path / "b.bin", 300)
    a.write(np.arange(100))
    b.write([7])
    data._move(a, b, 10, 30)
    a.commit()
    b.commit()
    assert load_tokens(tmp_path / "a.bin").tolist() == list(range(10)) + list(range(30, 100))
    assert load_tokens(tmp_path / "b.bin").tolist() == [7] + list(range(10, 30))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


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
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"input folder .*empty holds no text files; .* \.txt, \.jsonl"):
        prepare_data([tmp_path / "empty"], tok.directory, tmp_path / "out")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"the inputs hold no documents \(only empty or blank .jsonl files\)"):
        prepare_data([tmp_path / "e.jsonl"], tok.directory, tmp_path / "out")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        prepare_data([tmp_path / "latin1.txt"], tok.directory, tmp_path / "out")
    (tmp_path / "fake.txt.gz").write_text("not gzip")
    with pytest.raises(ValueError, match="fake.txt.gz cannot be read"):
        prepare_data([tmp_path / "fake.txt.gz"], tok.directory, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir())  # nothing half-written


def test_data_meta_of_older_data_reads_without_byte_counts(text_files, tok, tmp_path):
    prepare_data(text_files, tok.directory, tmp_path)
    record = json.loads((tmp_path / "meta.json").read_text())
    for key in ("train_bytes", "val_bytes", "train_documents", "val_documents", "split"):
        del record[key]
    (tmp_path / "meta.json").write_text(json.dumps(record))
    assert read_data_meta(tmp_path).val_bytes is None
    record["split"] = "lines"
    (tmp_path / "meta.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"field split is \"lines\"; expected \"documents\" or \"tokens\""):
        read_data_meta(tmp_path)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "npllm.data", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_prepare(text_files, tok, tmp_path):
    result = run_cli("prepare", "--input", *text_files, "--tokenizer", tok.model_path.parent, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 and result.stderr == ""  # no progress bar off a terminal
    meta = read_data_meta(tmp_path)
    assert len(load_tokens(tmp_path / "val.bin")) == meta.val_tokens > 0


def test_cli_prepare_a_folder_of_jsonl_with_a_field(many_docs, tok, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in many_docs[:20]))
    result = run_cli("prepare", "--input", tmp_path / "in", "--field=content", "--workers=2",
                     "--tokenizer", tok.directory, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert read_data_meta(tmp_path / "out").train_documents + read_data_meta(tmp_path / "out").val_documents == 20


def test_cli_missing_input_is_one_line_error(tok, tmp_path):
    result = run_cli("prepare", "--input", tmp_path / "missing.txt", "--tokenizer", tok.model_path.parent,
                     "--out", tmp_path / "out")
    assert result.returncode != 0
    missing = tmp_path / "missing.txt"
    assert result.stderr.strip().splitlines() == [f"npllm.data: error: input not found: {missing} (pass text or .jsonl "
                                                  f"files, folders or glob patterns)"]
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
